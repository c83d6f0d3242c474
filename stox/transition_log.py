"""A log line for each thing a transition did, naming its workflow, step and attempt.

An observer of the orchestrator (stox/observe.py). What went wrong is logged at the default
level: an attempt that failed or timed out (`info`), a step or workflow that failed for good
(`warning`), a review whose deadline passed and was escalated (`info`), a stale report
(`info`). What goes right (uploads, dispatches, completions, reviews waiting or decided,
duplicates) is logged at `debug`, so that `logging.level: debug` follows every workflow step
by step and the default costs the hot path a level check.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from stox import observe
from stox.workflow import FAILED, Change, Report, Step, Workflow

log = logging.getLogger("stox.workflow")

LEVELS = {
    "step_retrying": logging.INFO,
    "step_failed": logging.INFO,
    "workflow_failed": logging.WARNING,
    "workflow_cancelled": logging.INFO,
    "step_review_escalated": logging.INFO,
}  # any other change: debug
# the changes about an attempt under way (the others are about one that has ended)
_LIVE = {
    "step_dispatched": "dispatched",
    "step_waiting_review": "waiting for review",
    "step_review_escalated": "review escalated",
}


class TransitionLog:
    def transitioned(self, workflow: Workflow, changes: Sequence[Change], cause: str) -> None:
        for change in changes:
            level = LEVELS.get(change.type, logging.DEBUG)
            if log.isEnabledFor(level):
                message, extra = describe(workflow, change)
                log.log(level, "%s (%s)", message, cause, extra=extra)

    def report_refused(self, report: Report, reason: str) -> None:
        level = logging.INFO if reason == observe.STALE else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(
                level,
                "%s report for step %s (step_id %s) changed nothing",
                reason,
                report.step_type or "?",
                report.step_id,
                extra={"workflow_id": report.workflow_id},
            )


def describe(workflow: Workflow, change: Change) -> tuple[str, dict[str, Any]]:
    """What `change` of `workflow` (in its new state) says, and the fields of its line."""
    extra: dict[str, Any] = {"workflow_id": workflow.id}
    step = _step(workflow, change.step)
    if step is None:  # a change of the workflow itself
        where = ""
        if change.type == "workflow_failed":  # the step that failed (others may be cancelled)
            failed = next((s for s in workflow.steps if s.status == FAILED), workflow.step)
            where = f" at step {failed.name}"
        return f"workflow {change.type.removeprefix('workflow_')}{where}", extra
    extra["step"] = step.name
    if change.type in _LIVE:  # about the attempt under way
        extra["attempt"] = step.attempt
        return f"step {step.name} attempt {step.attempt} {_LIVE[change.type]}", extra
    ended = step.attempts[-1]  # the attempt the change is about has ended
    extra["attempt"] = ended["attempt"]
    text = f"step {step.name} attempt {ended['attempt']} {ended['outcome']}"
    if ended.get("by"):  # a review's decision
        text += f" by {ended['by']}"
    if ended["error"]:
        text += f": {ended['error']}"
    if change.type == "step_retrying":
        text += "; another attempt follows"
    elif change.type == "step_failed":
        text += "; no attempts left"
    return text, extra


def _step(workflow: Workflow, name: str | None) -> Step | None:
    return next((step for step in workflow.steps if step.name == name), None)
