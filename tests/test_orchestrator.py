"""The Orchestrator on real stores (SQLite and MongoDB): outbox, relay, commands, races, sweeper.

A `RecordingBus` stands in for the broker: it records what it confirms and can be told to
fail. Its publish yields to the loop first, as a broker round trip would, so publishes,
outbox clears and completions interleave the way they do in a running gateway.

Publishing is at-least-once: the same event (same `message_id`) may go out more than once,
so "dispatched twice" is checked on distinct message ids, never on raw publish counts.
"""

from __future__ import annotations

import asyncio
import copy
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any, TypeVar

import pytest
from support import PRODUCT, T0, Clock, RecordingBus

from stox import workflow as w
from stox.bus.base import Event
from stox.bus.local import LocalBus
from stox.observe import Observers
from stox.orchestrator import NotFound, Orchestrator
from stox.store import WorkflowStore, make_store
from stox.workflow import NotAllowed, Pipeline, Report, StaleReport, StepSpec

# image: 2 attempts, immediate retry; ai: 2 attempts, 5 s backoff; seo: one attempt.
PIPELINE = Pipeline(
    steps=(
        StepSpec("image_processing", timeout=30, max_attempts=2, backoff=0),
        StepSpec("ai_enhancement", timeout=30, max_attempts=2, backoff=5),
        StepSpec("seo_generation", timeout=30, max_attempts=1, backoff=0),
    ),
    completion_url="http://gateway.test/api/v1/workflow/step-completed",
)
T = TypeVar("T")
STEP_KEYS = {spec.routing_key for spec in PIPELINE.steps}


class CountingStore:
    """Delegates to a store and counts the writes that took effect."""

    def __init__(self, inner: WorkflowStore) -> None:
        self.inner = inner
        self.inserts = 0
        self.replaced = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def insert(self, doc: dict[str, Any], events: Any = None) -> int:
        size = await self.inner.insert(doc, events)
        self.inserts += 1
        return size

    async def replace(
        self, doc: dict[str, Any], expected_version: int, new_events: list[Any]
    ) -> int:
        size = await self.inner.replace(doc, expected_version, new_events)
        self.replaced += bool(size)
        return size


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def bus() -> RecordingBus:
    return RecordingBus()


@pytest.fixture
def orch(store: WorkflowStore, bus: RecordingBus, clock: Clock) -> Orchestrator:
    return Orchestrator(store, bus, PIPELINE, clock=clock)


@pytest.fixture
async def other_store(store_url: str, store: WorkflowStore) -> AsyncIterator[WorkflowStore]:
    """A second, separately opened store on the same file or database as `store`."""
    second = make_store(store_url)
    await second.open()
    try:
        yield second
    finally:
        await second.close()


def ok(wf: w.Workflow, result: dict[str, Any] | None = None) -> Report:
    step = wf.step
    return Report(wf.id, str(step.step_id), True, step_type=step.name, result=result or {"n": 1})


def bad(wf: w.Workflow, error: str = "boom") -> Report:
    step = wf.step
    return Report(wf.id, str(step.step_id), False, step_type=step.name, error=error)


def distinct(events: Iterable[Event], routing_key: str) -> list[Event]:
    """Events with this routing key, each message once, in first-publish order."""
    found: dict[str, Event] = {}
    for e in events:
        if e.routing_key == routing_key:
            found.setdefault(e.message_id, e)
    return list(found.values())


def dispatches(events: Iterable[Event]) -> dict[str, Event]:
    """Distinct dispatch events by message id."""
    return {e.message_id: e for e in events if e.routing_key in STEP_KEYS}


async def later(delay: float, awaitable: Awaitable[T]) -> T:
    await asyncio.sleep(delay)
    return await awaitable


def step_ids_of(doc: dict[str, Any]) -> set[str]:
    """Every attempt the stored workflow knows of: finished ones and the current one."""
    found: set[str] = set()
    for step in doc["steps"]:
        found.update(record["step_id"] for record in step["attempts"])
        if step["status"] == w.DISPATCHED:
            found.add(step["step_id"])
    return found


# -- upload and the outbox -----------------------------------------------------------------


@pytest.mark.timeout(10)
async def test_drain_returns_while_a_finished_publish_awaits_its_done_callback(
    orch: Orchestrator,
) -> None:
    """A publish task leaves `_publishing` in its done callback, which runs a loop step after
    it finished; drain() called in between returns (it once waited on the finished task
    again, and since Python 3.12 such a gather() returns without yielding: a busy loop)."""
    finished: asyncio.Task[None] = asyncio.ensure_future(asyncio.sleep(0))
    await finished
    orch._publishing.add(finished)
    finished.add_done_callback(orch._publishing.discard)  # to run in the next loop step
    await orch.drain()


async def test_upload_stores_then_publishes_in_order_and_clears_outbox(
    orch: Orchestrator, store: WorkflowStore, bus: RecordingBus
) -> None:
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    written = [entry["routing_key"] for entry in wf.outbox]
    assert written == ["workflow.start", "step.image_processing", "workflow.changed"]

    await orch.drain()

    assert bus.keys() == written
    assert [e.message_id for e in bus.events] == [entry["message_id"] for entry in wf.outbox]
    assert all(e.correlation_id == wf.id for e in bus.events)
    start, dispatch, _changed = (e.payload for e in bus.events)
    assert start["owner"] == "alice"
    assert start["steps"] == ["image_processing", "ai_enhancement", "seo_generation"]
    assert dispatch["step_id"] == wf.steps[0].step_id
    assert dispatch["reply_to"]["http"] == PIPELINE.completion_url

    stored = await store.get(wf.id)
    assert stored is not None
    assert stored["status"] == w.RUNNING
    assert stored["steps"][0]["status"] == w.DISPATCHED
    assert stored["outbox"] == []
    assert stored["outbox_at"] is None
    assert stored["version"] == 1  # the upload; clearing the outbox is no new version


async def test_upload_through_a_local_bus_reaches_consumers_in_order(
    store: WorkflowStore, clock: Clock
) -> None:
    bus = LocalBus()
    await bus.start()
    try:
        seen: list[Event] = []
        arrived = asyncio.Event()

        async def handler(event: Event) -> None:
            seen.append(event)
            if len(seen) == 3:
                arrived.set()

        await bus.declare("probe", ["#"], exclusive=True)
        await bus.consume("probe", handler)
        orch = Orchestrator(store, bus, PIPELINE, clock=clock)
        wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
        await orch.drain()
        await asyncio.wait_for(arrived.wait(), 5)
        assert [e.routing_key for e in seen] == [
            "workflow.start",
            "step.image_processing",
            "workflow.changes",  # the change notification, in a batch (stox/changes.py)
        ]
        [notification] = seen[2].payload["notifications"]
        assert notification["message_id"] == wf.outbox[2]["message_id"]
        assert notification["payload"] == wf.outbox[2]["payload"]
        assert (await orch.get(wf.id)).outbox == []
    finally:
        await bus.close()


async def test_unconfirmed_events_stay_in_the_outbox_and_the_relay_publishes_them(
    orch: Orchestrator, store: WorkflowStore, bus: RecordingBus, clock: Clock
) -> None:
    bus.fail = True
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    await orch.drain()

    assert bus.events == []
    stored = await store.get(wf.id)
    assert stored is not None
    assert stored["outbox"] == wf.outbox  # nothing lost
    assert stored["outbox_at"] == wf.outbox[0]["created_at"]

    # the broker is still down: the relay tries, and nothing is lost either
    clock.advance(10)
    assert await orch.relay(min_age=5) == 1
    assert (await orch.get(wf.id)).outbox == wf.outbox

    bus.fail = False
    assert await orch.relay(min_age=5) == 1
    assert [e.message_id for e in bus.events] == [entry["message_id"] for entry in wf.outbox]
    stored = await store.get(wf.id)
    assert stored is not None
    assert stored["outbox"] == []
    assert stored["outbox_at"] is None
    assert await orch.relay(min_age=0) == 0  # nothing left behind
    assert len(bus.events) == 3


async def test_a_partly_confirmed_outbox_keeps_the_rest_in_order(
    orch: Orchestrator, store: WorkflowStore, bus: RecordingBus, clock: Clock
) -> None:
    bus.allow = 1  # the broker confirms workflow.start, then goes away
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    await orch.drain()

    assert bus.keys() == ["workflow.start"]
    stored = await store.get(wf.id)
    assert stored is not None
    assert [e["routing_key"] for e in stored["outbox"]] == [
        "step.image_processing",
        "workflow.changed",
    ]
    assert stored["outbox_at"] == stored["outbox"][0]["created_at"]

    bus.allow = None
    clock.advance(60)
    assert await orch.relay() == 1
    assert bus.keys() == ["workflow.start", "step.image_processing", "workflow.changed"]
    assert (await orch.get(wf.id)).outbox == []


async def test_relay_leaves_fresh_entries_to_their_publisher(
    orch: Orchestrator, bus: RecordingBus, clock: Clock
) -> None:
    bus.fail = True
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    await orch.drain()
    bus.fail = False

    clock.advance(4)
    assert await orch.relay(min_age=5) == 0
    assert bus.events == []
    assert len((await orch.get(wf.id)).outbox) == 3

    clock.advance(1)
    assert await orch.relay(min_age=5) == 1
    assert len(bus.events) == 3
    assert (await orch.get(wf.id)).outbox == []


# the events of an upload and of the report that completes its first step
UPLOAD_AND_FIRST_REPORT = [
    "workflow.start",
    "step.image_processing",
    "workflow.changed",
    "step.ai_enhancement",
    "workflow.changed",
]


async def test_events_of_a_later_transition_wait_behind_unconfirmed_ones(
    orch: Orchestrator, bus: RecordingBus, clock: Clock
) -> None:
    bus.fail = True
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    await orch.drain()
    await orch.report(ok(wf))
    await orch.drain()
    assert bus.events == []

    bus.fail = False
    clock.advance(60)
    await orch.relay()
    assert bus.keys() == UPLOAD_AND_FIRST_REPORT
    assert (await orch.get(wf.id)).outbox == []


async def test_a_change_written_while_its_outbox_is_published_sends_no_event_twice(
    store: WorkflowStore, clock: Clock
) -> None:
    """A report lands while the upload's events wait for the broker's confirms: the next
    round publishes the new events only, not the confirmed ones again."""
    gate = asyncio.Event()

    class SlowBroker(RecordingBus):
        async def publish(self, event: Event) -> None:
            await gate.wait()  # confirms take a while
            await super().publish(event)

    bus = SlowBroker()
    orch = Orchestrator(store, bus, PIPELINE, clock=clock)
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    await asyncio.sleep(0)  # its round has begun: workflow.start awaits its confirm
    await orch.report(ok(wf))
    gate.set()
    await orch.drain()

    assert bus.keys() == UPLOAD_AND_FIRST_REPORT
    assert len({e.message_id for e in bus.events}) == 5
    assert (await orch.get(wf.id)).outbox == []


# -- commands ------------------------------------------------------------------------------


async def test_reports_drive_a_workflow_to_completion(
    orch: Orchestrator, bus: RecordingBus
) -> None:
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    for name in ("image_processing", "ai_enhancement", "seo_generation"):
        assert wf.step.name == name
        outcome = await orch.report(ok(wf, {"step": name}))
        assert outcome.applied
        wf = outcome.workflow
    await orch.drain()

    assert wf.status == w.COMPLETED
    assert [s.status for s in wf.steps] == [w.COMPLETED] * 3
    stored = await orch.get(wf.id)
    assert stored.status == w.COMPLETED
    assert stored.results() == {name: {"step": name} for name in stored.results()}
    assert len(stored.results()) == 3
    assert stored.outbox == []
    completed = distinct(bus.events, "workflow.completed")
    assert len(completed) == 1
    assert completed[0].payload["results"]["seo_generation"] == {"step": "seo_generation"}
    assert len(dispatches(bus.events)) == 3


async def test_the_same_report_again_is_a_duplicate_and_changes_nothing(
    orch: Orchestrator, store: WorkflowStore
) -> None:
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    report = ok(wf)
    assert (await orch.report(report)).applied
    await orch.drain()
    before = await store.get(wf.id)

    again = await orch.report(report)
    await orch.drain()

    assert not again.applied
    assert again.workflow.version == before["version"]  # type: ignore[index]
    assert await store.get(wf.id) == before


async def test_stale_reports_are_refused_and_change_nothing(
    orch: Orchestrator, store: WorkflowStore
) -> None:
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    first = ok(wf)
    await orch.report(first)
    await orch.drain()
    before = await store.get(wf.id)

    with pytest.raises(StaleReport):  # the ended attempt, now reported as failed
        await orch.report(Report(wf.id, first.step_id, False, error="late"))
    with pytest.raises(StaleReport):  # no such attempt
        await orch.report(Report(wf.id, "f" * 32, True))
    assert await store.get(wf.id) == before


async def test_a_failure_retries_then_fails_and_retry_restarts_the_failed_step(
    orch: Orchestrator, bus: RecordingBus
) -> None:
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    wf = (await orch.report(bad(wf, "first"))).workflow
    assert wf.status == w.RUNNING
    assert wf.step.attempt == 2  # backoff 0: re-dispatched at once
    wf = (await orch.report(bad(wf, "second"))).workflow
    assert wf.status == w.FAILED
    assert wf.step.status == w.FAILED
    assert wf.step.error == "second"
    assert [a["outcome"] for a in wf.step.attempts] == [w.FAILED, w.FAILED]

    with pytest.raises(NotAllowed):
        await orch.cancel(wf.id, "alice")
    retried = await orch.retry(wf.id, "alice")
    await orch.drain()

    assert retried.status == w.RUNNING
    assert retried.step.name == "image_processing"
    assert retried.step.status == w.DISPATCHED
    assert retried.step.attempt == 1
    assert retried.step.step_id not in {a["step_id"] for a in retried.step.attempts}
    assert (await orch.get(wf.id)).outbox == []
    assert len(distinct(bus.events, "workflow.failed")) == 1
    assert retried.step.step_id in {e.payload["step_id"] for e in dispatches(bus.events).values()}
    with pytest.raises(NotAllowed):
        await orch.retry(wf.id, "alice")


async def test_cancel_ends_a_running_workflow(orch: Orchestrator, bus: RecordingBus) -> None:
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    cancelled = await orch.cancel(wf.id, "alice")
    await orch.drain()

    assert cancelled.status == w.CANCELLED
    assert [s.status for s in cancelled.steps] == [w.CANCELLED] * 3
    assert (await orch.get(wf.id)).status == w.CANCELLED
    assert len(distinct(bus.events, "workflow.cancelled")) == 1
    with pytest.raises(NotAllowed):
        await orch.cancel(wf.id, "alice")
    with pytest.raises(StaleReport):
        await orch.report(ok(wf))


async def test_admins_pass_owner_none(orch: Orchestrator) -> None:
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    assert (await orch.get(wf.id, None)).id == wf.id
    assert (await orch.cancel(wf.id, None)).status == w.CANCELLED
    await orch.drain()


async def test_missing_workflows_and_other_owners_are_not_found(
    orch: Orchestrator, store: WorkflowStore
) -> None:
    missing = "0" * 32
    with pytest.raises(NotFound):
        await orch.get(missing)
    with pytest.raises(NotFound):
        await orch.cancel(missing, None)
    with pytest.raises(NotFound):
        await orch.retry(missing, None)
    with pytest.raises(NotFound):
        await orch.report(Report(missing, "1" * 32, True))

    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    await orch.drain()
    before = await store.get(wf.id)
    with pytest.raises(NotFound):
        await orch.get(wf.id, "mallory")
    with pytest.raises(NotFound):
        await orch.cancel(wf.id, "mallory")
    with pytest.raises(NotFound):
        await orch.retry(wf.id, "mallory")
    assert await store.get(wf.id) == before


async def test_list_is_per_owner(orch: Orchestrator) -> None:
    mine = [await orch.upload("alice", copy.deepcopy(PRODUCT)) for _ in range(3)]
    await orch.upload("bob", copy.deepcopy(PRODUCT))
    await orch.drain()
    listed = await orch.list_workflows("alice", None, 10)
    assert {wf.id for wf in listed} == {wf.id for wf in mine}
    assert len(await orch.list_workflows(None, w.RUNNING, 10)) == 4


# -- concurrent completions ----------------------------------------------------------------


async def test_concurrent_identical_reports_apply_exactly_once(
    orch: Orchestrator, store: WorkflowStore, bus: RecordingBus
) -> None:
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    await orch.drain()
    report = ok(wf)

    outcomes = await asyncio.gather(*(orch.report(report) for _ in range(20)))
    await orch.drain()

    assert sum(o.applied for o in outcomes) == 1
    stored = await orch.get(wf.id)
    assert stored.steps[0].status == w.COMPLETED
    assert stored.steps[0].attempts == [
        {
            "step_id": report.step_id,
            "attempt": 1,
            "outcome": w.COMPLETED,
            "error": None,
            "dispatched_at": wf.step.dispatched_at,
        }
    ]
    assert stored.step.name == "ai_enhancement"
    ai = [e for e in dispatches(bus.events).values() if e.routing_key == "step.ai_enhancement"]
    assert len(ai) == 1
    assert ai[0].payload["step_id"] == stored.step.step_id
    assert stored.outbox == []


async def test_concurrent_reports_of_different_outcomes_decide_once(
    orch: Orchestrator, bus: RecordingBus
) -> None:
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    await orch.drain()
    reports = [ok(wf), bad(wf)] * 5

    results = await asyncio.gather(*(orch.report(r) for r in reports), return_exceptions=True)
    await orch.drain()

    applied = [r for r in results if not isinstance(r, BaseException) and r.applied]
    assert len(applied) == 1
    assert all(isinstance(r, StaleReport) or not isinstance(r, BaseException) for r in results), (
        results
    )
    stored = await orch.get(wf.id)
    assert len(stored.steps[0].attempts) == 1
    # one new dispatch: the next step (success won) or the next attempt (failure won)
    assert len(dispatches(bus.events)) == 2


async def test_two_instances_on_one_store_lose_no_update(
    store: WorkflowStore, other_store: WorkflowStore, clock: Clock
) -> None:
    """Completions and sweeps race on two orchestrators with their own store connections."""
    store_a, store_b = CountingStore(store), CountingStore(other_store)
    bus_a, bus_b = RecordingBus(), RecordingBus()
    pipeline = Pipeline(
        steps=tuple(StepSpec(s.name, timeout=30, max_attempts=3, backoff=0) for s in PIPELINE.steps)
    )
    a = Orchestrator(store_a, bus_a, pipeline, clock=clock)  # type: ignore[arg-type]
    b = Orchestrator(store_b, bus_b, pipeline, clock=clock)  # type: ignore[arg-type]
    ids = [
        (await (a if i % 2 else b).upload(f"user{i}", copy.deepcopy(PRODUCT))).id for i in range(4)
    ]
    await asyncio.gather(a.drain(), b.drain())

    for round_no in range(12):
        running = [wf for wf in [await a.get(i) for i in ids] if wf.status == w.RUNNING]
        if not running:
            break
        if round_no % 2:
            clock.advance(31)  # every current attempt is past its deadline: sweeps race too
        rng = random.Random(round_no)
        calls: list[tuple[str, Any]] = []
        for wf in running:
            report = ok(wf, {"round": round_no})
            # reports arrive a little late at times, so sweeps sometimes win the race
            calls += [
                ("report", later(rng.uniform(0, 0.01), o.report(report))) for o in (a, b, a, b)
            ]
        calls += [("sweep", o.sweep()) for o in (a, b, a, b)]
        rng.shuffle(calls)
        results = await asyncio.gather(*(c for _, c in calls), return_exceptions=True)
        applied = swept = 0
        for (kind, _), r in zip(calls, results, strict=True):
            if isinstance(r, BaseException):
                assert isinstance(r, StaleReport), r
            elif kind == "report":
                applied += r.applied
            else:
                swept += r
        # exactly one transition per running workflow: a completion, or a timeout
        assert applied + swept == len(running), (round_no, applied, swept)
        await asyncio.gather(a.drain(), b.drain())
    else:
        pytest.fail("the workflows did not finish")

    await a.relay(min_age=0)  # anything whose clear lost a race goes out now
    await asyncio.gather(a.drain(), b.drain())

    docs = [await store.get(i) for i in ids]
    assert all(doc is not None and doc["outbox"] == [] for doc in docs)
    # no lost update: every successful write shows in exactly one version increment
    writes = store_a.inserts + store_b.inserts + store_a.replaced + store_b.replaced
    assert sum(doc["version"] for doc in docs) == writes  # type: ignore[index]

    # no step dispatched twice, and none lost: one distinct dispatch event per attempt
    sent = dispatches(bus_a.events + bus_b.events).values()
    by_step_id: dict[str, int] = defaultdict(int)
    for event in sent:
        by_step_id[event.payload["step_id"]] += 1
    assert all(n == 1 for n in by_step_id.values()), by_step_id
    known = set().union(*(step_ids_of(doc) for doc in docs))  # type: ignore[arg-type]
    assert set(by_step_id) == known
    for doc in docs:
        assert doc is not None
        assert doc["status"] in (w.COMPLETED, w.FAILED)
        for step in doc["steps"]:
            attempts = [record["attempt"] for record in step["attempts"]]
            assert attempts == list(range(1, len(attempts) + 1))
            assert sum(record["outcome"] == w.COMPLETED for record in step["attempts"]) <= 1


# -- the sweeper ---------------------------------------------------------------------------


async def test_nothing_is_swept_before_a_deadline(orch: Orchestrator, clock: Clock) -> None:
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    await orch.drain()
    version = (await orch.get(wf.id)).version
    clock.advance(29)
    assert await orch.sweep() == 0
    assert (await orch.get(wf.id)).version == version


async def test_a_passed_deadline_starts_a_new_attempt_then_fails_the_workflow(
    orch: Orchestrator, bus: RecordingBus, clock: Clock
) -> None:
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    first = wf.step.step_id

    clock.advance(31)
    assert await orch.sweep() == 1
    await orch.drain()
    wf = await orch.get(wf.id)
    assert wf.status == w.RUNNING
    assert wf.step.attempt == 2
    assert wf.step.status == w.DISPATCHED
    assert wf.step.step_id != first
    assert wf.step.attempts[0]["outcome"] == w.TIMED_OUT
    assert wf.step.attempts[0]["step_id"] == first
    second = [e for e in dispatches(bus.events).values() if e.payload["attempt"] == 2]
    assert [e.payload["step_id"] for e in second] == [wf.step.step_id]

    clock.advance(31)
    assert await orch.sweep() == 1
    await orch.drain()
    wf = await orch.get(wf.id)
    assert wf.status == w.FAILED
    assert wf.step.status == w.FAILED
    assert wf.step.error == "no report within 30s"
    assert wf.wake_at is None
    failed = distinct(bus.events, "workflow.failed")
    assert len(failed) == 1
    assert failed[0].payload["error"] == {
        "step": "image_processing",
        "message": "no report within 30s",
    }
    assert await orch.sweep() == 0


async def test_a_due_retry_is_dispatched_by_the_sweeper(
    orch: Orchestrator, bus: RecordingBus, clock: Clock
) -> None:
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    wf = (await orch.report(ok(wf))).workflow
    wf = (await orch.report(bad(wf))).workflow  # ai_enhancement: retry after 5 s
    await orch.drain()
    assert wf.step.status == w.PENDING
    assert wf.step.retry_at == w.isoformat(T0 + 5)
    ai_dispatches = len(distinct(bus.events, "step.ai_enhancement"))

    clock.advance(4)
    assert await orch.sweep() == 0
    clock.advance(1)
    assert await orch.sweep() == 1
    await orch.drain()

    wf = await orch.get(wf.id)
    assert wf.step.status == w.DISPATCHED
    assert wf.step.attempt == 2
    ai = distinct(bus.events, "step.ai_enhancement")
    assert len(ai) == ai_dispatches + 1
    assert ai[-1].payload["step_id"] == wf.step.step_id
    assert ai[-1].payload["results"] == {"image_processing": {"n": 1}}


async def test_two_sweepers_on_one_due_workflow_make_one_new_attempt(
    store: WorkflowStore, other_store: WorkflowStore, clock: Clock
) -> None:
    bus_a, bus_b = RecordingBus(), RecordingBus()
    a = Orchestrator(store, bus_a, PIPELINE, clock=clock)
    b = Orchestrator(other_store, bus_b, PIPELINE, clock=clock)
    wf = await a.upload("alice", copy.deepcopy(PRODUCT))
    await a.drain()
    bus_a.events.clear()

    clock.advance(31)
    swept = await asyncio.gather(a.sweep(), b.sweep(), a.sweep(), b.sweep())
    await asyncio.gather(a.drain(), b.drain())

    assert sum(swept) == 1
    stored = await a.get(wf.id)
    assert stored.step.attempt == 2
    assert [r["outcome"] for r in stored.step.attempts] == [w.TIMED_OUT]
    sent = dispatches(bus_a.events + bus_b.events)
    assert [e.payload["step_id"] for e in sent.values()] == [stored.step.step_id]


async def test_a_completion_racing_a_timeout_makes_one_transition(
    orch: Orchestrator, clock: Clock
) -> None:
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    await orch.drain()
    clock.advance(31)  # past the deadline, with the report on its way
    outcome, swept = await asyncio.gather(orch.report(ok(wf)), orch.sweep(), return_exceptions=True)
    await orch.drain()

    stored = await orch.get(wf.id)
    if isinstance(outcome, StaleReport):  # the timeout won: a second attempt
        assert swept == 1
        assert stored.step.name == "image_processing"
        assert stored.step.attempt == 2
    else:  # the completion won: the sweep found nothing due any more
        assert not isinstance(outcome, BaseException)
        assert outcome.applied
        assert swept == 0
        assert stored.step.name == "ai_enhancement"
    assert len(stored.steps[0].attempts) == 1


# -- the cache of last-written documents ---------------------------------------------------


async def test_the_write_cache_is_bounded_in_bytes_as_well_as_in_count(
    store: WorkflowStore, bus: RecordingBus, clock: Clock
) -> None:
    """Large documents (~130 KB each here) fill the byte bound long before the count bound."""
    bound = 1024 * 1024
    orch = Orchestrator(store, bus, PIPELINE, clock=clock, cache_size=1000, cache_bytes=bound)
    large = {"name": "Mug", "description": "d" * 10_000, "images": ["i" * 2048] * 50}
    for _ in range(40):
        wf = await orch.upload("alice", large)
        await orch.drain()
        await orch.report(ok(wf))
        count, size = orch.cached
        assert size <= bound
    assert 0 < count < 40
    assert size > bound // 2  # the bound is used, not left empty
    # the newest workflow is the one kept: its next report needs no read
    assert (await orch.report(ok(await orch.get(wf.id)))).applied


async def test_a_document_larger_than_the_byte_bound_is_not_cached(
    store: WorkflowStore, bus: RecordingBus, clock: Clock
) -> None:
    orch = Orchestrator(store, bus, PIPELINE, clock=clock, cache_bytes=50_000)
    await orch.upload("alice", {"name": "Mug", "description": "d" * 10_000})
    assert orch.cached == (1, orch.cached[1]) and orch.cached[1] < 50_000
    await orch.upload("alice", {"name": "Mug", "images": ["i" * 2048] * 50})
    count, size = orch.cached
    assert count == 1 and size < 50_000  # the big one stayed out; the small one is still there


class RecordingObserver:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int, list[str]]] = []
        self.refused: list[tuple[str, str]] = []

    def transitioned(self, workflow: w.Workflow, changes: Any, cause: str) -> None:
        self.seen.append((cause, workflow.version, [c.type for c in changes]))

    def report_refused(self, report: Report, reason: str) -> None:
        self.refused.append((report.step_id, reason))


class BrokenObserver:
    def transitioned(self, workflow: w.Workflow, changes: Any, cause: str) -> None:
        raise RuntimeError("observer bug")

    def report_refused(self, report: Report, reason: str) -> None:
        raise RuntimeError("observer bug")


async def test_observers_hear_each_committed_transition_with_its_cause_and_refused_reports(
    store: WorkflowStore, bus: RecordingBus, clock: Clock
) -> None:
    recorder = RecordingObserver()
    # one that raises is logged; the write stands and the next observer still hears
    orch = Orchestrator(
        store, bus, PIPELINE, clock=clock, observers=Observers([BrokenObserver(), recorder])
    )
    wf = await orch.upload("alice", copy.deepcopy(PRODUCT))
    first = ok(wf)
    await orch.report(first)
    await orch.report(first)  # a duplicate: acknowledged, no transition
    with pytest.raises(StaleReport):
        await orch.report(Report(wf.id, first.step_id, False, error="late"))
    clock.advance(31)
    assert await orch.sweep() == 1  # ai_enhancement timed out: retried after its backoff
    await orch.cancel(wf.id, "alice")
    other = await orch.upload("bob", copy.deepcopy(PRODUCT))
    for _ in range(2):  # image_processing: two attempts, then the workflow fails
        other = (await orch.report(Report(other.id, other.step.step_id or "", False))).workflow
    await orch.retry(other.id, "bob")
    await orch.drain()

    assert recorder.seen == [
        ("upload", 1, ["step_dispatched"]),
        ("report", 2, ["step_completed", "step_dispatched"]),
        ("wake", 3, ["step_retrying"]),
        ("cancel", 4, ["workflow_cancelled"]),
        ("upload", 1, ["step_dispatched"]),
        ("report", 2, ["step_retrying", "step_dispatched"]),
        ("report", 3, ["step_failed", "workflow_failed"]),
        ("retry", 4, ["step_dispatched"]),
    ]
    assert recorder.refused == [(first.step_id, "duplicate"), (first.step_id, "stale")]
    assert (await orch.get(wf.id)).status == w.CANCELLED
