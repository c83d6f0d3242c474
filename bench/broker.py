"""The load's AMQP side: the step services consuming the gateway's step queues
(`AmqpServices`, the RabbitMQ mode of bench/e2e.py), the names of one run's broker objects
(`BrokerNames`), and the Celery peer: its record (`CeleryRun`) and its producer and
done-consumer (`CeleryDriver`). Each uses a pika AsyncioConnection on the bench's loop
(`open_channel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from figures import counts
from processes import CpuMeter, now
from roles import Phase, Shared, product_fields, step_result, wait_or_stall

CELERY_CONCURRENCY = 2  # prefork pool processes of the Celery peer's worker


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
        return None if phase.completed else f"cannot publish: {counts(phase.errors)}"

    async def close(self) -> None:
        await close_connection(self.connection)
