"""Auth endpoints: register, login, validate, profile — each one call to the AuthService."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar, cast

from handlers import responses
from handlers.base import ApiError, BaseHandler, requires
from handlers.openapi import operation
from stox.auth.client import AuthCallError, AuthClient
from stox.schemas import login_schema, register_schema, token_schema

T = TypeVar("T")

# (code, message) of each HTTP status a failed call becomes; the service's own words only
# for bad input, which names the field
_ERRORS = {
    409: ("already_exists", "that user name is taken"),
    401: ("invalid_token", "the token is invalid or has expired"),
    404: ("not_found", "no such user"),
    503: ("auth_unavailable", "the auth service is unavailable; try again shortly"),
    502: ("auth_failed", "the auth service failed"),
}
_BUSY = ("auth_busy", "too many registrations at once; try again shortly")


class AuthHandler(BaseHandler):
    @property
    def auth(self) -> AuthClient:
        return cast(AuthClient, self.settings["auth"])

    @property
    def address(self) -> str:
        """The client's address, which the attempt limits count by."""
        return self.request.remote_ip or ""

    async def call(self, call: Awaitable[T], unauthenticated: tuple[str, str] | None = None) -> T:
        """The call's result; its failure as the ApiError of the fixed status mapping (a limit
        reached, TooManyAttempts, is a domain error: 429 with Retry-After)."""
        try:
            return await call
        except AuthCallError as exc:
            status = exc.http_status
            if status == 400:
                code, message = "invalid_input", exc.details
            elif status == 401 and unauthenticated:
                code, message = unauthenticated
            else:
                code, message = _BUSY if exc.busy else _ERRORS[status]
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            raise ApiError(status, code, message, headers=headers) from None


class RegisterHandler(AuthHandler):
    @operation(
        "Register a user",
        body=register_schema,
        answers={201: ("the new user's profile", responses.ProfileSchema())},
        errors={
            409: "`already_exists`: the name is taken",
            429: "`too_many_attempts` from this address, with `Retry-After`",
            503: "`auth_unavailable`, or `auth_busy`, with `Retry-After`",
            502: "`auth_failed`",
        },
    )
    async def post(self) -> None:
        body = self.load(register_schema, self.json_body())
        register = self.auth.register(body["username"], body["password"], self.address)
        self.write_json(201, await self.call(register))


class LoginHandler(AuthHandler):
    @operation(
        "Sign in: a user token",
        body=login_schema,
        answers={200: ("a bearer token", responses.LoginAnswerSchema())},
        errors={
            401: "`invalid_credentials`: wrong name or password (the same for both)",
            429: "`too_many_attempts`, with `Retry-After`",
            503: "`auth_unavailable`, or `auth_busy`, with `Retry-After`",
            502: "`auth_failed`",
        },
    )
    async def post(self) -> None:
        body = self.load(login_schema, self.json_body())
        login = self.auth.login(body["username"], body["password"], self.address)
        self.write_json(
            200, await self.call(login, ("invalid_credentials", "wrong user name or password"))
        )


class ValidateHandler(AuthHandler):
    @operation(
        "Who a token speaks for",
        body=token_schema,
        answers={200: ("the token is valid", responses.ValidateAnswerSchema())},
        errors={
            401: "`invalid_token`",
            503: "`auth_unavailable`, or `auth_busy`, with `Retry-After`",
            502: "`auth_failed`",
        },
    )
    async def post(self) -> None:
        token = self.load(token_schema, self.json_body())["token"]
        reply = await self.call(self.auth.validate(token))
        self.write_json(
            200, {"valid": True, "user": reply["user"], "expires_at": reply["expires_at"]}
        )


class ProfileHandler(AuthHandler):
    @operation(
        "The token's user's profile",
        answers={200: ("the profile (never the hash)", responses.ProfileSchema())},
        errors={
            404: "`not_found`: the token's user is not a registered one",
            503: "`auth_unavailable`, or `auth_busy`, with `Retry-After`",
            502: "`auth_failed`",
        },
    )
    @requires("user")
    async def get(self) -> None:
        self.write_json(200, await self.call(self.auth.profile(self.bearer_token)))


routes = [
    (r"/api/v1/auth/register", RegisterHandler),
    (r"/api/v1/auth/login", LoginHandler),
    (r"/api/v1/auth/validate", ValidateHandler),
    (r"/api/v1/auth/profile", ProfileHandler),
]
