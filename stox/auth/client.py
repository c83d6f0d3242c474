"""The gateway's gRPC client of the AuthService (grpc.aio, on the gateway's loop).

Every call has a deadline (`auth.timeout`, retries included); a call the service was
UNAVAILABLE for is retried (`auth.retries`, backoff from `auth.retry_backoff`, doubling,
with jitter). A failed call raises AuthCallError, whose status maps to HTTP by one fixed
table. Logins go through the LoginLimiter first, registrations through the
RegistrationLimiter: both know the client's address, which a remote AuthService does not.

The channel to a remote AuthService is TLS when `auth.tls_ca_file` is set (stox/auth/tls.py).
When the service cannot be reached (it is down, or the TLS handshake fails: a wrong CA, a
plaintext server) calls fail UNAVAILABLE (HTTP 503) and the health check says so (/readyz);
each new reason is logged once, with gRPC's own words (CERTIFICATE_VERIFY_FAILED, …).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import auth_pb2, auth_pb2_grpc
from settings import AuthSettings
from stox.auth import tls
from stox.auth.limits import LoginLimiter, RegistrationLimiter

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name

# the fixed mapping of gRPC status to HTTP status; any other status is a 502
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,  # not retried: it is the service shedding load
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 503,
}
RETRY_AFTER = 1  # seconds, sent with a 503: the channel reconnects at least this often
HEALTH_TIMEOUT = 1.0

# reconnect quickly once the service is back (gRPC's default backoff grows to 120 s)
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class AuthCallError(Exception):
    """A call that failed with `code`; `http_status` (and `retry_after`) say how to answer."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 502)

    @property
    def retry_after(self) -> int | None:
        return RETRY_AFTER if self.http_status == 503 else None

    @property
    def busy(self) -> bool:
        """The service refused for want of capacity, not because it is away."""
        return bool(self.code == grpc.StatusCode.RESOURCE_EXHAUSTED)


class AuthClient:
    def __init__(
        self,
        target: str = "",
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.1,
        limiter: LoginLimiter | None = None,
        registrations: RegistrationLimiter | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: list[tuple[str, str]] | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.limiter = limiter or LoginLimiter()
        self.registrations = registrations or RegistrationLimiter()
        self.credentials = credentials  # None: plaintext
        self.options = [*CHANNEL_OPTIONS, *(options or [])]
        self._unavailable: str | None = None  # the reason last logged
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._health: Any = None

    @classmethod
    def from_settings(cls, auth: AuthSettings, target: str = "") -> AuthClient:
        """`target`: a remote AuthService's host:port, reached over TLS when the settings
        say so; empty: the built-in one, plaintext on the loopback interface."""
        return cls(
            target,
            credentials=tls.channel_credentials(auth) if target else None,
            options=tls.channel_options(auth) if target else None,
            timeout=auth.timeout,
            retries=auth.retries,
            backoff=auth.retry_backoff,
            limiter=LoginLimiter.from_settings(auth),
            registrations=RegistrationLimiter.from_settings(auth),
        )

    async def connect(self, target: str | None = None) -> None:
        """Open the channel on the running loop (it connects on the first call)."""
        self.target = target or self.target
        if self.credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=self.options)
        else:
            self._channel = grpc.aio.secure_channel(
                self.target, self.credentials, options=self.options
            )
        self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    # -- the AuthService ------------------------------------------------------------------

    async def register(self, username: str, password: str, address: str) -> dict[str, Any]:
        """The profile, or TooManyAttempts when the address is at its limit. Every answer
        counts against it but a 503: the service did not get to decide."""
        attempt = self.registrations.begin(address)
        request = auth_pb2.RegisterRequest(username=username, password=password)
        counted = False
        try:
            reply = await self._call(self._stub.Register, request)
            counted = True
        except AuthCallError as exc:
            counted = exc.http_status != 503
            raise
        finally:
            if not counted:
                attempt.cancel()
        return _profile(reply)

    async def login(self, username: str, password: str, address: str) -> dict[str, Any]:
        """A token, or TooManyAttempts when failed logins from this address for this name, for
        this name (unless it signed in from here recently) or from this address are at their
        limits. Only a wrong password or an unknown name counts as a failure."""
        attempt = self.limiter.begin(username, address)
        failed = False
        try:
            reply = await self._call(
                self._stub.Login, auth_pb2.LoginRequest(username=username, password=password)
            )
        except AuthCallError as exc:
            failed = exc.code == grpc.StatusCode.UNAUTHENTICATED
            raise
        finally:
            if not failed:
                attempt.cancel()
        self.limiter.succeeded(username, address)
        return {
            "access_token": reply.access_token,
            "token_type": reply.token_type,
            "expires_in": reply.expires_in,
        }

    async def validate(self, token: str) -> dict[str, Any]:
        reply = await self._call(
            self._stub.ValidateToken, auth_pb2.ValidateTokenRequest(token=token)
        )
        user = reply.user
        return {
            "user": {"id": user.id, "username": user.username, "role": user.role},
            "expires_at": reply.expires_at,
        }

    async def profile(self, access_token: str) -> dict[str, Any]:
        request = auth_pb2.GetProfileRequest(access_token=access_token)
        return _profile(await self._call(self._stub.GetProfile, request))

    async def check(self) -> bool:
        """True when the service answers its health check as SERVING (one try, 1 s)."""
        if self._health is None:
            return False
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        try:
            reply = await self._health.Check(request, timeout=HEALTH_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            self._note(exc.code(), exc.details() or "")
            return False
        self._note(None, "")
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def _note(self, code: grpc.StatusCode | None, details: str) -> None:
        """Log why the service is unreachable, once per reason; and when it answers again
        (`code` None: a reply; another code than UNAVAILABLE or a deadline: it answered)."""
        if code == grpc.StatusCode.UNAVAILABLE:
            if details != self._unavailable:
                log.warning("the AuthService at %s is unavailable: %s", self.target, details)
                self._unavailable = details
        elif code != grpc.StatusCode.DEADLINE_EXCEEDED and self._unavailable is not None:
            log.info("the AuthService at %s answers again", self.target)
            self._unavailable = None

    # -- deadlines and retries ------------------------------------------------------------

    async def _call(self, rpc: Callable[..., Awaitable[M]], request: Message) -> M:
        if self._stub is None:
            raise AuthCallError(grpc.StatusCode.UNAVAILABLE, "the client is not connected")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        delay = self.backoff
        for attempt in range(self.retries + 1):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                reply = await rpc(request, timeout=remaining)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    self._note(code, exc.details() or "")
                    raise AuthCallError(code, exc.details() or "") from None
            else:
                self._note(None, "")
                return reply
            pause = min(delay * random.uniform(0.5, 1.5), deadline - loop.time())
            if pause > 0:
                await asyncio.sleep(pause)
            delay *= 2
        raise AuthCallError(grpc.StatusCode.DEADLINE_EXCEEDED, "the AuthService did not answer")


def _profile(reply: auth_pb2.Profile) -> dict[str, Any]:
    return {
        "id": reply.id,
        "username": reply.username,
        "role": reply.role,
        "created_at": reply.created_at,
    }
