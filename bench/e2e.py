"""End-to-end throughput benchmark of the Stox gateway, run by hand; it prints figures.

It starts the gateway (`server.py`, embedded SQLite store and in-process bus) as a
subprocess, or targets a running one with `--url`, and drives it the way an embedded-mode
deployment is driven:

* `--uploaders U` coroutines upload `--workflows N` products over HTTP (a user token);
* one WebSocket subscription to all of that user's workflows (`/ws`) sees every
  `step_dispatched` change and puts (workflow, step_id, step) on a queue;
* `--services S` coroutines play the step services: they drain the queue and report each
  step over HTTP (`POST /api/v1/workflow/step-completed`, a service token, success);
* a workflow counts as completed when its `workflow_completed` message arrives.

Then, in the same run, it starts `bench/bare_tornado.py` (one JSON POST handler on a bare
Tornado app) and drives it with the same client and the same total concurrency (U+S) for
as many requests as the gateway served: the ceiling one Tornado process reaches here.

The HTTP client is a minimal asyncio HTTP/1.1 keep-alive client (one connection per worker,
Content-Length bodies), several times cheaper per request than tornado's AsyncHTTPClient,
so the load generator stays out of the way; the gateway and the bare app each run in their
own process. Everything has a bound: per-request timeouts and an overall `--timeout`, after
which it prints what it has and exits non-zero. Only loopback addresses are used.

    .venv/bin/python bench/e2e.py --quick          # 300 workflows, a smoke run
    .venv/bin/python bench/e2e.py                  # 2000 workflows, about a minute
    .venv/bin/python bench/e2e.py --profile-server /tmp/gw.prof   # gateway under cProfile
    .venv/bin/python -m pstats /tmp/gw.prof      # then: sort cumulative, stats 15
    .venv/bin/python bench/e2e.py --url http://127.0.0.1:8080 --jwt-secret "$STOX_JWT_SECRET"
    .venv/bin/python bench/e2e.py --rabbitmq-url amqp://guest:guest@127.0.0.1/   # both modes
    .venv/bin/python bench/e2e.py --peers         # both modes, Celery and the ceiling: make bench

With `--rabbitmq-url` a second gateway runs on RabbitMQ after the embedded one (the same
load, its own exchange and queue names, deleted afterwards): the services then consume the
step queues over AMQP and reply with `step.completed` messages, as `examples/worker.py`
does, and the two are reported side by side.

After each mode's closed loop, an open loop (unless `--no-open-loop`) drives the same
gateway at a fixed rate, by default half the maximum just measured (`--open-loop-share`,
`--open-loop-rate`), for `--open-loop-seconds`: each upload leaves at its scheduled time
whether or not earlier ones have been answered, and every latency runs from that time, so
a slow answer cannot hide the requests it would have held back (coordinated omission).

With `--peers` (the broker defaulting to the local one) the Celery peer runs next: the same
three steps as Celery chains of no-op tasks (bench/celery_peer.py, its packages from
bench/requirements.txt) on a `celery worker` with 2 prefork processes, as many workflows,
the same warm-up; then one table puts the four side by side, per unit of work.

Exit status: 0 when every workflow completed (the open loop's too), 1 otherwise (timeout,
errors that lost workflows, a gateway that would not start), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import ipaddress
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stox.auth.tokens import SERVICE, USER, TokenAuthority

REPO = Path(__file__).resolve().parent.parent

UPLOAD_PATH = "/api/v1/workflow/upload"
STEP_PATH = "/api/v1/workflow/step-completed"
CEILING_PATH = "/echo"
GOAL_WORKFLOWS_PER_S = 750
DEFAULT_STEPS = ["image_processing", "ai_enhancement", "seo_generation"]  # the AMQP services'
LOCAL_BROKER = "amqp://guest:guest@127.0.0.1:5672/"  # --peers' default (pika and kombu agree)
CELERY_CONCURRENCY = 2  # prefork pool processes of the Celery peer's worker

now = time.perf_counter

# `python -c THREAD_CPU_PROFILER OUT server.py ARGS…`: cProfile on the main thread's CPU clock
THREAD_CPU_PROFILER = """
import cProfile, runpy, sys, time
out = sys.argv[1]
sys.argv = sys.argv[2:]
profiler = cProfile.Profile(time.thread_time)
profiler.enable()
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
finally:
    profiler.disable()
    profiler.dump_stats(out)
"""


# -- a minimal HTTP/1.1 keep-alive client ------------------------------------------------


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


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def ms(values: list[float]) -> str:
    p50, p99 = percentile(values, 50), percentile(values, 99)
    if p50 is None or p99 is None:
        return "-"
    return f"p50 {p50 * 1000:.1f} ms   p99 {p99 * 1000:.1f} ms"


def ms_max(values: list[float]) -> str:
    """p50, p99 and the worst, in ms (the open loop's figures)."""
    if not values:
        return "-"
    return f"{ms(values)}   max {max(values) * 1000:.1f} ms"


def within(values: list[float], limit_ms: float) -> bool | None:
    """Whether p99 is within `limit_ms`; None without figures."""
    p99 = percentile(values, 99)
    return None if p99 is None else p99 * 1000 <= limit_ms


def verdict(values: list[float], limit_ms: float) -> str:
    """The target next to a figure."""
    met = {True: "met", False: "not met", None: "no data"}[within(values, limit_ms)]
    return f"p99 <= {limit_ms:g} ms: {met}"


def format_errors(errors: Counter[Any]) -> str:
    if not errors:
        return "none"
    return ", ".join(f"{key}: {count}" for key, count in sorted(errors.items(), key=str))


# -- the gateway load -------------------------------------------------------------------


@dataclass
class Phase:
    """One batch of workflows (the warm-up, then the measured run), told apart by `tag`."""

    name: str
    total: int
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: float = 0.0
    ended_at: float = 0.0
    last_finish: float = 0.0
    upload_requests: int = 0
    step_requests: int = 0
    uploaded: int = 0
    completed: int = 0
    failed: int = 0
    uploads_done: bool = False
    stalled: bool = False  # nothing moved for --idle-timeout seconds
    upload_latency: list[float] = field(default_factory=list)
    step_latency: list[float] = field(default_factory=list)
    workflow_latency: list[float] = field(default_factory=list)
    # a dispatch seen on /ws -> a service free to report it (HTTP services)
    service_wait: list[float] = field(default_factory=list)
    # the transition's decision (the event's occurred_at) -> the service's receipt (AMQP)
    decision_latency: list[float] = field(default_factory=list)
    errors: Counter[Any] = field(default_factory=Counter)
    sent_at: dict[int, float] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def finish(self, n: int, ok: bool) -> None:
        if n in self.finished:
            return
        self.finished.add(n)
        t = now()
        self.last_finish = t
        if ok:
            self.completed += 1
        else:
            self.failed += 1
        if n in self.sent_at:
            self.workflow_latency.append(t - self.sent_at[n])
        self.check()

    def check(self) -> None:
        if self.uploads_done and len(self.finished) >= self.uploaded:
            self.done.set()

    @property
    def wall(self) -> float:
        end = self.ended_at or now()
        return max(end - self.started_at, 1e-9)


@dataclass
class Shared:
    """State the WebSocket reader and the services share across phases."""

    phases: dict[str, Phase] = field(default_factory=dict)
    # (phase, workflow id, step id, step name, when the dispatch was seen)
    queue: asyncio.Queue[tuple[Phase, str, str, str, float]] = field(default_factory=asyncio.Queue)
    ws_messages: int = 0
    ws_closed: str | None = None
    steps_per_workflow: int = 3  # learnt from the first workflow seen
    http_services: bool = True  # False: the services take their jobs from RabbitMQ instead

    def wake_all(self) -> None:
        for phase in self.phases.values():
            phase.done.set()


# messages the services never need; skipped before json.loads (the hub writes "type" first)
_SKIP = ('{"type":"step_completed"', '{"type":"snapshot"', '{"type":"step_retrying"')
_WANTED = {"step_dispatched", "workflow_completed", "workflow_failed", "workflow_cancelled"}


async def ws_reader(conn: Any, shared: Shared) -> None:
    while True:
        message = await conn.read_message()
        if message is None:
            shared.ws_closed = f"closed by the server: code {conn.close_code} {conn.close_reason!r}"
            shared.wake_all()
            return
        shared.ws_messages += 1
        if isinstance(message, bytes):
            message = message.decode()
        if message.startswith(_SKIP):
            continue
        msg = json.loads(message)
        kind = msg.get("type")
        if kind not in _WANTED:
            continue
        workflow = (msg.get("data") or {}).get("workflow") or {}
        meta = (workflow.get("product") or {}).get("metadata") or {}
        phase = shared.phases.get(meta.get("bench"))
        if phase is None:
            continue  # another client's workflow of the same user
        if kind == "step_dispatched":
            shared.steps_per_workflow = len(workflow["steps"])
            step = workflow["steps"][workflow["current_step"]]
            if shared.http_services:
                job = (phase, workflow["id"], step["step_id"], step["name"], now())
                shared.queue.put_nowait(job)
        else:
            phase.finish(int(meta["n"]), ok=kind == "workflow_completed")


def product_fields(tag: str, n: int) -> dict[str, Any]:
    return {
        "name": f"Bench mug #{n}",
        "description": "Stoneware mug, 350 ml, dishwasher safe.",
        "images": [f"https://cdn.example.com/bench/{n}/front.jpg"],
        "category": "kitchen",
        "price": 12.5,
        "metadata": {"bench": tag, "n": n},
    }


def product(tag: str, n: int) -> bytes:
    return json.dumps(product_fields(tag, n), separators=(",", ":")).encode()


def step_result(name: str, workflow_id: str) -> dict[str, Any]:
    if name == "image_processing":
        return {"images": [f"https://cdn.example.com/p/{workflow_id}/0.webp"], "width": 1024}
    if name == "ai_enhancement":
        return {"description": "A sturdy stoneware mug for every morning.", "tags": ["mug"]}
    if name == "seo_generation":
        return {"title": "Stoneware mug 350 ml", "slug": f"mug-{workflow_id[:8]}"}
    return {"ok": True}


async def uploader(
    client: HttpClient, phase: Phase, numbers: itertools.count[int], headers: bytes, delay: float
) -> None:
    if delay > 0:
        await asyncio.sleep(delay)
    for n in numbers:
        if n >= phase.total:
            return
        body = product(phase.tag, n)
        t0 = now()
        phase.sent_at[n] = t0
        try:
            status, _ = await client.request("POST", UPLOAD_PATH, body, headers)
        except TRANSPORT_ERRORS as exc:
            phase.errors[f"upload {error_name(exc)}"] += 1
            continue  # an upload is not retried: it might have been applied
        answered(phase, status, t0)


def answered(phase: Phase, status: int, since: float) -> None:
    """Count an upload's answer, its latency measured from `since`."""
    phase.upload_requests += 1
    phase.upload_latency.append(now() - since)
    if 200 <= status < 300:
        phase.uploaded += 1
    else:
        phase.errors[f"upload {status}"] += 1


async def service(client: HttpClient, shared: Shared, headers: bytes, attempts: int = 3) -> None:
    """A simulated step service: report each dispatched step as done (retrying 503s)."""
    while True:
        phase, workflow_id, step_id, name, seen_at = await shared.queue.get()
        phase.service_wait.append(now() - seen_at)
        body = json.dumps(
            {
                "workflow_id": workflow_id,
                "step_id": step_id,
                "step_type": name,
                "success": True,
                "result": step_result(name, workflow_id),
            },
            separators=(",", ":"),
        ).encode()
        for attempt in range(attempts):
            t0 = now()
            try:
                status, _ = await client.request("POST", STEP_PATH, body, headers)
            except TRANSPORT_ERRORS as exc:
                phase.errors[f"step {error_name(exc)}"] += 1
                await asyncio.sleep(0.05 * (attempt + 1))
                continue  # a completion is idempotent: sending it again is safe
            phase.step_requests += 1
            phase.step_latency.append(now() - t0)
            if 200 <= status < 300:
                break
            phase.errors[f"step {status}"] += 1
            if status != 503:
                break
            await asyncio.sleep(0.05 * (attempt + 1))


def auth_headers(token: str) -> bytes:
    return f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n".encode()


async def open_channel(url: str) -> tuple[Any, Any]:
    """A pika AsyncioConnection on this loop (pika's own timeouts bound it) and a channel."""
    import pika
    from pika.adapters.asyncio_connection import AsyncioConnection

    loop = asyncio.get_running_loop()
    opened: asyncio.Future[Any] = loop.create_future()
    connection = AsyncioConnection(
        pika.URLParameters(url),
        on_open_callback=opened.set_result,
        on_open_error_callback=lambda _, exc: opened.set_exception(ConnectionError(exc)),
        custom_ioloop=loop,
    )
    await opened
    ready: asyncio.Future[Any] = loop.create_future()
    connection.channel(on_open_callback=ready.set_result)
    return connection, await ready


async def close_connection(connection: Any) -> None:
    """Close a connection of `open_channel`'s, waiting up to 5 s for the broker's answer."""
    if connection is None or not connection.is_open:
        return
    closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_close(*_: Any) -> None:
        if not closed.done():
            closed.set_result(None)

    connection.add_on_close_callback(on_close)
    connection.close()
    await asyncio.wait({closed}, timeout=5)


class AmqpServices:
    """The step services over AMQP: consume `<prefix>.step.<name>`, reply `step.completed`.

    One pika AsyncioConnection on the bench's loop, one channel, a prefetch of `prefetch`
    per queue. A reply is published (persistent, with the service token header) and the
    dispatch acknowledged at once, without waiting for the broker's confirm: a benchmark
    shortcut that examples/worker.py does not take. The step latency recorded is from the
    gateway's publish (the `x-stox-timestamp` header: the gateway's clock when it hands the
    event to the broker, after the commit) to its arrival here; the decision latency is from
    the event's `occurred_at` (the transition's clock, before its write) to the same arrival.
    The commit lies between the two, so they bound the commit-to-receipt time.
    """

    def __init__(self, shared: Shared, url: str, names: BrokerNames, token: str) -> None:
        self.shared = shared
        self.url = url
        self.names = names
        self.headers = {"authorization": f"Bearer {token}"}
        self.connection: Any = None

    async def start(self, steps: list[str], prefetch: int) -> None:
        self.connection, channel = await open_channel(self.url)
        qos: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        channel.basic_qos(prefetch_count=prefetch, callback=qos.set_result)
        await qos
        for step in steps:
            channel.basic_consume(f"{self.names.prefix}.step.{step}", self.on_dispatch)

    def on_dispatch(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        import pika

        received = time.time()  # the receipt, before this service's own work
        job = json.loads(body)
        sent_at = float((properties.headers or {}).get("x-stox-timestamp", 0) or 0)
        meta = (job.get("product") or {}).get("metadata") or {}
        phase = self.shared.phases.get(meta.get("bench"))
        report = {
            "event": "step.completed",
            "workflow_id": job["workflow_id"],
            "occurred_at": job["occurred_at"],
            "step_id": job["step_id"],
            "step_type": job["step_type"],
            "success": True,
            "result": step_result(job["step_type"], job["workflow_id"]),
        }
        channel.basic_publish(
            self.names.exchange,
            job["reply_to"]["routing_key"],
            json.dumps(report, separators=(",", ":")),
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=uuid.uuid4().hex,
                correlation_id=job["workflow_id"],
                headers=self.headers,
            ),
        )
        channel.basic_ack(method.delivery_tag)
        if phase is not None:
            phase.step_requests += 1
            if sent_at:
                phase.step_latency.append(max(0.0, received - sent_at))
            decided = datetime.fromisoformat(job["occurred_at"]).timestamp()
            phase.decision_latency.append(max(0.0, received - decided))

    async def close(self) -> None:
        await close_connection(self.connection)


@dataclass
class BrokerNames:
    """The exchange and queue-name prefix of one RabbitMQ run, deleted when it ends."""

    prefix: str = field(default_factory=lambda: f"bench.{uuid.uuid4().hex[:8]}")

    @property
    def exchange(self) -> str:
        return f"{self.prefix}.events"

    def config(self) -> str:
        return f"rabbitmq:\n  exchange: {self.exchange}\n  prefix: {self.prefix}\n"

    def delete(self, url: str, steps: list[str]) -> None:
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = connection.channel()
            for name in [*(f"step.{s}" for s in steps), "step.completed", "dead"]:
                channel.queue_delete(f"{self.prefix}.{name}")
            for exchange in (self.exchange, f"{self.prefix}.dead"):
                channel.exchange_delete(exchange)
        finally:
            connection.close()


async def run_phase(
    phase: Phase, target: Target, shared: Shared, args: argparse.Namespace, user_token: str
) -> None:
    shared.phases[phase.tag] = phase
    headers = auth_headers(user_token)
    numbers = itertools.count()
    clients = [
        HttpClient(target.host, target.port, args.request_timeout) for _ in range(args.uploaders)
    ]
    phase.started_at = now()
    tasks = [
        asyncio.ensure_future(
            uploader(c, phase, numbers, headers, args.ramp * i / max(1, args.uploaders))
        )
        for i, c in enumerate(clients)
    ]
    try:
        await asyncio.gather(*tasks)
        phase.uploads_done = True
        phase.check()
        if shared.ws_closed:
            phase.done.set()  # nothing more will arrive
        await wait_or_stall(
            phase, lambda: (shared.ws_messages, phase.step_requests), args.idle_timeout
        )
    finally:
        for task in tasks:
            task.cancel()
        for c in clients:
            c.close()
        phase.ended_at = phase.last_finish if phase.done.is_set() and phase.last_finish else now()


async def wait_or_stall(phase: Phase, progress: Callable[[], object], idle: float) -> None:
    """Wait for the phase to finish, or until `progress()` has not changed for `idle` s."""
    last, still_since = progress(), now()
    while not phase.done.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(1.0, idle)):
                await phase.done.wait()
        moved = progress()
        if moved != last:
            last, still_since = moved, now()
        elif now() - still_since >= idle:
            phase.stalled = True
            return


# -- the open loop ----------------------------------------------------------------------


@dataclass
class OpenLoop:
    """Uploads at a fixed rate, each at its scheduled time whether or not earlier ones have
    finished; every latency runs from the scheduled time, so a slow answer cannot hold back
    the requests that follow it (no coordinated omission)."""

    rate: float  # uploads (workflows) offered per second
    basis: str  # how the rate was chosen
    phase: Phase
    connections: int  # at most this many uploads in flight: the safety valve
    send_lag: list[float] = field(default_factory=list)  # scheduled -> request written
    peak: int = 0  # connections busy at once, at most
    waited: int = 0  # uploads that found every connection busy
    schedule_wall: float = 0.0  # first scheduled upload -> last one sent
    cpu: CpuMeter | None = None

    @property
    def seconds(self) -> float:
        return self.phase.total / self.rate


class ClientPool:
    """Keep-alive connections for the open loop, opened as needed up to `limit`."""

    def __init__(self, target: Target, timeout: float, limit: int) -> None:
        self.target = target
        self.timeout = timeout
        self.limit = limit
        self.clients: list[HttpClient] = []
        self.idle: asyncio.Queue[HttpClient] = asyncio.Queue()

    def _new(self) -> HttpClient:
        client = HttpClient(self.target.host, self.target.port, self.timeout)
        self.clients.append(client)
        return client

    async def prime(self, count: int) -> None:
        """Connect `count` clients before the clock starts (no connect in the first uploads)."""
        for _ in range(min(count, self.limit)):
            client = self._new()
            await client._connect()
            self.idle.put_nowait(client)

    @property
    def busy(self) -> int:
        return len(self.clients) - self.idle.qsize()

    async def get(self, loop: OpenLoop) -> HttpClient:
        if not self.idle.empty():
            client = self.idle.get_nowait()
        elif len(self.clients) < self.limit:
            client = self._new()
        else:
            loop.waited += 1
            client = await self.idle.get()
        loop.peak = max(loop.peak, self.busy)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()


async def open_loop_upload(
    pool: ClientPool, loop: OpenLoop, n: int, due: float, headers: bytes
) -> None:
    phase = loop.phase
    phase.sent_at[n] = due
    body = product(phase.tag, n)
    client = await pool.get(loop)
    try:
        loop.send_lag.append(now() - due)
        try:
            status, _ = await client.request("POST", UPLOAD_PATH, body, headers)
        except TRANSPORT_ERRORS as exc:
            phase.errors[f"upload {error_name(exc)}"] += 1
            return
    finally:
        pool.idle.put_nowait(client)  # it reconnects if the request broke it
    answered(phase, status, due)


async def run_open_loop(
    loop: OpenLoop, target: Target, shared: Shared, args: argparse.Namespace, user_token: str
) -> None:
    phase = loop.phase
    shared.phases[phase.tag] = phase
    headers = auth_headers(user_token)
    pool = ClientPool(target, args.request_timeout, loop.connections)
    uploads: set[asyncio.Future[None]] = set()
    try:
        await pool.prime(args.uploaders)
        interval = 1 / loop.rate
        phase.started_at = start = now()
        for n in range(phase.total):
            delay = start + n * interval - now()
            if delay > 0:
                await asyncio.sleep(delay)
            upload = asyncio.ensure_future(
                open_loop_upload(pool, loop, n, start + n * interval, headers)
            )
            uploads.add(upload)
            upload.add_done_callback(uploads.discard)
        await asyncio.gather(*uploads)
        loop.schedule_wall = now() - start
        phase.uploads_done = True
        phase.check()
        if shared.ws_closed:
            phase.done.set()
        await wait_or_stall(
            phase, lambda: (shared.ws_messages, phase.step_requests), args.idle_timeout
        )
    finally:
        for upload in uploads:
            upload.cancel()
        pool.close()
        phase.ended_at = phase.last_finish if phase.done.is_set() and phase.last_finish else now()


def open_loop_for(run: Run) -> OpenLoop | None:
    """The open loop of this mode: the rate given, or a share of the closed loop's maximum."""
    args, closed = run.args, run.run
    if args.open_loop_rate:
        rate, basis = args.open_loop_rate, "--open-loop-rate"
    elif closed is not None and closed.completed == closed.total and not closed.stalled:
        rate = args.open_loop_share * closed.completed / closed.wall
        basis = f"{args.open_loop_share:g} x the closed loop's {closed.completed / closed.wall:.1f}"
    else:
        run.problems.append("the closed loop did not finish: no maximum, no open loop")
        return None
    total = args.open_loop_workflows or max(1, round(rate * args.open_loop_seconds))
    return OpenLoop(rate, basis, Phase("open loop", total), args.open_loop_connections)


# -- the ceiling ------------------------------------------------------------------------


@dataclass
class Ceiling:
    concurrency: int
    total: int
    requests: int = 0
    latency: list[float] = field(default_factory=list)
    errors: Counter[Any] = field(default_factory=Counter)
    started_at: float = 0.0
    ended_at: float = 0.0
    cpu: CpuMeter | None = None

    @property
    def wall(self) -> float:
        return max((self.ended_at or now()) - self.started_at, 1e-9)

    @property
    def rate(self) -> float:
        return self.requests / self.wall


async def drive_ceiling(host: str, port: int, ceiling: Ceiling, request_timeout: float) -> None:
    headers = b"Content-Type: application/json\r\n"
    body = json.dumps(
        {
            "workflow_id": uuid.uuid4().hex,
            "step_id": uuid.uuid4().hex,
            "step_type": "ai_enhancement",
            "success": True,
            "result": step_result("ai_enhancement", "0" * 32),
        },
        separators=(",", ":"),
    ).encode()

    async def worker(client: HttpClient, numbers: itertools.count[int], total: int, record: bool):
        for n in numbers:
            if n >= total:
                return
            t0 = now()
            try:
                status, _ = await client.request("POST", CEILING_PATH, body, headers)
            except TRANSPORT_ERRORS as exc:
                ceiling.errors[error_name(exc)] += 1
                continue
            if record:
                ceiling.requests += 1
                ceiling.latency.append(now() - t0)
                if not 200 <= status < 300:
                    ceiling.errors[status] += 1

    clients = [HttpClient(host, port, request_timeout) for _ in range(ceiling.concurrency)]
    try:
        warm = itertools.count()
        warmup = min(2000, max(ceiling.concurrency * 10, ceiling.total // 10))
        await asyncio.gather(*(worker(c, warm, warmup, False) for c in clients))
        numbers = itertools.count()
        if ceiling.cpu is not None:
            ceiling.cpu.start()
        ceiling.started_at = now()
        try:
            await asyncio.gather(*(worker(c, numbers, ceiling.total, True) for c in clients))
        finally:
            ceiling.ended_at = now()
            if ceiling.cpu is not None:
                ceiling.cpu.stop()
    finally:
        for c in clients:
            c.close()


# -- processes --------------------------------------------------------------------------


@dataclass
class Target:
    base_url: str
    host: str
    port: int
    origin: str
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_target(url: str, origin: str | None) -> Target:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback or not parts.port:
        raise ValueError(f"--url must be http://<loopback address>:<port>, not {url!r}")
    base = f"http://{parts.netloc}"
    return Target(base, host, parts.port, origin or base)


def spawn(
    cmd: list[str], env: dict[str, str], log_path: Path, group: bool = False
) -> subprocess.Popen[bytes]:
    """Start `cmd` in the repository; `group`: in a process group of its own (see stop)."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=group,
        )


async def wait_ready(target: Target, path: str, within: float) -> None:
    """Poll `path` until it answers 200; fail fast if the process exits."""
    client = HttpClient(target.host, target.port, 2.0)
    deadline = now() + within
    try:
        while now() < deadline:
            if target.process is not None and target.process.poll() is not None:
                raise RuntimeError(f"exited with status {target.process.returncode}")
            try:
                status, _ = await client.request("GET", path)
                if status == 200:
                    return
            except TRANSPORT_ERRORS:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"not ready within {within:g}s")
    finally:
        client.close()


def stop(
    process: subprocess.Popen[bytes] | None, grace: float = 10.0, group: bool = False
) -> int | None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit status.

    `group`: the process was spawned with `group=True`; whatever is left of its group
    afterwards (children it did not stop) is killed too.
    """
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: state, ppid, … (Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = _stat(pid)
    try:
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else None
    except (IndexError, ValueError):
        return None


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat(entry.name) if entry.name.isdigit() else None
        if fields and len(fields) > 1 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree: list[int] = []
    todo = [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU time of `pid` and its descendants, with that of the children they have reaped."""
    ticks = 0
    for each in process_tree(pid):  # `pid` first
        fields = _stat(each)
        if fields is None:
            if each == pid:
                return None
            continue  # exited meanwhile
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


def host_busy_seconds() -> float | None:
    """CPU seconds every process on the host has used (all cores), from /proc/stat."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class CpuMeter:
    """CPU used by the server under test, by this load generator and by everything else."""

    pid: int | None
    tree: bool = False  # count the process's children too (the Celery worker's pool)
    server0: float | None = None
    bench0: float = 0.0
    host0: float | None = None
    wall0: float = 0.0
    server: float | None = None
    bench: float | None = None
    others: float | None = None
    wall: float = 0.0

    def _server_cpu(self) -> float | None:
        if not self.pid:
            return None
        return tree_cpu_seconds(self.pid) if self.tree else cpu_seconds(self.pid)

    def start(self) -> None:
        self.server0 = self._server_cpu()
        self.bench0 = time.process_time()
        self.host0 = host_busy_seconds()
        self.wall0 = now()

    def stop(self) -> None:
        self.wall = max(now() - self.wall0, 1e-9)
        server1 = self._server_cpu()
        self.bench = time.process_time() - self.bench0
        host1 = host_busy_seconds()
        if self.server0 is not None and server1 is not None:
            self.server = server1 - self.server0
        if self.host0 is not None and host1 is not None:
            self.others = max(0.0, host1 - self.host0 - self.bench - (self.server or 0.0))

    def describe(self, server_name: str) -> str:
        parts = []
        if self.server is not None:
            parts.append(f"{server_name} {100 * self.server / self.wall:.0f}%")
        if self.bench is not None:
            parts.append(f"load generator {100 * self.bench / self.wall:.0f}%")
        if self.others is not None:
            others = "other processes" if self.pid else f"other processes (with the {server_name})"
            parts.append(f"{others} {100 * self.others / self.wall:.0f}%")
        return ", ".join(parts) + f"  (host has {os.cpu_count()} CPUs)"


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def tree_rss_mib(pid: int) -> float | None:
    """The RSS of `pid` and its descendants added up (shared pages counted in each)."""
    sizes = [rss_mib(each) for each in process_tree(pid)]
    return sum(s for s in sizes if s is not None) if sizes and sizes[0] is not None else None


def tail(path: Path | None, lines: int = 8) -> list[str]:
    if path is None or not path.exists():
        return []
    return path.read_text(errors="replace").splitlines()[-lines:]


def count_lines(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    return len(path.read_text(errors="replace").splitlines())


# -- the run ----------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    target: Target | None = None
    run: Phase | None = None
    warmup: Phase | None = None
    shared: Shared | None = None
    ceiling: Ceiling | None = None
    gateway_cpu: CpuMeter | None = None
    rss_before: float | None = None
    rss_after: float | None = None
    gateway_exit: int | None = None
    gateway_log_lines: list[str] = field(default_factory=list)
    gateway_log_count: int = 0
    problems: list[str] = field(default_factory=list)
    timed_out: bool = False
    mode: str = "embedded"  # or "rabbitmq": the same load on a gateway using RabbitMQ
    rabbitmq: Run | None = None  # with --rabbitmq-url: that second run
    celery: CeleryRun | None = None  # with --peers: the Celery peer's run
    open_loop: OpenLoop | None = None  # after the closed loop, unless --no-open-loop
    broker: BrokerNames | None = None

    @property
    def amqp(self) -> bool:
        return self.mode == "rabbitmq"


def tokens_for(args: argparse.Namespace, secret: str | None) -> tuple[str, str]:
    if args.user_token and args.service_token:
        return args.user_token, args.service_token
    if not secret:
        raise ValueError("no --jwt-secret to mint tokens with")
    authority = TokenAuthority(secret, issuer="stox", audience="stox", expiry=3600)
    user = f"bench-{uuid.uuid4().hex[:8]}"  # a fresh user: the subscription sees only ours
    return (
        args.user_token or authority.issue(user, user, USER),
        args.service_token or authority.issue("service:bench", "bench", SERVICE),
    )


async def open_ws(target: Target, token: str) -> Any:
    import tornado.httpclient
    import tornado.websocket

    ws_url = target.base_url.replace("http://", "ws://", 1) + "/ws"
    request = tornado.httpclient.HTTPRequest(
        ws_url, headers={"Origin": target.origin}, connect_timeout=10, request_timeout=10
    )
    return await tornado.websocket.websocket_connect(
        request, subprotocols=["bearer", token], max_message_size=64 * 1024 * 1024
    )


async def gateway_part(run: Run, tmpdir: Path) -> None:
    args = run.args
    secret = args.jwt_secret
    if args.url:
        target = loopback_target(args.url, args.origin)
    else:
        secret = secret or "bench-" + uuid.uuid4().hex + uuid.uuid4().hex
        port = args.port or free_port()
        target = Target(f"http://127.0.0.1:{port}", "127.0.0.1", port, "")
        target.origin = args.origin or target.base_url
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOX_")}
        env.update(STOX_JWT_SECRET=secret, STOX_LOG_LEVEL="warning")
        profile: list[str] = []
        if args.profile_server and args.profile_clock == "wall":
            profile = ["-m", "cProfile", "-o", args.profile_server]
        elif args.profile_server:
            profile = ["-c", THREAD_CPU_PROFILER, args.profile_server]
        cmd = [sys.executable, *profile, "server.py", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--storage-url", f"sqlite:///{tmpdir}/{run.mode}.db", *args.gateway_arg]
        if run.amqp:
            run.broker = BrokerNames()
            (tmpdir / "rabbitmq.yaml").write_text(run.broker.config())
            cmd += ["--rabbitmq-url", args.rabbitmq_url, "--config", f"{tmpdir}/rabbitmq.yaml"]
        target.log_path = tmpdir / f"gateway-{run.mode}.log"
        target.process = spawn(cmd, env, target.log_path)
    run.target = target
    user_token, service_token = tokens_for(args, secret)
    try:
        await wait_ready(target, "/readyz", args.startup_timeout)
    except RuntimeError as exc:
        run.problems.append(f"gateway at {target.base_url} not ready: {exc}")
        return

    shared = run.shared = Shared(http_services=not run.amqp)
    try:
        conn = await open_ws(target, user_token)
    except Exception as exc:  # any handshake failure ends the gateway part
        run.problems.append(f"WebSocket /ws refused: {exc!r}")
        return
    reader = asyncio.ensure_future(ws_reader(conn, shared))
    service_headers = auth_headers(service_token)
    service_clients = [
        HttpClient(target.host, target.port, args.request_timeout)
        for _ in range(0 if run.amqp else args.services)
    ]
    amqp_services = None
    if run.amqp and run.broker is not None:
        amqp_services = AmqpServices(shared, args.rabbitmq_url, run.broker, service_token)
        try:
            await amqp_services.start(DEFAULT_STEPS, prefetch=args.services)
        except Exception as exc:  # the broker refused us: nothing to measure
            run.problems.append(f"cannot consume the step queues: {exc!r}")
            reader.cancel()
            conn.close()
            return
    services = [asyncio.ensure_future(service(c, shared, service_headers)) for c in service_clients]
    pid = target.process.pid if target.process else None
    try:
        if args.warmup:
            run.warmup = Phase("warm-up", args.warmup)
            await run_phase(run.warmup, target, shared, args, user_token)
            if run.warmup.stalled or shared.ws_closed:
                run.problems.append("the warm-up did not finish; no measured run")
                return
        if pid:
            run.rss_before = rss_mib(pid)
        run.gateway_cpu = CpuMeter(pid)
        run.gateway_cpu.start()
        run.run = Phase("run", args.workflows)
        try:
            await run_phase(run.run, target, shared, args, user_token)
        finally:
            run.gateway_cpu.stop()
            if pid:
                run.rss_after = rss_mib(pid)
        if not args.no_open_loop and not shared.ws_closed:
            run.open_loop = open_loop_for(run)
        if run.open_loop is not None:
            run.open_loop.cpu = CpuMeter(pid)
            run.open_loop.cpu.start()
            try:
                await run_open_loop(run.open_loop, target, shared, args, user_token)
            finally:
                run.open_loop.cpu.stop()
    finally:
        reader.cancel()
        for task in services:
            task.cancel()
        await asyncio.gather(reader, *services, return_exceptions=True)
        for c in service_clients:
            c.close()
        conn.close()
        if amqp_services is not None:
            await amqp_services.close()


async def ceiling_part(run: Run, tmpdir: Path) -> None:
    args = run.args
    port = free_port()
    target = Target(f"http://127.0.0.1:{port}", "127.0.0.1", port, "")
    target.log_path = tmpdir / "bare_tornado.log"
    cmd = [sys.executable, "bench/bare_tornado.py", "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOX_")}
    target.process = spawn(cmd, env, target.log_path)
    try:
        try:
            await wait_ready(target, "/readyz", args.startup_timeout)
        except RuntimeError as exc:
            run.problems.append(f"bare_tornado.py not ready: {exc}; {tail(target.log_path)}")
            return
        served = 0
        if run.run is not None:
            served = run.run.upload_requests + run.run.step_requests
        total = args.ceiling_requests or max(served, args.workflows * 4)
        run.ceiling = Ceiling(args.uploaders + args.services, total)
        run.ceiling.cpu = CpuMeter(target.process.pid)
        await drive_ceiling(target.host, target.port, run.ceiling, args.request_timeout)
    finally:
        stop(target.process)


async def main_async(run: Run) -> None:
    tmpdir = Path(tempfile.mkdtemp(prefix="stox-bench-"))
    try:
        await gateway_run(run, tmpdir)
        if run.args.rabbitmq_url:
            run.rabbitmq = Run(run.args, mode="rabbitmq")
            await gateway_run(run.rabbitmq, tmpdir)
        if run.args.peers:
            await celery_part(run, tmpdir)
        if not run.args.no_ceiling:
            await ceiling_part(run, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


async def gateway_run(run: Run, tmpdir: Path) -> None:
    """The gateway part, then stop the gateway (and drop what it made in the broker)."""
    try:
        await gateway_part(run, tmpdir)
    finally:
        if run.target is not None and run.target.process is not None:
            run.gateway_exit = await asyncio.to_thread(stop, run.target.process)
            run.gateway_log_count = count_lines(run.target.log_path)
            run.gateway_log_lines = tail(run.target.log_path)
        if run.broker is not None:
            try:
                await asyncio.to_thread(run.broker.delete, run.args.rabbitmq_url, DEFAULT_STEPS)
            except Exception as exc:  # reported; the figures stand
                run.problems.append(f"could not delete {run.broker.prefix}.*: {exc!r}")


# -- the Celery peer --------------------------------------------------------------------


@dataclass
class CeleryRun:
    """The peer: Celery chains of the same three no-op steps, on the same broker."""

    window: int  # chains in flight at most; 0: all published at once
    peer: Any = None  # the bench/celery_peer.py module, once imported
    prefix: str = ""
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    warmup: Phase | None = None
    run: Phase | None = None
    cpu: CpuMeter | None = None
    rss: float | None = None
    processes: int = 0
    exit: int | None = None
    log_lines: list[str] = field(default_factory=list)
    log_count: int = 0
    received: int = 0  # done messages consumed
    problems: list[str] = field(default_factory=list)
    cleanup_due: bool = False  # broker objects of this run may exist, none tried to delete

    @property
    def complete(self) -> bool:
        return self.run is not None and self.run.completed == self.run.total


class CeleryDriver:
    """Publishes the chains with Celery's own client and consumes their done messages.

    A phase's chains are published one after another, as fast as this producer goes (like
    the uploaders, it does not wait for workflows to finish), or with `--celery-window`
    at most that many in flight. Publishing is kombu's blocking call, on this loop, which
    it yields every few chains so the done messages (pika, on this loop too) come in.
    """

    def __init__(self, record: CeleryRun, url: str) -> None:
        self.record = record
        self.url = url
        self.phases: dict[str, Phase] = {}
        self.connection: Any = None
        self.room = asyncio.Event()  # set whenever a workflow finishes

    async def start(self) -> None:
        self.connection, channel = await open_channel(self.url)
        channel.basic_consume(self.record.peer.NAMES.done, self.on_done, auto_ack=True)

    def on_done(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.record.received += 1
        tag, n = self.record.peer.done_of(body)
        phase = self.phases.get(tag)
        if phase is not None:
            phase.finish(n, ok=True)
            self.room.set()

    async def publish(self, phase: Phase) -> None:
        """Publish the phase's chains (`upload_requests` counts the attempts)."""
        window = self.record.window
        for n in range(phase.total):
            while window and phase.uploaded - len(phase.finished) >= window:
                self.room.clear()
                await self.room.wait()
            phase.upload_requests += 1
            phase.sent_at[n] = now()
            try:
                self.record.peer.workflow(product_fields(phase.tag, n), phase.tag, n).apply_async()
            except Exception as exc:  # kombu's OperationalError and kin: counted, not fatal
                phase.errors[f"publish {type(exc).__name__}"] += 1
                continue
            phase.uploaded += 1
            if n % 8 == 7:
                await asyncio.sleep(0)
        phase.uploads_done = True
        phase.check()

    async def run(self, phase: Phase, idle: float) -> None:
        self.phases[phase.tag] = phase
        phase.started_at = now()
        publisher = asyncio.ensure_future(self.publish(phase))

        def progress() -> tuple[int, int]:
            return self.record.received, phase.upload_requests

        try:
            await wait_or_stall(phase, progress, idle)
        finally:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
            done = phase.done.is_set() and phase.last_finish
            phase.ended_at = phase.last_finish if done else now()

    async def ready(self, process: subprocess.Popen[bytes], within: float) -> str | None:
        """One workflow through a worker just started; what went wrong, if anything."""
        phase = Phase("start-up", 1)
        self.phases[phase.tag] = phase
        await self.publish(phase)
        deadline = now() + within
        while not phase.done.is_set():
            if process.poll() is not None:
                return f"celery worker exited with status {process.returncode}"
            if now() >= deadline:
                return f"celery worker finished no workflow within {within:g}s"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await phase.done.wait()
        return None if phase.completed else f"cannot publish: {format_errors(phase.errors)}"

    async def close(self) -> None:
        await close_connection(self.connection)


def import_peer(record: CeleryRun, url: str) -> bool:
    """Import bench/celery_peer.py for this run's broker and names; False if Celery is absent."""
    record.prefix = f"bench.{uuid.uuid4().hex[:8]}"
    os.environ.update(BENCH_CELERY_BROKER_URL=url, BENCH_CELERY_PREFIX=record.prefix)
    try:
        record.peer = importlib.import_module("celery_peer")
    except ImportError as exc:
        record.problems.append(
            f"cannot import the Celery peer ({exc}): "
            "pip install -r bench/requirements.txt (make bench does)"
        )
        return False
    return True


def celery_cleanup(record: CeleryRun) -> None:
    """Delete the run's queues and exchanges (once), close the producer's connections."""
    if not record.cleanup_due:
        return
    record.cleanup_due = False
    try:
        record.peer.delete()
    except Exception as exc:  # reported; the figures stand
        record.problems.append(f"could not delete {record.prefix}.*: {exc!r}")
    finally:
        record.peer.app.close()


async def celery_part(run: Run, tmpdir: Path) -> None:
    """Start the worker, drive the warm-up and the run, stop it and clean the broker."""
    args = run.args
    record = run.celery = CeleryRun(args.celery_window)
    if not import_peer(record, args.rabbitmq_url):
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOX_")}
    env["PYTHONPATH"] = str(REPO / "bench")
    driver = CeleryDriver(record, args.rabbitmq_url)
    record.cleanup_due = True
    try:
        try:
            await asyncio.to_thread(record.peer.declare)
            await driver.start()
        except Exception as exc:  # the broker refused us: nothing to measure
            record.problems.append(f"cannot declare or consume {record.prefix}.*: {exc!r}")
            return
        record.log_path = tmpdir / "celery-worker.log"
        command = record.peer.worker_command(sys.executable, CELERY_CONCURRENCY)
        record.process = spawn(command, env, record.log_path, group=True)
        problem = await driver.ready(record.process, args.startup_timeout)
        if problem:
            record.problems.append(problem)
            return
        if args.warmup:
            record.warmup = Phase("warm-up", args.warmup)
            await driver.run(record.warmup, args.idle_timeout)
            if record.warmup.stalled:
                record.problems.append("the warm-up did not finish; no measured run")
                return
        pid = record.process.pid
        record.cpu = CpuMeter(pid, tree=True)
        record.cpu.start()
        record.run = Phase("run", args.workflows)
        try:
            await driver.run(record.run, args.idle_timeout)
        finally:
            record.cpu.stop()
            record.rss = tree_rss_mib(pid)
            record.processes = len(process_tree(pid))
    finally:
        await driver.close()
        if record.process is not None:
            record.exit = await asyncio.to_thread(stop, record.process, 10.0, True)
            record.log_count = count_lines(record.log_path)
            record.log_lines = tail(record.log_path)
        await asyncio.to_thread(celery_cleanup, record)


# -- the report -------------------------------------------------------------------------


def report(run: Run) -> None:
    args = run.args
    p = print
    target = run.target
    p("Stox end-to-end benchmark")
    if target is not None:
        how = "started here, SQLite in a temp dir" if target.process else "already running"
        p(f"  gateway                 {target.base_url} ({how})")
    p(
        f"  load                    {args.workflows} workflows, {args.uploaders} uploaders, "
        f"{args.services} services, warm-up {args.warmup}, ramp {args.ramp:g}s"
    )
    report_gateway(run, "gateway")
    if run.rabbitmq is not None:
        report_gateway(run.rabbitmq, "gateway on RabbitMQ (AMQP dispatch and replies)")
        report_comparison(run, run.rabbitmq)
    if run.celery is not None:
        report_celery(run.celery, args)
    report_ceiling(run)
    if args.peers:
        report_peers(run)
    report_notes(run)


def report_stalled(phases: tuple[Phase | None, ...], idle: float) -> None:
    for stalled in phases:
        if stalled is not None and stalled.stalled:
            missing = stalled.uploaded - len(stalled.finished)
            print(
                f"STALLED in the {stalled.name}: {missing} workflows never finished and nothing "
                f"moved for {idle:g}s"
            )


def report_gateway(run: Run, title: str) -> None:
    args, p, target = run.args, print, run.target
    phase = run.run
    if phase is not None:
        # over AMQP only the uploads are HTTP requests; the steps are messages
        served = phase.upload_requests + (0 if run.amqp else phase.step_requests)
        p(title)
        p(
            f"  workflows completed     {phase.completed} / {phase.total}"
            f"  (failed {phase.failed}, uploads accepted {phase.uploaded})"
        )
        p(f"  wall time               {phase.wall:.2f} s")
        p(f"  completed workflows/s   {phase.completed / phase.wall:.1f}")
        if run.amqp:
            p(
                f"  HTTP requests/s         {served / phase.wall:.1f}  ({phase.upload_requests} "
                f"uploads; {phase.step_requests} steps dispatched and reported over AMQP)"
            )
        else:
            p(
                f"  HTTP requests/s         {served / phase.wall:.1f}"
                f"  ({phase.upload_requests} uploads + {phase.step_requests} step-completed)"
            )
        p(f"  upload latency          {ms(phase.upload_latency)}")
        if run.amqp:
            p(f"  dispatch latency        {ms(phase.step_latency)}  (gateway publish -> service)")
        else:
            p(f"  step-completed latency  {ms(phase.step_latency)}")
        p(f"  workflow latency        {ms(phase.workflow_latency)}  (upload sent -> completed)")
        p(f"  errors                  {format_errors(phase.errors)}")
        if run.shared is not None:
            closed = run.shared.ws_closed or "open to the end"
            p(f"  websocket               {run.shared.ws_messages} messages, {closed}")
        gw_cpu = run.gateway_cpu
        if gw_cpu is not None:
            p(f"  cpu (% of one core)     {gw_cpu.describe('gateway')}")
            if gw_cpu.server is not None and phase.completed and served:
                per_request = f", {1e6 * gw_cpu.server / served:.0f} us per HTTP request"
                if run.amqp:  # the uploads are its only HTTP requests: no figure of its own
                    per_request = ""
                p(
                    f"  gateway cpu per unit    {1000 * gw_cpu.server / phase.completed:.2f} ms "
                    f"per workflow{per_request}"
                    f"  (one free core: ~{phase.completed / gw_cpu.server:.0f} workflows/s)"
                )
            if run.amqp:
                p("  (the broker's CPU counts among the other processes)")
        if run.rss_before is not None and run.rss_after is not None:
            p(f"  gateway RSS             {run.rss_before:.0f} MiB -> {run.rss_after:.0f} MiB")
    if run.open_loop is not None:
        report_open_loop(run, run.open_loop)
    if target is not None and target.process is not None:
        p(
            f"  gateway exit status     {run.gateway_exit}; "
            f"{run.gateway_log_count} log lines at level warning and above"
        )
        for line in run.gateway_log_lines if run.gateway_log_count else []:
            p(f"    | {line[:200]}")
    open_phase = run.open_loop.phase if run.open_loop is not None else None
    report_stalled((run.warmup, run.run, open_phase), args.idle_timeout)
    if run.amqp:
        for problem in run.problems:
            p(f"PROBLEM (RabbitMQ run): {problem}")


UPLOAD_P99_MS = 10  # issue 9's targets for the open loop
STEP_P99_MS = 10
DISPATCH_P99_MS = 5


def report_open_loop(run: Run, loop: OpenLoop) -> None:
    p, phase = print, loop.phase
    p(
        f"  open loop               {loop.rate:.1f} uploads/s for {loop.seconds:.1f} s "
        f"({loop.basis}), {phase.total} uploads"
    )
    p("                          at fixed times; latency from each one's scheduled time")
    p(
        f"    achieved              {phase.completed / phase.wall:.1f} workflows/s"
        "  (first scheduled upload -> last completion)"
    )
    p(
        f"    workflows completed   {phase.completed} / {phase.total}"
        f"  (failed {phase.failed}, uploads accepted {phase.uploaded})"
    )
    valve = f"{loop.waited} uploads waited for one" if loop.waited else "never all busy"
    p(f"    connections           at most {loop.peak} busy of {loop.connections} ({valve})")
    p(f"    send lag              {ms_max(loop.send_lag)}  (scheduled -> request written)")
    p(
        f"    upload latency        {ms_max(phase.upload_latency)}  "
        f"{verdict(phase.upload_latency, UPLOAD_P99_MS)}"
    )
    if run.amqp:
        p(
            f"    dispatch latency      {ms_max(phase.step_latency)}  "
            f"{verdict(phase.step_latency, DISPATCH_P99_MS)}"
        )
        p("                          (the gateway's publish stamp, after the commit -> receipt)")
        p(
            f"    from the decision     {ms_max(phase.decision_latency)}  "
            f"{verdict(phase.decision_latency, DISPATCH_P99_MS)}"
        )
        p("                          (the event's occurred_at, before the write -> receipt)")
    else:
        p(
            f"    step-completed        {ms_max(phase.step_latency)}  "
            f"{verdict(phase.step_latency, STEP_P99_MS)}"
        )
        p(f"    service wait          {ms_max(phase.service_wait)}  (seen on /ws -> taken)")
    p(f"    workflow latency      {ms_max(phase.workflow_latency)}  (scheduled -> completed)")
    p(f"    errors                {format_errors(phase.errors)}")
    if loop.cpu is not None:
        p(f"    cpu (% of one core)   {loop.cpu.describe('gateway')}")


def open_loop_targets(run: Run, loop: OpenLoop) -> str:
    """'met', or which targets were not (the dispatch's: from the publish stamp)."""
    phase = loop.phase
    checks = [("upload", phase.upload_latency, UPLOAD_P99_MS)]
    if run.amqp:
        checks.append(("dispatch", phase.step_latency, DISPATCH_P99_MS))
    else:
        checks.append(("step-completed", phase.step_latency, STEP_P99_MS))
    missed = [name for name, values, limit in checks if not within(values, limit)]
    return "met" if not missed else "not met: " + ", ".join(missed)


def report_comparison(embedded: Run, amqp: Run) -> None:
    """The figures that matter, side by side; both runs had the same load."""
    p = print
    rows: list[tuple[str, Callable[[Run], str]]] = [
        ("completed workflows/s", _rate),
        ("workflow latency p50", lambda r: _ms(r.run.workflow_latency if r.run else [], 50)),
        ("workflow latency p99", lambda r: _ms(r.run.workflow_latency if r.run else [], 99)),
        ("upload latency p50", lambda r: _ms(r.run.upload_latency if r.run else [], 50)),
        ("gateway cpu / workflow", _cpu_per_workflow),
    ]
    p("embedded vs RabbitMQ (same load, same machine)")
    p(f"  {'':24}{'embedded':>14}{'RabbitMQ':>14}")
    for name, figure in rows:
        p(f"  {name:24}{figure(embedded):>14}{figure(amqp):>14}")


def _rate(run: Run) -> str:
    return "-" if run.run is None else f"{run.run.completed / run.run.wall:.1f}"


def _ms(values: list[float], q: float) -> str:
    value = percentile(values, q)
    return "-" if value is None else f"{value * 1000:.1f} ms"


def _cpu_per_workflow(run: Run) -> str:
    cpu = run.gateway_cpu
    if cpu is None or cpu.server is None or run.run is None or not run.run.completed:
        return "-"
    return f"{1000 * cpu.server / run.run.completed:.2f} ms"


def report_ceiling(run: Run) -> None:
    args, p, phase = run.args, print, run.run
    ceiling = run.ceiling
    if ceiling is not None:
        p(f"ceiling (bare Tornado, {ceiling.concurrency} connections)")
        p(f"  requests                {ceiling.requests} in {ceiling.wall:.2f} s")
        p(f"  requests/s              {ceiling.rate:.1f}")
        p(f"  latency                 {ms(ceiling.latency)}")
        p(f"  errors                  {format_errors(ceiling.errors)}")
        if ceiling.cpu is not None:
            p(f"  cpu (% of one core)     {ceiling.cpu.describe('bare Tornado')}")
            used = ceiling.cpu.server
            if used and ceiling.requests:
                p(
                    f"  cpu per request         {1e6 * used / ceiling.requests:.0f} us"
                    f"  (one free core: ~{ceiling.requests / used:.0f} requests/s)"
                )
        if phase is not None and ceiling.requests:
            served = phase.upload_requests + phase.step_requests
            wf_rate = phase.completed / phase.wall
            p("comparison")
            http_ratio = served / phase.wall / ceiling.rate
            p(f"  gateway HTTP req/s / ceiling req/s         {http_ratio:.3f}")
            p(f"  completed workflows/s / ceiling req/s      {wf_rate / ceiling.rate:.3f}")
            per_workflow = 1 + (run.shared.steps_per_workflow if run.shared else 3)
            goal_http = GOAL_WORKFLOWS_PER_S * per_workflow
            p(
                f"  goal {GOAL_WORKFLOWS_PER_S} workflows/s = {goal_http} HTTP req/s    "
                f"{goal_http / ceiling.rate:.3f} of the ceiling; "
                f"now at {wf_rate / GOAL_WORKFLOWS_PER_S:.1%} of the goal"
            )
    report_stalled((run.warmup, run.run), args.idle_timeout)


def report_celery(record: CeleryRun, args: argparse.Namespace) -> None:
    p, phase = print, record.run
    p(f"Celery peer (chains of 3 no-op tasks, {CELERY_CONCURRENCY} prefork workers, same broker)")
    if phase is not None:
        p(
            f"  workflows completed     {phase.completed} / {phase.total}"
            f"  (chains published {phase.uploaded})"
        )
        p(f"  wall time               {phase.wall:.2f} s")
        p(f"  completed workflows/s   {phase.completed / phase.wall:.1f}")
        window = f"at most {record.window}" if record.window else "no limit (--celery-window)"
        p(f"  chains in flight        {window}")
        p(f"  workflow latency        {ms(phase.workflow_latency)}  (published -> done message)")
        p(f"  errors                  {format_errors(phase.errors)}")
    cpu = record.cpu
    if phase is not None and cpu is not None:
        p(f"  cpu (% of one core)     {cpu.describe('celery worker')}")
        if cpu.server and phase.completed:
            p(
                f"  worker cpu per unit     {1000 * cpu.server / phase.completed:.2f} ms "
                f"per workflow  (one free core: ~{phase.completed / cpu.server:.0f} workflows/s)"
            )
        p("  (the worker's CPU: its main process and its pool; the broker's: other processes)")
    if record.rss is not None:
        p(f"  worker RSS              {record.rss:.0f} MiB in {record.processes} processes")
    if record.process is not None:
        p(f"  worker exit status      {record.exit}; {record.log_count} log lines")
        for line in [] if record.complete else record.log_lines:
            p(f"    | {line[:200]}")
    report_stalled((record.warmup, record.run), args.idle_timeout)
    for problem in record.problems:
        p(f"PROBLEM (Celery run): {problem}")


@dataclass
class PeerRow:
    """One line of the peers table: `count` units (workflows or requests) and their CPU."""

    name: str
    unit: str
    count: int | None = None
    wall: float = 0.0
    cpu: CpuMeter | None = None

    @property
    def rate(self) -> float | None:
        return self.count / self.wall if self.count and self.wall else None

    def per_unit(self, seconds: float | None) -> str:
        if seconds is None or not self.count:
            return "-"
        if self.unit == "req":
            return f"{1e6 * seconds / self.count:.0f} us"
        return f"{1000 * seconds / self.count:.2f} ms"

    def cells(self, celery: float | None) -> list[str]:
        cpu = self.cpu
        server, bench, others = (cpu.server, cpu.bench, cpu.others) if cpu else (None,) * 3
        host = None
        if server is not None and bench is not None and others is not None:
            host = server + bench + others
        ratio = "-"
        if self.rate is not None and celery and self.unit == "wf":
            ratio = f"{self.rate / celery:.2f}"
        rate = "-" if self.rate is None else f"{self.rate:.1f} {self.unit}/s"
        return [rate, *(self.per_unit(x) for x in (server, bench, others, host)), ratio]


def peer_rows(run: Run) -> list[PeerRow]:
    def of(name: str, phase: Phase | None, cpu: CpuMeter | None) -> PeerRow:
        if phase is None:
            return PeerRow(name, "wf")
        return PeerRow(name, "wf", phase.completed, phase.wall, cpu)

    amqp, celery, ceiling = run.rabbitmq, run.celery, run.ceiling
    rows = [
        of("Stox embedded", run.run, run.gateway_cpu),
        of("Stox on RabbitMQ", amqp.run if amqp else None, amqp.gateway_cpu if amqp else None),
        of("Celery chains", celery.run if celery else None, celery.cpu if celery else None),
        PeerRow("bare Tornado ceiling", "req"),
    ]
    if ceiling is not None:
        rows[-1] = PeerRow(
            "bare Tornado ceiling", "req", ceiling.requests, ceiling.wall, ceiling.cpu
        )
    return rows


def report_peers(run: Run) -> None:
    """The page: Stox in both modes, the Celery peer and the ceiling, per unit of work."""
    p = print
    rows = peer_rows(run)
    celery = rows[2].rate
    p(
        f"peers: one run, one machine, one broker; {run.args.workflows} workflows each after "
        f"{run.args.warmup} of warm-up, the ceiling as many requests as the gateway served"
    )
    heads = ["throughput", "server cpu", "load gen cpu", "others cpu", "host cpu", "rate/Celery"]
    p(f"  {'':22}" + "".join(f"{h:>14}" for h in heads))
    for row in rows:
        p(f"  {row.name:22}" + "".join(f"{c:>14}" for c in row.cells(celery)))
    p("  cpu per workflow (per request for the ceiling). server: the gateway; the Celery worker")
    p(f"  and its {CELERY_CONCURRENCY} pool processes (they run the no-op tasks); bare_tornado.py.")
    p("  load gen: this process (Stox's step services, Celery's producer). others: the broker")
    p("  and the rest of the host. host: the three added up.")
    for row in rows[:2]:
        if row.rate is not None and celery:
            line = f"  {row.name} / Celery: {row.rate / celery:.2f}x the workflows/s"
            mine, theirs = row.cpu, rows[2].cpu
            if mine and theirs and mine.server and theirs.server and row.count and rows[2].count:
                cpu_ratio = (mine.server / row.count) / (theirs.server / rows[2].count)
                line += f", {cpu_ratio:.2f}x the server cpu per workflow"
            p(line)
    report_open_peers(run)


def report_open_peers(run: Run) -> None:
    """The open loop of both modes, with issue 9's targets."""
    runs = [(name, r) for name, r in (("Stox embedded", run), ("Stox on RabbitMQ", run.rabbitmq))]
    rows = [(name, r, r.open_loop) for name, r in runs if r is not None and r.open_loop]
    if not rows:
        return
    p = print
    p(
        f"open loop: {run.args.open_loop_share:g} x the closed-loop maximum (or --open-loop-rate), "
        "uploads at fixed times, latency from the scheduled time"
    )
    heads = ["offered", "achieved", "upload p99", "step p99", "dispatch p99", "workflow p99"]
    p(f"  {'':22}" + "".join(f"{h:>14}" for h in heads) + "  targets")
    for name, each, loop in rows:
        phase = loop.phase
        step, dispatch = "-", "-"
        if each.amqp:
            dispatch = _ms(phase.step_latency, 99)
        else:
            step = _ms(phase.step_latency, 99)
        cells = [
            f"{loop.rate:.1f} wf/s",
            f"{phase.completed / phase.wall:.1f} wf/s",
            _ms(phase.upload_latency, 99),
            step,
            dispatch,
            _ms(phase.workflow_latency, 99),
        ]
        p(
            f"  {name:22}"
            + "".join(f"{c:>14}" for c in cells)
            + f"  {open_loop_targets(each, loop)}"
        )
    p(
        f"  targets: upload p99 <= {UPLOAD_P99_MS} ms, step-completed p99 <= {STEP_P99_MS} ms "
        f"(embedded), dispatch p99 <= {DISPATCH_P99_MS} ms"
    )
    p("  (RabbitMQ; from the gateway's publish stamp, set after the commit, to the receipt)")


def report_notes(run: Run) -> None:
    args, p, ceiling = run.args, print, run.ceiling
    busy = [  # not the runs on the broker: its CPU is among their others
        meter.others / meter.wall
        for meter in (run.gateway_cpu, ceiling.cpu if ceiling else None)
        if meter is not None and meter.others is not None and meter.pid
    ]
    if busy and max(busy) > 0.25:
        p(
            f"NOTE: other processes used up to {max(busy):.0%} of a core meanwhile; the rates "
            "are skewed, the CPU-per-unit figures less so"
        )
    if run.timed_out:
        p(f"TIMED OUT after {args.timeout:g}s: the figures above are partial")
    for problem in run.problems:
        p(f"PROBLEM: {problem}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/e2e.py", description="End-to-end throughput benchmark of the Stox gateway."
    )
    parser.add_argument("--workflows", type=int, default=None, help="workflows (default 2000)")
    parser.add_argument("--uploaders", type=int, default=8, help="concurrent uploaders (8)")
    parser.add_argument("--services", type=int, default=24, help="concurrent services (24)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up workflows (100)")
    parser.add_argument("--ramp", type=float, default=0.0, help="seconds to start uploaders")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 300 workflows")
    parser.add_argument(
        "--timeout", type=float, default=None, help="overall limit (120 s; 300 s with --peers)"
    )
    parser.add_argument("--request-timeout", type=float, default=30.0, help="per request (30 s)")
    parser.add_argument(
        "--idle-timeout", type=float, default=10.0, help="give up when nothing moves (10 s)"
    )
    parser.add_argument("--startup-timeout", type=float, default=30.0, help="readiness (30 s)")
    parser.add_argument("--url", help="a running gateway (loopback only) instead of starting one")
    parser.add_argument("--origin", help="Origin header for /ws (default: the gateway's URL)")
    parser.add_argument("--jwt-secret", help="the gateway's STOX_JWT_SECRET, to mint tokens")
    parser.add_argument("--user-token", help="a user token (instead of --jwt-secret)")
    parser.add_argument("--service-token", help="a service token (instead of --jwt-secret)")
    parser.add_argument("--port", type=int, default=0, help="port of the started gateway")
    parser.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        help="extra server.py argument for the started gateway (repeatable)",
    )
    parser.add_argument("--profile-server", metavar="PATH", help="run the gateway under cProfile")
    parser.add_argument(
        "--profile-clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: python -m cProfile; cpu: the IOLoop thread's CPU time only, which other "
        "processes on a busy host do not inflate (and the SQLite thread does not enter)",
    )
    parser.add_argument("--ceiling-requests", type=int, default=0, help="default: as many")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the bare-Tornado ceiling")
    parser.add_argument(
        "--rabbitmq-url",
        help="also run the load on a gateway using this RabbitMQ, services over AMQP",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="the whole page: embedded, RabbitMQ (--rabbitmq-url, default the local broker), "
        "the Celery peer (bench/celery_peer.py) and the ceiling, in one table",
    )
    parser.add_argument(
        "--celery-window",
        type=int,
        default=0,
        help="Celery chains in flight at most (default 0: published as fast as they go)",
    )
    parser.add_argument(
        "--no-open-loop", action="store_true", help="skip the open loop after each closed loop"
    )
    parser.add_argument(
        "--open-loop-share",
        type=float,
        default=0.5,
        help="the open loop's rate as a share of the closed loop's workflows/s (0.5)",
    )
    parser.add_argument(
        "--open-loop-rate", type=float, default=0.0, help="uploads/s of the open loop, instead"
    )
    parser.add_argument(
        "--open-loop-seconds",
        type=float,
        default=None,
        help="how long the open loop schedules uploads (10 s; 3 s with --quick)",
    )
    parser.add_argument(
        "--open-loop-workflows",
        type=int,
        default=0,
        help="a number of uploads for the open loop, instead of --open-loop-seconds",
    )
    parser.add_argument(
        "--open-loop-connections",
        type=int,
        default=64,
        help="uploads in flight at most in the open loop, a safety valve, reported if hit (64)",
    )
    args = parser.parse_args(argv)
    if args.peers and not args.rabbitmq_url:
        args.rabbitmq_url = LOCAL_BROKER
    if args.timeout is None:
        args.timeout = 300.0 if args.peers else 120.0
    if args.workflows is None:
        args.workflows = 300 if args.quick else 2000
    if args.warmup is None:
        args.warmup = 30 if args.quick else 100
    if args.open_loop_seconds is None:
        args.open_loop_seconds = 3.0 if args.quick else 10.0
    if args.profile_server:
        args.profile_server = str(Path(args.profile_server).resolve())
    for name in ("workflows", "uploaders", "services"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0 or args.ramp < 0 or args.timeout <= 0:
        parser.error("--warmup and --ramp must not be negative, --timeout must be positive")
    if args.rabbitmq_url and args.url:
        parser.error("--rabbitmq-url and --peers start their own gateway; not with --url")
    if args.celery_window < 0:
        parser.error("--celery-window must not be negative")
    if args.open_loop_share <= 0 or args.open_loop_rate < 0 or args.open_loop_seconds <= 0:
        parser.error("--open-loop-share and -seconds must be positive, -rate not negative")
    if args.open_loop_workflows < 0 or args.open_loop_connections < 1:
        parser.error("--open-loop-workflows must not be negative, --open-loop-connections >= 1")
    if args.rabbitmq_url and not args.rabbitmq_url.startswith(("amqp://", "amqps://")):
        parser.error("--rabbitmq-url must be amqp://… or amqps://…")
    if args.url:
        if args.profile_server:
            parser.error("--profile-server only applies to a gateway started here")
        if not args.jwt_secret and not (args.user_token and args.service_token):
            parser.error("with --url give --jwt-secret, or --user-token and --service-token")
        check_loopback(parser, args.url, args.origin)
    return args


def check_loopback(parser: argparse.ArgumentParser, url: str, origin: str | None) -> None:
    """A usage error unless `url` is a gateway on this host (see loopback_target)."""
    try:
        loopback_target(url, origin)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    run = Run(parse_args(argv))

    async def bounded() -> None:
        try:
            async with asyncio.timeout(run.args.timeout):
                await main_async(run)
        except TimeoutError:
            run.timed_out = True

    interrupted = False
    try:
        asyncio.run(bounded())
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for each in (run, run.rabbitmq):
            if each is not None and each.target is not None and each.target.process is not None:
                stop(each.target.process)  # when the timeout struck in start-up or shutdown
        if run.celery is not None:
            if run.celery.exit is None:
                stop(run.celery.process, group=True)
            celery_cleanup(run.celery)  # unless done already
    report(run)
    runs = [run] if run.rabbitmq is None else [run, run.rabbitmq]
    complete = all(r.run is not None and r.run.completed == r.run.total for r in runs)
    for r in runs:
        loop = r.open_loop
        if loop is not None and loop.phase.completed != loop.phase.total:
            complete = False
    problems = any(r.problems for r in runs)
    if run.celery is not None:
        complete = complete and run.celery.complete
        problems = problems or bool(run.celery.problems)
    ok = complete and not run.timed_out and not problems and not interrupted
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
