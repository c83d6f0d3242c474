"""The workflow, step and report families, counted from the orchestrator's transitions (an
`Observer`, stox/observe.py): what changed, and the workflow's state after it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from stox import observe
from stox.metrics import Metrics
from stox.metrics.families import Buckets, Count
from stox.workflow import (
    CANCELLED,
    COMPLETED,
    DEFAULT_PIPELINE,
    FAILED,
    TIMED_OUT,
    Change,
    Pipeline,
    Report,
    Step,
    Workflow,
    epoch,
)


class _StepCounts:
    """One step's children, looked up once."""

    __slots__ = (
        "completed",
        "completions",
        "dispatches",
        "duplicate",
        "failed",
        "failures",
        "retries",
        "stale",
        "timeouts",
    )

    def __init__(self, metrics: Metrics, step: str) -> None:
        self.duplicate: Count = metrics.reports_duplicate.labels(step)
        self.stale: Count = metrics.reports_stale.labels(step)
        if not step:  # a report's without a known step: only those two
            return
        self.dispatches: Count = metrics.step_dispatches.labels(step)
        self.completions: Count = metrics.step_completions.labels(step)
        self.failures: Count = metrics.step_failures.labels(step)
        self.timeouts: Count = metrics.step_timeouts.labels(step)
        self.retries: Count = metrics.step_retries.labels(step)
        self.completed: Buckets = metrics.step_duration.labels(step, COMPLETED)
        self.failed: Buckets = metrics.step_duration.labels(step, FAILED)


class _Finished:
    __slots__ = ("count", "duration")

    def __init__(self, count: Count, duration: Buckets) -> None:
        self.count, self.duration = count, duration


class _PipelineCounts:
    """One pipeline's children, looked up once."""

    __slots__ = ("finished", "retried", "started")

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.started = metrics.workflows_started.labels(name)
        self.retried = metrics.workflows_retried.labels(name)
        duration = metrics.workflow_duration
        self.finished = {
            f"workflow_{status}": _Finished(count.labels(name), duration.labels(name, status))
            for status, count in (
                (COMPLETED, metrics.workflows_completed),
                (FAILED, metrics.workflows_failed),
                (CANCELLED, metrics.workflows_cancelled),
            )
        }


class WorkflowMetrics:
    """Counts each committed transition of the workflows of `pipelines`, by the name of the
    pipeline each runs on (a workflow stored without one: `default`).

    A refused report is counted under its step only when that is a step known here (one of
    the pipelines', or of a transition seen): under "" otherwise, so that what a service
    writes in `step_type` cannot make new series without bound. Pipeline names come from
    the settings and the definitions workflows stored, so they are bounded too.
    """

    def __init__(self, metrics: Metrics, pipelines: Iterable[Pipeline]) -> None:
        self.metrics = metrics
        self._steps: dict[str, _StepCounts] = {}
        self._pipelines: dict[str, _PipelineCounts] = {}
        self.step("")
        for pipeline in pipelines:
            self.pipeline(pipeline.name)
            for spec in pipeline.steps:
                self.step(spec.name)

    def step(self, name: str) -> _StepCounts:
        counts = self._steps.get(name)
        if counts is None:
            counts = self._steps[name] = _StepCounts(self.metrics, name)
        return counts

    def pipeline(self, name: str) -> _PipelineCounts:
        counts = self._pipelines.get(name)
        if counts is None:
            counts = self._pipelines[name] = _PipelineCounts(self.metrics, name)
        return counts

    def transitioned(self, workflow: Workflow, changes: Sequence[Change], cause: str) -> None:
        definition = workflow.pipeline
        pipeline = self.pipeline(DEFAULT_PIPELINE if definition is None else definition["name"])
        if cause == observe.UPLOAD:
            pipeline.started.inc()
        elif cause == observe.RETRY:
            pipeline.retried.inc()
        for change in changes:
            kind = change.type
            if change.step is not None:
                counts = self.step(change.step)
                if kind == "step_dispatched":
                    counts.dispatches.inc()
                elif kind == "step_completed":
                    counts.completions.inc()
                    _observe_attempt(workflow, change.step, counts.completed)
                elif kind in ("step_retrying", "step_failed"):
                    self._attempt_failed(workflow, change.step, counts)
                    if kind == "step_retrying":
                        counts.retries.inc()
            elif (finished := pipeline.finished.get(kind)) is not None:
                finished.count.inc()
                finished.duration.observe(epoch(workflow.updated_at) - epoch(workflow.created_at))

    def _attempt_failed(self, workflow: Workflow, step: str, counts: _StepCounts) -> None:
        """A timeout (the sweeper's) or a failure (a report's), as the attempt's record says."""
        if _observe_attempt(workflow, step, counts.failed) == TIMED_OUT:
            counts.timeouts.inc()
        else:
            counts.failures.inc()

    def report_refused(self, report: Report, reason: str) -> None:
        counts = self._steps.get(report.step_type or "") or self._steps[""]
        (counts.duplicate if reason == observe.DUPLICATE else counts.stale).inc()


def _observe_attempt(workflow: Workflow, name: str, duration: Buckets) -> str | None:
    """The outcome of step `name`'s attempt that ended with this transition (its last
    record); its dispatch to now into `duration`, unless it timed out (no report came)."""
    record = _last_attempt(workflow, name)
    if record is None:
        return None
    outcome: str = record["outcome"]
    began = record.get("dispatched_at")
    if outcome != TIMED_OUT and began:
        duration.observe(epoch(workflow.updated_at) - epoch(began))
    return outcome


def _last_attempt(workflow: Workflow, name: str) -> dict[str, Any] | None:
    step: Step | None = workflow.step if workflow.step.name == name else None
    if step is None:
        step = next((s for s in workflow.steps if s.name == name), None)
    return step.attempts[-1] if step is not None and step.attempts else None
