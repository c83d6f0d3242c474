"""What one workflow costs, counted (never timed): the work the performance issue took out of
the hot path must not grow back. Each count is of a real store, bus and hub doing a real
three-step workflow; a change that adds a store write, a JSON encoding of the document or a
broker round trip per transition fails here, whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
import rabbit
from support import PRODUCT, Calls, eventually

from stox import codec
from stox.bus import rabbitmq
from stox.bus.base import EventBus
from stox.bus.local import LocalBus
from stox.changes import CHANGES_ROUTING_KEY
from stox.hub import Hub
from stox.orchestrator import Orchestrator
from stox.store import sqlite_db
from stox.store.sqlite import SQLiteStore
from stox.workflow import CHANGE_ROUTING_KEY, Pipeline, Report, StepSpec

PIPELINE = Pipeline(
    steps=(StepSpec("image_processing"), StepSpec("ai_enhancement"), StepSpec("seo_generation")),
    completion_url="http://127.0.0.1/api/v1/workflow/step-completed",
)
WORKFLOWS = 20
TRANSITIONS = 4  # the upload and three completions
# a socket message per change: the first dispatch; then each completion and what followed it
MESSAGES = 1 + 3 * 2
# upload: workflow.start, the first dispatch, the change; each completion: the next dispatch
# (or workflow.completed) and the change
EVENTS = 3 + 3 * 2


class Watcher:
    """A WebSocket as the hub sees it: every write flushed at once."""

    def __init__(self) -> None:
        self.messages = 0

    def send(self, message: bytes) -> asyncio.Future[None]:
        self.messages += 1
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        pass


class DocumentEncodings:
    """Counts JSON encodings of a workflow document (or of a payload carrying one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = orjson.dumps

        def counted(value: Any, *args: Any) -> bytes:
            if isinstance(value, dict) and (_document(value) or _document(value.get("workflow"))):
                self.count += 1
            encoded: bytes = original(value, *args)
            return encoded

        monkeypatch.setattr(codec, "orjson", type("Spy", (), {"dumps": staticmethod(counted)}))


def _document(value: Any) -> bool:
    """Whether `value` is a workflow document (an id, and steps that are objects; a pipeline's
    definition, written once at upload, has steps but no id)."""
    steps = value.get("steps") if isinstance(value, dict) else None
    is_steps = isinstance(steps, list) and bool(steps) and isinstance(steps[0], dict)
    return is_steps and "id" in value


async def watched(store: SQLiteStore, bus: EventBus, watcher: Watcher) -> Orchestrator:
    """An orchestrator whose changes `watcher` follows through the hub."""
    orchestrator = Orchestrator(store, bus, PIPELINE)
    hub = Hub(
        orchestrator,
        max_backlog=1 << 24,
        send_timeout=10,
        max_sockets_per_user=1,
        snapshot_cache=1 << 24,
        max_sockets=1,
    )
    await bus.declare("cost.hub", [CHANGES_ROUTING_KEY, CHANGE_ROUTING_KEY], exclusive=True)
    await bus.consume("cost.hub", hub.on_change)
    await hub.send_snapshot(hub.subscribe(watcher, user="alice", owner="alice", workflow_id=None))
    return orchestrator


async def run_workflows(orchestrator: Orchestrator) -> None:
    """WORKFLOWS three-step workflows, one after the other."""
    for _ in range(WORKFLOWS):
        wf = await orchestrator.upload("alice", copy.deepcopy(PRODUCT))
        for _ in range(3):
            step = wf.step
            wf = (await orchestrator.report(Report(wf.id, step.step_id or "", True))).workflow
        await orchestrator.drain()


async def test_a_three_step_workflow_writes_its_state_four_times_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One insert and three compare-and-swaps; published events leave the outbox inside
    those transactions (or, for the last ones, in one of their own for all of them)."""
    store = SQLiteStore(str(tmp_path / "stox.db"))
    await store.open()
    bus = LocalBus()
    await bus.start()
    watcher = Watcher()
    orchestrator = await watched(store, bus, watcher)
    inserts = Calls(monkeypatch, store, "insert")
    replaces = Calls(monkeypatch, store, "replace")
    transactions = Calls(monkeypatch, sqlite_db, "_together")
    encodings = DocumentEncodings(monkeypatch)
    publishes = Calls(monkeypatch, bus, "publish")
    try:
        await run_workflows(orchestrator)
        await eventually(lambda: watcher.messages == WORKFLOWS * MESSAGES)
        assert (inserts.count, replaces.count) == (WORKFLOWS, 3 * WORKFLOWS)
        # each event once, though each report arrives while the events before it are being
        # published (they were decided on a document that still held them)
        assert publishes.count == WORKFLOWS * EVENTS
        # one transaction a transition; the drops ride in them, and `drain` commits the last
        assert transactions.count <= WORKFLOWS * (TRANSITIONS + 1)
        # per transition: its state for the store, its change notification, and the hub's
        # copy for the sockets (the notification is decoded from the bus, as from a broker)
        assert encodings.count == 3 * WORKFLOWS * TRANSITIONS
        rows = store.connection().execute("SELECT count(*) FROM outbox").fetchone()[0]
        assert rows == 0, "every published event left the outbox"
    finally:
        await bus.close()
        await store.close()


@pytest.mark.rabbitmq
async def test_each_event_is_one_confirmed_publish_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rabbit_ns: rabbit.Namespace
) -> None:
    """A transition's events go out as one publish (one confirm) each: no declare, no retry,
    no channel opened per publish."""
    store = SQLiteStore(str(tmp_path / "stox.db"))
    await store.open()
    bus = rabbit_ns.bus()
    await bus.start()
    watcher = Watcher()
    orchestrator = await watched(store, bus, watcher)
    published = Calls(monkeypatch, bus, "_publish_once")
    channels = Calls(monkeypatch, rabbitmq, "temporary_channel")
    opened = Calls(monkeypatch, rabbitmq, "open_channel")
    try:
        await run_workflows(orchestrator)
        await eventually(lambda: watcher.messages == WORKFLOWS * MESSAGES)
        assert published.count == WORKFLOWS * EVENTS
        assert channels.count == 0 and opened.count == 0
    finally:
        await bus.close()
        await store.close()
