"""The handlers' bases: bounded request bodies, one error shape, bearer-token users.

Every handler reads its request body through `BoundedBody`. API errors leave as
`{"error": {"code", "message", "fields"?}}`; unexpected exceptions become a 500 that reveals
nothing of the internals (and are logged with the request id). Handlers let the domain's
errors propagate: `DOMAIN_ERRORS` is the one place they become HTTP answers.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
from asyncio import Future
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from types import TracebackType
from typing import Any, TypeVar, cast

import tornado.web
from marshmallow import Schema, ValidationError
from tornado.http1connection import HTTP1Connection

from stox.auth import bearer
from stox.auth.limits import TooManyAttempts
from stox.auth.tokens import (
    ADMIN,
    REVIEWER,
    SERVICE,
    USER,
    InvalidToken,
    Principal,
    TokenAuthority,
)
from stox.codec import dumps
from stox.ids import random16
from stox.logs import bind, log_exception
from stox.orchestrator import (
    CallbackRefused,
    Contention,
    KeyReused,
    NotFound,
    Orchestrator,
    UnknownPipeline,
)
from stox.schemas import nested_beyond
from stox.store import StoreError
from stox.workflow import NotAllowed, StaleReport

log = logging.getLogger("stox.http")

IDEMPOTENCY_KEY = "Idempotency-Key"  # the upload's header (handlers/workflow.py)

F = TypeVar("F", bound=Callable[..., Awaitable[None]])

# which token roles each declared audience admits
_ADMITS = {USER: {USER, ADMIN, REVIEWER}, ADMIN: {ADMIN}, SERVICE: {SERVICE}}


class ApiError(tornado.web.HTTPError):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, reason=HTTPStatus(status).phrase)
        self.code = code
        self.message = message
        self.fields = fields
        self.headers = headers or {}


def write_json_error(handler: tornado.web.RequestHandler, error: ApiError) -> Future[None]:
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.fields:
        body["fields"] = error.fields
    for name, value in error.headers.items():
        handler.set_header(name, value)
    handler.set_header("Content-Type", "application/json")
    # the standard library: marshmallow's messages may have whole-number keys (list indexes)
    return handler.finish(json.dumps({"error": body}, separators=(",", ":")))


def status_error(status: int, message: str | None = None) -> ApiError:
    """An error with no code of its own: the status's phrase is its code (`method_not_allowed`)."""
    phrase = HTTPStatus(status).phrase
    return ApiError(status, phrase.lower().replace(" ", "_"), message or phrase)


def unauthorized() -> ApiError:
    """No bearer token."""
    return ApiError(
        401,
        "unauthorized",
        "send Authorization: Bearer <token>",
        headers={"WWW-Authenticate": 'Bearer realm="stox"'},
    )


def invalid_token() -> ApiError:
    return ApiError(
        401,
        "invalid_token",
        "the token is invalid or has expired",
        headers={"WWW-Authenticate": 'Bearer realm="stox", error="invalid_token"'},
    )


def verified(tokens: TokenAuthority, token: str) -> Principal:
    """Who `token` speaks for; 401 invalid_token when it does not verify."""
    try:
        return tokens.verify(token)
    except InvalidToken:
        raise invalid_token() from None


def _not_found(exc: Exception) -> ApiError:
    return ApiError(404, "not_found", f"no workflow {exc}", {"workflow_id": "not found"})


def _conflict(exc: Exception) -> ApiError:
    return ApiError(409, cast(NotAllowed | StaleReport, exc).code, str(exc))


def _contended(exc: Exception) -> ApiError:
    return ApiError(
        503,
        "contention",
        "the workflow is changing too fast; try again",
        headers={"Retry-After": "1"},
    )


def _store_unavailable(exc: Exception) -> ApiError:
    log.warning("store unavailable: %s", exc)  # what failed, for the operator; not the client
    return ApiError(
        503,
        "store_unavailable",
        "the store is unavailable; try again shortly",
        headers={"Retry-After": "1"},
    )


def _unknown_pipeline(exc: Exception) -> ApiError:
    unknown = cast(UnknownPipeline, exc)
    expected = f"one of: {', '.join(unknown.known)}"
    return ApiError(
        400,
        "invalid_input",
        f"pipeline: no pipeline {unknown.name!r} is configured; {expected}",
        {"pipeline": f"unknown pipeline; {expected}"},
    )


def _callback_refused(exc: Exception) -> ApiError:
    return ApiError(400, "invalid_input", f"callback_url: {exc}", {"callback_url": str(exc)})


def _key_reused(exc: Exception) -> ApiError:
    return ApiError(
        422,
        "idempotency_key_reused",
        "this Idempotency-Key was sent before with a different body; use a new key",
        {IDEMPOTENCY_KEY: "used before with a different body"},
    )


def _too_many(exc: Exception) -> ApiError:
    limited = cast(TooManyAttempts, exc)
    return ApiError(
        429,
        "too_many_attempts",
        f"too many {limited.what}; try again later",
        headers={"Retry-After": str(limited.retry_after)},
    )


# Each domain error's answer, the one place they are translated (as Starlette's exception
# handlers are one dict): handlers raise them, JsonErrors answers them. A subclass takes its
# nearest listed base's answer. NotFound carries the workflow id; the others their message.
DOMAIN_ERRORS: dict[type[Exception], Callable[[Exception], ApiError]] = {
    NotFound: _not_found,
    NotAllowed: _conflict,
    StaleReport: _conflict,
    Contention: _contended,
    StoreError: _store_unavailable,  # AlreadyExists too: an id taken is for a retry as well
    KeyReused: _key_reused,
    UnknownPipeline: _unknown_pipeline,
    CallbackRefused: _callback_refused,
    TooManyAttempts: _too_many,
}


def domain_error(exc: BaseException) -> ApiError | None:
    """The ApiError that answers `exc`, if it is a domain error."""
    for cls in type(exc).__mro__:
        answer = DOMAIN_ERRORS.get(cls)
        if answer is not None:
            return answer(cast(Exception, exc))
    return None


def requires(role: str) -> Callable[[F], F]:
    """Declare who may call a handler method: "user" (users, reviewers and admins), "admin",
    "service"."""
    admitted = _ADMITS[role]

    def decorate(method: F) -> F:
        @functools.wraps(method)
        async def wrapper(self: BaseHandler, *args: Any, **kwargs: Any) -> None:
            principal = self.principal
            if principal.role not in admitted:
                raise ApiError(403, "forbidden", f"this endpoint needs a {role} token")
            await method(self, *args, **kwargs)

        wrapper.required_role = role  # type: ignore[attr-defined]  # read by handlers/openapi.py
        return cast(F, wrapper)

    return decorate


class PathOnlyErrorLog(tornado.web.RequestHandler):
    """Logs handler errors by path: Tornado's own log names the URI, ?token= and all."""

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        log_exception(self, typ, value, tb)


@tornado.web.stream_request_body
class BoundedBody(tornado.web.RequestHandler):
    """Reads the request body in chunks and keeps at most `server.max_body_size` of it.

    A larger body gets a 413 (`body_too_large`, the JSON error shape). Many clients (urllib
    among them) send their whole body before they read an answer, and never see one that
    came early on a connection closed with their body unread (it is reset under them). So:

    - up to `server.max_drain_size`, the rest of the body is read and thrown away, and the 413
      comes once all of it has arrived, on a connection that stays open;
    - past it (declared by Content-Length, or counted in a chunked body), or when the client
      waits for `100 Continue` before it sends, the 413 comes at once and the connection
      closes.

    Subclasses that define `prepare` call this one first.
    """

    @property
    def max_body_size(self) -> int:
        return cast(int, self.settings["max_body_size"])

    @property
    def max_drain_size(self) -> int:
        return cast(int, self.settings["max_drain_size"])

    def prepare(self) -> None:
        self._body: list[bytes] = []
        self._body_size = 0
        connection = self.request.connection
        if isinstance(connection, HTTP1Connection):
            # both limits are enforced here, with the 413; Tornado's would answer a bare 400
            connection.set_max_body_size(sys.maxsize)
        declared = self.request.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_body_size:
            waiting = self.request.headers.get("Expect", "").lower() == "100-continue"
            if waiting or int(declared) > self.max_drain_size:
                raise self._too_large(closing=True)

    def data_received(self, chunk: bytes) -> None:
        if self._finished:
            return
        over_before = self._body_size > self.max_body_size
        self._body_size += len(chunk)
        if self._body_size <= self.max_body_size:
            self._body.append(chunk)
        elif self._body_size > self.max_drain_size:
            error = self._too_large(closing=True)
            self.send_error(error.status_code, exc_info=(type(error), error, None))
        elif not over_before:
            self._body.clear()
            self._refuse_once_read()

    def request_body(self) -> bytes:
        return b"".join(self._body)

    def _refuse_once_read(self) -> None:
        """Answer the 413 once the whole body has been read, instead of the HTTP method.

        Tornado runs the method when it resolves `request._body_future`, which the handler's
        `_execute` awaits. A new future takes that one's place for Tornado to resolve, and its
        end fails the awaited one with the 413 (or with StreamClosedError if the client left).
        """
        awaited = self.request._body_future
        read: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.request._body_future = read
        error = self._too_large()

        def refuse(read: asyncio.Future[None]) -> None:
            awaited.set_exception(read.exception() or error)

        read.add_done_callback(refuse)

    def _too_large(self, *, closing: bool = False) -> ApiError:
        return ApiError(
            413,
            "body_too_large",
            f"the request body is over {self.max_body_size} bytes",
            headers={"Connection": "close"} if closing else None,
        )

    def on_connection_close(self) -> None:
        # ends the wait for a body the client will not finish; WebSocketHandler's own
        # on_connection_close does not call RequestHandler's, which does that
        tornado.web.RequestHandler.on_connection_close(self)
        super().on_connection_close()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            write_json_error(self, exc)
        else:
            super().write_error(status_code, **kwargs)


class JsonErrors(tornado.web.RequestHandler):
    """The one error path: a domain error becomes its ApiError (`DOMAIN_ERRORS`) before
    Tornado logs and answers it, and every error is answered in the JSON shape, with the
    request's id."""

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("X-Request-Id", self.request_id)

    @property
    def request_id(self) -> str:
        if not hasattr(self, "_request_id"):
            self._request_id = self.request.headers.get("X-Request-Id") or random16().hex()
        return self._request_id

    def prepare(self) -> None:
        # in the request's own task (Tornado runs each request's _execute as one), so the id
        # is on every line logged about it and does not outlive it
        bind(request_id=self.request_id)
        super().prepare()

    def _handle_request_exception(self, e: BaseException) -> None:
        answer = domain_error(e)
        if answer is None:
            super()._handle_request_exception(e)
            return
        try:  # Tornado reads what it handles from sys.exc_info()
            raise answer from e
        except ApiError as error:
            super()._handle_request_exception(error)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if not isinstance(exc, ApiError):
            if status_code >= 500:
                log.error("request %s failed", self.request_id, exc_info=kwargs.get("exc_info"))
                exc = ApiError(500, "internal", "internal error; see the server log")
            else:
                exc = status_error(status_code)
        write_json_error(self, exc)


class BaseHandler(JsonErrors, PathOnlyErrorLog, BoundedBody):
    """The API's handlers: JSON in and out, the principal from the bearer token."""

    def initialize(self) -> None:
        self._principal: Principal | None = None

    # -- dependencies, read from the application settings -------------------------------

    @property
    def orchestrator(self) -> Orchestrator:
        return cast(Orchestrator, self.settings["orchestrator"])

    @property
    def tokens(self) -> TokenAuthority:
        return cast(TokenAuthority, self.settings["tokens"])

    # -- request ----------------------------------------------------------------------------

    def json_body(self) -> dict[str, Any]:
        raw = self.request_body() or b"null"
        # checked before parsing: how deep json.loads gets depends on the Python version
        if nested_beyond(raw):
            raise ApiError(400, "invalid_json", "the body is nested too deeply")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        return body

    def load(self, schema: Schema, data: dict[str, Any]) -> dict[str, Any]:
        try:
            return cast(dict[str, Any], schema.load(data))
        except ValidationError as exc:
            raise invalid(exc) from None

    def query(self) -> dict[str, str]:
        """Query parameters, the last value of each."""
        return {
            name: self.decode_argument(values[-1], name)
            for name, values in self.request.query_arguments.items()
        }

    # -- authentication -------------------------------------------------------------------

    @property
    def principal(self) -> Principal:
        if self._principal is None:
            self._principal = self._authenticate()
        return self._principal

    @property
    def bearer_token(self) -> str:
        """The token of the Authorization header; 401 when there is none."""
        token = bearer.from_authorization(self.request.headers.get("Authorization"))
        if token is None:
            raise unauthorized()
        return token

    def _authenticate(self) -> Principal:
        return verified(self.tokens, self.bearer_token)

    # -- responses ------------------------------------------------------------------------

    def allowed_methods(self) -> list[str]:
        base = tornado.web.RequestHandler
        return [
            method
            for method in ("GET", "POST", "PUT", "PATCH", "DELETE")
            if getattr(type(self), method.lower()) is not getattr(base, method.lower())
        ]

    def write_json(self, status: int, body: Any) -> None:
        """Answer `status` with `body` as JSON (not Tornado's `render`, which takes a template)."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        super().write_error(status_code, **kwargs)


def invalid(exc: ValidationError) -> ApiError:
    messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
    fields = {name: _flatten(value) for name, value in messages.items()}
    first = next(iter(fields), "body")
    return ApiError(400, "invalid_input", f"invalid value for {first}", fields)


def _flatten(value: Any) -> Any:
    """Marshmallow's nested messages, as they are; lists of one message become that message."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    return value


class NotFoundHandler(BaseHandler):
    """Any path no route matches: a JSON 404 for every method, once the body has been read."""

    def not_found(self, *args: str, **kwargs: str) -> None:
        raise ApiError(404, "not_found", f"no such endpoint: {self.request.path}")

    get = head = post = put = patch = delete = options = not_found
