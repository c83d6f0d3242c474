"""The load bench/e2e.py puts on a gateway, role by role.

* uploaders (`uploader`, `run_phase`: the closed loop) upload products over HTTP as fast as
  their answers come; the open loop (`run_open_loop`) uploads at fixed times instead;
* one WebSocket subscriber (`ws_reader`) sees every change of the user's workflows, queues
  each dispatched step and finishes a workflow when its last change arrives;
* the step services (`service`) take the queued steps and report each over HTTP;
* the ceiling's clients (`drive_ceiling`) post the same kind of body to a bare Tornado app.

The services over AMQP and the Celery peer's producer are in bench/broker.py. A `Phase` is
one batch of workflows (the warm-up, the measured run, the open loop) and what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from httpclient import (
    STEP_PATH,
    TRANSPORT_ERRORS,
    UPLOAD_PATH,
    HttpClient,
    auth_headers,
    error_name,
)
from processes import CpuMeter, Target, now

CEILING_PATH = "/echo"  # bench/bare_tornado.py's handler


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


def report_body(workflow_id: str, step_id: str, name: str, error: str | None = None) -> bytes:
    """A step-completed report as a service POSTs it: a success with `step_result`, or, given
    `error`, a failure."""
    report: dict[str, Any] = {
        "workflow_id": workflow_id,
        "step_id": step_id,
        "step_type": name,
        "success": error is None,
    }
    if error is None:
        report["result"] = step_result(name, workflow_id)
    else:
        report["error"] = error
    return json.dumps(report, separators=(",", ":")).encode()


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
        body = report_body(workflow_id, step_id, name)
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
    body = report_body(uuid.uuid4().hex, uuid.uuid4().hex, "ai_enhancement")

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
