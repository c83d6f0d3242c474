"""Who may call what (docs/architecture.md#the-http-api): 401 without valid credentials, 403 for the
wrong role, and 404 (never 403) for another user's workflow."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from support import (
    CANCEL,
    COMPLETED,
    LIST,
    RETRY,
    STATUS,
    UPLOAD,
    RunningGateway,
    assert_error,
    free_port,
    gateway_settings,
    running_gateway,
    write_key_pair,
)

from handlers import completion_path
from settings import Endpoint, SettingsError
from stox.app import Gateway
from stox.auth.tokens import CannotIssue, TokenAuthority, load_private_key

SECRET = "test-secret-" + "x" * 32  # the harness's jwt.secret


# (method, path, body) of every endpoint that needs a token
PROTECTED = [
    ("POST", UPLOAD, {"name": "Mug"}),
    ("GET", f"{STATUS}?workflow_id={'a' * 32}", None),
    ("POST", COMPLETED, {"workflow_id": "a" * 32, "step_id": "b" * 32, "success": True}),
    ("GET", LIST, None),
    ("POST", CANCEL, {"workflow_id": "a" * 32}),
    ("POST", RETRY, {"workflow_id": "a" * 32}),
    (
        "POST",
        "/api/v1/workflow/review",
        {"workflow_id": "a" * 32, "step_id": "b" * 32, "decision": "approve"},
    ),
    ("GET", "/api/v1/pipelines", None),
]
PROTECTED_IDS = [f"{m} {p.split('?')[0].rsplit('/', 1)[-1]}" for m, p, _ in PROTECTED]


def claims(**changes: Any) -> dict[str, Any]:
    """Claims the gateway would accept, changed as given (None removes a claim)."""
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice",
        "username": "alice",
        "role": "user",
        "iat": now,
        "exp": now + 600,
        "iss": "stox",
        "aud": "stox",
        "jti": "j" * 32,
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(payload: dict[str, Any]) -> str:
    """A hand-made token with alg "none" and an empty signature."""
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(payload).encode())}."


def bad_tokens() -> dict[str, str]:
    other = TokenAuthority("another-secret-" + "y" * 32)
    with warnings.catch_warnings():  # the secret is short for HS512; beside the point here
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        hs512 = jwt.encode(claims(), SECRET, algorithm="HS512")
    good = jwt.encode(claims(), SECRET, algorithm="HS256")
    head, body, signature = good.split(".")
    return {
        "garbage": "garbage",
        "three garbage parts": "a.b.c",
        "empty parts": "..",
        "another secret": other.issue("alice", "alice", "user"),
        "tampered payload": f"{head}.{b64(json.dumps(claims(role='admin')).encode())}.{signature}",
        "truncated signature": f"{head}.{body}.{signature[:-4]}",
        "alg none (pyjwt)": jwt.encode(claims(), "", algorithm="none"),
        "alg none (by hand)": unsigned(claims()),
        "HS512 with the right secret": hs512,
        "missing exp": jwt.encode(claims(exp=None), SECRET, algorithm="HS256"),
        "missing iat": jwt.encode(claims(iat=None), SECRET, algorithm="HS256"),
        "missing sub": jwt.encode(claims(sub=None), SECRET, algorithm="HS256"),
        "missing iss": jwt.encode(claims(iss=None), SECRET, algorithm="HS256"),
        "missing aud": jwt.encode(claims(aud=None), SECRET, algorithm="HS256"),
        "missing role": jwt.encode(claims(role=None), SECRET, algorithm="HS256"),
        "wrong iss": jwt.encode(claims(iss="someone-else"), SECRET, algorithm="HS256"),
        "wrong aud": jwt.encode(claims(aud="another-app"), SECRET, algorithm="HS256"),
        "unknown role": jwt.encode(claims(role="root"), SECRET, algorithm="HS256"),
        "role list": jwt.encode(claims(role=["admin"]), SECRET, algorithm="HS256"),
        "numeric sub": jwt.encode(claims(sub=42), SECRET, algorithm="HS256"),
        "expired": jwt.encode(claims(exp=int(time.time()) - 10), SECRET, algorithm="HS256"),
        "not yet valid": jwt.encode(claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256"),
        "exp not a number": jwt.encode(claims(exp="tomorrow"), SECRET, algorithm="HS256"),
    }


BAD_TOKEN_NAMES = list(bad_tokens())


async def test_the_crafted_good_token_is_accepted(gw: RunningGateway) -> None:
    """The claims the bad tokens are made from are fine as they are."""
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    response = await gw.fetch("GET", LIST, token=token)
    assert response.status == 200


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=PROTECTED_IDS)
async def test_no_authorization_is_401_with_www_authenticate(
    gw: RunningGateway, method: str, path: str, body: Any
) -> None:
    response = await gw.fetch(method, path, body)
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "header", ["", "Bearer", "Bearer ", "Basic YWxpY2U6cHc=", "Token abc", "bearer"]
)
async def test_a_malformed_authorization_header_is_401(gw: RunningGateway, header: str) -> None:
    response = await gw.fetch("GET", LIST, headers={"Authorization": header})
    assert_error(response, 401, "unauthorized")
    assert "Bearer" in response.headers["WWW-Authenticate"]


@pytest.mark.parametrize("name", BAD_TOKEN_NAMES)
async def test_a_bad_token_is_401(gw: RunningGateway, name: str) -> None:
    token = bad_tokens()[name]
    for method, path, body in (PROTECTED[0], PROTECTED[3]):
        response = await gw.fetch(method, path, body, token=token)
        assert_error(response, 401, "invalid_token")
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    listed = await gw.fetch("GET", LIST, token=gw.token("alice"))
    assert listed.body["workflows"] == []  # the upload with the bad token stored nothing


async def test_a_token_issued_already_expired_is_401(gw: RunningGateway) -> None:
    token = gw.gateway.tokens.issue("alice", "alice", "user", expires_in=-10)
    response = await gw.fetch("GET", LIST, token=token)
    assert_error(response, 401, "invalid_token")


async def test_a_token_stops_working_when_it_expires_even_after_use(
    gw: RunningGateway,
) -> None:
    token = gw.gateway.tokens.issue("alice", "alice", "user", expires_in=1)
    assert (await gw.fetch("GET", LIST, token=token)).status == 200  # verified and cached
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    await asyncio.sleep(max(0.0, exp + 0.05 - time.time()))
    response = await gw.fetch("GET", LIST, token=token)
    assert_error(response, 401, "invalid_token")


async def test_a_user_token_cannot_report_completions(gw: RunningGateway) -> None:
    user = gw.token("alice")
    workflow_id = await gw.upload(user)
    status = await gw.fetch("GET", f"{STATUS}?workflow_id={workflow_id}", token=user)
    step = status.body["steps"][0]
    body = {"workflow_id": workflow_id, "step_id": step["step_id"], "success": True}

    for token in (user, gw.token("root", "admin")):
        response = await gw.fetch("POST", COMPLETED, body, token=token)
        assert_error(response, 403, "forbidden")

    after = await gw.fetch("GET", f"{STATUS}?workflow_id={workflow_id}", token=user)
    assert after.body["steps"][0] == step  # the step did not advance


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [item for item in PROTECTED if item[1] != COMPLETED],
    ids=[name for name, item in zip(PROTECTED_IDS, PROTECTED, strict=True) if item[1] != COMPLETED],
)
async def test_a_service_token_cannot_use_user_endpoints(
    gw: RunningGateway, method: str, path: str, body: Any
) -> None:
    response = await gw.fetch(method, path, body, token=gw.service_token())
    assert_error(response, 403, "forbidden")


async def test_a_service_token_cannot_upload_anything(gw: RunningGateway) -> None:
    response = await gw.fetch("POST", UPLOAD, {"name": "Mug"}, token=gw.service_token("imgsvc"))
    assert_error(response, 403, "forbidden")
    admin = await gw.fetch("GET", LIST, token=gw.token("root", "admin"))
    assert admin.body["workflows"] == []


# -- ownership -----------------------------------------------------------------------------


@pytest.fixture
async def failed_gw(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    """A gateway whose steps fail on the first failure report (max_attempts 1)."""

    def one_attempt(settings: Any) -> None:
        for step in settings.pipeline.steps:
            step.max_attempts = 1

    async with running_gateway(tmp_path, one_attempt) as gateway:
        yield gateway


async def alice_failed_workflow(gw: RunningGateway) -> str:
    alice = gw.token("alice")
    workflow_id = await gw.upload(alice, name="alice's mug")
    status = await gw.fetch("GET", f"{STATUS}?workflow_id={workflow_id}", token=alice)
    step = status.body["steps"][0]
    body = {"workflow_id": workflow_id, "step_id": step["step_id"], "success": False}
    failed = await gw.fetch("POST", COMPLETED, body, token=gw.service_token())
    assert failed.body["status"] == "failed"
    return workflow_id


async def test_another_users_workflow_is_404_not_403(failed_gw: RunningGateway) -> None:
    gw = failed_gw
    workflow_id = await alice_failed_workflow(gw)
    await gw.gateway.orchestrator.drain()
    before = await gw.gateway.store.get(workflow_id)
    bob = gw.token("bob")
    missing = "c" * 32

    status = await gw.fetch("GET", f"{STATUS}?workflow_id={workflow_id}", token=bob)
    error = assert_error(status, 404, "not_found")
    absent = await gw.fetch("GET", f"{STATUS}?workflow_id={missing}", token=bob)
    # nothing tells bob that alice's workflow exists
    assert error["message"].replace(workflow_id, missing) == absent.body["error"]["message"]
    assert error.get("fields") == absent.body["error"].get("fields")

    for path in (RETRY, CANCEL):
        response = await gw.fetch("POST", path, {"workflow_id": workflow_id}, token=bob)
        assert_error(response, 404, "not_found")

    await gw.gateway.orchestrator.drain()
    after = await gw.gateway.store.get(workflow_id)
    assert after is not None and before is not None
    assert after["status"] == "failed"
    assert after["steps"] == before["steps"]
    assert after["version"] == before["version"]


async def test_the_owner_can_retry_and_cancel(failed_gw: RunningGateway) -> None:
    gw = failed_gw
    workflow_id = await alice_failed_workflow(gw)
    alice = gw.token("alice")
    retried = await gw.fetch("POST", RETRY, {"workflow_id": workflow_id}, token=alice)
    assert retried.status == 200 and retried.body["status"] == "running"
    cancelled = await gw.fetch("POST", CANCEL, {"workflow_id": workflow_id}, token=alice)
    assert cancelled.status == 200 and cancelled.body["status"] == "cancelled"


async def test_lists_show_only_the_users_own_workflows(gw: RunningGateway) -> None:
    alice, bob = gw.token("alice"), gw.token("bob")
    alices = [await gw.upload(alice, name=f"a{i}") for i in range(2)]
    bobs = [await gw.upload(bob, name="b0")]

    bob_list = await gw.fetch("GET", LIST, token=bob)
    alice_list = await gw.fetch("GET", LIST, token=alice)
    bob_running = await gw.fetch("GET", f"{LIST}?status=running", token=bob)

    assert [w["id"] for w in bob_list.body["workflows"]] == bobs
    assert [w["id"] for w in alice_list.body["workflows"]] == alices[::-1]
    assert [w["id"] for w in bob_running.body["workflows"]] == bobs
    assert all(w["owner"] == "bob" for w in bob_list.body["workflows"])


async def test_an_admin_sees_every_workflow(gw: RunningGateway) -> None:
    alice, bob = gw.token("alice"), gw.token("bob")
    alices = await gw.upload(alice)
    bobs = await gw.upload(bob)
    admin = gw.token("root", "admin")

    status = await gw.fetch("GET", f"{STATUS}?workflow_id={alices}", token=admin)
    listed = await gw.fetch("GET", LIST, token=admin)

    assert status.status == 200
    assert status.body["id"] == alices and status.body["owner"] == "alice"
    assert [w["id"] for w in listed.body["workflows"]] == [bobs, alices]


def test_the_authority_issues_only_known_roles() -> None:
    authority = TokenAuthority(SECRET)
    principal = authority.verify(authority.issue("alice", "alice", "admin"))
    assert principal.is_admin and principal.id == "alice"
    with pytest.raises(ValueError):
        authority.issue("alice", "alice", "root")


# -- key pairs: a gateway that holds only the public key (EdDSA, RS256) ----------------------


@dataclass
class KeyPair:
    algorithm: str
    private_file: Path
    public_file: Path

    @property
    def private_key(self) -> Any:
        return load_private_key(self.private_file.read_bytes(), self.algorithm)

    @property
    def signer(self) -> TokenAuthority:
        return TokenAuthority(algorithm=self.algorithm, private_key=self.private_key)

    def sign(self, payload: dict[str, Any]) -> str:
        return jwt.encode(payload, self.private_key, algorithm=self.algorithm)


@pytest.fixture(scope="module")
def key_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    """The gateway's pair and a stranger's, of each algorithm (RSA keys are slow to make)."""
    folder = tmp_path_factory.mktemp("keys")
    pairs = {}
    for algorithm in ("EdDSA", "RS256"):
        for owner in ("gateway", "stranger"):
            files = write_key_pair(folder, algorithm, f"{owner}-{algorithm}")
            pairs[f"{owner} {algorithm}"] = KeyPair(algorithm, *files)
    return pairs


@pytest.fixture(params=["EdDSA", "RS256"])
async def keyed(
    request: pytest.FixtureRequest, tmp_path: Path, key_pairs: dict[str, KeyPair]
) -> AsyncIterator[tuple[RunningGateway, KeyPair]]:
    """A gateway configured with the public key of `key_pairs["gateway ALG"]` only.

    Its AuthService is remote, and nothing listens there: verification is local.
    """
    pair = key_pairs[f"gateway {request.param}"]

    def public_key_only(settings: Any) -> None:
        settings.jwt.secret = ""
        settings.jwt.algorithm = pair.algorithm
        settings.jwt.public_key_file = str(pair.public_file)
        settings.services.auth = Endpoint("127.0.0.1", free_port())

    async with running_gateway(tmp_path, public_key_only) as gateway:
        yield gateway, pair


def hs256_by_hand(payload: dict[str, Any], key: bytes) -> str:
    """An HS256 token whose HMAC key is `key` (pyjwt refuses PEM keys as HMAC secrets)."""
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}."
    signing_input += b64(json.dumps(payload).encode())
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


async def test_a_public_key_gateway_accepts_tokens_signed_with_the_private_key(
    keyed: tuple[RunningGateway, KeyPair],
) -> None:
    gw, pair = keyed
    token = pair.signer.issue("alice", "alice", "user")
    assert jwt.get_unverified_header(token)["alg"] == pair.algorithm
    assert (await gw.fetch("GET", LIST, token=token)).status == 200
    workflow_id = await gw.upload(token)
    status = await gw.fetch("GET", f"{STATUS}?workflow_id={workflow_id}", token=token)
    assert status.status == 200 and status.body["owner"] == "alice"


async def test_a_public_key_gateway_cannot_issue_tokens(
    keyed: tuple[RunningGateway, KeyPair],
) -> None:
    gw, _ = keyed
    assert not gw.gateway.tokens.can_issue
    with pytest.raises(CannotIssue):
        gw.gateway.tokens.issue("alice", "alice", "user")


def test_a_gateway_running_the_auth_service_needs_the_private_key(
    tmp_path: Path, key_pairs: dict[str, KeyPair]
) -> None:
    pair = key_pairs["gateway EdDSA"]
    settings = gateway_settings(tmp_path, jwt__secret="", jwt__algorithm="EdDSA")
    settings.jwt.public_key_file = str(pair.public_file)
    with pytest.raises(SettingsError, match=r"jwt\.private_key_file"):
        # the built-in AuthService would have to sign tokens
        Gateway(settings, completion_path=completion_path())


async def test_a_bad_token_is_401_with_a_key_pair(
    keyed: tuple[RunningGateway, KeyPair], key_pairs: dict[str, KeyPair]
) -> None:
    gw, pair = keyed
    other_algorithm = "RS256" if pair.algorithm == "EdDSA" else "EdDSA"
    good = pair.sign(claims())
    head, body, signature = good.split(".")
    attacks = {
        "garbage": "garbage",
        "alg none": unsigned(claims()),
        "HS256 keyed with the public key (algorithm confusion)": hs256_by_hand(
            claims(), pair.public_file.read_bytes()
        ),
        "HS256 with the test secret": jwt.encode(claims(), SECRET, algorithm="HS256"),
        "a stranger's key": key_pairs[f"stranger {pair.algorithm}"].sign(claims()),
        f"{other_algorithm}": key_pairs[f"gateway {other_algorithm}"].sign(claims()),
        "tampered payload": f"{head}.{b64(json.dumps(claims(role='admin')).encode())}.{signature}",
        "truncated signature": f"{head}.{body}.{signature[:-4]}",
        "expired": pair.sign(claims(exp=int(time.time()) - 10)),
        "wrong iss": pair.sign(claims(iss="someone-else")),
        "wrong aud": pair.sign(claims(aud="another-app")),
        "missing exp": pair.sign(claims(exp=None)),
    }
    accepted = {}
    for name, token in attacks.items():
        response = await gw.fetch("GET", LIST, token=token)
        if response.status != 401 or response.body["error"]["code"] != "invalid_token":
            accepted[name] = response.status
    assert accepted == {}
    assert (await gw.fetch("GET", LIST, token=good)).status == 200
