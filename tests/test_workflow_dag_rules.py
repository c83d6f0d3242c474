"""One test per rule of pipelines as DAGs and of review steps, against the pure domain in
stox.workflow (docs/architecture.md#the-workflow-model).

Every transition mutates the Workflow in place, so "nothing changed" is checked by comparing a
deep copy of `to_doc()` taken before the call with the document after it.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from support import PRODUCT

from stox import workflow as w
from stox.workflow import (
    CHANGE_ROUTING_KEY,
    REVIEW,
    DuplicateReport,
    InvalidPipeline,
    NotAllowed,
    Pipeline,
    Report,
    Review,
    StaleReport,
    Step,
    StepSpec,
    Workflow,
)

T0 = 1_700_000_000.0
URL = "http://gateway.test/api/v1/workflow/step-completed"

# image, then text and tags side by side (text tried twice, tags once), then a page from both
DIAMOND = Pipeline(
    steps=(
        StepSpec("image", after=(), timeout=30, max_attempts=1),
        StepSpec("text", after=("image",), timeout=30, max_attempts=2, backoff=0),
        StepSpec("tags", after=("image",), timeout=30, max_attempts=1),
        StepSpec("page", after=("text", "tags"), timeout=30),
    ),
    completion_url=URL,
    name="diamond",
)
# two steps that depend on nothing, and a third that waits for the first only
PARALLEL = Pipeline(
    steps=(
        StepSpec("a", after=(), max_attempts=1),
        StepSpec("b", after=(), max_attempts=1),
        StepSpec("c", after=("a",), max_attempts=1),
    ),
    completion_url=URL,
    name="parallel",
)


def reviewed(
    on_reject: str = "fail", on_deadline: str = "fail", timeout: float | None = None
) -> Pipeline:
    """draft, then edit, then a person's review of both, then publish."""
    return Pipeline(
        steps=(
            StepSpec("draft", timeout=30),
            StepSpec("edit", timeout=30),
            StepSpec(
                "check",
                kind=REVIEW,
                on_reject=on_reject,
                on_deadline=on_deadline,
                timeout=timeout,
            ),
            StepSpec("publish", timeout=30),
        ),
        completion_url=URL,
        name="reviewed",
    )


class Ids:
    """Deterministic id factory: id-0001, id-0002, ..."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"id-{self.n:04d}"


@pytest.fixture
def ids() -> Ids:
    return Ids()


def snap(wf: Workflow) -> dict[str, Any]:
    return copy.deepcopy(wf.to_doc())


def keys(events: list[dict[str, Any]]) -> list[str]:
    return [e["routing_key"] for e in events]


def types(changes: list[w.Change]) -> list[str]:
    return [c.type for c in changes]


def step(wf: Workflow, name: str) -> Step:
    found = wf.named(name)
    assert found is not None, name
    return found


def attempt(wf: Workflow, name: str) -> str:
    step_id = step(wf, name).step_id
    assert step_id is not None, f"{name} has not begun"
    return step_id


def dispatches(wf: Workflow, pipeline: Pipeline, since: int = 0) -> list[dict[str, Any]]:
    routing = {s.routing_key for s in pipeline.steps if s.kind == w.SERVICE}
    return [e["payload"] for e in wf.outbox[since:] if e["routing_key"] in routing]


def succeed(
    wf: Workflow, pipeline: Pipeline, name: str, result: dict[str, Any], now: float, ids: Ids
) -> list[w.Change]:
    report = Report(wf.id, attempt(wf, name), True, step_type=name, result=result)
    return w.complete(wf, pipeline, report, now, ids)


def fail(wf: Workflow, pipeline: Pipeline, name: str, now: float, ids: Ids) -> list[w.Change]:
    report = Report(wf.id, attempt(wf, name), False, step_type=name, error="boom")
    return w.complete(wf, pipeline, report, now, ids)


def decide(
    wf: Workflow,
    pipeline: Pipeline,
    decision: str,
    now: float,
    ids: Ids,
    result: dict[str, Any] | None = None,
    reason: str | None = None,
) -> list[w.Change]:
    review = Review(wf.id, attempt(wf, "check"), decision, "ann", result=result, reason=reason)
    return w.review(wf, pipeline, review, now, ids)


def to_review(pipeline: Pipeline, ids: Ids) -> Workflow:
    """A workflow of `reviewed(...)` whose review is waiting."""
    wf, _ = w.start(pipeline, "user-1", copy.deepcopy(PRODUCT), T0, ids)
    succeed(wf, pipeline, "draft", {"text": "v1"}, T0 + 1, ids)
    succeed(wf, pipeline, "edit", {"text": "v1 edited"}, T0 + 2, ids)
    assert step(wf, "check").status == w.WAITING
    return wf


# -- DAGs ------------------------------------------------------------------------------------


def test_independent_steps_start_in_parallel(ids: Ids) -> None:
    wf, changes = w.start(PARALLEL, "user-1", PRODUCT, T0, ids)

    assert [(s.name, s.status) for s in wf.steps] == [
        ("a", w.DISPATCHED),
        ("b", w.DISPATCHED),
        ("c", w.PENDING),
    ]
    assert types(changes) == ["step_dispatched", "step_dispatched"]
    assert [c.step for c in changes] == ["a", "b"]
    assert keys(wf.outbox) == ["workflow.start", "step.a", "step.b", CHANGE_ROUTING_KEY]
    assert [p["results"] for p in dispatches(wf, PARALLEL)] == [{}, {}]
    assert wf.wake_at == step(wf, "a").deadline == step(wf, "b").deadline


def test_a_step_begins_when_its_own_deps_complete_while_others_still_run(ids: Ids) -> None:
    wf, _ = w.start(PARALLEL, "user-1", PRODUCT, T0, ids)
    changes = succeed(wf, PARALLEL, "a", {"x": 1}, T0 + 1, ids)

    assert types(changes) == ["step_completed", "step_dispatched"]
    assert step(wf, "b").status == w.DISPATCHED
    assert step(wf, "c").status == w.DISPATCHED
    assert dispatches(wf, PARALLEL)[-1]["results"] == {"a": {"x": 1}}
    assert wf.current_step == 1  # b, the first step not completed


def test_fan_in_waits_for_all_its_deps(ids: Ids) -> None:
    wf, _ = w.start(DIAMOND, "user-1", PRODUCT, T0, ids)
    succeed(wf, DIAMOND, "image", {"img": 1}, T0 + 1, ids)
    assert step(wf, "text").status == step(wf, "tags").status == w.DISPATCHED

    changes = succeed(wf, DIAMOND, "text", {"txt": 2}, T0 + 2, ids)
    assert types(changes) == ["step_completed"]
    assert step(wf, "page").status == w.PENDING

    changes = succeed(wf, DIAMOND, "tags", {"tag": 3}, T0 + 3, ids)
    assert types(changes) == ["step_completed", "step_dispatched"]
    assert step(wf, "page").status == w.DISPATCHED

    changes = succeed(wf, DIAMOND, "page", {"html": 4}, T0 + 4, ids)
    assert types(changes) == ["step_completed", "workflow_completed"]
    assert wf.status == w.COMPLETED
    assert wf.outbox[-2]["payload"]["results"] == {
        "image": {"img": 1},
        "text": {"txt": 2},
        "tags": {"tag": 3},
        "page": {"html": 4},
    }


def test_a_dispatch_carries_the_results_of_its_transitive_deps_only(ids: Ids) -> None:
    pipeline = Pipeline(
        steps=(
            StepSpec("a", after=()),
            StepSpec("b", after=("a",)),
            StepSpec("side", after=()),
            StepSpec("c", after=("b",)),
        ),
        name="chain-and-side",
    )
    wf, _ = w.start(pipeline, "user-1", PRODUCT, T0, ids)
    succeed(wf, pipeline, "side", {"s": 0}, T0 + 1, ids)
    succeed(wf, pipeline, "a", {"a": 1}, T0 + 2, ids)
    assert dispatches(wf, pipeline)[-1]["step_type"] == "b"
    assert dispatches(wf, pipeline)[-1]["results"] == {"a": {"a": 1}}

    succeed(wf, pipeline, "b", {"b": 2}, T0 + 3, ids)
    payload = dispatches(wf, pipeline)[-1]
    assert payload["step_type"] == "c"
    assert payload["results"] == {"a": {"a": 1}, "b": {"b": 2}}  # not side's


def test_last_failure_fails_the_workflow_and_cancels_running_siblings(ids: Ids) -> None:
    wf, _ = w.start(DIAMOND, "user-1", PRODUCT, T0, ids)
    succeed(wf, DIAMOND, "image", {"img": 1}, T0 + 1, ids)
    text_id = attempt(wf, "text")

    changes = fail(wf, DIAMOND, "tags", T0 + 2, ids)  # tags has a single attempt

    assert types(changes) == ["step_failed", "workflow_failed"]
    assert wf.status == w.FAILED
    assert step(wf, "tags").status == w.FAILED
    text = step(wf, "text")
    assert text.status == w.CANCELLED
    assert text.attempts[-1]["step_id"] == text_id
    assert text.attempts[-1]["outcome"] == w.CANCELLED
    assert step(wf, "page").status == w.PENDING
    assert wf.wake_at is None
    assert wf.outbox[-2]["payload"]["error"] == {"step": "tags", "message": "boom"}

    before = snap(wf)
    for success in (True, False):
        late = Report(wf.id, text_id, success, step_type="text", result={})
        with pytest.raises(StaleReport):
            w.complete(wf, DIAMOND, late, T0 + 3, ids)
    assert snap(wf) == before


def test_a_failure_with_a_retry_waiting_cancels_the_retry(ids: Ids) -> None:
    pipeline = Pipeline(
        steps=(
            StepSpec("a", after=(), max_attempts=2, backoff=5),
            StepSpec("b", after=(), max_attempts=1),
        ),
        name="retrying",
    )
    wf, _ = w.start(pipeline, "user-1", PRODUCT, T0, ids)
    fail(wf, pipeline, "a", T0 + 1, ids)
    assert step(wf, "a").status == w.PENDING and step(wf, "a").retry_at is not None

    fail(wf, pipeline, "b", T0 + 2, ids)

    assert wf.status == w.FAILED
    assert step(wf, "a").status == w.CANCELLED
    assert step(wf, "a").retry_at is None


def test_retry_restarts_failed_and_cancelled_steps_only(ids: Ids) -> None:
    wf, _ = w.start(DIAMOND, "user-1", PRODUCT, T0, ids)
    succeed(wf, DIAMOND, "image", {"img": 1}, T0 + 1, ids)
    fail(wf, DIAMOND, "tags", T0 + 2, ids)
    image = step(wf, "image").to_doc()
    n = len(wf.outbox)

    changes = w.retry(wf, DIAMOND, T0 + 10, ids)

    assert wf.status == w.RUNNING
    assert step(wf, "image").to_doc() == image  # completed: its result kept
    for name in ("text", "tags"):
        assert step(wf, name).status == w.DISPATCHED
        assert step(wf, name).attempt == 1
    assert step(wf, "page").status == w.PENDING
    assert types(changes) == ["step_dispatched", "step_dispatched"]
    sent = dispatches(wf, DIAMOND, n)
    assert [p["step_type"] for p in sent] == ["text", "tags"]  # no new dispatch of image
    assert all(p["results"] == {"image": {"img": 1}} for p in sent)


def test_cancel_a_partly_parallel_workflow(ids: Ids) -> None:
    wf, _ = w.start(DIAMOND, "user-1", PRODUCT, T0, ids)
    succeed(wf, DIAMOND, "image", {"img": 1}, T0 + 1, ids)
    succeed(wf, DIAMOND, "text", {"txt": 2}, T0 + 2, ids)
    tags_id = attempt(wf, "tags")

    changes = w.cancel(wf, DIAMOND, T0 + 3, ids)

    assert types(changes) == ["workflow_cancelled"]
    assert wf.status == w.CANCELLED
    assert [(s.name, s.status) for s in wf.steps] == [
        ("image", w.COMPLETED),
        ("text", w.COMPLETED),
        ("tags", w.CANCELLED),
        ("page", w.CANCELLED),
    ]
    assert step(wf, "tags").attempts[-1] == {
        "step_id": tags_id,
        "attempt": 1,
        "outcome": w.CANCELLED,
        "error": None,
        "dispatched_at": w.isoformat(T0 + 1),
    }
    assert wf.wake_at is None
    with pytest.raises(StaleReport):
        w.complete(wf, DIAMOND, Report(wf.id, tags_id, True, result={}), T0 + 4, ids)


def test_wake_fires_every_due_timer_in_one_transition(ids: Ids) -> None:
    pipeline = Pipeline(
        steps=(
            StepSpec("a", after=(), timeout=5, max_attempts=2, backoff=0),
            StepSpec("b", after=(), timeout=5, max_attempts=2, backoff=0),
        ),
        name="timers",
    )
    wf, _ = w.start(pipeline, "user-1", PRODUCT, T0, ids)
    changes = w.wake(wf, pipeline, T0 + 6, ids)

    assert types(changes) == [
        "step_retrying",
        "step_dispatched",
        "step_retrying",
        "step_dispatched",
    ]
    assert [(s.attempt, s.status) for s in wf.steps] == [(2, w.DISPATCHED), (2, w.DISPATCHED)]
    assert wf.version == 2
    assert wf.wake_at == w.isoformat(T0 + 11)


# -- review steps ----------------------------------------------------------------------------


def test_a_review_step_waits_without_a_dispatch(ids: Ids) -> None:
    pipeline = reviewed()
    wf, _ = w.start(pipeline, "user-1", PRODUCT, T0, ids)
    succeed(wf, pipeline, "draft", {"text": "v1"}, T0 + 1, ids)
    n = len(wf.outbox)

    changes = succeed(wf, pipeline, "edit", {"text": "v2"}, T0 + 2, ids)

    check = step(wf, "check")
    assert types(changes) == ["step_completed", "step_waiting_review"]
    assert changes[-1].step == "check"
    assert check.status == w.WAITING
    assert check.step_id not in (None, attempt(wf, "edit"))
    assert check.attempt == 1
    assert check.dispatched_at == w.isoformat(T0 + 2)
    assert check.deadline is None  # a review has no timeout unless it says
    assert keys(wf.outbox[n:]) == [CHANGE_ROUTING_KEY]
    assert wf.wake_at is None
    assert wf.status == w.RUNNING
    assert wf.current_step == 2


def test_approve_with_edits_makes_them_the_result(ids: Ids) -> None:
    pipeline = reviewed()
    wf = to_review(pipeline, ids)
    check_id = attempt(wf, "check")

    changes = decide(wf, pipeline, "approve", T0 + 5, ids, result={"text": "v1 by ann"})

    check = step(wf, "check")
    assert types(changes) == ["step_reviewed", "step_dispatched"]
    assert check.status == w.COMPLETED
    assert check.result == {"text": "v1 by ann"}
    assert check.review == {
        "decision": "approved",
        "by": "ann",
        "at": w.isoformat(T0 + 5),
        "reason": None,
    }
    assert check.attempts[-1]["step_id"] == check_id
    assert check.attempts[-1]["outcome"] == w.COMPLETED
    assert check.attempts[-1]["by"] == "ann"
    payload = dispatches(wf, pipeline)[-1]
    assert payload["step_type"] == "publish"
    assert payload["results"]["check"] == {"text": "v1 by ann"}


def test_approve_without_edits_makes_an_empty_result(ids: Ids) -> None:
    pipeline = reviewed()
    wf = to_review(pipeline, ids)
    decide(wf, pipeline, "approve", T0 + 5, ids)
    assert step(wf, "check").result == {}


def test_reject_with_on_reject_fail_fails_the_workflow_with_the_reason(ids: Ids) -> None:
    pipeline = reviewed()
    wf = to_review(pipeline, ids)

    changes = decide(wf, pipeline, "reject", T0 + 5, ids, reason="off-brand")

    check = step(wf, "check")
    assert types(changes) == ["step_reviewed", "step_failed", "workflow_failed"]
    assert wf.status == w.FAILED
    assert check.status == w.FAILED
    assert check.error == "rejected in review: off-brand"
    assert check.review is not None and check.review["reason"] == "off-brand"
    assert check.attempts[-1]["outcome"] == w.REJECTED
    assert wf.outbox[-2]["payload"]["error"] == {
        "step": "check",
        "message": "rejected in review: off-brand",
    }


def test_reject_with_on_reject_upstream_runs_it_and_the_steps_between_again(ids: Ids) -> None:
    pipeline = reviewed(on_reject="draft")
    wf = to_review(pipeline, ids)
    n = len(wf.outbox)

    changes = decide(wf, pipeline, "reject", T0 + 5, ids, reason="too long")

    assert wf.status == w.RUNNING
    assert types(changes) == ["step_reviewed", "step_dispatched"]
    draft, edit, check = step(wf, "draft"), step(wf, "edit"), step(wf, "check")
    assert draft.status == w.DISPATCHED and draft.attempt == 1
    assert edit.status == w.PENDING and edit.attempt == 0 and edit.result is None
    assert check.status == w.PENDING and check.attempt == 0
    assert check.attempts[-1]["outcome"] == w.REJECTED
    assert [p["step_type"] for p in dispatches(wf, pipeline, n)] == ["draft"]
    assert dispatches(wf, pipeline, n)[0]["results"] == {}

    succeed(wf, pipeline, "draft", {"text": "v2"}, T0 + 6, ids)
    assert dispatches(wf, pipeline)[-1]["results"] == {"draft": {"text": "v2"}}
    changes = succeed(wf, pipeline, "edit", {"text": "v2 edited"}, T0 + 7, ids)
    assert types(changes) == ["step_completed", "step_waiting_review"]
    assert step(wf, "check").status == w.WAITING
    assert step(wf, "check").review is None
    decide(wf, pipeline, "approve", T0 + 8, ids)
    assert step(wf, "publish").status == w.DISPATCHED


def test_reject_running_a_step_again_stops_every_step_that_used_its_result(ids: Ids) -> None:
    pipeline = Pipeline(
        steps=(
            StepSpec("draft", after=()),
            StepSpec("translate", after=("draft",)),
            StepSpec("check", kind=REVIEW, after=("draft",), on_reject="draft"),
        ),
        name="review-beside-a-sibling",
    )
    wf, _ = w.start(pipeline, "user-1", PRODUCT, T0, ids)
    succeed(wf, pipeline, "draft", {"text": "v1"}, T0 + 1, ids)
    translate_id = attempt(wf, "translate")
    review = Review(wf.id, attempt(wf, "check"), "reject", "ann", reason="no")

    w.review(wf, pipeline, review, T0 + 2, ids)

    translate = step(wf, "translate")
    assert step(wf, "draft").status == w.DISPATCHED
    assert translate.status == w.PENDING and translate.attempt == 0
    assert translate.attempts[-1]["step_id"] == translate_id
    assert translate.attempts[-1]["outcome"] == w.CANCELLED
    with pytest.raises(StaleReport):
        late = Report(wf.id, translate_id, True, step_type="translate", result={})
        w.complete(wf, pipeline, late, T0 + 3, ids)


def test_the_same_review_again_is_a_duplicate_and_changes_nothing(ids: Ids) -> None:
    pipeline = reviewed(on_reject="draft")
    wf = to_review(pipeline, ids)
    review = Review(wf.id, attempt(wf, "check"), "reject", "ann", reason="no")
    w.review(wf, pipeline, review, T0 + 5, ids)
    before = snap(wf)

    with pytest.raises(DuplicateReport):
        w.review(wf, pipeline, review, T0 + 6, ids)
    with pytest.raises(NotAllowed):  # the other decision on that attempt
        w.review(wf, pipeline, Review(wf.id, review.step_id, "approve", "bob"), T0 + 6, ids)
    assert snap(wf) == before


def test_an_approved_review_again_is_a_duplicate(ids: Ids) -> None:
    pipeline = reviewed()
    wf = to_review(pipeline, ids)
    review = Review(wf.id, attempt(wf, "check"), "approve", "ann")
    w.review(wf, pipeline, review, T0 + 5, ids)
    before = snap(wf)
    with pytest.raises(DuplicateReport):
        w.review(wf, pipeline, review, T0 + 6, ids)
    assert snap(wf) == before


def test_a_review_of_a_service_step_is_not_allowed(ids: Ids) -> None:
    pipeline = reviewed()
    wf, _ = w.start(pipeline, "user-1", PRODUCT, T0, ids)
    before = snap(wf)
    with pytest.raises(NotAllowed):
        w.review(wf, pipeline, Review(wf.id, attempt(wf, "draft"), "approve", "ann"), T0, ids)
    assert snap(wf) == before


def test_a_review_with_an_unknown_step_id_is_not_allowed(ids: Ids) -> None:
    pipeline = reviewed()
    wf = to_review(pipeline, ids)
    before = snap(wf)
    with pytest.raises(NotAllowed):
        w.review(wf, pipeline, Review(wf.id, "no-such-id", "approve", "ann"), T0 + 5, ids)
    assert snap(wf) == before


def test_a_review_of_a_finished_workflow_is_not_allowed(ids: Ids) -> None:
    pipeline = reviewed()
    wf = to_review(pipeline, ids)
    check_id = attempt(wf, "check")
    w.cancel(wf, pipeline, T0 + 5, ids)
    before = snap(wf)
    for decision in ("approve", "reject"):
        with pytest.raises(NotAllowed):
            w.review(wf, pipeline, Review(wf.id, check_id, decision, "ann"), T0 + 6, ids)
    assert snap(wf) == before


def test_a_review_past_its_deadline_fails_the_workflow(ids: Ids) -> None:
    pipeline = reviewed(timeout=60)
    wf = to_review(pipeline, ids)
    check_id = attempt(wf, "check")
    assert wf.wake_at == step(wf, "check").deadline == w.isoformat(T0 + 2 + 60)

    assert w.wake(wf, pipeline, T0 + 61, ids) == []
    changes = w.wake(wf, pipeline, T0 + 62, ids)

    check = step(wf, "check")
    assert types(changes) == ["step_failed", "workflow_failed"]
    assert wf.status == w.FAILED
    assert check.status == w.FAILED
    assert check.error == "no review within 60s"
    assert check.attempts[-1]["outcome"] == w.TIMED_OUT
    with pytest.raises(NotAllowed):
        w.review(wf, pipeline, Review(wf.id, check_id, "approve", "ann"), T0 + 63, ids)


def test_a_review_past_its_deadline_escalates_and_keeps_waiting(ids: Ids) -> None:
    pipeline = reviewed(on_deadline="escalate", timeout=60)
    wf = to_review(pipeline, ids)

    changes = w.wake(wf, pipeline, T0 + 62, ids)

    check = step(wf, "check")
    assert types(changes) == ["step_review_escalated"]
    assert wf.status == w.RUNNING
    assert check.status == w.WAITING
    assert check.deadline is None
    assert check.review == {"escalated_at": w.isoformat(T0 + 62)}
    assert wf.wake_at is None
    assert w.wake(wf, pipeline, T0 + 1000, ids) == []

    decide(wf, pipeline, "approve", T0 + 2000, ids)
    assert check.review == {
        "decision": "approved",
        "by": "ann",
        "at": w.isoformat(T0 + 2000),
        "reason": None,
        "escalated_at": w.isoformat(T0 + 62),
    }


@pytest.mark.parametrize("decided", [None, "approve", "reject"])
@pytest.mark.parametrize("success", [True, False])
def test_a_service_report_naming_a_reviews_step_id_is_stale(
    ids: Ids, decided: str | None, success: bool
) -> None:
    pipeline = reviewed(on_reject="draft")
    wf = to_review(pipeline, ids)
    check_id = attempt(wf, "check")
    if decided is not None:
        decide(wf, pipeline, decided, T0 + 5, ids)
    before = snap(wf)
    for step_type in (None, "check"):
        report = Report(wf.id, check_id, success, step_type=step_type, result={})
        with pytest.raises(StaleReport):
            w.complete(wf, pipeline, report, T0 + 6, ids)
    assert snap(wf) == before


# -- pipelines as data -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ((), "at least one step"),
        ((StepSpec("a"), StepSpec("a")), "step 'a' appears twice"),
        ((StepSpec("a", after=("nope",)),), "step 'a': after names unknown step 'nope'"),
        ((StepSpec("a", after=("a",)),), "step 'a': after names itself"),
        (
            (StepSpec("a", after=("b",)), StepSpec("b", after=("a",))),
            "cycle: a -> b -> a",
        ),
        ((StepSpec("a", on_reject="b"),), "step 'a': on_reject and on_deadline are for review"),
        ((StepSpec("a", on_deadline="escalate"),), "step 'a': on_reject and on_deadline"),
        (
            (StepSpec("a", after=()), StepSpec("r", kind=REVIEW, after=(), on_reject="a")),
            "step 'r': on_reject must be fail or a step it comes after, not 'a'",
        ),
        (
            (StepSpec("a"), StepSpec("r", kind=REVIEW, on_reject="nope")),
            "step 'r': on_reject must be fail or a step it comes after, not 'nope'",
        ),
        ((StepSpec("r", kind=REVIEW, on_deadline="later"),), "step 'r': on_deadline must be"),
        ((StepSpec("a", kind="robot"),), "step 'a': kind must be one of service, review"),
        ((StepSpec("a", timeout=0),), "step 'a': timeout must be positive"),
    ],
)
def test_an_invalid_pipeline_is_refused_with_a_message_naming_the_step(
    steps: tuple[StepSpec, ...], message: str
) -> None:
    with pytest.raises(InvalidPipeline, match=message):
        Pipeline(steps=steps)


def test_a_sequence_without_after_runs_one_step_after_another(ids: Ids) -> None:
    names = ("image_processing", "ai_enhancement", "seo_generation")
    pipeline = Pipeline(steps=tuple(StepSpec(n) for n in names), completion_url=URL)
    assert pipeline.deps == {
        "image_processing": (),
        "ai_enhancement": ("image_processing",),
        "seo_generation": ("ai_enhancement",),
    }
    wf, changes = w.start(pipeline, "user-1", PRODUCT, T0, ids)
    assert types(changes) == ["step_dispatched"]
    results: dict[str, Any] = {}
    for i, name in enumerate(names):
        assert wf.current_step == i
        assert [s.status for s in wf.steps] == (
            [w.COMPLETED] * i + [w.DISPATCHED] + [w.PENDING] * (len(names) - i - 1)
        )
        assert dispatches(wf, pipeline)[-1]["results"] == results
        changes = succeed(wf, pipeline, name, {"n": i}, T0 + i + 1, ids)
        results[name] = {"n": i}
        last = i == len(names) - 1
        assert types(changes) == (
            ["step_completed", "workflow_completed"]
            if last
            else ["step_completed", "step_dispatched"]
        )
    assert wf.status == w.COMPLETED
    assert wf.current_step == len(names) - 1


def test_a_steps_after_overrides_the_sequence_for_every_step() -> None:
    pipeline = Pipeline(steps=(StepSpec("a"), StepSpec("b"), StepSpec("c", after=("a",))))
    assert pipeline.deps == {"a": (), "b": (), "c": ("a",)}
    assert pipeline.upstream == {"a": frozenset(), "b": frozenset(), "c": frozenset({"a"})}


def test_version_changes_with_a_step_definition_and_is_equal_for_equal_ones() -> None:
    base = Pipeline(steps=(StepSpec("a", timeout=5), StepSpec("b", after=("a",))), name="p")
    same = Pipeline(
        steps=(StepSpec("a", timeout=5), StepSpec("b", after=["a"])),  # type: ignore[arg-type]
        completion_url=URL,  # where replies go is not part of the definition
        name="p",
    )
    assert base.version == same.version
    assert len(base.version) == 12
    changed = [
        Pipeline(steps=(StepSpec("a", timeout=6), StepSpec("b", after=("a",))), name="p"),
        Pipeline(steps=(StepSpec("a", timeout=5), StepSpec("b", after=())), name="p"),
        Pipeline(steps=(StepSpec("a", timeout=5), StepSpec("b", kind=REVIEW)), name="p"),
        Pipeline(steps=(StepSpec("a", timeout=5, max_attempts=4), StepSpec("b")), name="p"),
        Pipeline(steps=(StepSpec("a", timeout=5), StepSpec("b", after=("a",))), name="q"),
    ]
    assert len({base.version, *(p.version for p in changed)}) == len(changed) + 1


def test_definition_round_trips_through_from_definition(ids: Ids) -> None:
    pipeline = Pipeline(
        steps=(
            StepSpec("a", after=(), timeout=5, max_attempts=2, backoff=0.5),
            StepSpec("b", after=("a",), routing_key="jobs.b"),
            StepSpec("r", kind=REVIEW, after=("b",), on_reject="a", on_deadline="escalate"),
        ),
        completion_url=URL,
        name="round-trip",
    )
    doc = pipeline.definition()
    assert doc["version"] == pipeline.version
    again = Pipeline.from_definition(copy.deepcopy(doc), URL)
    assert again == pipeline
    assert again.version == pipeline.version
    assert again.deps == pipeline.deps
    assert again.definition() == doc

    wf, _ = w.start(pipeline, "user-1", PRODUCT, T0, ids)
    assert wf.pipeline == doc
    stored = Workflow.from_doc(copy.deepcopy(wf.to_doc()))
    assert stored.pipeline is not None
    assert Pipeline.from_definition(stored.pipeline).version == pipeline.version


def test_whole_and_decimal_numbers_of_seconds_make_one_version() -> None:
    whole = w.Pipeline((w.StepSpec("a", timeout=5, backoff=2),))
    decimal = w.Pipeline((w.StepSpec("a", timeout=5.0, backoff=2.0),))
    assert whole.version == decimal.version
    assert whole.definition() == decimal.definition()
