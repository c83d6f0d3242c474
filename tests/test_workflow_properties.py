"""Stateful property test of the workflow rules (docs/architecture.md#the-workflow-model) over
random interleavings.

A hypothesis state machine runs up to three workflows on a small random pipeline (few
attempts, short timeouts, some zero backoffs) and applies, in any order: reports for the
current attempt, replays of any report sent before, stale reports (old, foreign and random
step_ids, wrong step types), clock advances followed by `wake`, cancels and retries. Nobody
calls `drop_published`, so each outbox only grows and holds every event ever emitted.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from support import PRODUCT

from stox import workflow as w
from stox.workflow import (
    CHANGE_ROUTING_KEY,
    DuplicateReport,
    NotAllowed,
    Pipeline,
    Report,
    StaleReport,
    StepSpec,
    Workflow,
    WorkflowError,
)

T0 = 1_700_000_000.0
MAX_WORKFLOWS = 3

step_specs = st.lists(
    st.tuples(
        st.sampled_from([1.0, 5.0, 10.0]),  # timeout
        st.integers(min_value=1, max_value=3),  # max_attempts
        st.sampled_from([0.0, 0.0, 1.0, 3.0]),  # backoff, zero half of the time
    ),
    min_size=1,
    max_size=3,
)
# Small ids so a "random" step_id sometimes hits a real id (of this or another workflow).
random_ids = st.integers(min_value=1, max_value=400).map(lambda n: f"id-{n:06d}")
picks = st.integers(min_value=0, max_value=10_000)
# What an operation must do: "applied", "noop", the WorkflowError it raises, or None (either).
Expect = str | type[WorkflowError] | None
clock_steps = st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0, 11.0, 30.0])


def completed_results(wf: Workflow) -> dict[str, Any]:
    return {s.name: s.result for s in wf.steps if s.status == w.COMPLETED}


def parse(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


@dataclass(eq=False)
class Tracked:
    wf: Workflow
    last_version: int
    last_doc: dict[str, Any]
    seen_events: list[dict[str, Any]] = field(default_factory=list)  # deep copies
    ever_current: set[str] = field(default_factory=set)  # step_ids seen as current attempts
    applied: dict[str, bool] = field(default_factory=dict)  # step_id -> outcome applied
    finished: set[str] = field(default_factory=set)  # statuses reached: completed/cancelled


class WorkflowMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.n = 0
        self.tracked: list[Tracked] = []
        self.sent: list[tuple[int, Report]] = []  # every report ever sent, with its target

    # -- helpers --------------------------------------------------------------------------

    def ids(self) -> str:
        self.n += 1
        return f"id-{self.n:06d}"

    def pick(self, i: int) -> Tracked:
        return self.tracked[i % len(self.tracked)]

    def apply(self, t: Tracked, op: Any, *, expect: Expect = None) -> bool:
        """Run one operation on t.wf and check the transition contract.

        expect: "applied", "noop" (wake with nothing due), the WorkflowError subclass it must
        raise, or None when either an applied transition or a WorkflowError is acceptable.
        Returns True when the operation changed the workflow.
        """
        wf = t.wf
        before = copy.deepcopy(wf.to_doc())
        n_events = len(wf.outbox)
        try:
            changes = op(wf)
        except WorkflowError as exc:
            event(f"rejected: {type(exc).__name__}")
            assert expect in (None, type(exc)), (expect, exc)
            assert wf.to_doc() == before, "a rejected operation changed the workflow"
            return False
        if not changes:
            event("no-op wake")
            assert expect in (None, "noop"), expect
            assert wf.to_doc() == before, "a no-op wake changed the workflow"
            return False
        assert expect in (None, "applied"), expect
        for c in changes:
            event(f"change: {c.type}")
        assert wf.version == before["version"] + 1
        new = wf.outbox[n_events:]
        assert wf.outbox[:n_events] == before["outbox"], "the outbox lost or rewrote events"
        assert [e["routing_key"] for e in new].count(CHANGE_ROUTING_KEY) == 1
        assert new[-1]["routing_key"] == CHANGE_ROUTING_KEY
        change = new[-1]["payload"]
        assert change["version"] == wf.version
        assert change["owner"] == wf.owner
        assert change["changes"] == [c.to_doc() for c in changes]
        assert change["workflow"] == wf.public()
        types = [c.type for c in changes]
        for e in new:
            if e["routing_key"] in self.dispatch_keys:  # a dispatch made by this transition
                payload = e["payload"]
                assert payload["step_id"] == wf.step.step_id
                assert payload["attempt"] == wf.step.attempt
                timeout = self.pipeline.spec(wf.step.name).timeout
                assert timeout is not None  # a service step's
                assert payload["deadline"] == w.isoformat(self.now + timeout)
                assert payload["product"] == wf.product
                assert payload["results"] == completed_results(wf)
                assert payload["reply_to"]["http"] == self.pipeline.completion_url
        if "step_retrying" in types:
            spec = self.pipeline.spec(wf.step.name)
            if spec.backoff == 0:  # the next attempt goes out at once
                assert wf.step.status == w.DISPATCHED
                assert types[-1] == "step_dispatched"
            else:  # after backoff, doubling with each attempt
                assert wf.step.status == w.PENDING
                delay = spec.backoff * 2 ** (wf.step.attempt - 1)
                assert wf.step.retry_at == w.isoformat(self.now + delay)
        return True

    def report(self, t: Tracked, report: Report, expect: Expect = None) -> None:
        index = self.tracked.index(t)
        self.sent.append((index, report))
        step_id, success = report.step_id, report.success
        if self.apply(
            t, lambda wf: w.complete(wf, self.pipeline, report, self.now, self.ids), expect=expect
        ):
            assert step_id not in t.applied
            t.applied[step_id] = success

    def expectation(self, t: Tracked, report: Report) -> Expect:
        """What the rules say must happen to `report`, when it is decidable up front."""
        wf = t.wf
        owner = None
        for step in wf.steps:
            if step.step_id == report.step_id or any(
                r["step_id"] == report.step_id for r in step.attempts
            ):
                owner = step
        if owner is None:
            return StaleReport
        if report.step_type is not None and report.step_type != owner.name:
            return StaleReport
        if report.step_id in t.applied:
            same = t.applied[report.step_id] == report.success
            return DuplicateReport if same else StaleReport
        record = next((r for r in owner.attempts if r["step_id"] == report.step_id), None)
        if record is not None:  # ended by a timeout or a cancel
            return StaleReport
        if wf.status == w.RUNNING and owner is wf.step and owner.status == w.DISPATCHED:
            return "applied"
        return StaleReport

    # -- setup ----------------------------------------------------------------------------

    @initialize(specs=step_specs, with_url=st.booleans())
    def make_pipeline(self, specs: list[tuple[float, int, float]], with_url: bool) -> None:
        names = ["image_processing", "ai_enhancement", "seo_generation"]
        self.pipeline = Pipeline(
            steps=tuple(
                StepSpec(names[k], timeout=timeout, max_attempts=attempts, backoff=backoff)
                for k, (timeout, attempts, backoff) in enumerate(specs)
            ),
            completion_url="http://gw.test/api/v1/workflow/step-completed" if with_url else "",
        )
        self.dispatch_keys = {spec.routing_key for spec in self.pipeline.steps}
        self.start()

    @rule()
    def start(self) -> None:
        if len(self.tracked) >= MAX_WORKFLOWS:
            return
        wf, changes = w.start(
            self.pipeline, f"user-{len(self.tracked)}", copy.deepcopy(PRODUCT), self.now, self.ids
        )
        assert wf.version == 1
        assert [c.type for c in changes] == ["step_dispatched"]
        self.tracked.append(Tracked(wf, 0, {}))

    # -- reports --------------------------------------------------------------------------

    @rule(i=picks, success=st.sampled_from([True, True, False]), typed=st.booleans())
    def report_current_attempt(self, i: int, success: bool, typed: bool) -> None:
        t = self.pick(i)
        step = t.wf.step
        report = Report(
            t.wf.id,
            step.step_id or "never-dispatched",
            success,
            step_type=step.name if typed else None,
            result={"by": step.step_id} if success else None,
            error=None if success else "boom",
        )
        self.report(t, report, self.expectation(t, report))

    @rule(k=picks)
    def replay_an_earlier_report(self, k: int) -> None:
        if not self.sent:
            return
        index, report = self.sent[k % len(self.sent)]
        t = self.tracked[index]
        expect = self.expectation(t, report)
        if report.step_id in t.applied:
            assert expect in (DuplicateReport, StaleReport)
        self.report(t, report, expect)

    @rule(i=picks, k=picks, flip=st.booleans())
    def report_an_old_attempt(self, i: int, k: int, flip: bool) -> None:
        t = self.pick(i)
        records = [r for s in t.wf.steps for r in s.attempts]
        if not records:
            return
        record = records[k % len(records)]
        success = record["outcome"] == w.COMPLETED
        report = Report(t.wf.id, record["step_id"], success != flip, result={}, error="late")
        expect = self.expectation(t, report)
        assert expect in (DuplicateReport, StaleReport)
        self.report(t, report, expect)

    @rule(i=picks, step_id=random_ids, success=st.booleans())
    def report_a_random_step_id(self, i: int, step_id: str, success: bool) -> None:
        t = self.pick(i)
        report = Report(t.wf.id, step_id, success, result={}, error="random")
        self.report(t, report, self.expectation(t, report))

    @rule(i=picks, j=picks, success=st.booleans())
    def report_another_workflows_attempt(self, i: int, j: int, success: bool) -> None:
        t, other = self.pick(i), self.pick(j)
        if t is other or other.wf.step.step_id is None:
            return
        report = Report(t.wf.id, other.wf.step.step_id, success, result={})
        self.report(t, report, StaleReport)

    @rule(i=picks, k=picks, success=st.booleans())
    def report_with_a_wrong_step_type(self, i: int, k: int, success: bool) -> None:
        t = self.pick(i)
        names = [s.name for s in t.wf.steps if s.name != t.wf.step.name] + ["unknown_step"]
        report = Report(
            t.wf.id,
            t.wf.step.step_id or "never-dispatched",
            success,
            step_type=names[k % len(names)],
            result={},
        )
        self.report(t, report, StaleReport)

    # -- timers ---------------------------------------------------------------------------

    @rule(i=picks, dt=clock_steps)
    def advance_clock_and_wake(self, i: int, dt: float) -> None:
        self.now += dt
        t = self.pick(i)
        due = t.wf.status == w.RUNNING and w.is_due(t.wf, self.now)
        if due:
            assert t.wf.wake_at is not None and t.wf.wake_at <= w.isoformat(self.now)
        self.apply(
            t,
            lambda wf: w.wake(wf, self.pipeline, self.now, self.ids),
            expect="applied" if due else "noop",
        )

    @rule(i=picks)
    def jump_to_the_next_timer_and_wake(self, i: int) -> None:
        t = self.pick(i)
        if t.wf.wake_at is not None:
            self.now = max(self.now, parse(t.wf.wake_at))
        due = w.is_due(t.wf, self.now)
        assert due == (t.wf.wake_at is not None)
        self.apply(
            t,
            lambda wf: w.wake(wf, self.pipeline, self.now, self.ids),
            expect="applied" if due else "noop",
        )

    # -- commands -------------------------------------------------------------------------

    @rule(i=picks, roll=st.integers(min_value=0, max_value=3))
    def cancel(self, i: int, roll: int) -> None:
        """Only one draw in four cancels, so most runs get far before the workflow is final."""
        if roll:
            return
        t = self.pick(i)
        expect = "applied" if t.wf.status == w.RUNNING else NotAllowed
        self.apply(t, lambda wf: w.cancel(wf, self.pipeline, self.now, self.ids), expect=expect)

    @rule(i=picks)
    def retry(self, i: int) -> None:
        t = self.pick(i)
        expect = "applied" if t.wf.status == w.FAILED else NotAllowed
        if self.apply(t, lambda wf: w.retry(wf, self.pipeline, self.now, self.ids), expect=expect):
            assert t.wf.status == w.RUNNING
            assert t.wf.step.attempt == 1
            assert t.wf.step.status == w.DISPATCHED

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def invariants_hold(self) -> None:
        for t in self.tracked:
            self.check(t)
            t.last_version = t.wf.version
            t.last_doc = copy.deepcopy(t.wf.to_doc())
            if t.wf.status in (w.COMPLETED, w.CANCELLED):
                t.finished.add(t.wf.status)

    def check(self, t: Tracked) -> None:
        wf = t.wf
        doc = wf.to_doc()

        # version only grows, by at most one per operation
        assert wf.version in (t.last_version, t.last_version + 1) or t.last_version == 0
        if wf.version == t.last_version:
            assert doc == t.last_doc, "the document changed without a version bump"

        # completed and cancelled are final; failed leaves only through retry
        if t.finished:
            assert doc == t.last_doc, f"a {t.wf.status} workflow changed"
            assert len(t.finished) == 1
        if t.last_doc and t.last_doc["status"] == w.FAILED:
            assert wf.status in (w.FAILED, w.RUNNING)

        # each attempt ends once; a step attempt completes at most once; a step completes once
        records = [r for s in wf.steps for r in s.attempts]
        ended = Counter(r["step_id"] for r in records)
        assert all(n == 1 for n in ended.values()), ended
        completed = Counter(r["step_id"] for r in records if r["outcome"] == w.COMPLETED)
        assert all(n <= 1 for n in completed.values())
        for step in wf.steps:
            done = [r for r in step.attempts if r["outcome"] == w.COMPLETED]
            assert len(done) <= 1
            assert len(done) == (1 if step.status == w.COMPLETED else 0)
            if step.status == w.COMPLETED:
                assert step.result is not None
                assert done[0]["step_id"] == step.step_id
        for step in wf.steps:  # an attempt is live while dispatched and ended otherwise
            if step.step_id is not None:
                assert (step.step_id in ended) == (step.status != w.DISPATCHED)
        for step_id, success in t.applied.items():
            record = next(r for r in records if r["step_id"] == step_id)
            assert record["outcome"] == (w.COMPLETED if success else w.FAILED)

        # events: unique ids, emitted events never rewritten, change events numbered 1..version
        outbox = wf.outbox
        assert len({e["message_id"] for e in outbox}) == len(outbox)
        assert outbox[: len(t.seen_events)] == t.seen_events, "an emitted event was rewritten"
        t.seen_events.extend(copy.deepcopy(outbox[len(t.seen_events) :]))
        versions = [
            e["payload"]["version"] for e in outbox if e["routing_key"] == CHANGE_ROUTING_KEY
        ]
        assert versions == list(range(1, wf.version + 1))
        for e in outbox:
            assert e["payload"]["event"] == e["routing_key"]
            assert e["payload"]["workflow_id"] == wf.id
        assert [e["routing_key"] for e in outbox].count("workflow.start") == 1
        assert outbox[0]["routing_key"] == "workflow.start"
        terminal = [e for e in outbox if e["routing_key"].startswith("workflow.")]
        terminal = [
            e for e in terminal if e["routing_key"] not in ("workflow.start", CHANGE_ROUTING_KEY)
        ]
        if wf.status in (w.COMPLETED, w.CANCELLED):
            assert terminal[-1]["routing_key"] == f"workflow.{wf.status}"
        if wf.status == w.COMPLETED:
            assert terminal[-1]["payload"]["results"] == completed_results(wf)

        # exactly one dispatch event per attempt; every attempt ever current was dispatched
        dispatches = [e for e in outbox if e["routing_key"] in self.dispatch_keys]
        dispatched = Counter(e["payload"]["step_id"] for e in dispatches)
        assert all(n == 1 for n in dispatched.values()), dispatched
        for step in wf.steps:
            if step.step_id is not None:
                t.ever_current.add(step.step_id)
        t.ever_current.update(ended)
        assert set(dispatched) == t.ever_current
        by_id = {e["payload"]["step_id"]: e["payload"] for e in dispatches}
        for step in wf.steps:
            if step.status == w.DISPATCHED:
                payload = by_id[step.step_id]
                assert payload["step_type"] == step.name
                assert payload["attempt"] == step.attempt
                assert payload["deadline"] == step.deadline

        # status consistency
        cur = wf.current_step
        before, current, after = wf.steps[:cur], wf.step, wf.steps[cur + 1 :]
        assert all(s.status == w.COMPLETED for s in before)
        if wf.status == w.COMPLETED:
            assert all(s.status == w.COMPLETED for s in wf.steps)
            assert cur == len(wf.steps) - 1
            assert wf.wake_at is None
        elif wf.status == w.RUNNING:
            assert current.status in (w.DISPATCHED, w.PENDING)
            assert all(s.status == w.PENDING and s.step_id is None for s in after)
            spec = self.pipeline.spec(current.name)
            assert 1 <= current.attempt <= spec.max_attempts
            if current.status == w.DISPATCHED:
                assert wf.wake_at == current.deadline
                assert current.retry_at is None
            else:
                assert current.retry_at is not None
                assert wf.wake_at == current.retry_at
                assert current.attempt < spec.max_attempts
                assert current.attempts[-1]["step_id"] == current.step_id
        elif wf.status == w.FAILED:
            assert current.status == w.FAILED
            assert current.attempt == self.pipeline.spec(current.name).max_attempts
            assert all(s.status == w.PENDING for s in after)
            assert wf.wake_at is None
        else:
            assert wf.status == w.CANCELLED
            assert all(s.status == w.CANCELLED for s in [current, *after])
            assert wf.wake_at is None
        # at most one step is live (dispatched or waiting to retry), and only while running
        live = [s for s in wf.steps if s.status in (w.DISPATCHED,)]
        assert len(live) == (1 if wf.status == w.RUNNING and current.status == w.DISPATCHED else 0)


WorkflowMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestWorkflowMachine = WorkflowMachine.TestCase
