"""The gateway's gRPC client against a scripted AuthService: deadlines, retries of
UNAVAILABLE with backoff, and the fixed mapping of gRPC status to HTTP status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from support import RunningGateway, eventually, running_gateway

from protos import auth_pb2, auth_pb2_grpc
from settings import Duration, Endpoint
from stox.auth.client import SERVICE_NAME

REGISTER = "/api/v1/auth/register"
LOGIN = "/api/v1/auth/login"
CREDENTIALS = {"username": "alice", "password": "correct horse battery"}
Code: TypeAlias = grpc.StatusCode

pytestmark = pytest.mark.uvloop  # grpc.aio, client and server, on both event loops


@dataclass
class Scripted(auth_pb2_grpc.AuthServiceServicer):
    """Each call takes the next outcome: a status to abort with, or seconds to stall; then
    (or when the script is empty) it answers. Records each call's name and deadline."""

    script: list[Code | float] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    deadlines: list[float | None] = field(default_factory=list)

    async def _answer(self, name: str, context: grpc.aio.ServicerContext, reply: Any) -> Any:
        self.calls.append(name)
        self.deadlines.append(context.time_remaining())
        outcome = self.script.pop(0) if self.script else None
        if isinstance(outcome, float):
            await asyncio.sleep(outcome)
        elif outcome is not None:  # a status code
            await context.abort(outcome, f"scripted {outcome.name}")
        return reply

    async def Register(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        profile = auth_pb2.Profile(
            id="1" * 32, username=request.username, role="user", created_at="2026-01-01T00:00Z"
        )
        return await self._answer("Register", context, profile)

    async def Login(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        reply = auth_pb2.LoginResponse(access_token="t", token_type="bearer", expires_in=60)
        return await self._answer("Login", context, reply)


@dataclass
class Fake:
    servicer: Scripted
    health: Any
    gw: RunningGateway
    server: grpc.aio.Server


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[Fake]:
    """A gateway whose AuthService (services.auth) is a scripted one; 10 ms retry backoff."""
    servicer = Scripted()  # type: ignore[abstract]  # the gateway calls Register and Login
    health_servicer = health.aio.HealthServicer()
    server = grpc.aio.server()
    auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    try:
        async with running_gateway(
            tmp_path,
            services__auth=Endpoint("127.0.0.1", port),
            auth__retry_backoff=Duration(0.01),
        ) as gw:
            yield Fake(servicer, health_servicer, gw, server)
    finally:
        await server.stop(None)


async def test_a_gateway_with_a_remote_service_starts_none_of_its_own(fake: Fake) -> None:
    assert fake.gw.gateway.auth_server is None
    response = await fake.gw.fetch("POST", REGISTER, CREDENTIALS)
    assert response.status == 201 and response.body["username"] == "alice"
    assert fake.servicer.calls == ["Register"]


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        (Code.INVALID_ARGUMENT, 400, "invalid_input"),
        (Code.ALREADY_EXISTS, 409, "already_exists"),
        (Code.UNAUTHENTICATED, 401, "invalid_token"),
        (Code.NOT_FOUND, 404, "not_found"),
        (Code.UNAVAILABLE, 503, "auth_unavailable"),
        (Code.DEADLINE_EXCEEDED, 503, "auth_unavailable"),
        (Code.RESOURCE_EXHAUSTED, 503, "auth_busy"),
        (Code.INTERNAL, 502, "auth_failed"),
        (Code.UNKNOWN, 502, "auth_failed"),
        (Code.PERMISSION_DENIED, 502, "auth_failed"),
        (Code.UNIMPLEMENTED, 502, "auth_failed"),
    ],
)
async def test_grpc_status_maps_to_http_status(
    fake: Fake, code: Code, status: int, error: str
) -> None:
    fake.servicer.script = [code] * 10
    response = await fake.gw.fetch("POST", REGISTER, CREDENTIALS)
    assert response.status == status
    assert response.body["error"]["code"] == error
    if status == 503:
        assert response.headers["Retry-After"] == "1"
    else:
        assert "Retry-After" not in response.headers
    if status == 400:  # the service's words, which name the field
        assert response.body["error"]["message"] == "scripted INVALID_ARGUMENT"


async def test_unavailable_is_retried_until_it_succeeds(fake: Fake) -> None:
    fake.servicer.script = [Code.UNAVAILABLE, Code.UNAVAILABLE]
    response = await fake.gw.fetch("POST", REGISTER, CREDENTIALS)
    assert response.status == 201
    assert fake.servicer.calls == ["Register"] * 3


async def test_unavailable_is_retried_a_bounded_number_of_times(fake: Fake) -> None:
    fake.servicer.script = [Code.UNAVAILABLE] * 10
    response = await fake.gw.fetch("POST", REGISTER, CREDENTIALS)
    assert response.status == 503
    assert len(fake.servicer.calls) == 1 + fake.gw.gateway.settings.auth.retries


@pytest.mark.parametrize(
    "code",
    [
        Code.UNAUTHENTICATED,
        Code.INTERNAL,
        Code.DEADLINE_EXCEEDED,
        Code.ALREADY_EXISTS,
        Code.RESOURCE_EXHAUSTED,  # the service shedding load: retrying would add to it
    ],
)
async def test_other_failures_are_not_retried(fake: Fake, code: Code) -> None:
    fake.servicer.script = [code, code]
    await fake.gw.fetch("POST", REGISTER, CREDENTIALS)
    assert fake.servicer.calls == ["Register"]


async def test_the_backoff_doubles(fake: Fake) -> None:
    client = fake.gw.gateway.auth
    client.backoff = 0.1
    fake.servicer.script = [Code.UNAVAILABLE] * 10
    started = time.monotonic()
    response = await fake.gw.fetch("POST", REGISTER, CREDENTIALS)
    elapsed = time.monotonic() - started
    assert response.status == 503
    # pauses of 0.1, 0.2 and 0.4 s, each with jitter of +-50%: 0.35 to 1.05 s in all
    assert 0.3 < elapsed < 2.0


async def test_every_call_carries_a_deadline(fake: Fake) -> None:
    await fake.gw.fetch("POST", REGISTER, CREDENTIALS)
    await fake.gw.fetch("POST", LOGIN, CREDENTIALS)
    timeout = fake.gw.gateway.settings.auth.timeout
    assert len(fake.servicer.deadlines) == 2
    for remaining in fake.servicer.deadlines:
        assert remaining is not None and 0 < remaining <= timeout + 0.1  # clocks differ a bit


async def test_a_call_past_its_deadline_is_503_with_retry_after(fake: Fake) -> None:
    fake.gw.gateway.auth.timeout = 0.3
    fake.servicer.script = [5.0]  # the service stalls
    started = time.monotonic()
    response = await fake.gw.fetch("POST", REGISTER, CREDENTIALS)
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    assert time.monotonic() - started < 2.0
    assert fake.servicer.calls == ["Register"]


async def test_a_service_that_goes_away_mid_login_is_503_with_retry_after(fake: Fake) -> None:
    """The AuthService stops (its connections closed) while a login waits for its answer."""
    fake.gw.gateway.auth.retries = 0
    fake.servicer.script = [30.0]  # the login is in progress when the service goes
    login = asyncio.ensure_future(fake.gw.fetch("POST", LOGIN, CREDENTIALS))
    await eventually(lambda: fake.servicer.calls == ["Login"])
    await fake.server.stop(None)  # no grace: calls under way are cancelled
    response = await login
    assert response.status == 503, response.body
    assert response.body["error"]["code"] == "auth_unavailable"
    assert response.headers["Retry-After"] == "1"


async def test_the_deadline_bounds_the_retries_too(fake: Fake) -> None:
    client = fake.gw.gateway.auth
    client.timeout, client.backoff, client.retries = 0.3, 1.0, 10
    fake.servicer.script = [Code.UNAVAILABLE] * 20
    started = time.monotonic()
    response = await fake.gw.fetch("POST", REGISTER, CREDENTIALS)
    assert response.status == 503
    assert time.monotonic() - started < 1.5


async def test_an_unavailable_service_does_not_count_as_failed_logins(fake: Fake) -> None:
    fake.gw.gateway.auth.retries = 0
    fake.servicer.script = [Code.UNAVAILABLE] * 100
    for _ in range(12):
        assert (await fake.gw.fetch("POST", LOGIN, CREDENTIALS)).status == 503
    fake.servicer.script = []
    assert (await fake.gw.fetch("POST", LOGIN, CREDENTIALS)).status == 200


async def test_a_registration_the_service_could_not_take_does_not_count(fake: Fake) -> None:
    fake.gw.gateway.auth.retries = 0
    fake.gw.gateway.auth.registrations.max_registrations = 2
    fake.servicer.script = [Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED] * 3
    for _ in range(6):
        assert (await fake.gw.fetch("POST", REGISTER, CREDENTIALS)).status == 503
    fake.servicer.script = [Code.ALREADY_EXISTS]
    assert (await fake.gw.fetch("POST", REGISTER, CREDENTIALS)).status == 409  # counts
    assert (await fake.gw.fetch("POST", REGISTER, CREDENTIALS)).status == 201
    limited = await fake.gw.fetch("POST", REGISTER, CREDENTIALS)
    assert limited.status == 429
    assert len(fake.servicer.calls) == 8  # the last never reached the service


async def test_failed_logins_reported_by_the_service_are_limited(fake: Fake) -> None:
    fake.servicer.script = [Code.UNAUTHENTICATED] * 10
    for _ in range(10):
        response = await fake.gw.fetch("POST", LOGIN, CREDENTIALS)
        assert response.status == 401 and response.body["error"]["code"] == "invalid_credentials"
    limited = await fake.gw.fetch("POST", LOGIN, CREDENTIALS)
    assert limited.status == 429
    assert len(fake.servicer.calls) == 10  # the 11th never reached the service


@pytest.mark.parametrize(
    ("status", "ready"),
    [
        (health_pb2.HealthCheckResponse.SERVING, "ok"),
        (health_pb2.HealthCheckResponse.NOT_SERVING, "unavailable"),
    ],
)
async def test_readyz_reports_the_auth_service_health(fake: Fake, status: Any, ready: str) -> None:
    await fake.health.set(SERVICE_NAME, status)
    response = await fake.gw.fetch("GET", "/readyz")
    assert response.body["auth"] == ready
    assert response.status == (200 if ready == "ok" else 503)


async def test_readyz_reports_a_service_without_health_checks_unavailable(
    tmp_path: Path,
) -> None:
    server = grpc.aio.server()
    auth_pb2_grpc.add_AuthServiceServicer_to_server(Scripted(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with running_gateway(tmp_path, services__auth=Endpoint("127.0.0.1", port)) as gw:
            response = await gw.fetch("GET", "/readyz")
            assert response.status == 503 and response.body["auth"] == "unavailable"
    finally:
        await server.stop(None)
