"""Body limits against a real gateway: a body over `server.max_body_size` is read and answered
413 on a connection that stays open; one over `server.max_drain_size` is answered at once and
the connection closed; nothing a client leaves half-sent keeps a handler or memory.

The requests are written by hand (RawConnection) where a client library would hide what is
being checked: chunked bodies, `Expect: 100-continue`, answers before the body is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
from procs import gateway_config, remote, start_gateway, wait_ready
from support import (
    COMPLETED,
    HEX32,
    LIST,
    UPLOAD,
    RunningGateway,
    assert_error,
    eventually,
    free_port,
    running_gateway,
)

import settings as settings_module

MAX_BODY = 1024 * 1024
MiB = 1024 * 1024
WS_HANDSHAKE = (
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Version: 13",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
)


class RawConnection:
    """A client connection that writes each request whole before it reads the answer.

    That is what urllib and most simple clients do: a server that answers early and closes
    with the body unread resets the connection under them, and they never see its answer.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    @contextlib.asynccontextmanager
    async def to(cls, gw: RunningGateway) -> AsyncIterator[RawConnection]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            yield cls(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def send(self, *parts: bytes) -> None:
        for part in parts:
            self.writer.write(part)
            await self.writer.drain()

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        """The status, headers (lower-case names) and body of the next answer."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(self.reader.readexactly(int(headers["content-length"])), 10)
        return status, headers, body

    async def exchange(self, *parts: bytes) -> tuple[int, dict[str, str], bytes]:
        await self.send(*parts)
        return await self.answer()

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 10) == b""


async def raw_exchange(gw: RunningGateway, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes on a fresh connection; the status, headers and body of the answer."""
    async with RawConnection.to(gw) as conn:
        return await conn.exchange(request)


def request_head(method: str, path: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]).encode()


def chunks(size: int, piece: int = 65536) -> bytes:
    """`size` bytes of chunked body, without the last (empty) chunk."""
    whole, rest = divmod(size, piece)
    body = b"%x\r\n%s\r\n" % (piece, b"a" * piece) * whole
    return body + (b"%x\r\n%s\r\n" % (rest, b"a" * rest) if rest else b"")


def assert_too_large(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 413, body[:300]
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "body_too_large"


async def test_a_body_over_the_limit_with_content_length_is_413(gw: RunningGateway) -> None:
    token = gw.token()
    padding = MAX_BODY - len(b'{"name":"x","description":""}')
    exactly = b'{"name":"x","description":"' + b"a" * padding + b'"}'
    assert len(exactly) == MAX_BODY
    # the size limit comes before the field checks: a body at the limit is read and checked
    at_limit = await gw.fetch("POST", UPLOAD, raw=exactly, token=token)
    assert_error(at_limit, 400, "invalid_input", "description")

    over = await gw.fetch("POST", UPLOAD, raw=exactly + b" ", token=token)
    assert_error(over, 413, "body_too_large")
    listed = await gw.fetch("GET", LIST, token=token)
    assert listed.body["workflows"] == []


@pytest.mark.parametrize(
    ("method", "path", "size", "chunked", "role"),
    [
        ("POST", COMPLETED, 10_000_000, False, "service"),
        ("POST", UPLOAD, 5 * MiB, False, "user"),
        ("POST", UPLOAD, 6 * MiB, True, "user"),
        ("GET", "/", 5 * MiB, False, None),
        ("GET", "/ws", 5 * MiB, True, "user"),
        ("POST", "/nowhere", 5 * MiB, False, None),
    ],
    ids=["10MB-step-completed", "5MiB-upload", "6MiB-chunked-upload", "index", "ws", "unknown"],
)
async def test_an_oversized_body_is_read_then_answered_413_and_the_connection_stays_open(
    gw: RunningGateway, method: str, path: str, size: int, chunked: bool, role: str | None
) -> None:
    headers = [
        "Content-Type: application/json",
        "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}",
    ]
    if role is not None:
        token = gw.service_token() if role == "service" else gw.token()
        headers.append(f"Authorization: Bearer {token}")
    if path == "/ws":
        headers += [
            *WS_HANDSHAKE,
            f"Origin: {gw.base_url}",
            f"Sec-WebSocket-Protocol: bearer, {token}",
        ]
    body = chunks(size) + b"0\r\n\r\n" if chunked else b"a" * size

    async with RawConnection.to(gw) as conn:
        assert_too_large(*await conn.exchange(request_head(method, path, *headers), body))
        # the whole body was read: the connection serves the next request
        status, _, health = await conn.exchange(request_head("GET", "/healthz"))
        assert status == 200 and json.loads(health)["status"] == "ok"


@pytest.mark.parametrize("path", [UPLOAD, "/", "/ws"])
async def test_a_streamed_chunked_body_over_the_limit_is_413(gw: RunningGateway, path: str) -> None:
    async def produce(write: Callable[[bytes], Awaitable[None]]) -> None:
        for _ in range(96):  # 6 MiB
            await write(b"a" * 65536)

    request = tornado.httpclient.HTTPRequest(
        gw.base_url + path,
        method="POST",  # tornado's client sends no other method's body chunked
        headers={"Authorization": f"Bearer {gw.token()}"},
        # no length: chunked (Tornado takes a coroutine function; its stubs say a Future)
        body_producer=produce,  # type: ignore[arg-type]
        request_timeout=20,
    )
    response = await tornado.httpclient.AsyncHTTPClient().fetch(request, raise_error=False)
    assert response.code == 413, response.error
    assert json.loads(response.body)["error"]["code"] == "body_too_large"


async def test_a_chunked_body_over_the_limit_is_413(gw: RunningGateway) -> None:
    request = request_head(
        "POST",
        UPLOAD,
        f"Authorization: Bearer {gw.token()}",
        "Content-Type: application/json",
        "Transfer-Encoding: chunked",
    )
    status, headers, body = await raw_exchange(gw, request + chunks(17 * 65536) + b"0\r\n\r\n")

    assert_too_large(status, headers, body)
    assert HEX32.match(headers["x-request-id"])
    listed = await gw.fetch("GET", LIST, token=gw.token())
    assert listed.body["workflows"] == []


async def test_a_small_chunked_body_is_accepted(gw: RunningGateway) -> None:
    payload = b'{"name":"chunked mug"}'
    request = (
        f"POST {UPLOAD} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gw.token()}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode() + b"".join(b"%x\r\n%s\r\n" % (1, payload[i : i + 1]) for i in range(len(payload)))
    status, _, body = await raw_exchange(gw, request + b"0\r\n\r\n")
    assert status == 202
    assert json.loads(body)["status"] == "running"


# a gateway with small limits, to cross the drain limit cheaply
SMALL = {"server__max_body_size": settings_module.Size(1024)}
DRAIN = 64 * 1024


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    limits: dict[str, Any] = {**SMALL, "server__max_drain_size": settings_module.Size(DRAIN)}
    async with running_gateway(tmp_path, **limits) as gateway:
        yield gateway


async def test_a_body_up_to_the_drain_limit_is_read_then_answered(small: RunningGateway) -> None:
    upload = request_head("POST", UPLOAD, f"Authorization: Bearer {small.token()}")
    async with RawConnection.to(small) as conn:
        sized = upload[:-2] + f"Content-Length: {DRAIN}\r\n\r\n".encode()
        assert_too_large(*await conn.exchange(sized, b"a" * DRAIN))
        streamed = upload[:-2] + b"Transfer-Encoding: chunked\r\n\r\n"
        status, headers, body = await conn.exchange(streamed, chunks(DRAIN) + b"0\r\n\r\n")
        assert_too_large(status, headers, body)
        assert "connection" not in headers
        assert (await conn.exchange(request_head("GET", "/healthz")))[0] == 200


async def test_a_body_declared_over_the_drain_limit_is_answered_at_once_then_closed(
    small: RunningGateway,
) -> None:
    head = request_head(
        "POST", UPLOAD, f"Authorization: Bearer {small.token()}", f"Content-Length: {DRAIN + 1}"
    )
    async with RawConnection.to(small) as conn:
        status, headers, body = await conn.exchange(head)  # without the body
        assert_too_large(status, headers, body)
        assert headers["connection"] == "close"
        assert await conn.closed_by_server()


async def test_a_chunked_body_past_the_drain_limit_is_answered_then_closed(
    small: RunningGateway,
) -> None:
    head = request_head(
        "POST", UPLOAD, f"Authorization: Bearer {small.token()}", "Transfer-Encoding: chunked"
    )
    async with RawConnection.to(small) as conn:
        status, headers, body = await conn.exchange(head, chunks(DRAIN + 1))  # and no end
        assert_too_large(status, headers, body)
        assert headers["connection"] == "close"
        assert await conn.closed_by_server()


async def test_a_client_waiting_to_continue_is_refused_before_it_sends_the_body(
    small: RunningGateway,
) -> None:
    head = request_head(
        "POST",
        UPLOAD,
        f"Authorization: Bearer {small.token()}",
        "Content-Length: 2048",
        "Expect: 100-continue",
    )
    async with RawConnection.to(small) as conn:
        status, headers, body = await conn.exchange(head)  # the 413, not "100 Continue"
        assert_too_large(status, headers, body)
        assert headers["connection"] == "close"
        assert await conn.closed_by_server()


def waiting_handlers() -> list[asyncio.Task[Any]]:
    """Tasks of handlers still running (Tornado's RequestHandler._execute)."""
    return [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "").endswith("._execute")
    ]


@pytest.mark.parametrize(
    ("path", "size"), [("/ws", 1000), (UPLOAD, 1000), ("/ws", 2 * MiB), (UPLOAD, 2 * MiB)]
)
async def test_a_client_that_leaves_mid_body_leaves_no_handler_waiting(
    gw: RunningGateway, path: str, size: int
) -> None:
    head = request_head("POST", path, f"Content-Length: {size}")
    async with RawConnection.to(gw) as conn:
        await conn.send(head, b"a" * (size // 2 + 1))  # past the limit, for the larger ones
        await eventually(waiting_handlers, within=5)
    await eventually(waiting_handlers, lambda tasks: not tasks, within=5)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
async def test_draining_keeps_no_body_in_memory(tmp_path: Path) -> None:
    port = free_port()
    config = gateway_config(port, "drain", f"sqlite:///{tmp_path}/stox.db", "")
    proc = start_gateway(tmp_path, "gateway", config)
    try:
        await wait_ready(proc, port)
        gw = remote(port)
        size = 60 * MiB
        head = request_head("POST", UPLOAD, f"Authorization: Bearer {gw.token()}")
        head = head[:-2] + f"Content-Length: {size}\r\n\r\n".encode()
        piece = b"a" * MiB
        async with RawConnection.to(gw) as conn:
            assert_too_large(*await conn.exchange(head, *([piece] * 60)))  # warmed up
            before = rss_mib(proc.popen.pid)
            for _ in range(5):
                assert_too_large(*await conn.exchange(head, *([piece] * 60)))
            grown = rss_mib(proc.popen.pid) - before
    finally:
        proc.stop()
    # 300 MiB were read and thrown away; a process that kept one body would grow by 60 MiB
    assert grown < 32, f"RSS grew by {grown:.0f} MiB"


def test_the_drain_limit_is_64_mib_and_no_smaller_than_the_body_limit(tmp_path: Path) -> None:
    assert settings_module.load([], {}).server.max_drain_size == 64 * MiB
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  max_body_size: 2MiB\n  max_drain_size: 1MiB\n")
    with pytest.raises(settings_module.SettingsError, match=r"^server\.max_drain_size: "):
        settings_module.load(["--config", str(config)], {})
