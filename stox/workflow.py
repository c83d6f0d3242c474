"""The workflow domain: pipelines as data and their transition rules. No I/O.

The model and its rules: docs/architecture.md#the-workflow-model.

Every transition mutates a freshly loaded `Workflow` in place, bumps its `version`, and
appends the events it causes to the workflow's `outbox`, so the caller saves state and
events in one compare-and-swap write. Rejections raise before anything is mutated.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from stox import tracecontext
from stox.ids import new_id

RUNNING, COMPLETED, FAILED, CANCELLED = "running", "completed", "failed", "cancelled"
DEFAULT_PIPELINE = "default"  # the name of the one pipeline (named pipelines: issue 14)
WORKFLOW_STATUSES = (RUNNING, COMPLETED, FAILED, CANCELLED)
TERMINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED})

PENDING, DISPATCHED = "pending", "dispatched"
STEP_STATUSES = (PENDING, DISPATCHED, COMPLETED, FAILED, CANCELLED)
TIMED_OUT = "timed_out"  # outcome of an attempt whose deadline passed

COMPLETION_ROUTING_KEY = "step.completed"
CHANGE_ROUTING_KEY = "workflow.changed"

IdFactory = Callable[[], str]


def isoformat(ts: float) -> str:
    """Fixed-width UTC timestamp (microseconds, `Z`); strings of this form sort in time order.

    Several are made per change, most within the same second as the one before: that
    second's text is kept, and only the microseconds are formatted. They are rounded as
    `datetime.fromtimestamp` rounds them (half to even, carried into the second).
    """
    fraction, whole = math.modf(ts)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    second = int(whole)
    if second != _second[0]:
        _second[:] = [second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second[1]}.{micros:06d}Z"


_second: list[Any] = [None, ""]  # the last second formatted, and its text


def epoch(timestamp: str) -> float:
    """The seconds since the epoch that `isoformat` wrote as `timestamp`."""
    return datetime.fromisoformat(timestamp).timestamp()


class WorkflowError(Exception):
    """A request the rules refuse; `code` is the API error code."""

    code = "conflict"


class StaleReport(WorkflowError):
    """A completion for an older attempt, another step, or a finished workflow (409)."""

    code = "stale_report"


class DuplicateReport(WorkflowError):
    """The same completion again: acknowledged, nothing changes (200)."""

    code = "duplicate"


class NotAllowed(WorkflowError):
    """Cancel or retry in a state that does not allow it (409)."""

    code = "not_allowed"


@dataclass(frozen=True, slots=True)
class StepSpec:
    name: str
    routing_key: str = ""
    timeout: float = 60.0
    max_attempts: int = 3
    backoff: float = 1.0

    def __post_init__(self) -> None:
        if not self.routing_key:
            object.__setattr__(self, "routing_key", f"step.{self.name}")

    def retry_delay(self, attempt: int) -> float:
        """Exponential backoff: `backoff`, then twice that, and so on."""
        return self.backoff * 2.0 ** max(attempt - 1, 0)


DEFAULT_STEPS = (
    StepSpec("image_processing"),
    StepSpec("ai_enhancement"),
    StepSpec("seo_generation"),
)


@dataclass(frozen=True, slots=True)
class Pipeline:
    steps: tuple[StepSpec, ...] = DEFAULT_STEPS
    completion_url: str = ""  # the HTTP reply address put into every dispatch
    completion_routing_key: str = COMPLETION_ROUTING_KEY  # the AMQP reply routing key
    name: str = DEFAULT_PIPELINE

    def spec(self, name: str) -> StepSpec:
        for spec in self.steps:
            if spec.name == name:
                return spec
        return StepSpec(name)  # a step removed from the pipeline since the workflow began


@dataclass(frozen=True, slots=True)
class Report:
    """A service's completion report for one step attempt."""

    workflow_id: str
    step_id: str
    success: bool
    step_type: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


@dataclass(slots=True)
class Step:
    name: str
    status: str = PENDING
    step_id: str | None = None
    attempt: int = 0
    dispatched_at: str | None = None
    deadline: str | None = None
    completed_at: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    retry_at: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)  # finished attempts

    def to_doc(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "step_id": self.step_id,
            "attempt": self.attempt,
            "dispatched_at": self.dispatched_at,
            "deadline": self.deadline,
            "completed_at": self.completed_at,
            "result": self.result,
            "error": self.error,
            "retry_at": self.retry_at,
            "attempts": list(self.attempts),
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Step:
        step = cls(**doc)
        step.attempts = list(step.attempts)  # appended to; the source document stays as it was
        return step


@dataclass(slots=True)
class Workflow:
    id: str
    owner: str
    status: str
    product: dict[str, Any]
    steps: list[Step]
    current_step: int
    version: int
    created_at: str
    updated_at: str
    outbox: list[dict[str, Any]] = field(default_factory=list)
    wake_at: str | None = None  # the earliest deadline or retry time, for the sweeper
    outbox_at: str | None = None  # when the oldest unconfirmed event was written
    # the traceparent of its upload's span when it is traced (stox/tracecontext.py); its
    # document has the field only then
    trace: str | None = None

    def to_doc(self) -> dict[str, Any]:
        doc = {
            "id": self.id,
            "owner": self.owner,
            "status": self.status,
            "product": self.product,
            "steps": [step.to_doc() for step in self.steps],
            "current_step": self.current_step,
            "version": self.version,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "outbox": list(self.outbox),
            "wake_at": self.wake_at,
            "outbox_at": self.outbox_at,
        }
        if self.trace is not None:
            doc["trace"] = self.trace
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Workflow:
        fields = dict(doc)
        fields["steps"] = [Step.from_doc(step) for step in doc["steps"]]
        fields["outbox"] = list(doc["outbox"])  # appended to, as above
        return cls(**fields)

    def public(self) -> dict[str, Any]:
        """The document as clients see it: everything but the outbox and the trace."""
        doc = self.to_doc()
        del doc["outbox"]
        doc.pop("trace", None)
        return doc

    def copy(self) -> Workflow:
        return copy.deepcopy(self)

    @property
    def step(self) -> Step:
        return self.steps[self.current_step]

    def results(self) -> dict[str, Any]:
        return {s.name: s.result for s in self.steps if s.status == COMPLETED}


@dataclass(slots=True)
class Change:
    """One thing a transition did, as the WebSocket reports it."""

    type: str
    step: str | None = None

    def to_doc(self) -> dict[str, Any]:
        return {"type": self.type, "step": self.step}


class _Transition:
    """Collects the events and changes of one transition, then seals them into the outbox."""

    def __init__(self, wf: Workflow, pipeline: Pipeline, now: float, ids: IdFactory) -> None:
        self.wf, self.pipeline, self.now, self.ids = wf, pipeline, now, ids
        self.now_iso = isoformat(now)
        self.changes: list[Change] = []

    def emit(self, routing_key: str, payload: dict[str, Any]) -> None:
        body = {"event": routing_key, "workflow_id": self.wf.id, "occurred_at": self.now_iso}
        # Payloads share only what no transition mutates in place (the product, step
        # results, attempt records); the containers that grow are copied by to_doc/from_doc.
        body.update(payload)
        self.wf.outbox.append(
            {
                "message_id": self.ids(),
                "routing_key": routing_key,
                "payload": body,
                "created_at": self.now_iso,
            }
        )

    def dispatch(self, index: int) -> None:
        wf = self.wf
        step = wf.steps[index]
        spec = self.pipeline.spec(step.name)
        wf.current_step = index
        step.status = DISPATCHED
        step.step_id = self.ids()
        step.attempt += 1
        step.dispatched_at = self.now_iso
        step.deadline = isoformat(self.now + spec.timeout)
        step.retry_at = None
        step.completed_at = None
        payload = {
            "step_id": step.step_id,
            "step_type": step.name,
            "attempt": step.attempt,
            "deadline": step.deadline,
            "product": wf.product,
            "results": wf.results(),
            "reply_to": {
                "http": self.pipeline.completion_url,
                "routing_key": self.pipeline.completion_routing_key,
            },
        }
        if wf.trace is not None:  # the worker's span is a child of this dispatch's
            payload[tracecontext.HEADER] = tracecontext.dispatch(wf.trace, step.step_id)
        self.emit(spec.routing_key, payload)
        self.changes.append(Change("step_dispatched", step.name))

    def finish_workflow(self, status: str, extra: dict[str, Any]) -> None:
        self.wf.status = status
        self.emit(f"workflow.{status}", {"status": status, **extra})
        self.changes.append(Change(f"workflow_{status}"))

    def end_attempt(self, step: Step, outcome: str, error: str | None = None) -> None:
        """Record how the attempt ended, and when it began (the step's `dispatched_at` is the
        next attempt's once that is dispatched): dispatch to end is its duration."""
        step.attempts.append(
            {
                "step_id": step.step_id,
                "attempt": step.attempt,
                "outcome": outcome,
                "error": error,
                "dispatched_at": step.dispatched_at,
            }
        )

    def fail_attempt(self, outcome: str, error: str) -> None:
        """A failed or timed-out attempt: retry after backoff, or fail the workflow."""
        wf = self.wf
        step = wf.step
        spec = self.pipeline.spec(step.name)
        self.end_attempt(step, outcome, error)
        step.error = error
        if step.attempt < spec.max_attempts:
            self.changes.append(Change("step_retrying", step.name))
            delay = spec.retry_delay(step.attempt)
            if delay <= 0:
                self.dispatch(wf.current_step)
            else:
                step.status = PENDING
                step.retry_at = isoformat(self.now + delay)
            return
        step.status = FAILED
        step.completed_at = self.now_iso
        self.changes.append(Change("step_failed", step.name))
        self.finish_workflow(FAILED, {"error": {"step": step.name, "message": error}})

    def seal(self) -> list[Change]:
        wf = self.wf
        wf.version += 1
        wf.updated_at = self.now_iso
        wf.wake_at = _wake_at(wf)
        self.emit(
            CHANGE_ROUTING_KEY,
            {
                "owner": wf.owner,
                "version": wf.version,
                "changes": [c.to_doc() for c in self.changes],
                "workflow": wf.public(),
            },
        )
        wf.outbox_at = wf.outbox[0]["created_at"]
        return self.changes


def _wake_at(wf: Workflow) -> str | None:
    if wf.status != RUNNING:
        return None
    step = wf.step
    if step.status == DISPATCHED:
        return step.deadline
    if step.status == PENDING:
        return step.retry_at
    return None


def start(
    pipeline: Pipeline,
    owner: str,
    product: dict[str, Any],
    now: float,
    ids: IdFactory = new_id,
    trace: str | None = None,
) -> tuple[Workflow, list[Change]]:
    """Upload: a running workflow whose first step is dispatched; `trace`: the traceparent
    of its upload's span, when it is traced."""
    if not pipeline.steps:
        raise ValueError("a pipeline needs at least one step")
    now_iso = isoformat(now)
    wf = Workflow(
        id=ids(),
        owner=owner,
        status=RUNNING,
        product=product,
        steps=[Step(spec.name) for spec in pipeline.steps],
        current_step=0,
        version=0,
        created_at=now_iso,
        updated_at=now_iso,
        trace=trace,
    )
    t = _Transition(wf, pipeline, now, ids)
    t.emit(
        "workflow.start",
        {"owner": owner, "product": product, "steps": [s.name for s in wf.steps]},
    )
    t.dispatch(0)
    return wf, t.seal()


def _find_attempt(wf: Workflow, step_id: str) -> tuple[Step, dict[str, Any] | None] | None:
    """The step the attempt belongs to, and its finished-attempt record if it has ended."""
    for step in wf.steps:
        for record in step.attempts:
            if record["step_id"] == step_id:
                return step, record
        if step.step_id == step_id:
            return step, None
    return None


def attempt_of(wf: Workflow, step_id: str) -> tuple[str, int] | None:
    """The step and the number of the attempt that `step_id` names, if it is one of `wf`'s."""
    found = _find_attempt(wf, step_id)
    if found is None:
        return None
    step, record = found
    return step.name, record["attempt"] if record is not None else step.attempt


def complete(
    wf: Workflow, pipeline: Pipeline, report: Report, now: float, ids: IdFactory = new_id
) -> list[Change]:
    """Apply a service's completion report for the current attempt."""
    found = _find_attempt(wf, report.step_id)
    if found is None:
        raise StaleReport("no attempt of this workflow has that step_id")
    step, record = found
    if report.step_type is not None and report.step_type != step.name:
        raise StaleReport(f"step_id belongs to step {step.name!r}, not {report.step_type!r}")
    if record is not None:
        same = record["outcome"] == (COMPLETED if report.success else FAILED)
        if same:
            raise DuplicateReport("this completion was already applied")
        raise StaleReport(f"that attempt already ended as {record['outcome']}")
    if wf.status != RUNNING or step.status != DISPATCHED or step is not wf.step:
        raise StaleReport(f"the workflow is {wf.status} and the step is {step.status}")

    t = _Transition(wf, pipeline, now, ids)
    if report.success:
        t.end_attempt(step, COMPLETED)
        step.status = COMPLETED
        step.result = report.result or {}
        step.error = None
        step.completed_at = t.now_iso
        t.changes.append(Change("step_completed", step.name))
        if wf.current_step + 1 < len(wf.steps):
            t.dispatch(wf.current_step + 1)
        else:
            t.finish_workflow(COMPLETED, {"results": wf.results()})
    else:
        t.fail_attempt(FAILED, report.error or "the service reported a failure")
    return t.seal()


def is_due(wf: Workflow, now: float) -> bool:
    return wf.wake_at is not None and wf.wake_at <= isoformat(now)


def wake(wf: Workflow, pipeline: Pipeline, now: float, ids: IdFactory = new_id) -> list[Change]:
    """Timers: a passed deadline fails the attempt; a due retry dispatches the next one.

    Returns no changes (and mutates nothing) when nothing is due, so a sweeper that lost
    the race to another instance simply moves on.
    """
    if wf.status != RUNNING or not is_due(wf, now):
        return []
    t = _Transition(wf, pipeline, now, ids)
    step = wf.step
    if step.status == DISPATCHED:
        spec = pipeline.spec(step.name)
        t.fail_attempt(TIMED_OUT, f"no report within {spec.timeout:g}s")
    else:
        t.dispatch(wf.current_step)
    return t.seal()


def cancel(wf: Workflow, pipeline: Pipeline, now: float, ids: IdFactory = new_id) -> list[Change]:
    if wf.status != RUNNING:
        raise NotAllowed(f"only a running workflow can be cancelled; this one is {wf.status}")
    t = _Transition(wf, pipeline, now, ids)
    for step in wf.steps[wf.current_step :]:
        if step.status == DISPATCHED:
            t.end_attempt(step, CANCELLED)
        step.status = CANCELLED
        step.retry_at = None
    t.finish_workflow(CANCELLED, {})
    return t.seal()


def retry(wf: Workflow, pipeline: Pipeline, now: float, ids: IdFactory = new_id) -> list[Change]:
    """Restart a failed workflow from the step that failed, with a fresh attempt budget."""
    if wf.status != FAILED:
        raise NotAllowed(f"only a failed workflow can be retried; this one is {wf.status}")
    t = _Transition(wf, pipeline, now, ids)
    wf.status = RUNNING
    step = wf.step
    step.attempt = 0
    step.error = None
    step.completed_at = None
    t.dispatch(wf.current_step)
    return t.seal()


def drop_published(wf: Workflow, message_ids: set[str]) -> bool:
    """Drop outbox entries the broker has confirmed; False when none were still there.

    Not a transition: the version stays, so a transition decided meanwhile on the same
    version still writes (its own events are appended after these, never over them).
    """
    kept = unpublished(wf.outbox, message_ids)
    if len(kept) == len(wf.outbox):
        return False
    wf.outbox = kept
    wf.outbox_at = outbox_at(kept)
    return True


def unpublished(outbox: list[dict[str, Any]], message_ids: set[str]) -> list[dict[str, Any]]:
    """The entries of `outbox` but those published (`message_ids`), in order."""
    return [entry for entry in outbox if entry["message_id"] not in message_ids]


def outbox_at(outbox: list[dict[str, Any]]) -> str | None:
    """When the oldest entry still in `outbox` was written."""
    return outbox[0]["created_at"] if outbox else None
