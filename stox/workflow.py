"""The workflow domain: pipelines as data and their transition rules. No I/O.

The model and its rules: docs/architecture.md#the-workflow-model.

Every transition mutates a freshly loaded `Workflow` in place, bumps its `version`, and
appends the events it causes to the workflow's `outbox`, so the caller saves state and
events in one compare-and-swap write. Rejections raise before anything is mutated.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from stox import tracecontext
from stox.codec import canonical
from stox.ids import new_id

RUNNING, COMPLETED, FAILED, CANCELLED = "running", "completed", "failed", "cancelled"
DEFAULT_PIPELINE = "default"  # the pipeline of an upload that names none
WORKFLOW_STATUSES = (RUNNING, COMPLETED, FAILED, CANCELLED)
TERMINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED})

PENDING, DISPATCHED, WAITING = "pending", "dispatched", "waiting"  # waiting: for a review
STEP_STATUSES = (PENDING, DISPATCHED, WAITING, COMPLETED, FAILED, CANCELLED)
TIMED_OUT = "timed_out"  # outcome of an attempt whose deadline passed
REJECTED = "rejected"  # outcome of a review attempt a person rejected

SERVICE, REVIEW = "service", "review"  # a step's kind: sent to a queue, or done by a person
STEP_KINDS = (SERVICE, REVIEW)
FAIL, ESCALATE = "fail", "escalate"  # what a review's passed deadline does
APPROVE = "approve"
REVIEW_DECISIONS = (APPROVE, "reject")
DEFAULT_TIMEOUT = 60.0  # a service step's, unless it says; a review has none unless it says

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


class InvalidPipeline(ValueError):
    """A pipeline definition the rules cannot run (the message names the step)."""


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One step of a pipeline. `after`: the steps it waits for (None: see `Pipeline`);
    a review step (`kind`) waits for a person, `on_reject` saying what a rejection does (fail
    the workflow, or the name of an upstream step to run again) and `on_deadline` what its
    `timeout`, if it has one, does (fail, or escalate and keep waiting)."""

    name: str
    routing_key: str = ""
    timeout: float | None = None  # None: DEFAULT_TIMEOUT for a service step, none for a review
    max_attempts: int = 3
    backoff: float = 1.0
    kind: str = SERVICE
    after: tuple[str, ...] | None = None
    on_reject: str = FAIL
    on_deadline: str = FAIL

    def __post_init__(self) -> None:
        if not self.routing_key:
            object.__setattr__(self, "routing_key", f"step.{self.name}")
        if self.timeout is None and self.kind == SERVICE:
            object.__setattr__(self, "timeout", DEFAULT_TIMEOUT)
        elif self.timeout is not None:  # 5 and 5.0: one definition, one version
            object.__setattr__(self, "timeout", float(self.timeout))
        object.__setattr__(self, "backoff", float(self.backoff))
        if self.after is not None:
            object.__setattr__(self, "after", tuple(self.after))

    def retry_delay(self, attempt: int) -> float:
        """Exponential backoff: `backoff`, then twice that, and so on."""
        return self.backoff * 2.0 ** max(attempt - 1, 0)

    def to_doc(self) -> dict[str, Any]:
        """Its name and what differs from the defaults: a workflow stores its pipeline's
        steps, and every change notification carries them, so they are kept short."""
        doc: dict[str, Any] = {"name": self.name}
        defaults = _SPEC_DEFAULTS.get(self.kind, _SPEC_DEFAULTS[SERVICE])
        for key in _SPEC_FIELDS:
            value = getattr(self, key)
            if value != defaults.get(key, f"step.{self.name}"):
                doc[key] = list(value) if key == "after" else value
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> StepSpec:
        return cls(**doc)  # `after` becomes a tuple in __post_init__


_SPEC_FIELDS = (
    "kind",
    "after",
    "routing_key",
    "timeout",
    "max_attempts",
    "backoff",
    "on_reject",
    "on_deadline",
)
# what `StepSpec.to_doc` leaves out, by kind (a routing key's default is step.NAME)
_SPEC_DEFAULTS: dict[str, dict[str, Any]] = {
    kind: {
        "kind": SERVICE,
        "after": None,
        "timeout": DEFAULT_TIMEOUT if kind == SERVICE else None,
        "max_attempts": 3,
        "backoff": 1.0,
        "on_reject": FAIL,
        "on_deadline": FAIL,
    }
    for kind in STEP_KINDS
}

DEFAULT_STEPS = (
    StepSpec("image_processing"),
    StepSpec("ai_enhancement"),
    StepSpec("seo_generation"),
)


@dataclass(frozen=True, slots=True)
class Pipeline:
    """Steps as data, and where services reply (the gateway's, not stored with a workflow).

    Dependencies: where any step names `after`, a step without it depends on nothing;
    where none does, each step follows the one before it (a sequence). Invalid definitions
    (no steps, a name twice, an unknown or cyclic dependency, a review's `on_reject` that is
    not upstream of it) raise InvalidPipeline.
    """

    steps: tuple[StepSpec, ...] = DEFAULT_STEPS
    completion_url: str = ""  # the HTTP reply address put into every dispatch
    completion_routing_key: str = COMPLETION_ROUTING_KEY  # the AMQP reply routing key
    name: str = DEFAULT_PIPELINE
    # derived from `steps`
    deps: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)
    upstream: dict[str, frozenset[str]] = field(init=False, repr=False, compare=False)
    version: str = field(init=False, compare=False)  # a short hash of name and steps
    # `definition()`, made once: every workflow of the pipeline shares it (none mutates it)
    _definition: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        deps = _dependencies(self.steps)
        object.__setattr__(self, "deps", deps)
        object.__setattr__(self, "upstream", _upstream(deps))
        for spec in self.steps:
            _check_step(spec, self.upstream[spec.name])
        definition = {"name": self.name, "steps": [spec.to_doc() for spec in self.steps]}
        version = hashlib.sha256(canonical(definition)).hexdigest()[:12]
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "_definition", {**definition, "version": version})

    def spec(self, name: str) -> StepSpec:
        for spec in self.steps:
            if spec.name == name:
                return spec
        return StepSpec(name)  # not in this definition (a workflow of before definitions)

    def definition(self) -> dict[str, Any]:
        """What a workflow stores of the pipeline it started with (no reply addresses)."""
        return self._definition

    @classmethod
    def from_definition(
        cls,
        doc: dict[str, Any],
        completion_url: str = "",
        completion_routing_key: str = COMPLETION_ROUTING_KEY,
    ) -> Pipeline:
        steps = tuple(StepSpec.from_doc(step) for step in doc["steps"])
        return cls(steps, completion_url, completion_routing_key, doc["name"])

    def with_replies(self, completion_url: str, completion_routing_key: str) -> Pipeline:
        return Pipeline(self.steps, completion_url, completion_routing_key, self.name)


def _dependencies(steps: tuple[StepSpec, ...]) -> dict[str, tuple[str, ...]]:
    if not steps:
        raise InvalidPipeline("a pipeline needs at least one step")
    names = [spec.name for spec in steps]
    for name in names:
        if names.count(name) > 1:
            raise InvalidPipeline(f"step {name!r} appears twice")
    if all(spec.after is None for spec in steps):  # a sequence
        return {name: (names[i - 1],) if i else () for i, name in enumerate(names)}
    deps: dict[str, tuple[str, ...]] = {}
    for spec in steps:
        after = spec.after or ()
        for dep in after:
            if dep not in names:
                raise InvalidPipeline(f"step {spec.name!r}: after names unknown step {dep!r}")
            if dep == spec.name:
                raise InvalidPipeline(f"step {spec.name!r}: after names itself")
        deps[spec.name] = tuple(dict.fromkeys(after))
    return deps


def _upstream(deps: dict[str, tuple[str, ...]]) -> dict[str, frozenset[str]]:
    """Each step's transitive dependencies; InvalidPipeline naming a cycle."""
    done: dict[str, frozenset[str]] = {}

    def visit(name: str, path: list[str]) -> frozenset[str]:
        if name in done:
            return done[name]
        if name in path:
            cycle = " -> ".join([*path[path.index(name) :], name])
            raise InvalidPipeline(f"the steps' after make a cycle: {cycle}")
        found: set[str] = set()
        for dep in deps[name]:
            found.add(dep)
            found |= visit(dep, [*path, name])
        done[name] = frozenset(found)
        return done[name]

    for name in deps:
        visit(name, [])
    return done


def _check_step(spec: StepSpec, upstream: frozenset[str]) -> None:
    where = f"step {spec.name!r}"
    if spec.kind not in STEP_KINDS:
        raise InvalidPipeline(f"{where}: kind must be one of {', '.join(STEP_KINDS)}")
    if spec.timeout is not None and not spec.timeout > 0:
        raise InvalidPipeline(f"{where}: timeout must be positive")
    if spec.kind == SERVICE and (spec.on_reject != FAIL or spec.on_deadline != FAIL):
        raise InvalidPipeline(f"{where}: on_reject and on_deadline are for review steps")
    if spec.on_deadline not in (FAIL, ESCALATE):
        raise InvalidPipeline(f"{where}: on_deadline must be fail or escalate")
    if spec.on_reject != FAIL and spec.on_reject not in upstream:
        raise InvalidPipeline(
            f"{where}: on_reject must be fail or a step it comes after, not {spec.on_reject!r}"
        )


@dataclass(frozen=True, slots=True)
class Report:
    """A service's completion report for one step attempt."""

    workflow_id: str
    step_id: str
    success: bool
    step_type: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    by: str | None = None  # who reported it, for the history ("service:NAME")


@dataclass(slots=True)
class Step:
    name: str
    status: str = PENDING
    step_id: str | None = None
    attempt: int = 0
    dispatched_at: str | None = None  # a review: when it began to wait
    deadline: str | None = None
    completed_at: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    retry_at: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)  # finished attempts
    # a review step's: {decision, by, at, reason} once decided, escalated_at if it was; the
    # document has the field only then
    review: dict[str, Any] | None = None

    def to_doc(self) -> dict[str, Any]:
        doc = {
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
        if self.review is not None:
            doc["review"] = dict(self.review)
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Step:
        step = cls(**doc)
        step.attempts = list(step.attempts)  # appended to; the source document stays as it was
        if step.review is not None:
            step.review = dict(step.review)
        return step


@dataclass(slots=True)
class Workflow:
    id: str
    owner: str
    status: str
    product: dict[str, Any]
    steps: list[Step]
    current_step: int  # the first step not completed (the last once all are)
    version: int
    created_at: str
    updated_at: str
    outbox: list[dict[str, Any]] = field(default_factory=list)
    wake_at: str | None = None  # the earliest deadline or retry time, for the sweeper
    outbox_at: str | None = None  # when the oldest unconfirmed event was written
    # the traceparent of its upload's span when it is traced (stox/tracecontext.py); its
    # document has the field only then
    trace: str | None = None
    # the definition it started with (`Pipeline.definition`), never rewritten; None in a
    # workflow stored before pipelines were stored (it runs on the gateway's `default`)
    pipeline: dict[str, Any] | None = None
    # the owner's user name, to show (`owner` is their id); the document has the field only
    # when it is known
    owner_name: str | None = None
    # what happened to it, oldest first (`record`), and how many older entries were dropped
    history: list[Any] = field(default_factory=list)
    history_dropped: int = 0
    # webhook deliveries of its events (`add_deliveries`), and where the upload asked its
    # own to go (the document has that field only when it did)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    callback_url: str | None = None

    def to_doc(self) -> dict[str, Any]:
        doc = self.public()
        doc["outbox"] = list(self.outbox)
        doc["history"] = list(self.history)
        doc["history_dropped"] = self.history_dropped
        doc["deliveries"] = [dict(d) for d in self.deliveries]
        if self.trace is not None:
            doc["trace"] = self.trace
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Workflow:
        fields = dict(doc)
        fields["steps"] = [Step.from_doc(step) for step in doc["steps"]]
        fields["outbox"] = list(doc["outbox"])  # appended to
        fields["history"] = list(doc.get("history", ()))  # none in documents of before
        fields["deliveries"] = [dict(d) for d in doc.get("deliveries", ())]  # changed in place
        return cls(**fields)

    def public(self) -> dict[str, Any]:
        """The document as clients see it: everything but the outbox, the trace, the
        deliveries and the history (GET …/history serves it; every change notification would
        carry it)."""
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
            "wake_at": self.wake_at,
            "outbox_at": self.outbox_at,
        }
        if self.callback_url is not None:
            doc["callback_url"] = self.callback_url
        if self.pipeline is not None:
            doc["pipeline"] = self.pipeline
        if self.owner_name is not None:
            doc["owner_name"] = self.owner_name
        return doc

    def copy(self) -> Workflow:
        return copy.deepcopy(self)

    @property
    def step(self) -> Step:
        return self.steps[self.current_step]

    def named(self, name: str) -> Step | None:
        for step in self.steps:
            if step.name == name:
                return step
        return None

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

    def begin(self, step: Step) -> None:
        """A new attempt of `step`: sent to its service, or, for a review, waiting."""
        wf = self.wf
        spec = self.pipeline.spec(step.name)
        step.step_id = self.ids()
        step.attempt += 1
        step.dispatched_at = self.now_iso
        step.deadline = None if spec.timeout is None else isoformat(self.now + spec.timeout)
        step.retry_at = None
        step.completed_at = None
        if spec.kind == REVIEW:
            step.status = WAITING
            step.review = None
            self.changes.append(Change("step_waiting_review", step.name))
            return
        step.status = DISPATCHED
        upstream = self.pipeline.upstream.get(step.name, frozenset())
        payload = {
            "step_id": step.step_id,
            "step_type": step.name,
            "attempt": step.attempt,
            "deadline": step.deadline,
            "product": wf.product,
            "results": {
                s.name: s.result for s in wf.steps if s.status == COMPLETED and s.name in upstream
            },
            "reply_to": {
                "http": self.pipeline.completion_url,
                "routing_key": self.pipeline.completion_routing_key,
            },
        }
        if wf.trace is not None:  # the worker's span is a child of this dispatch's
            payload[tracecontext.HEADER] = tracecontext.dispatch(wf.trace, step.step_id)
        self.emit(spec.routing_key, payload)
        self.changes.append(Change("step_dispatched", step.name))

    def advance(self) -> None:
        """Begin every step not yet begun whose dependencies have all completed; complete
        the workflow when every step has."""
        wf = self.wf
        done = {s.name for s in wf.steps if s.status == COMPLETED}
        if len(done) == len(wf.steps):
            self.finish_workflow(COMPLETED, {"results": wf.results()})
            return
        deps = self.pipeline.deps
        for step in wf.steps:
            pending = step.status == PENDING and step.retry_at is None
            if pending and done.issuperset(deps.get(step.name, ())):
                self.begin(step)

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

    def stop_live_steps(self) -> None:
        """The workflow ends: attempts under way end as cancelled (their late reports are
        stale), and so do retries waiting; steps never begun stay pending."""
        for step in self.wf.steps:
            if step.status in (DISPATCHED, WAITING):
                self.end_attempt(step, CANCELLED)
                step.status = CANCELLED
            elif step.status == PENDING and step.retry_at is not None:
                step.status = CANCELLED
                step.retry_at = None

    def fail_step(self, step: Step, error: str) -> None:
        """`step` failed for good: so does the workflow, and its running siblings stop."""
        step.status = FAILED
        step.error = error
        step.completed_at = self.now_iso
        self.changes.append(Change("step_failed", step.name))
        self.stop_live_steps()
        self.finish_workflow(FAILED, {"error": {"step": step.name, "message": error}})

    def fail_attempt(self, step: Step, outcome: str, error: str) -> None:
        """A failed or timed-out attempt: retry after backoff, or fail the workflow."""
        spec = self.pipeline.spec(step.name)
        self.end_attempt(step, outcome, error)
        step.error = error
        if step.attempt < spec.max_attempts:
            self.changes.append(Change("step_retrying", step.name))
            delay = spec.retry_delay(step.attempt)
            if delay <= 0:
                self.begin(step)
            else:
                step.status = PENDING
                step.retry_at = isoformat(self.now + delay)
            return
        self.fail_step(step, error)

    def seal(self) -> list[Change]:
        wf = self.wf
        wf.version += 1
        wf.updated_at = self.now_iso
        wf.current_step, wf.wake_at = _current_and_wake_at(wf)
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


def _current_and_wake_at(wf: Workflow) -> tuple[int, str | None]:
    """The first step not completed (the last when all are), and the earliest timer of a
    running workflow: a live attempt's deadline, a retry's time, a waiting review's
    deadline (one pass: every transition ends here)."""
    current, wake_at = -1, None
    running = wf.status == RUNNING
    for index, step in enumerate(wf.steps):
        if current < 0 and step.status != COMPLETED:
            current = index
        if running and (timer := _timer(step)) is not None:
            wake_at = timer if wake_at is None or timer < wake_at else wake_at
    for delivery in wf.deliveries:  # whatever the workflow's state
        if delivery["status"] == PENDING:
            timer = delivery["next_at"]
            wake_at = timer if wake_at is None or timer < wake_at else wake_at
    return (current if current >= 0 else len(wf.steps) - 1), wake_at


def _timer(step: Step) -> str | None:
    if step.status in (DISPATCHED, WAITING):
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
    owner_name: str | None = None,
    callback_url: str | None = None,
) -> tuple[Workflow, list[Change]]:
    """Upload: a running workflow whose first steps (those that depend on none) are begun;
    `trace`: the traceparent of its upload's span, when it is traced; `owner_name`: the
    owner's user name, when known; `callback_url`: where its end is to be delivered."""
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
        pipeline=pipeline.definition(),
        owner_name=owner_name,
        callback_url=callback_url,
    )
    t = _Transition(wf, pipeline, now, ids)
    t.emit(
        "workflow.start",
        {"owner": owner, "product": product, "steps": [s.name for s in wf.steps]},
    )
    t.advance()
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
    """Apply a service's completion report for a live attempt."""
    found = _find_attempt(wf, report.step_id)
    if found is None:
        raise StaleReport("no attempt of this workflow has that step_id")
    step, record = found
    if report.step_type is not None and report.step_type != step.name:
        raise StaleReport(f"step_id belongs to step {step.name!r}, not {report.step_type!r}")
    if pipeline.spec(step.name).kind == REVIEW:  # decided by `review`, never by a service
        raise StaleReport(f"step {step.name!r} is a review step")
    if record is not None:
        same = record["outcome"] == (COMPLETED if report.success else FAILED)
        if same:
            raise DuplicateReport("this completion was already applied")
        raise StaleReport(f"that attempt already ended as {record['outcome']}")
    if wf.status != RUNNING or step.status != DISPATCHED:
        raise StaleReport(f"the workflow is {wf.status} and the step is {step.status}")

    t = _Transition(wf, pipeline, now, ids)
    if report.success:
        t.end_attempt(step, COMPLETED)
        step.status = COMPLETED
        step.result = report.result or {}
        step.error = None
        step.completed_at = t.now_iso
        t.changes.append(Change("step_completed", step.name))
        t.advance()
    else:
        t.fail_attempt(step, FAILED, report.error or "the service reported a failure")
    return t.seal()


@dataclass(frozen=True, slots=True)
class Review:
    """A person's decision on a waiting review step: APPROVE (`result`: their edits, which
    become the step's result) or reject (`reason`)."""

    workflow_id: str
    step_id: str
    decision: str
    by: str
    result: dict[str, Any] | None = None
    reason: str | None = None


def review(
    wf: Workflow, pipeline: Pipeline, decision: Review, now: float, ids: IdFactory = new_id
) -> list[Change]:
    """Apply a review. The same decision on an attempt already decided is a DuplicateReport;
    any other on a step not waiting is NotAllowed."""
    found = _find_attempt(wf, decision.step_id)
    if found is None:
        raise NotAllowed("no review of this workflow has that step_id")
    step, record = found
    spec = pipeline.spec(step.name)
    if spec.kind != REVIEW:
        raise NotAllowed(f"step {step.name!r} is not a review step")
    approve = decision.decision == APPROVE
    if record is not None:
        if record["outcome"] == (COMPLETED if approve else REJECTED):
            raise DuplicateReport("this review was already applied")
        raise NotAllowed(f"that review already ended as {record['outcome']}")
    if wf.status != RUNNING or step.status != WAITING:
        raise NotAllowed(f"the workflow is {wf.status} and the step is {step.status}")

    t = _Transition(wf, pipeline, now, ids)
    escalated = (step.review or {}).get("escalated_at")
    step.review = {
        "decision": "approved" if approve else "rejected",
        "by": decision.by,
        "at": t.now_iso,
        "reason": decision.reason,
    }
    if escalated is not None:
        step.review["escalated_at"] = escalated
    t.changes.append(Change("step_reviewed", step.name))
    if approve:
        t.end_attempt(step, COMPLETED)
        step.attempts[-1]["by"] = decision.by
        step.status = COMPLETED
        step.result = decision.result if decision.result is not None else {}
        step.error = None
        step.completed_at = t.now_iso
        t.advance()
        return t.seal()
    reason = decision.reason or "rejected"
    t.end_attempt(step, REJECTED, reason)
    step.attempts[-1]["by"] = decision.by
    if spec.on_reject == FAIL:
        t.fail_step(step, f"rejected in review: {reason}")
        return t.seal()
    # run the named upstream step again, and every step after it (those between it and this
    # review, this review, and any other that used its result): attempts under way end as
    # cancelled, so none runs on, or is reviewed, with the result being replaced
    again = spec.on_reject
    for s in wf.steps:
        if s.name == again or again in pipeline.upstream[s.name]:
            if s is not step and s.status in (DISPATCHED, WAITING):
                t.end_attempt(s, CANCELLED)
            s.status = PENDING
            s.attempt = 0
            s.result = None
            s.retry_at = None
            s.completed_at = None
    step.error = f"rejected in review: {reason}"
    t.advance()
    return t.seal()


def is_due(wf: Workflow, now: float) -> bool:
    return wf.wake_at is not None and wf.wake_at <= isoformat(now)


def wake(wf: Workflow, pipeline: Pipeline, now: float, ids: IdFactory = new_id) -> list[Change]:
    """Timers: a passed deadline fails the attempt (a review's fails or escalates, as its
    step says); a due retry dispatches the next attempt.

    Returns no changes (and mutates nothing) when nothing is due, so a sweeper that lost
    the race to another instance simply moves on.
    """
    now_iso = isoformat(now)
    timers = (_timer(step) for step in wf.steps)
    if wf.status != RUNNING or not any(t is not None and t <= now_iso for t in timers):
        return []  # (a webhook delivery may be what is due: see `deliveries_due`)
    t = _Transition(wf, pipeline, now, ids)
    for step in wf.steps:
        timer = _timer(step)
        if wf.status != RUNNING or timer is None or timer > t.now_iso:
            continue
        spec = pipeline.spec(step.name)
        if step.status == DISPATCHED:
            t.fail_attempt(step, TIMED_OUT, f"no report within {spec.timeout:g}s")
        elif step.status == PENDING:
            t.begin(step)
        elif spec.on_deadline == ESCALATE:
            step.deadline = None
            step.review = {"escalated_at": t.now_iso}
            t.changes.append(Change("step_review_escalated", step.name))
        else:
            t.end_attempt(step, TIMED_OUT, f"no review within {spec.timeout:g}s")
            t.fail_step(step, f"no review within {spec.timeout:g}s")
    return t.seal()


def cancel(wf: Workflow, pipeline: Pipeline, now: float, ids: IdFactory = new_id) -> list[Change]:
    if wf.status != RUNNING:
        raise NotAllowed(f"only a running workflow can be cancelled; this one is {wf.status}")
    t = _Transition(wf, pipeline, now, ids)
    for step in wf.steps:
        if step.status in (DISPATCHED, WAITING):
            t.end_attempt(step, CANCELLED)
        if step.status != COMPLETED:
            step.status = CANCELLED
            step.retry_at = None
    t.finish_workflow(CANCELLED, {})
    return t.seal()


def retry(wf: Workflow, pipeline: Pipeline, now: float, ids: IdFactory = new_id) -> list[Change]:
    """Restart a failed workflow: the steps that failed, and those its failure stopped, with
    a fresh attempt budget; completed steps keep their results."""
    if wf.status != FAILED:
        raise NotAllowed(f"only a failed workflow can be retried; this one is {wf.status}")
    t = _Transition(wf, pipeline, now, ids)
    wf.status = RUNNING
    for step in wf.steps:
        if step.status in (FAILED, CANCELLED):
            step.status = PENDING
            step.attempt = 0
            step.error = None
            step.completed_at = None
            step.retry_at = None
    t.advance()
    return t.seal()


# -- webhook deliveries --------------------------------------------------------------------

DELIVERED, GIVEN_UP = "delivered", "given_up"  # a delivery's end; PENDING until then
FIRST_RETRY, LONGEST_PAUSE = 10.0, 3600.0  # a failed delivery's backoff: 10 s, doubling to 1 h


def add_deliveries(
    wf: Workflow, targets: list[tuple[str, str, dict[str, Any]]], now: float, ids: IdFactory
) -> None:
    """Deliveries of events just written to the outbox, due at once: each target is (url,
    signer: "endpoint" or "callback", the outbox entry). Part of the transition's write."""
    now_iso = isoformat(now)
    for url, signer, entry in targets:
        wf.deliveries.append(
            {
                "id": ids(),
                "url": url,
                "signer": signer,
                "event": entry["routing_key"],
                "message_id": entry["message_id"],
                "payload": entry["payload"],
                "status": PENDING,
                "attempts": 0,
                "created_at": now_iso,
                "next_at": now_iso,
                "last_error": None,
                "ended_at": None,
            }
        )
    if targets:
        wf.current_step, wf.wake_at = _current_and_wake_at(wf)


def deliveries_due(wf: Workflow, now: float) -> list[dict[str, Any]]:
    now_iso = isoformat(now)
    return [d for d in wf.deliveries if d["status"] == PENDING and d["next_at"] <= now_iso]


def delivery_attempted(
    wf: Workflow,
    pipeline: Pipeline,
    delivery_id: str,
    error: str | None,
    now: float,
    retry_for: float,
    ids: IdFactory = new_id,
) -> list[Change]:
    """A delivery's attempt ended: delivered (`error` None), or failed: tried again after a
    backoff (10 s, doubling, at most an hour apart) until `retry_for` after it was made, then
    given up. No change (nothing mutated) when it is not pending any more: another instance
    recorded it first."""
    delivery = next((d for d in wf.deliveries if d["id"] == delivery_id), None)
    if delivery is None or delivery["status"] != PENDING:
        return []
    t = _Transition(wf, pipeline, now, ids)
    delivery["attempts"] += 1
    delivery["last_error"] = error
    if error is None:
        delivery["status"], delivery["ended_at"] = DELIVERED, t.now_iso
        t.changes.append(Change("webhook_delivered"))
        return t.seal()
    pause = min(LONGEST_PAUSE, FIRST_RETRY * 2.0 ** (delivery["attempts"] - 1))
    if now + pause > epoch(delivery["created_at"]) + retry_for:
        delivery["status"], delivery["ended_at"] = GIVEN_UP, t.now_iso
        t.changes.append(Change("webhook_given_up"))
    else:
        delivery["next_at"] = isoformat(now + pause)
        t.changes.append(Change("webhook_retrying"))
    return t.seal()


STARTED = "workflow_started"  # the history's first entry: the upload
_ENDED_ATTEMPT = frozenset({"step_completed", "step_retrying", "step_failed", "step_reviewed"})


def record(
    wf: Workflow,
    changes: list[Change],
    by: str,
    limit: int,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add what a transition just did to the history, an entry per change: when, what, the
    step and its attempt, who or what caused it (`by`: "user:NAME", "service:NAME",
    "sweeper"…), the error of an attempt that failed; keep the newest `limit` entries,
    counting those dropped; `detail` goes into each entry (a delivery's url and error).
    Part of the transition's write: called before it is saved.

    An entry is stored as an array, `[at, version, event, by]` then, when there are, the step,
    its attempt, the error and the detail (`history_entry` reads it): every write of the
    workflow encodes its whole history again, and an array is a third of the work of an
    object. (A tuple here, a list once read back from the store.)"""
    at, version = wf.updated_at, wf.version  # the transition's (a store may write only these)
    steps = {step.name: step for step in wf.steps}
    for change in changes:
        step = steps.get(change.step) if change.step is not None else None
        entry: tuple[Any, ...]
        if step is None:
            entry = (at, version, change.type, by)
            if detail is not None:
                entry += (None, None, None, detail)
        else:
            ended = step.attempts[-1] if step.attempts else None
            if change.type in _ENDED_ATTEMPT and ended is not None:
                entry = (at, version, change.type, by, step.name, ended["attempt"])
                error = ended["error"]
            else:
                entry = (at, version, change.type, by, step.name, step.attempt)
                error = None
            if detail is not None:
                entry += (error, detail)
            elif error is not None:
                entry += (error,)
        wf.history.append(entry)
    excess = len(wf.history) - limit
    if excess > 0:
        del wf.history[:excess]
        wf.history_dropped += excess


def history_entry(stored: Sequence[Any] | dict[str, Any]) -> dict[str, Any]:
    """An entry as `record` stored it, as GET …/history shows it: `at`, `version`,
    `event`, `by`, and `step`, `attempt`, `error` and the detail's fields where there are."""
    if isinstance(stored, dict):  # written before entries were arrays
        return stored
    at, version, event, by, *rest = stored
    entry: dict[str, Any] = {"at": at, "version": version, "event": event, "by": by}
    step, attempt, error, detail = (*rest, None, None, None, None)[:4]
    if step is not None:
        entry["step"], entry["attempt"] = step, attempt
    if error is not None:
        entry["error"] = error
    if detail is not None:
        entry.update(detail)
    return entry


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
