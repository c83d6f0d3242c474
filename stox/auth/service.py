"""The built-in AuthService: protos/auth.proto served with grpc.aio on the running loop.

Users live in the configured store, passwords are argon2id hashes, and the tokens it issues
are signed by the TokenAuthority (gateways verify them locally). The standard gRPC health
service runs beside it (`grpc.health.v1.Health`), which the gateway's /readyz asks.

Errors leave as status codes the gateway maps to HTTP: INVALID_ARGUMENT (bad input),
ALREADY_EXISTS, UNAUTHENTICATED (bad credentials or token), NOT_FOUND, RESOURCE_EXHAUSTED (too
many registrations hashing at once), UNAVAILABLE (the store is down). No request field —
password or token — is ever logged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from marshmallow import ValidationError

from protos import auth_pb2, auth_pb2_grpc
from settings import Settings
from stox import version
from stox.auth.accounts import Accounts, BadCredentials, UnknownUser
from stox.auth.passwords import Busy, Passwords
from stox.auth.tokens import InvalidToken, TokenAuthority
from stox.store import AlreadyExists, StoreError, UserStore, make_user_store

log = logging.getLogger(__name__)

SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
BAD_CREDENTIALS = "wrong user name or password"

R = TypeVar("R")
Method = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]


def _first_message(exc: ValidationError) -> str:
    """`field: message` for the first invalid field (no input value is ever quoted)."""
    messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
    name, value = next(iter(messages.items()))
    while isinstance(value, list | dict):
        value = next(iter(value.values() if isinstance(value, dict) else value), "")
    return f"{name}: {value}"


def _rpc(method: Method[R]) -> Method[R]:
    """Turn the account and token errors into status codes; log failures by name only."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except ValidationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _first_message(exc))
        except AlreadyExists:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "that user name is taken")
        except BadCredentials:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, BAD_CREDENTIALS)
        except InvalidToken:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or expired token")
        except UnknownUser:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such user")
        except Busy:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "too many registrations at once"
            )
        except StoreError as exc:
            log.error("AuthService %s: the user store failed: %s", method.__name__, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the user store is unavailable")
        except Exception as exc:  # nothing of the request in the log: it holds passwords
            log.error("AuthService %s failed: %s", method.__name__, type(exc).__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    return wrapper


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, accounts: Accounts, tokens: TokenAuthority) -> None:
        self.accounts = accounts
        self.tokens = tokens

    @_rpc
    async def Register(
        self, request: auth_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.Profile:
        return auth_pb2.Profile(**await self.accounts.register(request.username, request.password))

    @_rpc
    async def Login(
        self, request: auth_pb2.LoginRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.LoginResponse:
        user = await self.accounts.authenticate(request.username, request.password)
        return auth_pb2.LoginResponse(
            access_token=self.tokens.issue(user["id"], user["username"], user["role"]),
            token_type="bearer",
            expires_in=int(self.tokens.expiry),
        )

    @_rpc
    async def ValidateToken(
        self, request: auth_pb2.ValidateTokenRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ValidateTokenResponse:
        principal = self.tokens.verify(request.token)
        return auth_pb2.ValidateTokenResponse(
            user=auth_pb2.User(id=principal.id, username=principal.username, role=principal.role),
            expires_at=int(principal.expires_at),
        )

    @_rpc
    async def GetProfile(
        self, request: auth_pb2.GetProfileRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.Profile:
        principal = self.tokens.verify(request.access_token)
        return auth_pb2.Profile(**await self.accounts.profile(principal.id))


class AuthServer:
    """The AuthService and the health service on one grpc.aio server; owns its user store."""

    def __init__(
        self,
        store: UserStore,
        passwords: Passwords,
        tokens: TokenAuthority,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        """`credentials`: serve TLS with them (stox/auth/tls.py); None: plaintext."""
        if not tokens.can_issue:
            raise ValueError("the AuthService needs a token authority that can issue tokens")
        self.store = store
        self.passwords = passwords
        self.tokens = tokens
        self.credentials = credentials
        self.accounts = Accounts(store, passwords)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        tokens: TokenAuthority,
        credentials: grpc.ServerCredentials | None = None,
    ) -> AuthServer:
        return cls(
            make_user_store(
                settings.storage.url, sqlite_synchronous=settings.storage.sqlite_synchronous
            ),
            Passwords.from_settings(settings.auth),
            tokens,
            credentials,
        )

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on host:port (0: a free port); the port it listens on."""
        await self.store.open()
        try:
            await self.passwords.start()
            # no SO_REUSEPORT: a second service on a taken port fails instead of sharing it
            server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            auth_pb2_grpc.add_AuthServiceServicer_to_server(
                AuthServicer(self.accounts, self.tokens), server
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            address = f"{host}:{port}"
            try:
                if self.credentials is None:
                    bound = int(server.add_insecure_port(address))
                else:
                    bound = int(server.add_secure_port(address, self.credentials))
            except RuntimeError as exc:  # grpcio's "Failed to bind to address"
                raise OSError(f"cannot listen on {host}:{port}") from exc
            await server.start()
        except BaseException:
            self.passwords.close()
            await self.store.close()
            raise
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._server, self.port = server, bound
        tls = "TLS" if self.credentials is not None else "plaintext"
        log.info("%s: AuthService listening on %s:%d (%s)", version.describe(), host, bound, tls)
        return bound

    async def stop(self, grace: float = 1.0) -> None:
        server, self._server = self._server, None
        if server is not None:
            await self.health.enter_graceful_shutdown()
            await server.stop(grace)
        self.passwords.close()
        await self.store.close()
