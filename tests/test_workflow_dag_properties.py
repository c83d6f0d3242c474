"""Stateful property test of the workflow rules over random DAG pipelines with review steps
(docs/architecture.md#the-workflow-model).

A hypothesis state machine draws a pipeline of one to five steps, each step's `after` a random
subset of the steps before it (so it is acyclic; sometimes no `after` anywhere, a sequence),
some of them review steps (a random `on_reject` among their upstream steps or fail, a random
`on_deadline`, a timeout or none), then runs up to two workflows on it and applies, in any
order: reports for any live attempt, replays of earlier reports, stale reports (old and random
step_ids, wrong step types, review step_ids), decisions on waiting reviews and on steps that
are not waiting, clock advances followed by `wake`, cancels and retries. Nobody calls
`drop_published`, so each outbox only grows and holds every event ever emitted.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from support import PRODUCT

from stox import workflow as w
from stox.workflow import (
    CHANGE_ROUTING_KEY,
    DuplicateReport,
    NotAllowed,
    Pipeline,
    Report,
    Review,
    StaleReport,
    Step,
    StepSpec,
    Workflow,
    WorkflowError,
)

T0 = 1_700_000_000.0
MAX_WORKFLOWS = 2
NAMES = ("a", "b", "c", "d", "e")

# Small ids so a "random" step_id sometimes hits a real id (of this or another workflow).
random_ids = st.integers(min_value=1, max_value=300).map(lambda n: f"id-{n:06d}")
picks = st.integers(min_value=0, max_value=10_000)
# What an operation must do: "applied", "noop", the WorkflowError it raises, or None (either).
Expect = str | type[WorkflowError] | None
clock_steps = st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0, 11.0, 30.0])


@st.composite
def pipelines(draw: st.DrawFn) -> Pipeline:
    """A random DAG (or, sometimes, a sequence) of service and review steps."""
    n = draw(st.sampled_from([1, 2, 3, 3, 4, 4, 5, 5]))
    names = NAMES[:n]
    sequence = draw(st.booleans()) and draw(st.booleans())  # a quarter of the time
    afters: list[tuple[str, ...] | None] = []
    upstream: dict[str, set[str]] = {}
    for i, name in enumerate(names):
        if sequence:
            after: tuple[str, ...] | None = None
            deps: tuple[str, ...] = (names[i - 1],) if i else ()
        else:
            chosen: list[str] = draw(st.lists(st.sampled_from(names[:i]), unique=True)) if i else []
            explicit: bool = bool(chosen) or draw(st.booleans())
            after = tuple(chosen) if explicit else None
            deps = tuple(chosen)
        afters.append(after)
        upstream[name] = set(deps).union(*(upstream[d] for d in deps))
    if not sequence and all(a is None for a in afters):
        afters[0] = ()  # a DAG of independent steps, not a sequence
    specs = []
    for name, after in zip(names, afters, strict=True):
        if draw(st.integers(min_value=0, max_value=2)) == 0:
            rerun = bool(upstream[name]) and draw(st.integers(min_value=0, max_value=3)) > 0
            on_reject = draw(st.sampled_from(sorted(upstream[name]))) if rerun else w.FAIL
            specs.append(
                StepSpec(
                    name,
                    kind=w.REVIEW,
                    after=after,
                    timeout=draw(st.sampled_from([None, 2.0, 10.0])),
                    on_reject=on_reject,
                    on_deadline=draw(st.sampled_from([w.FAIL, w.ESCALATE])),
                )
            )
        else:
            specs.append(
                StepSpec(
                    name,
                    after=after,
                    timeout=draw(st.sampled_from([1.0, 5.0, 10.0])),
                    max_attempts=draw(st.integers(min_value=1, max_value=3)),
                    backoff=draw(st.sampled_from([0.0, 0.0, 1.0, 3.0])),
                )
            )
    return Pipeline(
        steps=tuple(specs),
        completion_url="http://gw.test/api/v1/workflow/step-completed",
        name="dag",
    )


def parse(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def timer(step: Step) -> str | None:
    if step.status in (w.DISPATCHED, w.WAITING):
        return step.deadline
    if step.status == w.PENDING:
        return step.retry_at
    return None


@dataclass(eq=False)
class Tracked:
    wf: Workflow
    last_version: int = 0
    last_doc: dict[str, Any] = field(default_factory=dict)
    seen_events: list[dict[str, Any]] = field(default_factory=list)  # deep copies
    applied: dict[str, bool] = field(default_factory=dict)  # step_id -> report outcome applied
    decided: dict[str, str] = field(default_factory=dict)  # step_id -> review decision applied
    begun: set[str] = field(default_factory=set)  # every attempt's step_id ever seen
    # steps a reject of the last operation sent back to pending (they may leave completed)
    reset: set[str] = field(default_factory=set)
    retried: bool = False  # the last operation was an applied retry


class DagMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.n = 0
        self.tracked: list[Tracked] = []
        self.sent: list[tuple[int, Report]] = []  # every report ever sent, with its target
        self.reviews: list[tuple[int, Review]] = []  # every review ever sent, with its target

    # -- helpers --------------------------------------------------------------------------

    def ids(self) -> str:
        self.n += 1
        return f"id-{self.n:06d}"

    def pick(self, i: int) -> Tracked:
        return self.tracked[i % len(self.tracked)]

    def kind(self, name: str) -> str:
        return self.pipeline.spec(name).kind

    def owner_of(self, wf: Workflow, step_id: str) -> tuple[Step, dict[str, Any] | None] | None:
        for step in wf.steps:
            for record in step.attempts:
                if record["step_id"] == step_id:
                    return step, record
            if step.step_id == step_id:
                return step, None
        return None

    def apply(self, t: Tracked, op: Any, *, expect: Expect = None) -> bool:
        """Run one operation on t.wf and check the transition contract; True if it applied."""
        wf = t.wf
        before = copy.deepcopy(wf.to_doc())
        n_events = len(wf.outbox)
        t.reset, t.retried = set(), False
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
        self.check_begun(t, new, changes)
        return True

    def check_begun(self, t: Tracked, new: list[dict[str, Any]], changes: list[w.Change]) -> None:
        """The attempts this transition began: each after all its step's deps completed; a
        service attempt with one dispatch carrying its transitive deps' results, a review with
        none."""
        wf = t.wf
        done = {s.name: s.result for s in wf.steps if s.status == w.COMPLETED}
        dispatched = [e["payload"] for e in new if e["routing_key"] in self.dispatch_keys]
        names = [p["step_type"] for p in dispatched]
        assert names == [c.step for c in changes if c.type == "step_dispatched"]
        for payload in dispatched:
            found = self.owner_of(wf, payload["step_id"])
            assert found is not None
            step, record = found
            assert step.name == payload["step_type"]
            spec = self.pipeline.spec(step.name)
            assert spec.kind == w.SERVICE
            assert payload["step_id"] not in t.begun
            assert all(dep in done for dep in self.pipeline.deps[step.name]), step.name
            upstream = self.pipeline.upstream[step.name]
            assert payload["results"] == {k: v for k, v in done.items() if k in upstream}
            assert payload["deadline"] == w.isoformat(self.now + (spec.timeout or 0))
            assert payload["product"] == wf.product
            assert payload["reply_to"]["http"] == self.pipeline.completion_url
            if record is None:  # still live (a wake may have cancelled it since)
                assert step.status == w.DISPATCHED
                assert payload["attempt"] == step.attempt
                assert payload["deadline"] == step.deadline
            else:
                assert record["outcome"] == w.CANCELLED and wf.status == w.FAILED
        for c in changes:
            if c.type != "step_waiting_review":
                continue
            assert c.step is not None and self.kind(c.step) == w.REVIEW
            waiting = wf.named(c.step)
            assert waiting is not None and waiting.step_id is not None
            step = waiting
            assert step.step_id not in t.begun
            assert all(dep in done for dep in self.pipeline.deps[step.name]), step.name
            if step.status != w.WAITING:  # a failure in the same transition stopped it
                assert step.status == w.CANCELLED and wf.status == w.FAILED
            else:
                assert step.review is None
                spec = self.pipeline.spec(step.name)
                expected = None if spec.timeout is None else w.isoformat(self.now + spec.timeout)
                assert step.deadline == expected
        for step in wf.steps:
            if step.step_id is not None:
                t.begun.add(step.step_id)
            t.begun.update(r["step_id"] for r in step.attempts)

    # -- expectations ---------------------------------------------------------------------

    def report_expectation(self, t: Tracked, report: Report) -> Expect:
        found = self.owner_of(t.wf, report.step_id)
        if found is None:
            return StaleReport
        step, record = found
        if report.step_type is not None and report.step_type != step.name:
            return StaleReport
        if self.kind(step.name) == w.REVIEW:  # a person decides a review, never a service
            return StaleReport
        if report.step_id in t.applied:
            same = t.applied[report.step_id] == report.success
            return DuplicateReport if same else StaleReport
        if record is not None:  # ended by a timeout or a cancel
            assert record["outcome"] in (w.TIMED_OUT, w.CANCELLED), record
            return StaleReport
        if t.wf.status == w.RUNNING and step.status == w.DISPATCHED:
            return "applied"
        return StaleReport

    def review_expectation(self, t: Tracked, decision: Review) -> Expect:
        found = self.owner_of(t.wf, decision.step_id)
        if found is None:
            return NotAllowed
        step, record = found
        if self.kind(step.name) != w.REVIEW:
            return NotAllowed
        if decision.step_id in t.decided:
            return (
                DuplicateReport if t.decided[decision.step_id] == decision.decision else NotAllowed
            )
        if record is not None:  # ended by its deadline or a cancel
            assert record["outcome"] in (w.TIMED_OUT, w.CANCELLED), record
            return NotAllowed
        if t.wf.status == w.RUNNING and step.status == w.WAITING:
            return "applied"
        return NotAllowed

    def report(self, t: Tracked, report: Report, expect: Expect) -> None:
        self.sent.append((self.tracked.index(t), report))
        if self.apply(
            t, lambda wf: w.complete(wf, self.pipeline, report, self.now, self.ids), expect=expect
        ):
            assert report.step_id not in t.applied
            t.applied[report.step_id] = report.success

    def decide(self, t: Tracked, decision: Review, expect: Expect) -> None:
        self.reviews.append((self.tracked.index(t), decision))
        found = self.owner_of(t.wf, decision.step_id)
        reset: set[str] = set()
        if expect == "applied" and decision.decision != w.APPROVE and found is not None:
            name = found[0].name
            again = self.pipeline.spec(name).on_reject
            if again != w.FAIL:
                up = self.pipeline.upstream
                reset = {again} | {s.name for s in self.pipeline.steps if again in up[s.name]}
                assert name in reset
        before = copy.deepcopy({s.name: s.to_doc() for s in t.wf.steps})
        if self.apply(
            t, lambda wf: w.review(wf, self.pipeline, decision, self.now, self.ids), expect=expect
        ):
            assert found is not None
            step = found[0]
            assert decision.step_id not in t.decided
            t.decided[decision.step_id] = decision.decision
            t.reset = reset
            record = next(r for r in step.attempts if r["step_id"] == decision.step_id)
            assert record["by"] == decision.by
            if decision.decision == w.APPROVE:
                assert step.status == w.COMPLETED
                assert step.result == (decision.result if decision.result is not None else {})
                assert record["outcome"] == w.COMPLETED
                assert step.review is not None
                assert step.review["decision"] == "approved"
            else:
                assert record["outcome"] == w.REJECTED
                if not reset:
                    assert step.status == w.FAILED and t.wf.status == w.FAILED
                    assert step.review is not None and step.review["decision"] == "rejected"
                    assert step.review["reason"] == decision.reason
                else:
                    event("reject: run again")
                    assert t.wf.status == w.RUNNING
                    for other in t.wf.steps:
                        old = before[other.name]
                        if other.name not in reset:
                            assert other.to_doc() == old, f"a reject changed {other.name}"
                            continue
                        assert other.status in (w.PENDING, w.DISPATCHED, w.WAITING)
                        assert other.attempt == (0 if other.status == w.PENDING else 1)
                        if other is not step and old["status"] in (w.DISPATCHED, w.WAITING):
                            assert len(other.attempts) > len(old["attempts"]), other.name
                            ended = other.attempts[len(old["attempts"])]
                            assert ended["step_id"] == old["step_id"]
                            assert ended["outcome"] == w.CANCELLED
                            event("reject: a live attempt after it cancelled")

    # -- setup ----------------------------------------------------------------------------

    @initialize(pipeline=pipelines())
    def make_pipeline(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        event(f"steps: {len(pipeline.steps)}")
        if any(s.on_reject != w.FAIL for s in pipeline.steps):
            event("pipeline: a review that runs steps again")
        self.dispatch_keys = {s.routing_key for s in pipeline.steps if s.kind == w.SERVICE}
        self.start()

    @rule()
    def start(self) -> None:
        if len(self.tracked) >= MAX_WORKFLOWS:
            return
        owner = f"user-{len(self.tracked)}"
        wf, changes = w.start(self.pipeline, owner, copy.deepcopy(PRODUCT), self.now, self.ids)
        assert wf.version == 1
        assert wf.pipeline == self.pipeline.definition()
        roots = [s.name for s in self.pipeline.steps if not self.pipeline.deps[s.name]]
        event(f"roots: {len(roots)}")
        assert roots and [c.step for c in changes] == roots
        for c in changes:
            expected = "step_dispatched" if self.kind(c.step or "") == w.SERVICE else None
            assert c.type == (expected or "step_waiting_review")
        t = Tracked(wf)
        # start's change event was made before outbox_at was set (the outbox was empty)
        assert wf.outbox[-1]["payload"]["workflow"] == {**wf.public(), "outbox_at": None}
        self.check_begun(t, wf.outbox, changes)
        self.tracked.append(t)

    # -- reports --------------------------------------------------------------------------

    @rule(i=picks, k=picks, success=st.sampled_from([True, True, True, False]), typed=st.booleans())
    def report_a_live_attempt(self, i: int, k: int, success: bool, typed: bool) -> None:
        t = self.pick(i)
        live = [s for s in t.wf.steps if s.status == w.DISPATCHED]
        begun = [s for s in t.wf.steps if s.step_id is not None]
        candidates = live or begun
        if not candidates:
            return
        step = candidates[k % len(candidates)]
        assert step.step_id is not None
        report = Report(
            t.wf.id,
            step.step_id,
            success,
            step_type=step.name if typed else None,
            result={"by": step.step_id, "n": k} if success else None,
            error=None if success else "boom",
        )
        expect = self.report_expectation(t, report)
        if live:
            assert expect == "applied"
        self.report(t, report, expect)

    @rule(k=picks)
    def replay_an_earlier_report(self, k: int) -> None:
        if not self.sent:
            return
        index, report = self.sent[k % len(self.sent)]
        t = self.tracked[index]
        expect = self.report_expectation(t, report)
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
        expect = self.report_expectation(t, report)
        assert expect in (DuplicateReport, StaleReport)
        self.report(t, report, expect)

    @rule(i=picks, step_id=random_ids, success=st.booleans())
    def report_a_random_step_id(self, i: int, step_id: str, success: bool) -> None:
        t = self.pick(i)
        report = Report(t.wf.id, step_id, success, result={}, error="random")
        self.report(t, report, self.report_expectation(t, report))

    @rule(i=picks, k=picks, j=picks, success=st.booleans())
    def report_with_a_wrong_step_type(self, i: int, k: int, j: int, success: bool) -> None:
        t = self.pick(i)
        begun = [s for s in t.wf.steps if s.step_id is not None]
        if not begun:
            return
        step = begun[k % len(begun)]
        assert step.step_id is not None
        others = [s.name for s in t.wf.steps if s.name != step.name] + ["unknown_step"]
        report = Report(t.wf.id, step.step_id, success, step_type=others[j % len(others)])
        self.report(t, report, StaleReport)

    @rule(i=picks, k=picks, success=st.booleans(), typed=st.booleans())
    def report_a_reviews_step_id(self, i: int, k: int, success: bool, typed: bool) -> None:
        t = self.pick(i)
        ids = [
            (s.name, step_id)
            for s in t.wf.steps
            if self.kind(s.name) == w.REVIEW
            for step_id in [s.step_id, *(r["step_id"] for r in s.attempts)]
            if step_id is not None
        ]
        if not ids:
            return
        name, step_id = ids[k % len(ids)]
        report = Report(t.wf.id, step_id, success, step_type=name if typed else None, result={})
        self.report(t, report, StaleReport)

    @rule(i=picks, k=picks)
    def make_progress(self, i: int, k: int) -> None:
        """A live attempt succeeds or a waiting review is approved (so runs get far); reviews
        that can run steps again are left to the rules that reject them too."""
        t = self.pick(i)
        live = [
            s
            for s in t.wf.steps
            if s.status == w.DISPATCHED
            or (s.status == w.WAITING and self.pipeline.spec(s.name).on_reject == w.FAIL)
        ]
        if not live:
            return
        step = live[k % len(live)]
        assert step.step_id is not None
        if step.status == w.WAITING:
            decision = Review(t.wf.id, step.step_id, w.APPROVE, by="approver")
            self.decide(t, decision, "applied")
        else:
            report = Report(t.wf.id, step.step_id, True, result={"step": step.name, "n": k})
            self.report(t, report, "applied")

    # -- reviews --------------------------------------------------------------------------

    @rule(
        i=picks,
        k=picks,
        approve=st.sampled_from([True, True, False]),
        edits=st.none() | st.fixed_dictionaries({"title": st.sampled_from(["x", "y"])}),
        reason=st.none() | st.just("not good"),
    )
    def review_a_waiting_step(
        self, i: int, k: int, approve: bool, edits: dict[str, Any] | None, reason: str | None
    ) -> None:
        t = self.pick(i)
        waiting = [s for s in t.wf.steps if s.status == w.WAITING]
        if not waiting:
            return
        step = waiting[k % len(waiting)]
        assert step.step_id is not None
        decision = Review(
            t.wf.id,
            step.step_id,
            w.APPROVE if approve else "reject",
            by=f"reviewer-{k % 3}",
            result=edits if approve else None,
            reason=None if approve else reason,
        )
        expect = self.review_expectation(t, decision)
        assert expect == "applied"
        self.decide(t, decision, expect)

    @rule(i=picks, k=picks)
    def reject_a_review_that_runs_steps_again(self, i: int, k: int) -> None:
        t = self.pick(i)
        waiting = [
            s
            for s in t.wf.steps
            if s.status == w.WAITING and self.pipeline.spec(s.name).on_reject != w.FAIL
        ]
        if not waiting:
            return
        step = waiting[k % len(waiting)]
        assert step.step_id is not None
        decision = Review(t.wf.id, step.step_id, "reject", by="critic", reason="again")
        self.decide(t, decision, "applied")

    @rule(i=picks, k=picks, approve=st.booleans(), random=st.none() | random_ids)
    def review_any_step_id(self, i: int, k: int, approve: bool, random: str | None) -> None:
        t = self.pick(i)
        ids = [
            step_id
            for s in t.wf.steps
            for step_id in [s.step_id, *(r["step_id"] for r in s.attempts)]
            if step_id is not None
        ]
        step_id: str = ids[k % len(ids)] if random is None and ids else (random or "id-none")
        decision = Review(t.wf.id, step_id, w.APPROVE if approve else "reject", by="someone")
        self.decide(t, decision, self.review_expectation(t, decision))

    @rule(k=picks)
    def replay_an_earlier_review(self, k: int) -> None:
        if not self.reviews:
            return
        index, decision = self.reviews[k % len(self.reviews)]
        t = self.tracked[index]
        expect = self.review_expectation(t, decision)
        if decision.step_id in t.decided:
            assert expect in (DuplicateReport, NotAllowed)
        self.decide(t, decision, expect)

    # -- timers ---------------------------------------------------------------------------

    def wake(self, t: Tracked) -> None:
        due = t.wf.status == w.RUNNING and w.is_due(t.wf, self.now)
        self.apply(
            t,
            lambda wf: w.wake(wf, self.pipeline, self.now, self.ids),
            expect="applied" if due else "noop",
        )
        if due:  # every due timer went off at once
            stamp = w.isoformat(self.now)
            assert t.wf.wake_at is None or t.wf.wake_at > stamp

    @rule(i=picks, dt=clock_steps)
    def advance_clock_and_wake(self, i: int, dt: float) -> None:
        self.now += dt
        self.wake(self.pick(i))

    @rule(i=picks)
    def jump_to_the_next_timer_and_wake(self, i: int) -> None:
        t = self.pick(i)
        if t.wf.wake_at is not None:
            self.now = max(self.now, parse(t.wf.wake_at))
        self.wake(t)

    # -- commands -------------------------------------------------------------------------

    @rule(i=picks, roll=st.integers(min_value=0, max_value=5))
    def cancel(self, i: int, roll: int) -> None:
        """Only one draw in six cancels, so most runs get far before the workflow is final."""
        if roll:
            return
        t = self.pick(i)
        expect = "applied" if t.wf.status == w.RUNNING else NotAllowed
        before = {s.name: s.status for s in t.wf.steps}
        if self.apply(t, lambda wf: w.cancel(wf, self.pipeline, self.now, self.ids), expect=expect):
            assert t.wf.status == w.CANCELLED
            for step in t.wf.steps:
                kept = before[step.name] == w.COMPLETED
                assert step.status == (w.COMPLETED if kept else w.CANCELLED)

    @rule(i=picks)
    def retry(self, i: int) -> None:
        t = self.pick(i)
        expect = "applied" if t.wf.status == w.FAILED else NotAllowed
        before = copy.deepcopy({s.name: s.to_doc() for s in t.wf.steps})
        if self.apply(t, lambda wf: w.retry(wf, self.pipeline, self.now, self.ids), expect=expect):
            t.retried = True
            event("retry applied")
            assert t.wf.status == w.RUNNING
            for step in t.wf.steps:
                old = before[step.name]
                if old["status"] == w.COMPLETED:
                    assert step.to_doc() == old, "retry touched a completed step"
                elif old["status"] in (w.FAILED, w.CANCELLED):
                    assert step.status in (w.PENDING, w.DISPATCHED, w.WAITING)
                    assert step.attempt == (0 if step.status == w.PENDING else 1)
                else:
                    assert old["status"] == w.PENDING and old["retry_at"] is None
                    assert step.status in (w.PENDING, w.DISPATCHED, w.WAITING)

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def invariants_hold(self) -> None:
        for t in self.tracked:
            self.check(t)
            t.last_version = t.wf.version
            t.last_doc = copy.deepcopy(t.wf.to_doc())

    def check(self, t: Tracked) -> None:
        wf = t.wf
        doc = wf.to_doc()
        last = t.last_doc
        deps, upstream = self.pipeline.deps, self.pipeline.upstream

        # version only grows, by one per applied operation; nothing changes without it
        if last:
            assert wf.version in (t.last_version, t.last_version + 1)
            if wf.version == t.last_version:
                assert doc == last, "the document changed without a version bump"

        # completed and cancelled workflows are final; a failed one leaves only through retry
        if last and last["status"] in (w.COMPLETED, w.CANCELLED):
            assert doc == last, f"a {last['status']} workflow changed"
        if last and last["status"] == w.FAILED and wf.status != w.FAILED:
            assert t.retried and wf.status == w.RUNNING

        # a step's terminal state: completed leaves only through a reject sending it back,
        # cancelled and failed only through retry
        if last:
            for old, step in zip(last["steps"], wf.steps, strict=True):
                if old["status"] == w.COMPLETED and step.name not in t.reset:
                    assert step.to_doc() == old, f"completed step {step.name} changed"
                if old["status"] in (w.CANCELLED, w.FAILED) and not t.retried:
                    assert step.to_doc() == old, f"{old['status']} step {step.name} changed"

        # each attempt ends once and completes at most once; applied outcomes are recorded
        records = [r for s in wf.steps for r in s.attempts]
        ended = Counter(r["step_id"] for r in records)
        assert all(n == 1 for n in ended.values()), ended
        by_id = {r["step_id"]: r for r in records}
        for step_id, success in t.applied.items():
            assert by_id[step_id]["outcome"] == (w.COMPLETED if success else w.FAILED)
        for step_id, decision in t.decided.items():
            outcome = w.COMPLETED if decision == w.APPROVE else w.REJECTED
            assert by_id[step_id]["outcome"] == outcome
        for step in wf.steps:
            done = [r for r in step.attempts if r["outcome"] == w.COMPLETED]
            if step.status == w.COMPLETED:
                assert step.result is not None
                assert done and done[-1]["step_id"] == step.step_id
            if step.step_id is not None:  # the current attempt is live until it ends
                live = step.status in (w.DISPATCHED, w.WAITING)
                assert (step.step_id not in ended) == live, (step.name, step.status)
            else:
                assert step.status in (w.PENDING, w.CANCELLED) and not step.attempts

        # one dispatch event per service attempt, none for a review's
        outbox = wf.outbox
        assert len({e["message_id"] for e in outbox}) == len(outbox)
        assert outbox[: len(t.seen_events)] == t.seen_events, "an emitted event was rewritten"
        t.seen_events.extend(copy.deepcopy(outbox[len(t.seen_events) :]))
        dispatches = [e["payload"] for e in outbox if e["routing_key"] in self.dispatch_keys]
        dispatched = Counter(p["step_id"] for p in dispatches)
        assert all(n == 1 for n in dispatched.values()), dispatched
        attempts = {
            kind: {
                step_id
                for s in wf.steps
                if self.kind(s.name) == kind
                for step_id in [s.step_id, *(r["step_id"] for r in s.attempts)]
                if step_id is not None
            }
            for kind in w.STEP_KINDS
        }
        assert set(dispatched) == attempts[w.SERVICE]
        assert not set(dispatched) & attempts[w.REVIEW]
        assert set(dispatched) | attempts[w.REVIEW] == t.begun
        versions = [
            e["payload"]["version"] for e in outbox if e["routing_key"] == CHANGE_ROUTING_KEY
        ]
        assert versions == list(range(1, wf.version + 1))
        assert outbox[-1]["routing_key"] == CHANGE_ROUTING_KEY
        if wf.version > 1:
            assert outbox[-1]["payload"]["workflow"] == wf.public()

        # live steps: all their deps completed; timers as the step's spec says
        completed = {s.name for s in wf.steps if s.status == w.COMPLETED}
        for step in wf.steps:
            spec = self.pipeline.spec(step.name)
            if step.status in (w.DISPATCHED, w.WAITING):
                assert wf.status == w.RUNNING
                assert all(dep in completed for dep in deps[step.name]), step.name
                assert all(dep in completed for dep in upstream[step.name]), step.name
                assert step.retry_at is None
            if step.status == w.DISPATCHED:
                assert spec.kind == w.SERVICE
                assert 1 <= step.attempt <= spec.max_attempts
                assert step.dispatched_at is not None and step.deadline is not None
                assert parse(step.deadline) == parse(step.dispatched_at) + (spec.timeout or 0)
            if step.status == w.WAITING:
                assert spec.kind == w.REVIEW and step.attempt == 1
                escalated = step.review is not None and "escalated_at" in step.review
                if spec.timeout is None or escalated:
                    assert step.deadline is None
                    assert step.review is None or spec.on_deadline == w.ESCALATE
                else:
                    assert step.review is None
                    assert step.deadline is not None and step.dispatched_at is not None
                    assert parse(step.deadline) == parse(step.dispatched_at) + spec.timeout
            if step.status == w.COMPLETED:
                assert all(dep in completed for dep in upstream[step.name]), step.name
            if step.status == w.PENDING and step.retry_at is not None:
                assert wf.status == w.RUNNING and spec.kind == w.SERVICE
                assert 1 <= step.attempt < spec.max_attempts
                assert step.attempts[-1]["step_id"] == step.step_id

        # wake_at: the earliest live deadline, retry time or waiting review's deadline
        times = [s for step in wf.steps if (s := timer(step)) is not None]
        expected = min(times) if times and wf.status == w.RUNNING else None
        assert wf.wake_at == expected

        # current_step: the first step not completed (the last when all are)
        firsts = [i for i, s in enumerate(wf.steps) if s.status != w.COMPLETED]
        assert wf.current_step == (firsts[0] if firsts else len(wf.steps) - 1)

        # the workflow's status and its steps'
        statuses = Counter(s.status for s in wf.steps)
        if wf.status == w.RUNNING:
            running = statuses[w.DISPATCHED] + statuses[w.WAITING]
            retrying = [s for s in wf.steps if s.status == w.PENDING and s.retry_at is not None]
            assert running or retrying, "a running workflow with nothing live or pending"
            assert statuses[w.FAILED] == statuses[w.CANCELLED] == 0
            assert statuses[w.COMPLETED] < len(wf.steps)
            for step in wf.steps:  # nothing ready is left waiting to begin
                if step.status == w.PENDING and step.retry_at is None:
                    assert not all(dep in completed for dep in deps[step.name]), step.name
        elif wf.status == w.COMPLETED:
            assert statuses[w.COMPLETED] == len(wf.steps)
            assert wf.wake_at is None
            done = [e for e in outbox if e["routing_key"] == "workflow.completed"]
            assert len(done) == 1
            assert done[0]["payload"]["results"] == {s.name: s.result for s in wf.steps}
        elif wf.status == w.FAILED:
            assert statuses[w.FAILED] == 1
            assert statuses[w.DISPATCHED] == statuses[w.WAITING] == 0
            assert all(s.retry_at is None for s in wf.steps)
        else:
            assert wf.status == w.CANCELLED
            assert statuses[w.COMPLETED] + statuses[w.CANCELLED] == len(wf.steps)


DagMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDagMachine = DagMachine.TestCase
