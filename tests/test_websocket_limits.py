"""What a hostile WebSocket client can cost the gateway: memory, sockets, the loop.

The memory test runs a real `server.py` process and reads its resident set from /proc; the
others run a gateway in this process and count what it does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from procs import gateway_config, remote, start_gateway, wait_ready
from support import Calls, free_port, running_gateway

import settings as settings_module
from handlers.ws import WorkflowSocket
from stox.hub import Hub
from stox.workflow import Workflow

MiB = 1024 * 1024


def large_product(index: int) -> dict[str, Any]:
    """An upload at the schema's limits: ~129 KB once stored."""
    return {
        "name": f"Large {index}",
        "description": "d" * 10_000,
        "category": "Bulk",
        "price": 1.0,
        "images": [f"{index:04d}-{n:02d}-" + "x" * 2040 for n in range(50)],
        "metadata": {"blob": "m" * 16_000},
    }


def rss(pid: int) -> int:
    """Resident set size of process `pid`, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def kernel_send_queues(port: int) -> int:
    """Bytes the kernel holds unsent in the sockets of the server listening on `port`
    (the tx_queue of /proc/net/tcp, whose local port is that port)."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port:
            total += int(fields[4].split(":")[0], 16)
    return total


def stalled_socket(port: int, token: str) -> socket.socket:
    """A /ws client that completes the handshake and then never reads (a tiny receive
    buffer, so the gateway's writes back up quickly)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: bearer, {token}\r\nOrigin: http://127.0.0.1:{port}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1024)
        assert chunk, f"closed during the handshake: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


@contextlib.contextmanager
def closing_all(sockets: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


async def upload_all(gw: Any, token: str, indexes: range, concurrency: int = 4) -> None:
    queue = list(indexes)

    async def uploader() -> None:
        while queue:
            await gw.upload(token, **large_product(queue.pop()))

    await asyncio.gather(*(uploader() for _ in range(concurrency)))


# -- memory: sockets that never read -------------------------------------------------------

SOCKETS = 100
MAX_BACKLOG = 2 * MiB  # the default websocket.max_backlog
SNAPSHOT_CACHE = 16 * MiB  # the default websocket.snapshot_cache
# what the gateway may keep besides the sockets' backlogs: the shared snapshot cache, the
# pages being loaded, 100 handlers, and what the allocator does not return
SLACK = SNAPSHOT_CACHE + 64 * MiB
RSS_BOUND = SOCKETS * MAX_BACKLOG + SLACK
KERNEL_SEND_BUFFER = 256 * 1024  # the default websocket.kernel_send_buffer; Linux doubles it
KERNEL_BOUND = SOCKETS * 2 * KERNEL_SEND_BUFFER + 8 * MiB


async def test_sockets_that_never_read_keep_the_gateway_within_its_memory_bound(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = gateway_config(port, "stalled", f"sqlite:///{tmp_path}/stox.db", "")
    config += f"websocket:\n  max_sockets_per_user: {SOCKETS}\n"
    proc = start_gateway(tmp_path, "gateway", config)
    try:
        await wait_ready(proc, port)
        gw = remote(port)
        token = gw.token("alice")
        await upload_all(gw, token, range(100))
        baseline = rss(proc.popen.pid)

        peak = baseline

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss(proc.popen.pid))
                await asyncio.sleep(0.05)

        sampler = asyncio.ensure_future(sample())
        try:
            with closing_all([]) as sockets:
                for _ in range(SOCKETS):
                    sockets.append(stalled_socket(port, token))
                await asyncio.sleep(1)  # the snapshots go out as far as the sockets take them
                await upload_all(gw, token, range(100, 130))  # and changes flow to them all
                await asyncio.sleep(2)
                healthz = await gw.fetch("GET", "/healthz")
                kernel = kernel_send_queues(port)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        growth = peak - baseline
        print(f"RSS {baseline / MiB:.0f} MiB -> peak {peak / MiB:.0f} MiB (+{growth / MiB:.0f})")
        print(f"kernel send queues {kernel / MiB:.0f} MiB")
        assert healthz.status == 200, healthz.body
        assert kernel < KERNEL_BOUND, f"the kernel queues {kernel / MiB:.0f} MiB for them"
        assert growth < RSS_BOUND, (
            f"{SOCKETS} stalled sockets grew the gateway by {growth / MiB:.0f} MiB "
            f"(bound {RSS_BOUND / MiB:.0f} MiB = {SOCKETS} x {MAX_BACKLOG / MiB:.0f} MiB + "
            f"{SLACK / MiB:.0f} MiB)"
        )
    finally:
        assert proc.stop() == 0, proc.log()


# -- the loop: fifty snapshots at once -----------------------------------------------------


async def test_healthz_is_answered_while_fifty_snapshots_are_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_gateway(tmp_path, websocket__max_sockets_per_user=50) as gw:
        token = gw.token("alice")
        for index in range(100):
            await gw.upload(token, name=f"Mug {index}", description="d" * 5_000)
        await gw.gateway.orchestrator.drain()
        encodings = Calls(monkeypatch, Workflow, "public")
        sent = Calls(monkeypatch, WorkflowSocket, "send")  # messages handed to the sockets

        events: list[str] = []
        sent_when_answered = 0
        connected = 0
        all_connected = asyncio.Event()

        async def watch() -> None:
            nonlocal connected
            conn = await gw.ws_connect(token)
            connected += 1
            if connected == 50:
                all_connected.set()
            try:
                for _ in range(100):
                    message = await asyncio.wait_for(conn.read_message(), 20)
                    assert message is not None, (conn.close_code, conn.close_reason)
                events.append("snapshot")
            finally:
                conn.close()

        async def health() -> None:
            nonlocal sent_when_answered
            await all_connected.wait()
            response = await gw.fetch("GET", "/healthz")
            sent_when_answered = sent.count
            assert response.status == 200
            events.append("healthz")

        await asyncio.gather(*(watch() for _ in range(50)), health())
        assert events.count("snapshot") == 50
        assert sent.count == 50 * 100
        # answered while the snapshots were still being sent, not once they were all out
        assert sent_when_answered < sent.count, "/healthz waited for every snapshot"
        assert events.index("healthz") < 50
        assert encodings.count == 100, (
            "each workflow encoded once for the 50 sockets, not 5,000 times"
        )


# -- the settings --------------------------------------------------------------------------


def load_websocket(tmp_path: Path, yaml_text: str) -> settings_module.WebSocketSettings:
    path = tmp_path / "config.yaml"
    path.write_text("websocket:\n" + yaml_text)
    return settings_module.load(["--config", str(path)], {}).websocket


def test_the_websocket_settings_have_defaults_and_reach_the_hub(tmp_path: Path) -> None:
    defaults = settings_module.load([], {}).websocket
    assert defaults == settings_module.WebSocketSettings(
        max_backlog=settings_module.Size(2 * MiB),
        send_timeout=settings_module.Duration(30),
        max_sockets_per_user=10,
        snapshot_cache=settings_module.Size(16 * MiB),
        kernel_send_buffer=settings_module.Size(256 * 1024),
    )
    configured = load_websocket(
        tmp_path,
        "  max_backlog: 4MiB\n  send_timeout: 5s\n  max_sockets_per_user: 3\n  snapshot_cache: 0\n",
    )
    hub = Hub.from_settings(cast(Any, None), configured)
    assert (hub.max_backlog, hub.send_timeout, hub.max_sockets_per_user) == (4 * MiB, 5.0, 3)
    assert hub.documents.max_bytes == 0


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("  max_backlog: 1KiB\n", "websocket.max_backlog: expected at least 64KiB, got 1024"),
        ("  max_backlog: lots\n", "websocket.max_backlog: expected a size such as 1MiB"),
        ("  send_timeout: 0s\n", "websocket.send_timeout: expected at least 100ms"),
        ("  send_timeout: soon\n", "websocket.send_timeout: expected a duration"),
        ("  max_sockets_per_user: 0\n", "websocket.max_sockets_per_user: expected at least 1"),
        ("  max_sockets_per_user: many\n", "websocket.max_sockets_per_user: expected a whole"),
        ("  snapshot_cache: -1\n", "websocket.snapshot_cache: expected a size such as 1MiB"),
        ("  max_messages: 1000\n", "websocket.max_messages: unknown setting"),
    ],
)
def test_bad_websocket_settings_are_refused_by_name(
    tmp_path: Path, yaml_text: str, message: str
) -> None:
    with pytest.raises(settings_module.SettingsError) as refused:
        load_websocket(tmp_path, yaml_text)
    assert str(refused.value).startswith(message), refused.value
