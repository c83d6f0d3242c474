"""Clients that hold connections open on purpose (slowloris): over HTTP, sockets that send
nothing, headers a byte at a time or a body slowly; over /ws, handshakes never finished and
sockets that never answer a ping; and many users' sockets at once. Each is closed after a
configured time or refused past a configured count, while /healthz keeps answering.

The timeouts are configured short here; the tests wait for what the gateway does (a closed
socket, a close code), never for how long it took.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import UPLOAD, RunningGateway, eventually, running_gateway

import settings as settings_module
from handlers.ws import CLOSE_TRY_AGAIN_LATER

# short, but long enough that a request of the tests' own, on this busy loop, is not cut
SHORT = settings_module.Duration(1)
WITHIN = 20.0  # a generous bound on waiting for the gateway to act, not a measured time

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with running_gateway(
        tmp_path,
        server__idle_timeout=SHORT,
        server__body_timeout=SHORT,
        websocket__ping_interval=settings_module.Duration(0.2),
        websocket__ping_timeout=settings_module.Duration(0.2),
        websocket__max_sockets_per_user=100,
    ) as running:
        yield running


async def connect(gw: RunningGateway) -> Stream:
    return await asyncio.open_connection("127.0.0.1", gw.port)


async def closed_by_server(stream: Stream) -> bytes:
    """Everything the server sent until it closed the connection (it fails the test if the
    server never does)."""
    reader, _ = stream
    received = b""
    async with asyncio.timeout(WITHIN):
        while chunk := await _read(reader):
            received += chunk
    return received


async def _read(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read(65536)
    except ConnectionError:  # reset: closed as well
        return b""


async def trickle(stream: Stream, data: bytes, pause: float = 0.05) -> bytes:
    """Write `data` a byte at a time until the server closes the connection; what it sent."""
    _, writer = stream
    closed = asyncio.ensure_future(closed_by_server(stream))
    try:
        for byte in data:
            if closed.done():
                break
            with contextlib.suppress(ConnectionError):
                writer.write(bytes([byte]))
                await writer.drain()
            await asyncio.sleep(pause)
        return await closed
    finally:
        closed.cancel()
        writer.close()


def request_head(gw: RunningGateway, method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{gw.port}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def handshake(gw: RunningGateway, token: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return request_head(
        gw,
        "GET",
        "/ws",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Protocol: bearer, {token}",
        f"Origin: {gw.base_url}",
    )


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the unmasked frames a server sent."""
    found = []
    while len(data) >= 2:
        opcode, size = data[0] & 0x0F, data[1] & 0x7F
        start = 2
        if size == 126:
            (size,), start = struct.unpack("!H", data[2:4]), 4
        elif size == 127:
            (size,), start = struct.unpack("!Q", data[2:10]), 10
        found.append((opcode, data[start : start + size]))
        data = data[start + size :]
    return found


# -- HTTP ------------------------------------------------------------------------------------


async def test_sockets_that_send_nothing_or_part_of_a_request_are_closed(
    gw: RunningGateway,
) -> None:
    token = gw.token()
    silent = [await connect(gw) for _ in range(10)]
    # a request line and headers a byte at a time, without end: the time they take is bounded
    # as a whole, however steadily bytes arrive
    endless_head = request_head(gw, "GET", "/healthz")[:-2] + b"X-Slow: " + b"a" * 10_000
    slow_heads = [asyncio.ensure_future(trickle(await connect(gw), endless_head)) for _ in range(5)]
    # a WebSocket handshake started and never finished
    half_handshakes = [await connect(gw) for _ in range(5)]
    for _, writer in half_handshakes:
        writer.write(handshake(gw, token)[:-4])
    # a body announced and sent a byte at a time
    upload = request_head(
        gw,
        "POST",
        UPLOAD,
        f"Authorization: Bearer {token}",
        "Content-Type: application/json",
        "Content-Length: 5000",
    )
    slow_bodies = []
    for _ in range(5):
        stream = await connect(gw)
        stream[1].write(upload)
        body = b'{"name": "' + b"m" * 4000 + b'"}'
        slow_bodies.append(asyncio.ensure_future(trickle(stream, body)))
    # a connection kept alive after its request, then left idle
    idle = await connect(gw)
    idle[1].write(request_head(gw, "GET", "/healthz"))

    # meanwhile the gateway answers others
    answered = await gw.fetch("GET", "/healthz")
    assert answered.status == 200

    results = await asyncio.gather(
        *(closed_by_server(stream) for stream in silent),
        *slow_heads,
        *(closed_by_server(stream) for stream in half_handshakes),
        *slow_bodies,
        closed_by_server(idle),
    )
    assert results[:-1] == [b""] * 25, "closed without an answer"
    assert results[-1].startswith(b"HTTP/1.1 200 "), results[-1]
    listed = await gw.fetch("GET", "/api/v1/workflow/list", token=token)
    assert listed.status == 200
    assert listed.body["workflows"] == [], "a body that never arrived made nothing"
    assert gw.gateway.hub.subscriber_count == 0
    for _, writer in [*silent, *half_handshakes, idle]:
        writer.close()


async def test_a_request_within_the_timeouts_is_answered(gw: RunningGateway) -> None:
    """Bytes that come slowly but within the bounds are a request like any other."""
    stream = await connect(gw)
    _, writer = stream
    head = request_head(
        gw,
        "POST",
        UPLOAD,
        f"Authorization: Bearer {gw.token()}",
        "Content-Type: application/json",
        "Content-Length: 16",
        "Connection: close",
    )
    for part in (head[:20], head[20:], b'{"name": ', b'"Mug"}  '):
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(0.05)
    answer = await closed_by_server(stream)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 202 "), answer


# -- WebSocket -------------------------------------------------------------------------------


async def open_raw_socket(gw: RunningGateway, token: str) -> Stream:
    """A /ws socket through the handshake; it then answers nothing (no pong, no close)."""
    stream = await connect(gw)
    reader, writer = stream
    try:
        writer.write(handshake(gw, token))
        async with asyncio.timeout(WITHIN):
            head = await reader.readuntil(b"\r\n\r\n")
    except BaseException:
        writer.close()
        raise
    assert head.startswith(b"HTTP/1.1 101 "), head
    return stream


async def test_a_socket_that_never_answers_a_ping_is_closed_and_frees_its_slot(
    gw: RunningGateway,
) -> None:
    token = gw.token()
    listener = await gw.ws_connect(token)  # Tornado's client answers pings
    mute = await open_raw_socket(gw, token)
    await eventually(lambda: gw.gateway.hub.subscriber_count, lambda n: n == 2)

    sent = frames(await closed_by_server(mute))
    mute[1].close()
    opcodes = [opcode for opcode, _ in sent]
    assert 0x9 in opcodes, "pinged first"
    assert opcodes[-1] == 0x8, sent
    assert sent[-1][1] == struct.pack("!H", 1000) + b"ping timed out"
    await eventually(lambda: gw.gateway.hub.subscriber_count, lambda n: n == 1)

    # the client that answers its pings stays, through many ping intervals, and hears changes
    workflow_id = await gw.upload(token)
    async with asyncio.timeout(WITHIN):
        message = await listener.read_message()
    assert isinstance(message, str) and workflow_id in message
    assert listener.close_code is None
    listener.close()


async def test_sockets_past_the_instance_limit_are_closed_with_1013(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, websocket__max_sockets=3) as gw:
        sockets = [await gw.ws_connect(gw.token(user)) for user in ("alice", "bob", "carol")]
        refused = await gw.ws_connect(gw.token("dave"))
        async with asyncio.timeout(WITHIN):
            assert await refused.read_message() is None
        assert refused.close_code == CLOSE_TRY_AGAIN_LATER
        assert refused.close_reason == "server busy: at most 3 open sockets"
        refused.close()
        assert gw.gateway.hub.subscriber_count == 3

        sockets[0].close()  # a socket that goes makes room
        await eventually(lambda: gw.gateway.hub.subscriber_count, lambda n: n == 2)
        admitted = await gw.ws_connect(gw.token("dave"))
        workflow_id = await gw.upload(gw.token("dave"))
        async with asyncio.timeout(WITHIN):
            message = await admitted.read_message()
        assert isinstance(message, str) and workflow_id in message
        for conn in [*sockets[1:], admitted]:
            conn.close()


# -- /healthz under a hostile load ---------------------------------------------------------


async def flood(gw: RunningGateway, rounds: int) -> list[int]:
    """Bad requests of every kind, one after another; the statuses answered (0: the
    connection was closed without one)."""
    token = gw.token("mallory")
    statuses = []
    for index in range(rounds):
        kind = index % 4
        if kind == 0:
            response = await gw.fetch("POST", UPLOAD, raw=b'{"name": "Mug"', token=token)
        elif kind == 1:
            response = await gw.fetch("GET", "/api/v1/workflow/list", token="not.a.token")
        elif kind == 2:
            response = await gw.fetch("POST", UPLOAD, raw=b"\xff\xfe[", token=token)
        else:
            statuses.append(await huge_headers(gw))
            continue
        statuses.append(response.status)
    return statuses


async def huge_headers(gw: RunningGateway) -> int:
    stream = await connect(gw)
    stream[1].write(request_head(gw, "GET", "/healthz", "X-Big: " + "b" * 100_000))
    with contextlib.suppress(ConnectionError):
        await stream[1].drain()
    answer = await closed_by_server(stream)
    stream[1].close()
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


async def test_healthz_keeps_answering_while_hostile_clients_hold_and_flood_it(
    gw: RunningGateway,
) -> None:
    token = gw.token("mallory")
    held: list[Stream] = []
    stop = asyncio.Event()

    async def slowloris() -> None:
        """Keep 20 silent sockets open, replacing each one closed, and open mute WebSockets."""
        while not stop.is_set():
            while sum(not reader.at_eof() for reader, _ in held) < 20:
                held.append(await connect(gw))
            held.extend([await open_raw_socket(gw, token) for _ in range(5)])
            await asyncio.sleep(0.3)

    async def slow_head() -> None:
        endless = request_head(gw, "GET", "/healthz")[:-2] + b"X-Slow: " + b"a" * 10_000
        while not stop.is_set():
            await trickle(await connect(gw), endless, 0.1)

    holders = [
        asyncio.ensure_future(task) for task in (slowloris(), *(slow_head() for _ in range(5)))
    ]
    checks = 20
    try:
        await eventually(lambda: len(held), lambda count: count >= 25)  # the load is on
        flooding = asyncio.gather(*(flood(gw, 40) for _ in range(4)))
        answers = []
        for _ in range(checks):
            answers.append((await gw.fetch("GET", "/healthz")).status)
            await asyncio.sleep(0.05)
        flooded = await flooding
    finally:
        stop.set()
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        for _, writer in held:
            writer.close()
    assert answers == [200] * checks, answers
    statuses = [status for batch in flooded for status in batch]
    assert len(statuses) == 160
    assert all(status == 0 or 400 <= status < 500 for status in statuses), sorted(set(statuses))
    assert {400, 401} <= set(statuses)


# -- the settings ----------------------------------------------------------------------------


def load(tmp_path: Path, yaml_text: str) -> settings_module.Settings:
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    return settings_module.load(["--config", str(path)], {})


def test_the_timeouts_and_the_socket_limit_have_defaults() -> None:
    """What they do is shown above, with short values; 60 s covers a slow mobile upload of a
    1 MiB body, and Tornado's own default would leave a header read waiting an hour."""
    defaults = settings_module.load([], {})
    server, ws = defaults.server, defaults.websocket
    assert (server.idle_timeout, server.body_timeout) == (60.0, 60.0)
    assert (ws.ping_interval, ws.ping_timeout, ws.max_sockets) == (20.0, 20.0, 1000)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("server:\n  idle_timeout: 0s\n", "server.idle_timeout: expected at least 100ms"),
        ("server:\n  idle_timeout: never\n", "server.idle_timeout: expected a duration"),
        ("server:\n  body_timeout: 10ms\n", "server.body_timeout: expected at least 100ms"),
        ("websocket:\n  ping_interval: 0\n", "websocket.ping_interval: expected at least 100ms"),
        ("websocket:\n  ping_timeout: 0\n", "websocket.ping_timeout: expected at least 100ms"),
        (
            "websocket:\n  ping_interval: 5s\n  ping_timeout: 10s\n",
            "websocket.ping_timeout: expected at most websocket.ping_interval",
        ),
        ("websocket:\n  max_sockets: 0\n", "websocket.max_sockets: expected at least 1"),
    ],
)
def test_bad_timeouts_and_limits_are_refused_by_name(
    tmp_path: Path, yaml_text: str, message: str
) -> None:
    with pytest.raises(settings_module.SettingsError) as refused:
        load(tmp_path, yaml_text)
    assert str(refused.value).startswith(message), refused.value
