"""server.py runs on uvloop's event loop unless `server.event_loop` (STOX_EVENT_LOOP) asks for
asyncio's, and its start-up line says which; everything on that loop works, the built-in
AuthService (grpc.aio, server and client) included."""

from __future__ import annotations

from pathlib import Path

import pytest
from procs import gateway_config, remote, start_gateway, wait_ready
from support import STATUS, free_port

from stox import version

CHEAP_HASHES = "auth:\n  hash_time_cost: 1\n  hash_memory_cost: 1024\n  hash_parallelism: 1\n"
CREDENTIALS = {"username": "alice", "password": "correct horse battery"}


@pytest.mark.parametrize(
    ("env", "loop"),
    [({}, "uvloop"), ({"STOX_EVENT_LOOP": "asyncio"}, "asyncio")],
    ids=["default", "STOX_EVENT_LOOP=asyncio"],
)
async def test_server_py_runs_and_reports_its_event_loop(
    tmp_path: Path, env: dict[str, str], loop: str
) -> None:
    port = free_port()
    config = gateway_config(port, "loops", f"sqlite:///{tmp_path}/stox.db", "") + CHEAP_HASHES
    gateway = start_gateway(tmp_path, "gateway", config, **env)
    try:
        await wait_ready(gateway, port)  # /readyz asks the AuthService's health service
        client = remote(port)
        registered = await client.fetch("POST", "/api/v1/auth/register", CREDENTIALS)
        assert registered.status == 201, registered.body
        login = await client.fetch("POST", "/api/v1/auth/login", CREDENTIALS)
        assert login.status == 200, login.body
        token = login.body["access_token"]
        profile = await client.fetch("GET", "/api/v1/auth/profile", token=token)
        assert profile.status == 200, profile.body
        workflow_id = await client.upload(token)
        status = await client.fetch("GET", f"{STATUS}?workflow_id={workflow_id}", token=token)
        assert status.body["status"] == "running", status.body
    finally:
        assert gateway.stop() == 0, gateway.log()
    started = [line for line in gateway.log().splitlines() if "listening on" in line]
    assert any(line.endswith(f"bus in-process, loop {loop})") for line in started), started
    gateway_lines = [line for line in started if "gateway" in line and "AuthService" not in line]
    assert gateway_lines and all(version.describe() in line for line in gateway_lines), started
