"""The client side of bench/ws.py: a minimal WebSocket client, and the worker processes that
hold its sockets.

A socket is an asyncio.Protocol on a raw TCP connection: a hand-written upgrade request (the
token as `Sec-WebSocket-Protocol: bearer, <jwt>`), a reader of the frames the gateway sends
(unmasked; continuation frames are joined, though Tornado sends each message as one frame),
a masked pong for each ping and a close frame answering a close. It has no task and no
stream of its own, so one process holds ten thousand of them cheaply, which Tornado's client
does not. `Sec-WebSocket-Accept` is not checked: the peer is the gateway under test.

Of each message only the head the hub writes first is read (type, workflow id, version),
with a regular expression; a tracked socket (one that drives its workflow) also decodes the
document of its snapshot and of each dispatch, for the next step's `step_id`.

A worker runs one asyncio loop and answers bench/ws.py's commands over a pipe, one at a
time (open sockets, wait for a version, collect deliveries, upload and subscribe workflows
of its own, drive step-completed reports at a rate, close). Times are `time.monotonic()`:
CLOCK_MONOTONIC, one clock for every process on the host, so a send time taken in one
process and a receipt time taken in another compare.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import signal
import socket
import time
import traceback
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

from httpclient import (
    STEP_PATH,
    TRANSPORT_ERRORS,
    UPLOAD_PATH,
    HttpClient,
    auth_headers,
    error_name,
)
from roles import product

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux
MAX_HEAD = 16 * 1024
# the hub encodes the head of every message first, in this order (stox/hub.py `encode`)
HEAD = re.compile(rb'\{"type":"(\w+)","workflow_id":"(\w+)","version":(\d+)')
DOCUMENTED = (b"snapshot", b"step_dispatched", b"workflow_completed", b"workflow_failed")
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10

now = time.monotonic


def upgrade_request(path: str, token: str, host: str, origin: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: bearer, {token}\r\nOrigin: {origin}\r\n\r\n"
    ).encode()


class WsClient(asyncio.Protocol):
    """One socket; `seen` maps each version received to when its last message arrived."""

    def __init__(self, request: bytes, track: bool) -> None:
        loop = asyncio.get_running_loop()
        self.request = request
        self.track = track
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.fragments: list[bytes] = []
        self.opened: asyncio.Future[int] = loop.create_future()  # the upgrade's HTTP status
        self.first: asyncio.Future[None] = loop.create_future()  # the first message (or loss)
        self.lost: asyncio.Future[None] = loop.create_future()
        self.close_code: int | None = None  # from the server's close frame
        self.messages = 0
        self.unreadable = 0  # messages without the expected head
        self.seen: dict[int, float] = {}
        # a tracked socket's workflow, from its documents: the newest version decoded, and
        # the dispatched step a report may complete (None while a report is in flight)
        self.workflow_id = ""
        self.version = 0
        self.step: tuple[str, str] | None = None
        self.sent: dict[int, float] = {}  # version a report of ours made -> when it was sent

    @property
    def open(self) -> bool:
        return not self.lost.done() and self.close_code is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed before the upgrade"))
        if not self.first.done():
            self.first.set_result(None)
        self.lost.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        t = now()
        self.buffer += data
        if not self.upgraded and not self._upgrade():
            return
        self._frames(t)

    def _upgrade(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._fail(0)
            return False
        parts = bytes(self.buffer[: self.buffer.find(b"\r\n")]).split(b" ", 2)
        del self.buffer[: end + 4]
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if status != 101:
            self._fail(status)
            return False
        self.upgraded = True
        self.opened.set_result(status)
        return True

    def _fail(self, status: int) -> None:
        if not self.opened.done():
            self.opened.set_result(status)
        self.close()

    def _frames(self, t: float) -> None:
        buf = self.buffer
        pos = 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if len(buf) - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if len(buf) - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if b1 & 0x80:  # a server never masks
                self.close()
                return
            if len(buf) - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            self._frame(b0 & 0x80, b0 & 0x0F, payload, t)
        del buf[:pos]

    def _frame(self, fin: int, opcode: int, payload: bytes, t: float) -> None:
        if opcode in (OP_TEXT, OP_BINARY, OP_CONT):
            if not fin:
                self.fragments.append(payload)
                return
            if self.fragments:
                payload = b"".join((*self.fragments, payload))
                self.fragments = []
            self._message(payload, t)
        elif opcode == OP_PING:
            self._send(OP_PONG, payload)
        elif opcode == OP_CLOSE:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self._send(OP_CLOSE, payload[:2])
            self.close()

    def _send(self, opcode: int, payload: bytes) -> None:
        """A control frame (at most 125 bytes), masked as a client's must be."""
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)

    def _message(self, payload: bytes, t: float) -> None:
        self.messages += 1
        if not self.first.done():
            self.first.set_result(None)
        match = HEAD.match(payload)
        if match is None:
            self.unreadable += 1
            return
        kind, version = match.group(1), int(match.group(3))
        self.seen[version] = t
        if self.track and kind in DOCUMENTED and version > self.version:
            self.workflow_id = match.group(2).decode()
            data = json.loads(payload)["data"]
            self._learn(version, data if kind == b"snapshot" else data["workflow"])

    def _learn(self, version: int, workflow: dict[str, Any]) -> None:
        self.version = version
        self.step = None
        if workflow.get("status") == "running":
            step = workflow["steps"][workflow["current_step"]]
            if step.get("status") == "dispatched":
                self.step = (step["step_id"], step["name"])


async def connect(
    address: tuple[Any, ...], family: int, source: str | None, request: bytes, track: bool
) -> WsClient:
    """A socket from `source` (a loopback address, to spread ports) to `address`."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source is not None:
            # the port is chosen by connect(), per destination, not by bind()
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        await loop.sock_connect(sock, address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _, client = await loop.create_connection(lambda: WsClient(request, track), sock=sock)
    except BaseException:
        sock.close()
        raise
    return client


def raise_open_files() -> tuple[int, int]:
    """The soft open-files limit raised to the hard one; (soft, hard) after that."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def worker_main(conn: Connection, config: dict[str, Any]) -> None:
    """A worker process: its own limit raised, Ctrl-C left to the parent, commands served."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_open_files()
    asyncio.run(Worker(conn, config).serve())


class Worker:
    """The sockets of one client process and the commands on them."""

    def __init__(self, conn: Connection, config: dict[str, Any]) -> None:
        self.conn = conn
        self.host: str = config["host"]
        self.port: int = config["port"]
        self.origin: str = config["origin"]
        self.sources: list[str | None] = config["sources"] or [None]
        self.concurrency: int = config["connect_concurrency"]
        self.request_timeout: float = config["request_timeout"]
        self.host_header = f"{self.host}:{self.port}"
        self.sockets: list[WsClient] = []
        self.address: tuple[Any, ...] = ()
        self.family = socket.AF_INET

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        info = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        self.family, self.address = info[0][0], info[0][4]
        if self.family != socket.AF_INET:
            self.sources = [None]
        self.sources = [s for s in self.sources if _bindable(s)] or [None]
        while True:
            try:
                command = await loop.run_in_executor(None, self.conn.recv)
            except EOFError:
                command = None
            if command is None:
                break
            name, kwargs = command
            try:
                reply: tuple[str, Any] = ("ok", await getattr(self, f"do_{name}")(**kwargs))
            except Exception:
                reply = ("error", traceback.format_exc())
            self.conn.send(reply)
        await self.do_close()

    async def do_open(
        self, specs: list[tuple[str, str]], snapshot: bool, track: bool, within: float
    ) -> dict[str, Any]:
        """Open a socket per (path, token), each `within` seconds; with `snapshot`, wait for
        its first message too."""
        gate = asyncio.Semaphore(self.concurrency)
        refused: Counter[str] = Counter()
        t0 = now()

        async def one(i: int, path: str, token: str) -> None:
            request = upgrade_request(path, token, self.host_header, self.origin)
            source = self.sources[i % len(self.sources)]
            async with gate:
                try:
                    async with asyncio.timeout(within):
                        client = await connect(self.address, self.family, source, request, track)
                        status = await client.opened
                        if status == 101 and snapshot:
                            await client.first
                except (TimeoutError, OSError) as exc:
                    refused[error_name(exc)] += 1
                    return
            if status != 101:
                refused[f"HTTP {status}"] += 1
            elif not client.open:
                refused[f"closed {client.close_code}"] += 1
            else:
                self.sockets.append(client)

        await asyncio.gather(*(one(i, path, token) for i, (path, token) in enumerate(specs)))
        opened = len(specs) - sum(refused.values())
        return {"opened": opened, "refused": dict(refused), "seconds": now() - t0}

    async def do_status(self) -> dict[str, Any]:
        closes = Counter(
            "lost" if s.close_code is None else str(s.close_code)
            for s in self.sockets
            if not s.open
        )
        return {"open": sum(s.open for s in self.sockets), "closes": dict(closes)}

    async def do_close(self) -> int:
        """Close every socket (waiting up to 10 s for them to go); how many there were."""
        sockets, self.sockets = self.sockets, []
        for s in sockets:
            s.close()
        if sockets:
            await asyncio.wait([s.lost for s in sockets], timeout=10)
        return len(sockets)

    async def do_wait_version(self, version: int, within: float) -> int:
        """Until every open socket has `version` (polled: the receipt times are taken as
        the messages arrive); how many lack it after `within` seconds."""
        deadline = now() + within
        while True:
            missing = sum(1 for s in self.sockets if s.open and version not in s.seen)
            if not missing or now() >= deadline:
                return missing
            await asyncio.sleep(0.002)

    async def do_deliveries(self) -> list[tuple[int, float]]:
        """(version, receipt time) of every version every socket received."""
        return [item for s in self.sockets for item in s.seen.items()]

    async def do_prepare_own(
        self, users: list[tuple[str, int]], tag: str, uploaders: int, within: float
    ) -> dict[str, Any]:
        """Each (token, count): upload `count` workflows, then a tracked socket on each."""
        jobs = [(token, n) for token, count in users for n in range(count)]
        owned: list[tuple[str, str]] = []
        errors: Counter[str] = Counter()
        clients = [HttpClient(self.host, self.port, self.request_timeout) for _ in range(uploaders)]

        async def upload(client: HttpClient) -> None:
            while jobs:
                token, n = jobs.pop()
                try:
                    status, body = await client.request(
                        "POST", UPLOAD_PATH, product(tag, n), auth_headers(token)
                    )
                except TRANSPORT_ERRORS as exc:
                    errors[f"upload {error_name(exc)}"] += 1
                    continue
                if status == 202:
                    owned.append((f"/ws?workflow_id={json.loads(body)['workflow_id']}", token))
                else:
                    errors[f"upload {status}"] += 1

        t0 = now()
        try:
            await asyncio.gather(*(upload(c) for c in clients))
        finally:
            for c in clients:
                c.close()
        uploaded = now() - t0
        opened = await self.do_open(owned, snapshot=True, track=True, within=within)
        return {
            "uploaded": len(owned),
            "upload_seconds": uploaded,
            "errors": dict(errors),
            **opened,
        }

    async def do_drive(
        self,
        start_at: float,
        rate: float,
        duration: float,
        service_token: str,
        connections: int,
        grace: float,
    ) -> dict[str, Any]:
        """From `start_at`, `rate` step-completed reports a second for `duration` seconds,
        open loop (each at its time, whatever the earlier ones are doing; at most
        `connections` requests in flight, the rest wait their turn), on the tracked
        sockets' workflows in turn; then up to `grace` seconds for the changes to arrive."""
        targets = [s for s in self.sockets if s.track]
        pool: asyncio.Queue[HttpClient] = asyncio.Queue()
        for _ in range(connections):
            pool.put_nowait(HttpClient(self.host, self.port, self.request_timeout))
        headers = auth_headers(service_token)
        errors: Counter[str] = Counter()
        lag: list[float] = []
        stats = {"scheduled": 0, "applied": 0, "duplicate": 0, "starved": 0, "last_reply": 0.0}

        async def report(sock: WsClient, step_id: str, name: str, scheduled: float) -> None:
            completion = {
                "workflow_id": sock.workflow_id,
                "step_id": step_id,
                "step_type": name,
                "success": True,
                "result": {"ok": True},
            }
            body = json.dumps(completion, separators=(",", ":")).encode()
            client = await pool.get()
            try:
                sent = now()
                lag.append(sent - scheduled)
                try:
                    status, data = await client.request("POST", STEP_PATH, body, headers)
                except TRANSPORT_ERRORS as exc:
                    errors[error_name(exc)] += 1
                    sock.step = sock.step or (step_id, name)
                    return
            finally:
                pool.put_nowait(client)
            if status != 200:
                errors[f"HTTP {status}"] += 1
                sock.step = sock.step or (step_id, name)
                return
            reply = json.loads(data)
            if reply.get("result") == "applied":
                sock.sent[int(reply["version"])] = sent
                stats["applied"] += 1
                stats["last_reply"] = now()
            else:
                stats["duplicate"] += 1

        tasks: list[asyncio.Task[None]] = []
        total = int(rate * duration)
        cursor = 0
        await asyncio.sleep(max(0.0, start_at - now()))
        for k in range(total):
            scheduled = start_at + k / rate
            await asyncio.sleep(max(0.0, scheduled - now()))
            stats["scheduled"] += 1
            for _ in range(len(targets)):
                sock = targets[cursor]
                cursor = (cursor + 1) % len(targets)
                if sock.step is not None and sock.open:
                    step_id, name = sock.step
                    sock.step = None  # until the change's dispatch brings the next step
                    tasks.append(asyncio.ensure_future(report(sock, step_id, name, scheduled)))
                    break
            else:
                stats["starved"] += 1  # no workflow had a step to complete
        sent_until = now()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.request_timeout)
            for task in late:
                task.cancel()
                errors["no answer in time"] += 1
        while not pool.empty():
            pool.get_nowait().close()
        deadline = now() + grace
        while True:  # polled, like do_wait_version
            behind = [s for s in targets if s.open and any(v not in s.seen for v in s.sent)]
            if not behind or now() >= deadline:
                break
            await asyncio.sleep(0.01)

        latency = [s.seen[v] - t for s in targets for v, t in s.sent.items() if v in s.seen]
        expected = sum(len(s.sent) for s in targets)
        closes = Counter(
            "lost" if s.close_code is None else str(s.close_code) for s in targets if not s.open
        )
        return {
            **stats,
            "sent_until": sent_until,
            "errors": dict(errors),
            "lag": lag,
            "latency": latency,
            "expected": expected,
            "received": len(latency),
            "behind": len(behind),
            "closes": dict(closes),
            "sockets": len(targets),
            "messages": sum(s.messages for s in targets),
            "unreadable": sum(s.unreadable for s in targets),
            # versions after the snapshot that no report of ours made (the sweeper's, say)
            "others": sum(
                1 for s in targets for v in s.seen if v > min(s.seen) and v not in s.sent
            ),
        }


def _bindable(source: str | None) -> bool:
    """Whether a socket can be bound to `source` here (127.0.0.2 and up are not everywhere)."""
    if source is None:
        return True
    with socket.socket() as probe:
        try:
            probe.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            probe.bind((source, 0))
        except OSError:
            return False
    return True
