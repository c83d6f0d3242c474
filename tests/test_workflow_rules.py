"""One test (or a small group) per rule of the workflow model, against the pure domain in
stox.workflow (the rules: docs/architecture.md#the-workflow-model).

Every transition mutates the Workflow in place, so "nothing changed" is checked by comparing a
deep copy of `to_doc()` taken before the call with the document after it.
"""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import PRODUCT

from stox import workflow as w
from stox.ids import new_id
from stox.workflow import (
    CHANGE_ROUTING_KEY,
    COMPLETION_ROUTING_KEY,
    DuplicateReport,
    NotAllowed,
    Pipeline,
    Report,
    StaleReport,
    Step,
    StepSpec,
    Workflow,
)

T0 = 1_700_000_000.0
URL = "http://gateway.test/api/v1/workflow/step-completed"
WS_CHANGE_TYPES = {
    "step_dispatched",
    "step_completed",
    "step_retrying",
    "step_failed",
    "workflow_completed",
    "workflow_failed",
    "workflow_cancelled",
}

# image: 3 attempts, backoff 2s (2, 4, ...); ai: 2 attempts, no backoff; seo: a single attempt.
PIPELINE = Pipeline(
    steps=(
        StepSpec("image_processing", timeout=30, max_attempts=3, backoff=2),
        StepSpec("ai_enhancement", timeout=60, max_attempts=2, backoff=0),
        StepSpec("seo_generation", routing_key="seo.jobs", timeout=10, max_attempts=1, backoff=1),
    ),
    completion_url=URL,
)


class Ids:
    """Deterministic id factory: id-0001, id-0002, ..."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"id-{self.n:04d}"


def snap(wf: Workflow) -> dict[str, Any]:
    return copy.deepcopy(wf.to_doc())


def new_events(wf: Workflow, before: int) -> list[dict[str, Any]]:
    return wf.outbox[before:]


def keys(events: list[dict[str, Any]]) -> list[str]:
    return [e["routing_key"] for e in events]


def change_types(changes: list[w.Change]) -> list[str]:
    return [c.type for c in changes]


@pytest.fixture
def ids() -> Ids:
    return Ids()


@pytest.fixture
def wf(ids: Ids) -> Workflow:
    workflow, _ = w.start(PIPELINE, "user-1", copy.deepcopy(PRODUCT), T0, ids)
    return workflow


def attempt_of(step: Step) -> str:
    """The step_id of `step`'s attempt in flight (a pending step has none)."""
    assert step.step_id is not None, f"{step.name} has not been dispatched"
    return step.step_id


def ok(wf: Workflow, result: dict[str, Any] | None = None, **kw: Any) -> Report:
    return Report(
        wf.id, attempt_of(wf.step), True, step_type=wf.step.name, result=result or {"ok": 1}, **kw
    )


def bad(wf: Workflow, error: str = "boom") -> Report:
    return Report(wf.id, attempt_of(wf.step), False, step_type=wf.step.name, error=error)


def run(fn: Any, wf: Workflow, *args: Any) -> tuple[list[w.Change], list[dict[str, Any]]]:
    """Apply a transition; check the version/change-event contract; return changes and events."""
    version, n = wf.version, len(wf.outbox)
    changes = fn(wf, PIPELINE, *args)
    events = new_events(wf, n)
    assert wf.version == version + 1
    assert keys(events).count(CHANGE_ROUTING_KEY) == 1
    assert events[-1]["routing_key"] == CHANGE_ROUTING_KEY
    return changes, events


def complete_step(wf: Workflow, ids: Ids, now: float, result: dict[str, Any]) -> None:
    run(lambda wf_, p, *a: w.complete(wf_, p, ok(wf_, result), now, ids), wf)


def to_failed(wf: Workflow, ids: Ids, now: float = T0 + 1) -> float:
    """Drive the current (image) step to a failed workflow by failures and wakes."""
    while wf.status == w.RUNNING:
        if wf.step.status == w.DISPATCHED:
            w.complete(wf, PIPELINE, bad(wf), now, ids)
        else:
            now += 100
            w.wake(wf, PIPELINE, now, ids)
    assert wf.status == w.FAILED
    return now


# -- upload ---------------------------------------------------------------------------------


def test_upload_creates_running_workflow_with_first_step_dispatched(ids: Ids) -> None:
    wf, changes = w.start(PIPELINE, "user-1", PRODUCT, T0, ids)

    assert wf.status == w.RUNNING
    assert wf.owner == "user-1"
    assert wf.product == PRODUCT
    assert wf.version == 1
    assert wf.current_step == 0
    assert wf.created_at == wf.updated_at == w.isoformat(T0)
    first = wf.steps[0]
    assert first.name == "image_processing"
    assert first.status == w.DISPATCHED
    assert first.attempt == 1
    assert first.step_id
    assert first.dispatched_at == w.isoformat(T0)
    assert first.deadline == w.isoformat(T0 + 30)
    assert [s.name for s in wf.steps[1:]] == ["ai_enhancement", "seo_generation"]
    assert all(s.status == w.PENDING and s.step_id is None for s in wf.steps[1:])
    assert wf.wake_at == first.deadline
    assert change_types(changes) == ["step_dispatched"]
    assert changes[0].step == "image_processing"


def test_upload_emits_workflow_start_and_first_dispatch(ids: Ids) -> None:
    wf, _ = w.start(PIPELINE, "user-1", PRODUCT, T0, ids)

    assert keys(wf.outbox) == ["workflow.start", "step.image_processing", CHANGE_ROUTING_KEY]
    for event in wf.outbox:
        assert event["payload"]["event"] == event["routing_key"]
        assert event["payload"]["workflow_id"] == wf.id
        assert event["payload"]["occurred_at"] == w.isoformat(T0)
        assert event["created_at"] == w.isoformat(T0)
    assert len({e["message_id"] for e in wf.outbox}) == 3
    assert wf.outbox_at == w.isoformat(T0)

    started = wf.outbox[0]["payload"]
    assert started["owner"] == "user-1"
    assert started["product"] == PRODUCT
    assert started["steps"] == ["image_processing", "ai_enhancement", "seo_generation"]

    dispatch = wf.outbox[1]["payload"]
    assert set(dispatch) == {
        "event",
        "workflow_id",
        "occurred_at",
        "step_id",
        "step_type",
        "attempt",
        "deadline",
        "product",
        "results",
        "reply_to",
    }
    assert dispatch["step_id"] == wf.steps[0].step_id
    assert dispatch["step_type"] == "image_processing"
    assert dispatch["attempt"] == 1
    assert dispatch["deadline"] == w.isoformat(T0 + 30)
    assert dispatch["product"] == PRODUCT
    assert dispatch["results"] == {}
    assert dispatch["reply_to"] == {"http": URL, "routing_key": COMPLETION_ROUTING_KEY}


def test_upload_with_an_empty_pipeline_is_refused() -> None:
    with pytest.raises(ValueError):
        w.start(Pipeline(steps=()), "user-1", PRODUCT, T0)


def test_step_routing_key_defaults_to_step_name_and_can_be_overridden() -> None:
    assert StepSpec("image_processing").routing_key == "step.image_processing"
    assert StepSpec("x", routing_key="custom.key").routing_key == "custom.key"
    assert [s.name for s in w.DEFAULT_STEPS] == [
        "image_processing",
        "ai_enhancement",
        "seo_generation",
    ]


# -- success ---------------------------------------------------------------------------------


def test_success_completes_step_stores_result_and_dispatches_next_with_results(
    wf: Workflow, ids: Ids
) -> None:
    first_id = wf.step.step_id
    changes, events = run(
        lambda wf_, p: w.complete(wf_, p, ok(wf_, {"thumb": "t.jpg"}), T0 + 5, ids), wf
    )

    first, second = wf.steps[0], wf.steps[1]
    assert first.status == w.COMPLETED
    assert first.result == {"thumb": "t.jpg"}
    assert first.error is None
    assert first.completed_at == w.isoformat(T0 + 5)
    assert first.attempts == [
        {
            "step_id": first_id,
            "attempt": 1,
            "outcome": w.COMPLETED,
            "error": None,
            "dispatched_at": w.isoformat(T0),
        }
    ]
    assert wf.status == w.RUNNING
    assert wf.current_step == 1
    assert second.status == w.DISPATCHED
    assert second.attempt == 1
    assert second.step_id not in (None, first_id)
    assert second.deadline == w.isoformat(T0 + 5 + 60)
    assert change_types(changes) == ["step_completed", "step_dispatched"]
    assert [c.step for c in changes] == ["image_processing", "ai_enhancement"]

    assert keys(events) == ["step.ai_enhancement", CHANGE_ROUTING_KEY]
    dispatch = events[0]["payload"]
    assert dispatch["step_id"] == second.step_id
    assert dispatch["step_type"] == "ai_enhancement"
    assert dispatch["attempt"] == 1
    assert dispatch["results"] == {"image_processing": {"thumb": "t.jpg"}}
    assert dispatch["product"] == PRODUCT


def test_success_without_a_result_stores_an_empty_result(wf: Workflow, ids: Ids) -> None:
    report = Report(wf.id, attempt_of(wf.step), True)
    w.complete(wf, PIPELINE, report, T0 + 1, ids)
    assert wf.steps[0].result == {}


def test_dispatch_uses_the_step_routing_key(wf: Workflow, ids: Ids) -> None:
    complete_step(wf, ids, T0 + 1, {"a": 1})
    n = len(wf.outbox)
    complete_step(wf, ids, T0 + 2, {"b": 2})
    assert keys(new_events(wf, n)) == ["seo.jobs", CHANGE_ROUTING_KEY]
    assert new_events(wf, n)[0]["payload"]["results"] == {
        "image_processing": {"a": 1},
        "ai_enhancement": {"b": 2},
    }


def test_last_success_completes_workflow_with_results(wf: Workflow, ids: Ids) -> None:
    complete_step(wf, ids, T0 + 1, {"a": 1})
    complete_step(wf, ids, T0 + 2, {"b": 2})
    changes, events = run(lambda wf_, p: w.complete(wf_, p, ok(wf_, {"c": 3}), T0 + 3, ids), wf)

    assert wf.status == w.COMPLETED
    assert all(s.status == w.COMPLETED for s in wf.steps)
    assert wf.wake_at is None
    assert change_types(changes) == ["step_completed", "workflow_completed"]
    assert keys(events) == ["workflow.completed", CHANGE_ROUTING_KEY]
    done = events[0]["payload"]
    assert done["status"] == w.COMPLETED
    assert done["results"] == {
        "image_processing": {"a": 1},
        "ai_enhancement": {"b": 2},
        "seo_generation": {"c": 3},
    }
    assert done["workflow_id"] == wf.id


# -- failure, backoff, retries -----------------------------------------------------------------


def test_failure_with_attempts_left_retries_after_backoff(wf: Workflow, ids: Ids) -> None:
    first_id = wf.step.step_id
    changes, events = run(lambda wf_, p: w.complete(wf_, p, bad(wf_, "blurry"), T0 + 1, ids), wf)

    step = wf.step
    assert wf.status == w.RUNNING
    assert step.status == w.PENDING
    assert step.error == "blurry"
    assert step.retry_at == w.isoformat(T0 + 1 + 2)
    assert wf.wake_at == step.retry_at
    assert step.attempts == [
        {
            "step_id": first_id,
            "attempt": 1,
            "outcome": w.FAILED,
            "error": "blurry",
            "dispatched_at": w.isoformat(T0),
        }
    ]
    assert change_types(changes) == ["step_retrying"]
    assert keys(events) == [CHANGE_ROUTING_KEY]  # nothing dispatched yet

    # Not yet due: nothing happens.
    before = snap(wf)
    assert w.wake(wf, PIPELINE, T0 + 2.5, ids) == []
    assert snap(wf) == before

    changes, events = run(lambda wf_, p: w.wake(wf_, p, T0 + 3, ids), wf)
    assert step.status == w.DISPATCHED
    assert step.attempt == 2
    assert step.step_id not in (None, first_id)
    assert step.retry_at is None
    assert step.deadline == w.isoformat(T0 + 3 + 30)
    assert change_types(changes) == ["step_dispatched"]
    assert keys(events) == ["step.image_processing", CHANGE_ROUTING_KEY]
    assert events[0]["payload"]["step_id"] == step.step_id
    assert events[0]["payload"]["attempt"] == 2


def test_backoff_doubles_with_each_attempt(wf: Workflow, ids: Ids) -> None:
    w.complete(wf, PIPELINE, bad(wf), T0 + 1, ids)
    assert wf.step.retry_at == w.isoformat(T0 + 1 + 2)
    w.wake(wf, PIPELINE, T0 + 3, ids)
    w.complete(wf, PIPELINE, bad(wf), T0 + 10, ids)
    assert wf.step.retry_at == w.isoformat(T0 + 10 + 4)

    spec = StepSpec("x", backoff=1.5)
    assert [spec.retry_delay(a) for a in (1, 2, 3, 4)] == [1.5, 3.0, 6.0, 12.0]


def test_zero_backoff_dispatches_the_next_attempt_immediately(wf: Workflow, ids: Ids) -> None:
    complete_step(wf, ids, T0 + 1, {"a": 1})
    first_id = wf.step.step_id
    changes, events = run(lambda wf_, p: w.complete(wf_, p, bad(wf_), T0 + 2, ids), wf)

    step = wf.step
    assert step.name == "ai_enhancement"
    assert step.status == w.DISPATCHED
    assert step.attempt == 2
    assert step.step_id != first_id
    assert step.retry_at is None
    assert change_types(changes) == ["step_retrying", "step_dispatched"]
    assert keys(events) == ["step.ai_enhancement", CHANGE_ROUTING_KEY]
    assert events[0]["payload"]["attempt"] == 2
    assert events[0]["payload"]["results"] == {"image_processing": {"a": 1}}


def test_failure_without_attempts_left_fails_step_and_workflow(wf: Workflow, ids: Ids) -> None:
    complete_step(wf, ids, T0 + 1, {"a": 1})
    complete_step(wf, ids, T0 + 2, {"b": 2})
    changes, events = run(
        lambda wf_, p: w.complete(wf_, p, bad(wf_, "no keywords"), T0 + 3, ids), wf
    )

    step = wf.steps[2]
    assert step.status == w.FAILED
    assert step.error == "no keywords"
    assert step.completed_at == w.isoformat(T0 + 3)
    assert wf.status == w.FAILED
    assert wf.wake_at is None
    assert [s.status for s in wf.steps[:2]] == [w.COMPLETED, w.COMPLETED]
    assert change_types(changes) == ["step_failed", "workflow_failed"]
    assert keys(events) == ["workflow.failed", CHANGE_ROUTING_KEY]
    failed = events[0]["payload"]
    assert failed["status"] == w.FAILED
    assert failed["error"] == {"step": "seo_generation", "message": "no keywords"}


def test_failure_without_error_text_gets_a_default_message(wf: Workflow, ids: Ids) -> None:
    w.complete(wf, PIPELINE, Report(wf.id, attempt_of(wf.step), False), T0 + 1, ids)
    assert wf.step.error


# -- deadlines ------------------------------------------------------------------------------


def test_wake_before_the_deadline_does_nothing(wf: Workflow, ids: Ids) -> None:
    before = snap(wf)
    assert not w.is_due(wf, T0 + 29.9)
    assert w.wake(wf, PIPELINE, T0 + 29.9, ids) == []
    assert snap(wf) == before


def test_passed_deadline_is_a_timed_out_attempt_that_is_retried(wf: Workflow, ids: Ids) -> None:
    first_id = wf.step.step_id
    assert w.is_due(wf, T0 + 30)
    changes, events = run(lambda wf_, p: w.wake(wf_, p, T0 + 30, ids), wf)

    step = wf.step
    assert step.status == w.PENDING
    assert step.attempts[-1]["step_id"] == first_id
    assert step.attempts[-1]["outcome"] == w.TIMED_OUT
    assert step.error
    assert step.retry_at == w.isoformat(T0 + 30 + 2)
    assert change_types(changes) == ["step_retrying"]
    assert keys(events) == [CHANGE_ROUTING_KEY]

    changes, events = run(lambda wf_, p: w.wake(wf_, p, T0 + 32, ids), wf)
    assert step.status == w.DISPATCHED
    assert step.attempt == 2
    assert keys(events) == ["step.image_processing", CHANGE_ROUTING_KEY]


def test_passed_deadline_on_the_last_attempt_fails_the_workflow(wf: Workflow, ids: Ids) -> None:
    complete_step(wf, ids, T0 + 1, {"a": 1})
    complete_step(wf, ids, T0 + 2, {"b": 2})
    changes, events = run(lambda wf_, p: w.wake(wf_, p, T0 + 2 + 10, ids), wf)

    assert wf.status == w.FAILED
    assert wf.step.status == w.FAILED
    assert wf.step.attempts[-1]["outcome"] == w.TIMED_OUT
    assert change_types(changes) == ["step_failed", "workflow_failed"]
    assert keys(events) == ["workflow.failed", CHANGE_ROUTING_KEY]
    assert events[0]["payload"]["error"]["step"] == "seo_generation"


def test_success_report_for_a_timed_out_attempt_is_stale(wf: Workflow, ids: Ids) -> None:
    late = ok(wf)
    w.wake(wf, PIPELINE, T0 + 30, ids)
    before = snap(wf)
    with pytest.raises(StaleReport):
        w.complete(wf, PIPELINE, late, T0 + 31, ids)
    assert snap(wf) == before


def test_success_for_the_current_attempt_after_its_deadline_but_before_wake_applies(
    wf: Workflow, ids: Ids
) -> None:
    run(lambda wf_, p: w.complete(wf_, p, ok(wf_), T0 + 45, ids), wf)
    assert wf.steps[0].status == w.COMPLETED


# -- idempotency and stale reports -------------------------------------------------------------


@pytest.mark.parametrize("success", [True, False])
def test_the_same_completion_again_is_a_duplicate_and_changes_nothing(
    wf: Workflow, ids: Ids, success: bool
) -> None:
    report = ok(wf) if success else bad(wf)
    w.complete(wf, PIPELINE, report, T0 + 1, ids)
    before = snap(wf)
    with pytest.raises(DuplicateReport):
        w.complete(wf, PIPELINE, report, T0 + 2, ids)
    assert snap(wf) == before


def test_a_duplicate_after_the_workflow_finished_is_still_a_duplicate(
    wf: Workflow, ids: Ids
) -> None:
    complete_step(wf, ids, T0 + 1, {"a": 1})
    complete_step(wf, ids, T0 + 2, {"b": 2})
    last = ok(wf, {"c": 3})
    w.complete(wf, PIPELINE, last, T0 + 3, ids)
    before = snap(wf)
    with pytest.raises(DuplicateReport):
        w.complete(wf, PIPELINE, last, T0 + 4, ids)
    assert snap(wf) == before


def test_duplicate_report_is_a_workflow_error_with_its_own_code() -> None:
    assert issubclass(DuplicateReport, w.WorkflowError)
    assert issubclass(StaleReport, w.WorkflowError)
    assert issubclass(NotAllowed, w.WorkflowError)
    assert len({DuplicateReport.code, StaleReport.code, NotAllowed.code}) == 3


@pytest.mark.parametrize("first_success", [True, False])
def test_the_opposite_outcome_for_a_finished_attempt_is_stale(
    wf: Workflow, ids: Ids, first_success: bool
) -> None:
    first, opposite = (ok(wf), bad(wf)) if first_success else (bad(wf), ok(wf))
    w.complete(wf, PIPELINE, first, T0 + 1, ids)
    before = snap(wf)
    with pytest.raises(StaleReport):
        w.complete(wf, PIPELINE, opposite, T0 + 2, ids)
    assert snap(wf) == before


def test_a_report_for_an_older_attempt_is_stale(wf: Workflow, ids: Ids) -> None:
    old_ok = ok(wf)
    w.complete(wf, PIPELINE, bad(wf), T0 + 1, ids)
    w.wake(wf, PIPELINE, T0 + 3, ids)
    assert wf.step.attempt == 2
    before = snap(wf)
    with pytest.raises(StaleReport):
        w.complete(wf, PIPELINE, old_ok, T0 + 4, ids)
    assert snap(wf) == before


def test_a_report_for_another_step_is_stale(wf: Workflow, ids: Ids) -> None:
    wrong_type = Report(wf.id, attempt_of(wf.step), True, step_type="ai_enhancement", result={})
    before = snap(wf)
    with pytest.raises(StaleReport):
        w.complete(wf, PIPELINE, wrong_type, T0 + 1, ids)
    assert snap(wf) == before

    # A completed earlier step's attempt reported again as another step is stale too.
    complete_step(wf, ids, T0 + 1, {"a": 1})
    old_id = attempt_of(wf.steps[0])
    before = snap(wf)
    with pytest.raises(StaleReport):
        w.complete(wf, PIPELINE, Report(wf.id, old_id, True, step_type="seo_generation"), T0, ids)
    assert snap(wf) == before


def test_a_report_with_an_unknown_step_id_is_stale(wf: Workflow, ids: Ids) -> None:
    before = snap(wf)
    with pytest.raises(StaleReport):
        w.complete(wf, PIPELINE, Report(wf.id, "nope", True, result={}), T0 + 1, ids)
    with pytest.raises(StaleReport):
        w.complete(wf, PIPELINE, Report(wf.id, "nope", False, error="x"), T0 + 1, ids)
    assert snap(wf) == before


def _finish(wf: Workflow, ids: Ids, status: str) -> Report:
    """Bring wf to `status`; return a report for its last attempt with the opposite outcome."""
    if status == w.COMPLETED:
        complete_step(wf, ids, T0 + 1, {"a": 1})
        complete_step(wf, ids, T0 + 2, {"b": 2})
        last = attempt_of(wf.step)
        complete_step(wf, ids, T0 + 3, {"c": 3})
        return Report(wf.id, last, False, error="late")
    if status == w.CANCELLED:
        current = ok(wf)
        w.cancel(wf, PIPELINE, T0 + 1, ids)
        return current
    to_failed(wf, ids)
    return Report(wf.id, attempt_of(wf.step), True, result={})


@pytest.mark.parametrize("status", [w.COMPLETED, w.CANCELLED, w.FAILED])
def test_a_report_for_a_finished_workflow_is_stale(wf: Workflow, ids: Ids, status: str) -> None:
    opposite = _finish(wf, ids, status)
    assert wf.status == status
    before = snap(wf)
    for report in (
        opposite,
        Report(wf.id, "unknown", True, result={}),
        Report(wf.id, attempt_of(wf.steps[0]), True, step_type="seo_generation"),
    ):
        with pytest.raises(StaleReport):
            w.complete(wf, PIPELINE, report, T0 + 500, ids)
    assert snap(wf) == before


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_a_running_workflow(wf: Workflow, ids: Ids) -> None:
    complete_step(wf, ids, T0 + 1, {"a": 1})
    current = ok(wf)
    changes, events = run(lambda wf_, p: w.cancel(wf_, p, T0 + 2, ids), wf)

    assert wf.status == w.CANCELLED
    assert wf.wake_at is None
    assert wf.steps[0].status == w.COMPLETED
    assert wf.steps[0].result == {"a": 1}
    assert [s.status for s in wf.steps[1:]] == [w.CANCELLED, w.CANCELLED]
    assert wf.steps[1].attempts[-1]["outcome"] == w.CANCELLED
    assert change_types(changes) == ["workflow_cancelled"]
    assert keys(events) == ["workflow.cancelled", CHANGE_ROUTING_KEY]
    assert events[0]["payload"]["status"] == w.CANCELLED

    before = snap(wf)
    with pytest.raises(StaleReport):
        w.complete(wf, PIPELINE, current, T0 + 3, ids)
    assert snap(wf) == before
    assert w.wake(wf, PIPELINE, T0 + 10_000, ids) == []
    assert snap(wf) == before


def test_cancel_while_a_retry_is_pending(wf: Workflow, ids: Ids) -> None:
    w.complete(wf, PIPELINE, bad(wf), T0 + 1, ids)
    assert wf.step.status == w.PENDING
    run(lambda wf_, p: w.cancel(wf_, p, T0 + 2, ids), wf)
    assert wf.status == w.CANCELLED
    assert all(s.status == w.CANCELLED for s in wf.steps)
    assert wf.step.retry_at is None
    assert w.wake(wf, PIPELINE, T0 + 100, ids) == []


@pytest.mark.parametrize("status", [w.COMPLETED, w.CANCELLED, w.FAILED])
def test_cancel_a_finished_workflow_is_not_allowed(wf: Workflow, ids: Ids, status: str) -> None:
    _finish(wf, ids, status)
    before = snap(wf)
    with pytest.raises(NotAllowed):
        w.cancel(wf, PIPELINE, T0 + 600, ids)
    assert snap(wf) == before


# -- retry -----------------------------------------------------------------------------------


def test_retry_of_a_failed_workflow_restarts_from_the_failed_step(wf: Workflow, ids: Ids) -> None:
    complete_step(wf, ids, T0 + 1, {"a": 1})
    failed_id = attempt_of(wf.step)
    w.complete(wf, PIPELINE, bad(wf), T0 + 2, ids)  # attempt 1 of 2, re-dispatched (no backoff)
    w.complete(wf, PIPELINE, bad(wf, "gave up"), T0 + 3, ids)
    assert wf.status == w.FAILED
    assert wf.current_step == 1

    changes, events = run(lambda wf_, p: w.retry(wf_, p, T0 + 10, ids), wf)

    assert wf.status == w.RUNNING
    assert wf.current_step == 1
    assert wf.steps[0].status == w.COMPLETED
    assert wf.steps[0].result == {"a": 1}
    step = wf.step
    assert step.status == w.DISPATCHED
    assert step.attempt == 1  # a fresh attempt budget
    assert step.error is None
    assert step.completed_at is None
    assert step.step_id != failed_id
    assert step.deadline == w.isoformat(T0 + 10 + 60)
    assert wf.wake_at == step.deadline
    assert wf.steps[2].status == w.PENDING
    assert change_types(changes) == ["step_dispatched"]
    assert keys(events) == ["step.ai_enhancement", CHANGE_ROUTING_KEY]
    assert events[0]["payload"]["results"] == {"image_processing": {"a": 1}}
    assert events[0]["payload"]["step_id"] == step.step_id

    # The restarted workflow runs to completion; old attempts stay stale.
    with pytest.raises(StaleReport):
        w.complete(wf, PIPELINE, Report(wf.id, failed_id, True, result={}), T0 + 11, ids)
    complete_step(wf, ids, T0 + 12, {"b": 2})
    complete_step(wf, ids, T0 + 13, {"c": 3})
    assert wf.status == w.COMPLETED


@pytest.mark.parametrize("status", [w.RUNNING, w.COMPLETED, w.CANCELLED])
def test_retry_is_only_allowed_for_a_failed_workflow(wf: Workflow, ids: Ids, status: str) -> None:
    if status != w.RUNNING:
        _finish(wf, ids, status)
    before = snap(wf)
    with pytest.raises(NotAllowed):
        w.retry(wf, PIPELINE, T0 + 600, ids)
    assert snap(wf) == before


# -- wake with nothing due -------------------------------------------------------------------


@pytest.mark.parametrize("status", [w.RUNNING, w.COMPLETED, w.CANCELLED, w.FAILED])
def test_wake_when_nothing_is_due_returns_no_changes_and_mutates_nothing(
    wf: Workflow, ids: Ids, status: str
) -> None:
    now = T0 + 1
    if status != w.RUNNING:
        _finish(wf, ids, status)
        now = T0 + 1_000_000
    before = snap(wf)
    assert w.wake(wf, PIPELINE, now, ids) == []
    assert snap(wf) == before


# -- the transition contract: version and workflow.changed ------------------------------------


def test_every_transition_bumps_version_by_one_and_emits_one_change_event(ids: Ids) -> None:
    wf, changes = w.start(PIPELINE, "user-1", PRODUCT, T0, ids)
    assert wf.version == 1
    assert keys(wf.outbox).count(CHANGE_ROUTING_KEY) == 1
    steps = [
        lambda wf_, p: w.complete(wf_, p, bad(wf_), T0 + 1, ids),  # retrying (pending)
        lambda wf_, p: w.wake(wf_, p, T0 + 3, ids),  # attempt 2 dispatched
        lambda wf_, p: w.wake(wf_, p, T0 + 33, ids),  # attempt 2 timed out
        lambda wf_, p: w.wake(wf_, p, T0 + 37, ids),  # attempt 3 dispatched
        lambda wf_, p: w.complete(wf_, p, ok(wf_), T0 + 38, ids),  # ai dispatched
        lambda wf_, p: w.complete(wf_, p, bad(wf_), T0 + 39, ids),  # ai retried at once
        lambda wf_, p: w.complete(wf_, p, bad(wf_), T0 + 40, ids),  # workflow failed
        lambda wf_, p: w.retry(wf_, p, T0 + 41, ids),  # ai restarted
        lambda wf_, p: w.complete(wf_, p, ok(wf_), T0 + 42, ids),  # seo dispatched
        lambda wf_, p: w.cancel(wf_, p, T0 + 43, ids),
    ]
    seen_types: set[str] = set(change_types(changes))
    for i, step in enumerate(steps, start=2):
        changes, events = run(step, wf)
        assert wf.version == i
        change = events[-1]["payload"]
        assert change["version"] == i
        assert change["changes"] == [c.to_doc() for c in changes]
        seen_types |= set(change_types(changes))
    assert wf.status == w.CANCELLED
    assert seen_types <= WS_CHANGE_TYPES
    assert seen_types == WS_CHANGE_TYPES - {"workflow_completed"}
    versions = [
        e["payload"]["version"] for e in wf.outbox if e["routing_key"] == CHANGE_ROUTING_KEY
    ]
    assert versions == list(range(1, wf.version + 1))
    assert len({e["message_id"] for e in wf.outbox}) == len(wf.outbox)


def test_change_event_payload_carries_owner_version_changes_and_the_public_workflow(
    wf: Workflow, ids: Ids
) -> None:
    _, events = run(lambda wf_, p: w.complete(wf_, p, ok(wf_, {"a": 1}), T0 + 1, ids), wf)
    change = events[-1]
    assert change["routing_key"] == CHANGE_ROUTING_KEY
    payload = change["payload"]
    assert payload["event"] == CHANGE_ROUTING_KEY
    assert payload["workflow_id"] == wf.id
    assert payload["occurred_at"] == w.isoformat(T0 + 1)
    assert payload["owner"] == "user-1"
    assert payload["version"] == wf.version == 2
    assert payload["changes"] == [
        {"type": "step_completed", "step": "image_processing"},
        {"type": "step_dispatched", "step": "ai_enhancement"},
    ]
    assert "outbox" not in payload["workflow"]
    assert payload["workflow"] == wf.public()
    assert payload["workflow"]["version"] == 2
    assert payload["workflow"]["updated_at"] == w.isoformat(T0 + 1)


def test_an_emitted_event_is_a_snapshot_later_transitions_do_not_rewrite(
    wf: Workflow, ids: Ids
) -> None:
    emitted = copy.deepcopy(wf.outbox)
    w.complete(wf, PIPELINE, bad(wf), T0 + 1, ids)
    w.wake(wf, PIPELINE, T0 + 3, ids)
    complete_step(wf, ids, T0 + 4, {"a": 1})
    assert wf.outbox[: len(emitted)] == emitted
    first_change = wf.outbox[len(emitted) - 1]["payload"]["workflow"]
    assert first_change["version"] == 1
    assert first_change["steps"][0]["attempts"] == []


def test_public_is_the_document_without_the_outbox_history_and_deliveries(wf: Workflow) -> None:
    doc = wf.to_doc()
    public = wf.public()
    for kept_in in ("outbox", "history", "history_dropped", "deliveries"):
        assert kept_in in doc
        del doc[kept_in]
    assert public == doc


def test_document_round_trip(wf: Workflow, ids: Ids) -> None:
    w.complete(wf, PIPELINE, bad(wf), T0 + 1, ids)
    doc = snap(wf)
    again = Workflow.from_doc(copy.deepcopy(doc))
    assert again.to_doc() == doc
    assert again == wf
    clone = wf.copy()
    w.wake(clone, PIPELINE, T0 + 100, ids)
    assert snap(wf) == doc  # copy() is deep


# -- outbox confirmation -----------------------------------------------------------------------


def test_drop_published_drops_exactly_the_given_ids_and_recomputes_outbox_at(
    wf: Workflow, ids: Ids
) -> None:
    complete_step(wf, ids, T0 + 10, {"a": 1})
    outbox = copy.deepcopy(wf.outbox)
    assert wf.outbox_at == w.isoformat(T0)
    first_batch = {e["message_id"] for e in outbox if e["created_at"] == w.isoformat(T0)}
    wf_state = snap(wf)

    assert w.drop_published(wf, first_batch) is True
    assert wf.outbox == [e for e in outbox if e["message_id"] not in first_batch]
    assert wf.outbox_at == w.isoformat(T0 + 10)
    after = snap(wf)
    # not a transition: the version and everything but the outbox stay as they were
    for key in ("status", "steps", "current_step", "product", "wake_at", "owner"):
        assert after[key] == wf_state[key]
    assert (after["version"], after["updated_at"]) == (wf_state["version"], wf_state["updated_at"])

    # Unknown or already dropped ids: False, nothing changes.
    before = snap(wf)
    assert w.drop_published(wf, first_batch | {"unknown"}) is False
    assert snap(wf) == before

    # Dropping one from the middle keeps order and the oldest timestamp.
    middle = wf.outbox[0]["message_id"]
    rest = wf.outbox[1:]
    assert w.drop_published(wf, {middle}) is True
    assert wf.outbox == rest
    assert wf.outbox_at == rest[0]["created_at"]

    assert w.drop_published(wf, {e["message_id"] for e in rest}) is True
    assert wf.outbox == []
    assert wf.outbox_at is None
    assert wf.version == wf_state["version"]


def test_outbox_at_is_the_oldest_unconfirmed_event(wf: Workflow, ids: Ids) -> None:
    w.drop_published(wf, {e["message_id"] for e in wf.outbox})
    assert wf.outbox_at is None
    complete_step(wf, ids, T0 + 5, {"a": 1})
    assert wf.outbox_at == w.isoformat(T0 + 5)
    complete_step(wf, ids, T0 + 6, {"b": 2})
    assert wf.outbox_at == w.isoformat(T0 + 5)


# -- timestamps ------------------------------------------------------------------------------


def test_isoformat_is_fixed_width_utc_and_sorts_in_time_order() -> None:
    stamps = [w.isoformat(t) for t in (T0, T0 + 0.5, T0 + 9, T0 + 10, T0 + 86_400 * 400)]
    assert len({len(s) for s in stamps}) == 1
    assert all(s.endswith("Z") for s in stamps)
    assert stamps == sorted(stamps)
    assert w.isoformat(0) == "1970-01-01T00:00:00.000000Z"


def test_new_ids_are_random_uuid4_hex() -> None:
    made = [new_id() for _ in range(1000)]
    assert len(set(made)) == 1000
    for value in made[:50]:
        parsed = uuid.UUID(value)
        assert (parsed.version, parsed.variant, parsed.hex) == (4, uuid.RFC_4122, value)


def test_isoformat_rounds_like_datetime_and_keeps_its_width() -> None:
    for ts in (0.0, 0.0000004, 0.0000005, 1_767_225_600.9999996, 253_402_300_799.0):
        dt = datetime.fromtimestamp(ts, UTC)
        assert w.isoformat(ts) == dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert len(w.isoformat(ts)) == 27


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_isoformat_is_what_datetime_makes_of_the_timestamp(ts: float) -> None:
    from datetime import UTC, datetime

    expected = datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")[:-6] + "Z"
    assert w.isoformat(ts) == expected
    assert w.isoformat(ts) == expected  # the kept second gives the same


def test_isoformat_carries_rounded_microseconds_into_the_next_second() -> None:
    assert w.isoformat(1_767_225_599.9999996) == "2026-01-01T00:00:00.000000Z"
    assert w.isoformat(1_767_225_599.5) == "2025-12-31T23:59:59.500000Z"
