"""A minimal HTTP/1.1 keep-alive client for the benchmarks' load, and the gateway's paths.

One connection per client, Content-Length bodies, requests one at a time: several times
cheaper per request than tornado's AsyncHTTPClient, so the load generator stays out of the
way of the server it measures.
"""

from __future__ import annotations

import asyncio
import socket

UPLOAD_PATH = "/api/v1/workflow/upload"
STEP_PATH = "/api/v1/workflow/step-completed"


class ProtocolError(Exception):
    """The server's answer was not HTTP we understand."""


# what a failed request is counted as, besides a non-2xx status
TRANSPORT_ERRORS = (TimeoutError, OSError, asyncio.IncompleteReadError, ProtocolError)


def error_name(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, asyncio.IncompleteReadError | ConnectionError):
        return "connection closed"
    return type(exc).__name__


class HttpClient:
    """One keep-alive connection; requests go one at a time. Reconnects when needed."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.host_header = f"{host}:{port}".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: bytes = b""
    ) -> tuple[int, bytes]:
        """(status, body). `headers` are ready-made `Name: value\\r\\n` lines."""
        try:
            async with asyncio.timeout(self.timeout):
                if self.writer is None:
                    await self._connect()
                assert self.reader is not None and self.writer is not None
                self.writer.write(
                    b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n%s\r\n%s"
                    % (
                        method.encode(),
                        path.encode(),
                        self.host_header,
                        len(body),
                        headers,
                        body,
                    )
                )
                status, keep_alive, data = await self._read_response(self.reader)
        except BaseException:
            self.close()  # a half-read answer leaves the connection unusable
            raise
        if not keep_alive:
            self.close()
        return status, data

    @staticmethod
    async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        keep_alive = parts[0] == b"HTTP/1.1"
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                token = value.strip().lower()
                keep_alive = token != b"close" and (keep_alive or token == b"keep-alive")
        if chunked:
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailers
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            return status, keep_alive, b"".join(chunks)
        if length is not None:
            return status, keep_alive, await reader.readexactly(length)
        if status in (204, 304) or 100 <= status < 200:
            return status, keep_alive, b""
        return status, False, await reader.read()  # body until close


def auth_headers(token: str) -> bytes:
    return f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n".encode()
