"""The auth endpoints (docs/architecture.md#the-http-api) through the built-in gRPC AuthService, end
to end."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from support import Response, RunningGateway, auth_answer, running_gateway

from stox.auth.client import AuthClient

REGISTER = "/api/v1/auth/register"
LOGIN = "/api/v1/auth/login"
VALIDATE = "/api/v1/auth/validate"
PROFILE = "/api/v1/auth/profile"
PASSWORD = "correct horse battery staple"
PROFILE_KEYS = {"id", "username", "role", "created_at"}
OWNER, ATTACKER, ELSEWHERE = "198.51.100.4", "203.0.113.9", "192.0.2.1"


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    # the test client is the trusted proxy: X-Real-IP sets the address of each attempt
    async with running_gateway(tmp_path, server__trusted_proxies=["127.0.0.1"]) as gateway:
        yield gateway


async def register(gw: RunningGateway, username: str = "alice", password: str = PASSWORD) -> Any:
    response = await gw.fetch("POST", REGISTER, {"username": username, "password": password})
    assert response.status == 201, response.body
    return response.body


async def login(gw: RunningGateway, username: str = "alice", password: str = PASSWORD) -> Response:
    body = {"username": username, "password": password}
    return await gw.fetch("POST", LOGIN, body)


async def login_token(gw: RunningGateway, username: str = "alice") -> str:
    response = await login(gw, username)
    assert response.status == 200, response.body
    return str(response.body["access_token"])


def error_code(response: Response) -> str:
    assert set(response.body) == {"error"}, response.body
    return str(response.body["error"]["code"])


# -- register -------------------------------------------------------------------------------


async def test_register_answers_201_with_the_profile(gw: RunningGateway) -> None:
    profile = await register(gw, "alice.smith-99_x")
    assert set(profile) == PROFILE_KEYS
    assert profile["username"] == "alice.smith-99_x"
    assert profile["role"] == "user"
    assert len(profile["id"]) == 32
    assert profile["created_at"].endswith("Z")


async def test_the_password_is_stored_as_an_argon2id_hash(gw: RunningGateway) -> None:
    profile = await register(gw)
    assert gw.gateway.auth_server is not None
    stored = await gw.gateway.auth_server.store.user_by_id(profile["id"])
    assert stored is not None
    assert stored["password_hash"].startswith("$argon2id$v=19$m=1024,t=1,p=1$")
    assert PASSWORD not in json.dumps(stored)


async def test_a_taken_user_name_is_409(gw: RunningGateway) -> None:
    await register(gw)
    again = await gw.fetch("POST", REGISTER, {"username": "alice", "password": "x" * 12})
    assert again.status == 409 and error_code(again) == "already_exists"


async def test_concurrent_registrations_of_one_name_make_one_user(gw: RunningGateway) -> None:
    body = {"username": "alice", "password": PASSWORD}
    responses = await asyncio.gather(*(gw.fetch("POST", REGISTER, body) for _ in range(6)))
    assert sorted(r.status for r in responses) == [201] + [409] * 5


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "ab", "password": PASSWORD}, "username"),
        ({"username": "a" * 65, "password": PASSWORD}, "username"),
        ({"username": "Alice", "password": PASSWORD}, "username"),
        ({"username": "al ice", "password": PASSWORD}, "username"),
        ({"username": "alice/..", "password": PASSWORD}, "username"),
        ({"username": "ålice", "password": PASSWORD}, "username"),
        ({"username": "alice\n", "password": PASSWORD}, "username"),
        ({"username": 42, "password": PASSWORD}, "username"),
        ({"password": PASSWORD}, "username"),
        ({"username": "alice", "password": "x" * 11}, "password"),
        ({"username": "alice", "password": "x" * 1025}, "password"),
        ({"username": "alice", "password": None}, "password"),
        ({"username": "alice"}, "password"),
        ({"username": "alice", "password": PASSWORD, "role": "admin"}, "role"),
    ],
)
async def test_bad_registrations_are_400_naming_the_field(
    gw: RunningGateway, body: dict[str, Any], field: str
) -> None:
    response = await gw.fetch("POST", REGISTER, body)
    assert response.status == 400, response.body
    assert error_code(response) == "invalid_input"
    assert field in response.body["error"]["fields"]
    assert field in response.body["error"]["message"]


async def test_the_shortest_and_longest_names_and_passwords_are_accepted(
    gw: RunningGateway,
) -> None:
    await register(gw, "abc", "p" * 12)
    await register(gw, "z" * 64, "p" * 1024)


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'"alice"'])
async def test_a_body_that_is_not_an_object_is_400(gw: RunningGateway, raw: bytes) -> None:
    for path in (REGISTER, LOGIN, VALIDATE):
        response = await gw.fetch("POST", path, raw=raw)
        assert response.status == 400 and error_code(response) == "invalid_json"


# -- login ----------------------------------------------------------------------------------


async def test_login_issues_a_bearer_token_with_every_claim(gw: RunningGateway) -> None:
    profile = await register(gw)
    response = await login(gw)

    assert response.status == 200
    assert set(response.body) == {"access_token", "token_type", "expires_in"}
    assert response.body["token_type"] == "bearer"
    assert response.body["expires_in"] == 3600
    token = response.body["access_token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert set(claims) == {"sub", "username", "role", "iat", "exp", "iss", "aud", "jti"}
    assert (claims["sub"], claims["username"], claims["role"]) == (profile["id"], "alice", "user")
    assert (claims["iss"], claims["aud"]) == ("stox", "stox")
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(claims["iat"] - time.time()) < 5
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    assert gw.gateway.tokens.verify(token).id == profile["id"]
    assert (
        claims["jti"]
        != jwt.decode(await login_token(gw), options={"verify_signature": False})["jti"]
    )


async def test_a_wrong_password_and_an_unknown_user_get_the_same_401(gw: RunningGateway) -> None:
    await register(gw)
    wrong = await login(gw, "alice", "not the password")
    unknown = await login(gw, "bob", "not the password")
    unregistrable = await login(gw, "Not A Name", "not the password")
    assert wrong.status == unknown.status == unregistrable.status == 401
    assert wrong.body == unknown.body == unregistrable.body
    assert wrong.body["error"]["code"] == "invalid_credentials"


async def test_a_bad_login_body_is_400(gw: RunningGateway) -> None:
    for body in ({"username": "alice"}, {"password": "x"}, {"username": "", "password": "x"}):
        response = await gw.fetch("POST", LOGIN, body)
        assert response.status == 400 and error_code(response) == "invalid_input"


async def test_an_admin_made_by_the_command_line_logs_in_as_admin(gw: RunningGateway) -> None:
    server = gw.gateway.auth_server
    assert server is not None
    await server.accounts.register("root", PASSWORD, role="admin")
    token = await login_token(gw, "root")
    assert gw.gateway.tokens.verify(token).is_admin
    listed = await gw.fetch("GET", "/api/v1/workflow/list", token=token)
    assert listed.status == 200


# -- failed-login limits --------------------------------------------------------------------
# Over HTTP every request comes from this test's one address; the address variations call the
# gateway's AuthClient, as the login handler does, with the real AuthService behind it.


async def test_ten_failures_lock_that_name_from_that_address(gw: RunningGateway) -> None:
    await register(gw)
    await register(gw, "bob")
    for _ in range(10):
        assert (await login(gw, "alice", "wrong password")).status == 401

    locked = await login(gw, "alice", PASSWORD)  # even the right password
    assert locked.status == 429 and error_code(locked) == "too_many_attempts"
    assert locked.body["error"]["message"] == "too many failed logins; try again later"
    assert 0 < int(locked.headers["Retry-After"]) <= 300
    assert (await login(gw, "bob", PASSWORD)).status == 200  # the address is not locked


async def test_failures_from_one_address_for_many_names_reach_its_ceiling(
    tmp_path: Path,
) -> None:
    async with running_gateway(tmp_path, auth__max_login_failures_per_address=5) as gw:
        await register(gw)
        for i in range(5):
            assert (await login(gw, f"guess{i}", "wrong password")).status == 401
        locked = await login(gw, "alice", PASSWORD)
        assert locked.status == 429 and 0 < int(locked.headers["Retry-After"]) <= 300


async def test_successful_logins_do_not_count(gw: RunningGateway) -> None:
    await register(gw)
    for _ in range(12):
        assert (await login(gw)).status == 200
    for _ in range(9):
        assert (await login(gw, "alice", "wrong password")).status == 401
    assert (await login(gw)).status == 200


async def test_concurrent_guesses_cannot_slip_past_the_limit(gw: RunningGateway) -> None:
    await register(gw)
    guesses = [login(gw, "alice", f"guess {i}") for i in range(25)]
    statuses = sorted(r.status for r in await asyncio.gather(*guesses))
    assert statuses == [401] * 10 + [429] * 15


async def attempt(auth: AuthClient, username: str, password: str, address: str) -> int:
    """The HTTP status the login handler would answer."""
    return await auth_answer(auth.login(username, password, address), 200)


async def test_an_attacker_elsewhere_cannot_lock_the_owner_out(gw: RunningGateway) -> None:
    await register(gw)
    auth = gw.gateway.auth
    for _ in range(12):
        await attempt(auth, "alice", "wrong password", ATTACKER)
    assert await attempt(auth, "alice", PASSWORD, ATTACKER) == 429
    assert await attempt(auth, "alice", PASSWORD, OWNER) == 200


async def test_guesses_from_many_addresses_reach_the_names_ceiling_but_not_its_owner(
    gw: RunningGateway,
) -> None:
    await register(gw)
    auth = gw.gateway.auth
    assert await attempt(auth, "alice", PASSWORD, OWNER) == 200  # the owner signs in once
    statuses = [
        await attempt(auth, "alice", f"guess {i}", f"10.0.{i // 200}.{i % 200}") for i in range(101)
    ]
    assert statuses == [401] * 100 + [429]  # 100 failed logins for alice from 100 addresses
    assert await attempt(auth, "alice", PASSWORD, ELSEWHERE) == 429
    assert await attempt(auth, "alice", PASSWORD, OWNER) == 200  # an address it signed in from


async def test_concurrent_guesses_from_many_addresses_cannot_slip_past_the_ceiling(
    gw: RunningGateway,
) -> None:
    await register(gw)
    auth = gw.gateway.auth
    auth.limiter.per_name = 10
    guesses = [attempt(auth, "alice", f"guess {i}", f"10.1.0.{i}") for i in range(25)]
    assert sorted(await asyncio.gather(*guesses)) == [401] * 10 + [429] * 15


# -- validate and profile -------------------------------------------------------------------


async def test_validate_answers_who_a_token_speaks_for(gw: RunningGateway) -> None:
    profile = await register(gw)
    token = await login_token(gw)
    response = await gw.fetch("POST", VALIDATE, {"token": token})
    assert response.status == 200
    assert response.body["valid"] is True
    assert response.body["user"] == {"id": profile["id"], "username": "alice", "role": "user"}


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "x" * 8192])
async def test_validate_refuses_a_bad_token_with_401(gw: RunningGateway, token: str) -> None:
    response = await gw.fetch("POST", VALIDATE, {"token": token})
    assert response.status == 401 and error_code(response) == "invalid_token"


async def test_validate_refuses_an_expired_or_tampered_token(gw: RunningGateway) -> None:
    expired = gw.gateway.tokens.issue("alice", "alice", "user", expires_in=-10)
    good = gw.token("alice")
    head, _, signature = good.split(".")
    forged = jwt.encode(
        {"sub": "root", "role": "admin"}, "a guessed secret " * 4, algorithm="HS256"
    )
    tampered = f"{head}.{forged.split('.')[1]}.{signature}"
    for token in (expired, tampered, forged):
        response = await gw.fetch("POST", VALIDATE, {"token": token})
        assert response.status == 401, token


@pytest.mark.parametrize("body", [{}, {"token": ""}, {"token": 5}, {"token": "x" * 8193}])
async def test_validate_needs_a_token_field(gw: RunningGateway, body: dict[str, Any]) -> None:
    response = await gw.fetch("POST", VALIDATE, body)
    assert response.status == 400 and "token" in response.body["error"]["fields"]


async def test_the_profile_is_the_token_holders_and_never_shows_the_hash(
    gw: RunningGateway,
) -> None:
    profile = await register(gw)
    token = await login_token(gw)
    response = await gw.fetch("GET", PROFILE, token=token)
    assert response.status == 200
    assert response.body == profile
    assert set(response.body) == PROFILE_KEYS
    assert "argon2" not in json.dumps(response.body)


async def test_profile_needs_a_user_token(gw: RunningGateway) -> None:
    assert (await gw.fetch("GET", PROFILE)).status == 401
    assert (await gw.fetch("GET", PROFILE, token="garbage")).status == 401
    assert (await gw.fetch("GET", PROFILE, token=gw.service_token())).status == 403
    unregistered = await gw.fetch("GET", PROFILE, token=gw.token("carol"))  # a CLI token
    assert unregistered.status == 404 and error_code(unregistered) == "not_found"


async def test_wrong_methods_are_405(gw: RunningGateway) -> None:
    for method, path in (("GET", REGISTER), ("GET", LOGIN), ("GET", VALIDATE), ("POST", PROFILE)):
        response = await gw.fetch(method, path, token=gw.token("alice"))
        assert response.status == 405, (method, path)


# -- the login token everywhere -------------------------------------------------------------


async def test_the_login_token_works_on_every_workflow_endpoint_and_the_websocket(
    gw: RunningGateway,
) -> None:
    profile = await register(gw)
    token = await login_token(gw)

    workflow_id = await gw.upload(token, name="Blue Mug")
    status = await gw.fetch(
        "GET", f"/api/v1/workflow/status?workflow_id={workflow_id}", token=token
    )
    assert status.status == 200 and status.body["owner"] == profile["id"]
    listed = await gw.fetch("GET", "/api/v1/workflow/list", token=token)
    assert [w["id"] for w in listed.body["workflows"]] == [workflow_id]

    for via in ("protocol", "query"):
        conn = await gw.ws_connect(token, workflow_id, via=via)
        snapshot = json.loads(await conn.read_message())  # type: ignore[arg-type]
        conn.close()
        assert snapshot["type"] == "snapshot" and snapshot["workflow_id"] == workflow_id
        assert snapshot["data"]["product"]["name"] == "Blue Mug"

    cancelled = await gw.fetch(
        "POST", "/api/v1/workflow/cancel", {"workflow_id": workflow_id}, token=token
    )
    assert cancelled.status == 200 and cancelled.body["status"] == "cancelled"
    retried = await gw.fetch(
        "POST", "/api/v1/workflow/retry", {"workflow_id": workflow_id}, token=token
    )
    assert retried.status == 409  # a cancelled workflow is not retried
    bob = await gw.fetch("GET", "/api/v1/workflow/list", token=gw.token("bob"))
    assert bob.body["workflows"] == []  # another user sees none of it


async def test_requests_are_verified_locally_without_the_auth_service(
    gw: RunningGateway,
) -> None:
    """No RPC per request: with the AuthService stopped, a login token still works, while
    the auth endpoints answer 503 with Retry-After and /readyz reports it."""
    await register(gw)
    token = await login_token(gw)
    assert (await gw.fetch("GET", "/readyz")).body["auth"] == "ok"
    assert gw.gateway.auth_server is not None
    await gw.gateway.auth_server.stop()
    gw.gateway.auth.backoff = 0.01  # retries are tested elsewhere; keep this test quick

    assert (await gw.fetch("GET", "/api/v1/workflow/list", token=token)).status == 200
    assert (await gw.upload(token)) is not None
    for response in (
        await login(gw),
        await gw.fetch("POST", REGISTER, {"username": "bob", "password": PASSWORD}),
        await gw.fetch("POST", VALIDATE, {"token": token}),
        await gw.fetch("GET", PROFILE, token=token),
    ):
        assert response.status == 503 and error_code(response) == "auth_unavailable"
        assert response.headers["Retry-After"] == "1"
    ready = await gw.fetch("GET", "/readyz")
    assert ready.status == 503 and ready.body["auth"] == "unavailable"
    assert ready.body["store"] == "ok"


# -- on every store -------------------------------------------------------------------------


async def test_users_live_in_the_configured_store(tmp_path: Path, store_url: str) -> None:
    async with running_gateway(tmp_path, storage__url=store_url) as gw:
        profile = await register(gw)
        assert (
            await gw.fetch("POST", REGISTER, {"username": "alice", "password": PASSWORD})
        ).status == 409
        token = await login_token(gw)
        assert (await gw.fetch("GET", PROFILE, token=token)).body == profile
        assert (await login(gw, "alice", "wrong password")).status == 401
    async with running_gateway(tmp_path, storage__url=store_url) as again:  # a restart
        again_token = await login_token(again)
        assert (await again.fetch("GET", PROFILE, token=again_token)).body == profile
