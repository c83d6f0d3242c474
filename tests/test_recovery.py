"""Crash safety with real gateways: left-behind outboxes, restarts, deadlines passed while down."""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, closing
from pathlib import Path
from typing import Any

from procs import gateway_config, remote, start_gateway, wait_ready
from support import (
    PRODUCT,
    RunningGateway,
    free_port,
    gateway_settings,
    report,
    running_gateway,
)

import settings as settings_module
from handlers import completion_path
from stox import workflow as w
from stox.app import make_pipeline
from stox.bus.base import Event
from stox.bus.local import LocalBus
from stox.store import make_store

STEPS = ("image_processing", "ai_enhancement", "seo_generation")
TIMEOUT = 5.0


class Probe:
    """A consumer on a gateway's bus that records every event it is given."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    @classmethod
    async def attach(cls, bus: LocalBus | Any, *bindings: str) -> Probe:
        probe = cls()
        queue = f"probe.{id(probe)}"
        await bus.declare(queue, list(bindings), exclusive=True)
        await bus.consume(queue, probe.handle)
        return probe

    async def handle(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    def matching(self, routing_key: str, workflow_id: str | None = None) -> list[Event]:
        """Distinct events (by message id) with this routing key, of one workflow if given."""
        found: dict[str, Event] = {}
        for e in self.events:
            if e.routing_key == routing_key and workflow_id in (None, e.payload["workflow_id"]):
                found.setdefault(e.message_id, e)
        return list(found.values())

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait (at most TIMEOUT seconds) until `predicate()` holds."""
        async with asyncio.timeout(TIMEOUT):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


def serve(
    tmp_path: Path,
    configure: Callable[[settings_module.Settings], None] | None = None,
    **gateway_kwargs: Any,
) -> AbstractAsyncContextManager[RunningGateway]:
    """Like support.running_gateway, but the Gateway gets `gateway_kwargs` (bus, clock, ...)."""
    return running_gateway(tmp_path, configure, gateway_kwargs)


async def started_bus() -> LocalBus:
    bus = LocalBus()
    await bus.start()
    return bus


async def status(gw: RunningGateway, workflow_id: str) -> dict[str, Any]:
    return await gw.status(workflow_id)


async def complete_current_step(gw: RunningGateway, workflow_id: str) -> dict[str, Any]:
    doc = await status(gw, workflow_id)
    step = doc["steps"][doc["current_step"]]
    assert step["status"] == w.DISPATCHED, doc
    response = await report(gw, workflow_id, step)
    assert response.status == 200, response.body
    assert response.body["result"] == "applied"
    return await status(gw, workflow_id)


# -- a crash between the state write and the publish ---------------------------------------


async def test_startup_relay_publishes_what_a_crashed_gateway_left_in_the_outbox(
    tmp_path: Path, store_url: str
) -> None:
    def configure(settings: settings_module.Settings) -> None:
        settings.storage.url = store_url

    settings = gateway_settings(tmp_path)
    configure(settings)
    pipeline = make_pipeline(settings, completion_path())
    now = time.time() - 1
    # what a gateway that crashed right after its store write leaves behind:
    # an upload whose events never went out ...
    fresh, _ = w.start(pipeline, "alice", copy.deepcopy(PRODUCT), now)
    # ... and a completion whose next dispatch never went out
    advanced, _ = w.start(pipeline, "alice", copy.deepcopy(PRODUCT), now)
    w.drop_published(advanced, {e["message_id"] for e in advanced.outbox})
    first_step_id = str(advanced.step.step_id)
    w.complete(advanced, pipeline, w.Report(advanced.id, first_step_id, True, result={}), now)
    store = make_store(store_url)
    await store.open()
    try:
        await store.insert(fresh.to_doc())
        await store.insert(advanced.to_doc())
    finally:
        await store.close()

    bus = await started_bus()
    probe = await Probe.attach(bus, "step.#", "workflow.#")
    async with serve(tmp_path, configure, bus=bus) as gw:
        # the start-up relay ran before start() returned: nothing is left in the outboxes
        for workflow_id in (fresh.id, advanced.id):
            doc = await gw.gateway.store.get(workflow_id)
            assert doc is not None
            assert doc["outbox"] == []
            assert doc["outbox_at"] is None
        await probe.wait_for(lambda: len(probe.matching("step.ai_enhancement")) == 1)
        await probe.wait_for(lambda: len(probe.matching("step.image_processing")) == 1)
        (image,) = probe.matching("step.image_processing")
        assert image.payload["workflow_id"] == fresh.id
        assert image.payload["step_id"] == fresh.steps[0].step_id
        assert [e.payload["workflow_id"] for e in probe.matching("workflow.start")] == [fresh.id]
        (ai,) = probe.matching("step.ai_enhancement")
        assert ai.payload["workflow_id"] == advanced.id
        assert ai.payload["step_id"] == advanced.step.step_id
        assert ai.payload["results"] == {"image_processing": {}}

        # the relayed dispatches are live: services can finish both workflows
        for workflow_id in (fresh.id, advanced.id):
            doc = await status(gw, workflow_id)
            while doc["status"] == w.RUNNING:
                doc = await complete_current_step(gw, workflow_id)
            assert doc["status"] == w.COMPLETED


# -- a restart mid-flow --------------------------------------------------------------------


async def test_a_restarted_gateway_finishes_every_workflow_once(tmp_path: Path) -> None:
    bus_a = await started_bus()
    probe_a = await Probe.attach(bus_a, "workflow.#")
    async with serve(tmp_path, bus=bus_a) as gw:
        token = gw.token()
        ids = [await gw.upload(token, name=f"Lamp {i}") for i in range(4)]
        for steps_done, workflow_id in enumerate(ids):  # 0, 1, 2 and 3 steps done
            for _ in range(steps_done):
                await complete_current_step(gw, workflow_id)
        finished = await status(gw, ids[3])
        assert finished["status"] == w.COMPLETED
    before = {i: (await status_after_stop(tmp_path, i)) for i in ids}
    assert [doc["status"] for doc in before.values()] == [w.RUNNING] * 3 + [w.COMPLETED]

    bus_b = await started_bus()
    probe_b = await Probe.attach(bus_b, "workflow.#")
    async with serve(tmp_path, bus=bus_b) as gw:
        for workflow_id in ids:
            doc = await status(gw, workflow_id)
            while doc["status"] == w.RUNNING:
                doc = await complete_current_step(gw, workflow_id)
            assert doc["status"] == w.COMPLETED
            for step in doc["steps"]:
                assert step["status"] == w.COMPLETED
                assert [a["outcome"] for a in step["attempts"]] == [w.COMPLETED]
                assert step["result"] == {"done": step["name"]}

        # the workflow finished before the restart was left alone ...
        assert (await status(gw, ids[3]))["version"] == before[ids[3]]["version"]
        # ... and reporting its last step again changes nothing
        last = before[ids[3]]["steps"][-1]
        again = await report(gw, ids[3], last)
        assert again.status == 200
        assert again.body["result"] == "duplicate"
        await gw.gateway.orchestrator.drain()
        await probe_b.wait_for(lambda: len(probe_b.matching("workflow.completed")) == 3)

    completions = probe_a.matching("workflow.completed") + probe_b.matching("workflow.completed")
    assert sorted(e.payload["workflow_id"] for e in completions) == sorted(ids)


async def status_after_stop(tmp_path: Path, workflow_id: str) -> dict[str, Any]:
    store = make_store(gateway_settings(tmp_path).storage.url)
    await store.open()
    try:
        doc = await store.get(workflow_id)
    finally:
        await store.close()
    assert doc is not None
    return doc


# -- a deadline that passed while the gateway was down -------------------------------------


async def test_a_deadline_passed_while_down_is_retried_after_restart(tmp_path: Path) -> None:
    def configure(settings: settings_module.Settings) -> None:
        settings.pipeline.steps[0].timeout = settings_module.Duration(60)
        settings.pipeline.steps[0].backoff = settings_module.Duration(0.2)

    async with running_gateway(tmp_path, configure) as gw:
        workflow_id = await gw.upload(gw.token())
        first = (await status(gw, workflow_id))["steps"][0]
    assert first["status"] == w.DISPATCHED
    assert first["attempt"] == 1

    # two minutes later, well past the 60 s deadline
    bus = await started_bus()
    probe = await Probe.attach(bus, "step.image_processing")
    later = lambda: time.time() + 120  # noqa: E731
    async with serve(tmp_path, configure, bus=bus, clock=later) as gw:
        await probe.wait_for(lambda: bool(probe.matching("step.image_processing", workflow_id)))
        (dispatch,) = probe.matching("step.image_processing", workflow_id)
        assert dispatch.payload["attempt"] == 2
        assert dispatch.payload["step_id"] != first["step_id"]

        doc = await status(gw, workflow_id)
        step = doc["steps"][0]
        assert step["status"] == w.DISPATCHED
        assert step["attempt"] == 2
        assert step["step_id"] == dispatch.payload["step_id"]
        assert step["attempts"] == [
            {
                "step_id": first["step_id"],
                "attempt": 1,
                "outcome": w.TIMED_OUT,
                "error": "no report within 60s",
                "dispatched_at": first["dispatched_at"],
            }
        ]
        # the timed-out attempt's late report is refused; the new attempt's is applied
        late = await report(gw, workflow_id, first)
        assert late.status == 409
        doc = await complete_current_step(gw, workflow_id)
        assert doc["steps"][0]["status"] == w.COMPLETED
        assert doc["steps"][1]["status"] == w.DISPATCHED


def confirmed_dispatches_in_flight(path: Path) -> int:
    """Running workflows whose current step was dispatched and whose outbox no longer holds
    that dispatch: the bus had confirmed it, so only the bus can still deliver it."""
    # committed, then closed: Python 3.13 warns of a connection left to the collector
    with closing(sqlite3.connect(path)) as conn, conn:
        docs = [json.loads(doc) for (doc,) in conn.execute("SELECT doc FROM workflows")]
        pending = {
            (workflow_id, routing_key)
            for workflow_id, routing_key in conn.execute(
                "SELECT workflow_id, routing_key FROM outbox"
            )
        }
    return sum(
        doc["status"] == w.RUNNING
        and (step := doc["steps"][doc["current_step"]])["status"] == w.DISPATCHED
        and (doc["id"], f"step.{step['name']}") not in pending
        for doc in docs
    )


async def test_a_gateway_killed_with_dispatches_in_flight_resumes_them_at_once(
    tmp_path: Path,
) -> None:
    """SIGKILL with 200 workflows in flight on the embedded bus: the dispatches it had
    confirmed were kept in its SQLite file, so the restarted gateway's demo workers take them
    at once. Had they been lost, their steps would wait out a 120 s deadline (longer than this
    test may run) and every such attempt would end `timed_out`."""
    port = free_port()
    config = gateway_config(port, "embedded", f"sqlite:///{tmp_path}/stox.db", "") + (
        "demo_workers: true\npipeline:\n  steps:\n"
        + "".join(f"    - {{name: {step}, timeout: 120s, backoff: 100ms}}\n" for step in STEPS)
    )
    client = remote(port)
    token = client.token()
    first = start_gateway(tmp_path, "gateway-1", config)
    try:
        await wait_ready(first, port)
        ids = await asyncio.gather(*(client.upload(token) for _ in range(200)))
        first.popen.send_signal(signal.SIGKILL)
        first.popen.wait(10)
    finally:
        first.kill()
    assert confirmed_dispatches_in_flight(tmp_path / "stox.db") > 100

    second = start_gateway(tmp_path, "gateway-2", config)
    try:
        await wait_ready(second, port)
        docs = await client.wait_finished(list(ids), within=40)
    finally:
        second.stop()
    timed_out = [
        (doc["id"], step["name"])
        for doc in docs.values()
        for step in doc["steps"]
        for attempt in step["attempts"]
        if attempt["outcome"] == w.TIMED_OUT
    ]
    assert timed_out == []
    # the demo workers fail some attempts on purpose; the rest completed
    assert {doc["status"] for doc in docs.values()} <= {w.COMPLETED, w.FAILED}
