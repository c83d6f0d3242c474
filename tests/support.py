"""A real gateway on a free port for tests, with helpers to call it as clients do."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tornado.httpclient
import tornado.netutil
import tornado.websocket

import handlers
import settings as settings_module
from handlers.server import make_http_server
from stox.app import Gateway
from stox.auth.tokens import SERVICE, USER
from stox.bus.base import Event, PublishError

UPLOAD = "/api/v1/workflow/upload"
STATUS = "/api/v1/workflow/status"
COMPLETED = "/api/v1/workflow/step-completed"
LIST = "/api/v1/workflow/list"
CANCEL = "/api/v1/workflow/cancel"
RETRY = "/api/v1/workflow/retry"


@dataclass
class Response:
    status: int
    body: Any
    headers: Any


@dataclass
class RunningGateway:
    gateway: Gateway
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def token(self, user: str = "alice", role: str = USER, expires_in: float | None = None) -> str:
        return self.gateway.tokens.issue(user, user, role, expires_in)

    def service_token(self, name: str = "worker") -> str:
        return self.gateway.tokens.issue(f"service:{name}", name, SERVICE)

    async def status(self, workflow_id: str) -> dict[str, Any]:
        """The workflow as its owner (alice) gets it; asserts a 200."""
        response = await self.fetch(
            "GET", f"/api/v1/workflow/status?workflow_id={workflow_id}", token=self.token()
        )
        assert response.status == 200, response.body
        return dict(response.body)

    async def wait_finished(self, ids: list[str], within: float = 10.0) -> dict[str, Any]:
        """Poll until none of `ids` is running any more; their documents by id."""
        async with asyncio.timeout(within):
            while True:
                docs = {workflow_id: await self.status(workflow_id) for workflow_id in ids}
                if all(doc["status"] != "running" for doc in docs.values()):
                    return docs
                await asyncio.sleep(0.02)

    async def fetch(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is None and method in ("POST", "PUT", "PATCH"):
            data = b""
        request = tornado.httpclient.HTTPRequest(
            self.base_url + path,
            method=method,
            body=data,
            headers=all_headers,
            allow_nonstandard_methods=True,
            request_timeout=20,
        )
        client = tornado.httpclient.AsyncHTTPClient()
        response = await client.fetch(request, raise_error=False)
        text = response.body or b""
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = text.decode(errors="replace")
        return Response(response.code, parsed, response.headers)

    async def upload(self, token: str, **product: Any) -> str:
        response = await self.fetch(
            "POST", "/api/v1/workflow/upload", {"name": "Mug", **product}, token=token
        )
        assert response.status == 202, response.body
        return str(response.body["workflow_id"])

    async def ws_connect(
        self,
        token: str | None,
        workflow_id: str | None = None,
        *,
        origin: str | None = None,
        via: str = "protocol",
    ) -> tornado.websocket.WebSocketClientConnection:
        """Open /ws with the token in Sec-WebSocket-Protocol (via="protocol") or ?token=."""
        query = []
        if workflow_id:
            query.append(f"workflow_id={workflow_id}")
        if token and via == "query":
            query.append(f"token={token}")
        url = self.ws_url + ("?" + "&".join(query) if query else "")
        headers = {"Origin": origin or self.base_url}
        subprotocols = ["bearer", token] if token and via == "protocol" else None
        request = tornado.httpclient.HTTPRequest(url, headers=headers, request_timeout=10)
        return await tornado.websocket.websocket_connect(request, subprotocols=subprotocols)


ROOT = Path(__file__).resolve().parent.parent


def load_worker() -> ModuleType:
    """examples/worker.py, the reference worker, as a module."""
    spec = importlib.util.spec_from_file_location("reference_worker", ROOT / "examples/worker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stox_environ(**env: str) -> dict[str, str]:
    """This process's environment without STOX_* variables, plus `env` (the project is
    installed in the test venv, so `python -m stox` runs from any directory)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STOX_")}
    environ.update(env)
    return environ


def run_cli(
    cwd: Path, *args: str, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m stox ARGS` in `cwd`, with no STOX_* variables but those given."""
    return subprocess.run(
        [sys.executable, "-m", "stox", *args],
        cwd=cwd,
        env=stox_environ(**env),
        input=input,
        capture_output=True,
        text=True,
        timeout=30,
    )


def completion(
    workflow_id: str,
    step_id: str,
    step_type: str,
    success: bool = True,
    *,
    result: dict[str, Any] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """A step-completed body: `result` (by default a small one), or `error` (default "boom")."""
    body: dict[str, Any] = {
        "workflow_id": workflow_id,
        "step_id": step_id,
        "step_type": step_type,
        "success": success,
    }
    if success:
        body["result"] = result if result is not None else {"done": step_type}
    else:
        body["error"] = error or "boom"
    return body


# -- the tests' toolbox: one copy of each helper ---------------------------------------------

HEX32 = re.compile(r"^[0-9a-f]{32}$")
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, where a test's Clock starts

# a product as a shop uploads it, every field filled in (callers that change it copy it first)
PRODUCT: dict[str, Any] = {
    "name": "Desk lamp",
    "description": "A brass desk lamp",
    "images": ["https://img.example/lamp.jpg"],
    "category": "home",
    "price": 19.5,
    "metadata": {"sku": "L-1"},
}


class Clock:
    """A clock for the code under test (`clock=`) that moves only when the test moves it."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def assert_error(
    response: Response, status: int, code: str | None = None, field: str | None = None
) -> dict[str, Any]:
    """The response is the one JSON error shape, with a request id, naming `field`; the error."""
    assert response.status == status, response.body
    assert response.headers.get("Content-Type", "").startswith("application/json")
    assert HEX32.match(response.headers.get("X-Request-Id", "")), response.headers
    assert isinstance(response.body, dict) and set(response.body) == {"error"}, response.body
    error = response.body["error"]
    assert set(error) <= {"code", "message", "fields"}
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if field is not None:
        assert field in error.get("fields", {}), error
    return dict(error)


async def report(
    gw: RunningGateway,
    workflow_id: str,
    step: Mapping[str, Any],
    *,
    success: bool = True,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    step_type: str | None = None,
    token: str | None = None,
) -> Response:
    """POST a service's report on `step` (a step of a workflow document: its `step_id`, and its
    `name` unless `step_type` is given); a service token unless `token` is given."""
    body = completion(
        workflow_id,
        step["step_id"],
        step_type or step["name"],
        success,
        result=result,
        error=error,
    )
    return await gw.fetch("POST", COMPLETED, body, token=token or gw.service_token())


async def eventually(
    probe: Callable[[], Any], check: Callable[[Any], object] = bool, within: float = 10.0
) -> Any:
    """Poll `probe` (a function, or a coroutine function) until `check` holds for what it
    returns, and return that; fail the test, with the last value, after `within` seconds."""
    value: Any = None
    limit = asyncio.timeout(within)
    try:
        async with limit:
            while True:
                value = probe()
                if inspect.isawaitable(value):
                    value = await value
                if check(value):
                    return value
                await asyncio.sleep(0.02)
    except TimeoutError:
        if not limit.expired():
            raise
        raise AssertionError(f"not reached within {within:g} s; last value: {value!r}") from None


def free_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_settings(tmp_path: Path, **overrides: Any) -> settings_module.Settings:
    """Settings for a test gateway: SQLite in tmp_path, fast timers, a fixed secret."""
    settings = settings_module.load([], {})
    settings.storage.url = f"sqlite:///{tmp_path}/stox.db"
    settings.jwt.secret = "test-secret-" + "x" * 32
    settings.server.sweep_interval = settings_module.Duration(0.05)
    settings.server.relay_interval = settings_module.Duration(0.5)
    settings.logging.format = "text"
    # cheap password hashes for tests; the defaults (argon2id's recommended) take ~50 ms
    settings.auth.hash_time_cost = 1
    settings.auth.hash_memory_cost = 1024
    settings.auth.hash_parallelism = 1
    for dotted, value in overrides.items():
        target: Any = settings
        *parents, leaf = dotted.split("__")
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return settings


@asynccontextmanager
async def running_gateway(
    tmp_path: Path,
    configure: Callable[[settings_module.Settings], None] | None = None,
    gateway_options: Mapping[str, Any] | None = None,
    port: int | None = None,
    **overrides: Any,
) -> AsyncIterator[RunningGateway]:
    """Start a gateway on `port` (default: a free one); `overrides` use `section__field=value`.

    `gateway_options` go to `Gateway(...)` (a bus, a clock, demo-worker options).
    """
    settings = gateway_settings(tmp_path, **overrides)
    # The listening socket is bound first and held: a port picked free and bound later can be
    # taken meanwhile (by the AuthService's own free port, or any outgoing connection).
    sockets = tornado.netutil.bind_sockets(port or 0, "127.0.0.1")
    port = int(sockets[0].getsockname()[1])
    settings.server.port = port
    settings.cors.allowed_origins = [f"http://127.0.0.1:{port}"]
    try:
        if configure is not None:
            configure(settings)
        gateway = Gateway(
            settings, completion_path=handlers.completion_path(), **(gateway_options or {})
        )
        await gateway.start()
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    server = make_http_server(handlers.make_app(gateway), settings.server)
    server.add_sockets(sockets)
    metrics = handlers.metrics_server(gateway)
    try:
        yield RunningGateway(gateway, port)
    finally:
        server.stop()
        if metrics is not None:
            metrics.stop()
        await server.close_all_connections()
        await gateway.stop()


class Calls:
    """Counts the calls of `owner.name`, patched through `monkeypatch` (undone after the test)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
        self.count = 0
        original = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


async def auth_answer(call: Awaitable[Any], ok: int) -> int:
    """The HTTP status the auth handlers would answer for an AuthClient `call`: `ok`, 429
    when a limit refused it, or the status its failure maps to."""
    from stox.auth.client import AuthCallError
    from stox.auth.limits import TooManyAttempts

    try:
        await call
    except TooManyAttempts:
        return 429
    except AuthCallError as exc:
        return exc.http_status
    return ok


def write_key_pair(folder: Path, algorithm: str, name: str = "jwt") -> tuple[Path, Path]:
    """A new EdDSA (Ed25519) or RS256 (RSA 2048) key pair as PEM files: (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if algorithm == "EdDSA":
        key: Any = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def unbatched(event: Event) -> list[Event]:
    """A batch of change notifications (stox/changes.py) as the `workflow.changed` events it
    carries; any other event as it is."""
    from stox.changes import CHANGES_ROUTING_KEY
    from stox.workflow import CHANGE_ROUTING_KEY

    if event.routing_key != CHANGES_ROUTING_KEY:
        return [event]
    return [
        Event(
            CHANGE_ROUTING_KEY,
            item["payload"],
            item["message_id"],
            item["payload"]["workflow_id"],
            event.timestamp,
        )
        for item in event.payload["notifications"]
    ]


class RecordingBus:
    """An EventBus that confirms into `events`, or raises PublishError when told to."""

    kind = "recording"
    remote_consumers = False

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.fail = False
        self.allow: int | None = None  # confirm this many more, then fail
        self.connected = True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def publish(self, event: Event) -> None:
        await asyncio.sleep(0)  # the broker round trip
        if self.fail or self.allow == 0:
            raise PublishError("broker unavailable")
        if self.allow is not None:
            self.allow -= 1
        self.events.extend(unbatched(event))

    async def declare(self, queue: str, bindings: Any, *, exclusive: bool = False) -> None:
        pass

    async def consume(self, queue: str, handler: Any) -> None:
        pass

    def keys(self) -> list[str]:
        return [e.routing_key for e in self.events]
