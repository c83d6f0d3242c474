"""What the orchestrator tells its observers (metrics, traces) about the work it does.

Each call comes after the write it reports has committed, on the IOLoop, and must be cheap
and not block: an observer counts, times or records, it never does I/O of its own there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from stox.workflow import Change, Report, Workflow

log = logging.getLogger(__name__)

# what caused a transition
UPLOAD, REPORT, CANCEL, RETRY, WAKE = "upload", "report", "cancel", "retry", "wake"
REVIEW = "review"  # a person's decision on a review step
WEBHOOK = "webhook"  # a webhook delivery's attempt, recorded
# why a report changed nothing
DUPLICATE, STALE = "duplicate", "stale"


class Observer(Protocol):
    def transitioned(self, workflow: Workflow, changes: Sequence[Change], cause: str) -> None:
        """`workflow` (its new state) was written with `changes`; `cause` is one of UPLOAD,
        REPORT, CANCEL, RETRY, WAKE, REVIEW."""

    def report_refused(self, report: Report, reason: str) -> None:
        """A report that changed nothing: DUPLICATE (acknowledged) or STALE (a 409)."""


class Observers:
    """Tells each observer in turn; one that raises is logged and the others still hear."""

    def __init__(self, observers: Sequence[Observer] = ()) -> None:
        self.observers = list(observers)

    def add(self, observer: Observer) -> None:
        self.observers.append(observer)

    def transitioned(self, workflow: Workflow, changes: Sequence[Change], cause: str) -> None:
        for observer in self.observers:
            try:
                observer.transitioned(workflow, changes, cause)
            except Exception:
                log.exception("observer %r failed on a transition of %s", observer, workflow.id)

    def report_refused(self, report: Report, reason: str) -> None:
        for observer in self.observers:
            try:
                observer.report_refused(report, reason)
            except Exception:
                log.exception("observer %r failed on a %s report", observer, reason)
