"""The dashboard's charts: what the workflows did over the last hour, and what runs now.

`StatsBoard` counts the change notifications the hub consumes (stox/hub.py): every
instance's hub hears every instance's notifications, so every instance counts the same
transitions, whichever instance made them. What it has not heard (before this instance
started) it does not know: the per-minute counts and the steps' figures cover the last
hour of what this instance heard (`since` says from when), and the running and waiting
counts are read once from the store at start-up (`seed`), then kept from the notifications.

Each notification costs a few dictionary updates, and is on every transition's path, so the
counting does as little as it can: a dispatch counts nothing; timestamps are not parsed
(that was most of the cost) but for the first of each minute, the minute and the seconds are
read from the text `isoformat` wrote, and a duration within one minute is a difference of
seconds. The figures are computed only when asked (GET /api/v1/stats, or `StatsFeed` at most
once a second for the sockets that watch them).
The counts are kept per owner and for everyone together (what an admin sees), so a view is
read from one of them, never merged. Memory is bounded: 60 minutes of counts per owner and
step (older ones are dropped once a minute, and an owner with nothing left in the window is
forgotten), at most MAX_SAMPLES durations per owner and step (the newest; as many for
everyone's), one entry per running workflow, and the versions of at most MAX_VERSIONS
workflows (to skip a notification delivered twice).

`StatsFeed` pushes the figures to the sockets that asked for them too (`/ws?stats=1`): at most
once every `interval` seconds per view (an owner's, or everyone's), only after a change, and
only when the figures differ from those it last sent that view.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from stox.codec import dumps
from stox.workflow import (
    FAILED,
    RUNNING,
    TERMINAL_STATUSES,
    TIMED_OUT,
    WAITING,
    epoch,
    isoformat,
)

if TYPE_CHECKING:
    from stox.hub import Subscription
    from stox.orchestrator import Orchestrator

log = logging.getLogger(__name__)

MINUTES = 60  # the window: the last hour, a bucket a minute
MAX_SAMPLES = 2000  # durations kept per owner and step (the newest)
MAX_VERSIONS = 100_000  # workflows whose last version is remembered, to skip duplicates
SEED_PAGE = 100
SEED_LIMIT = 10_000  # running workflows read from the store at start-up, at most

# What each change counts: a finished workflow (the index of its count), the end of a step's
# attempt (its last record says how), a change of whether a running workflow waits for a
# review, or both of the last two; the others (a dispatch) count nothing.
_ATTEMPT = -1
_REVIEW = -2
_ATTEMPT_AND_REVIEW = -3
_ACTIONS = {
    "workflow_completed": 0,
    "workflow_failed": 1,
    "step_completed": _ATTEMPT,
    "step_failed": _ATTEMPT,
    "step_retrying": _ATTEMPT,
    "step_reviewed": _ATTEMPT_AND_REVIEW,
    "step_waiting_review": _REVIEW,
    "step_review_escalated": _REVIEW,
    "workflow_cancelled": _REVIEW,
}
_SHAPE = "2026-01-01T00:00:00.000000Z"  # what `isoformat` writes


class _StepFigures:
    __slots__ = ("durations", "minutes")

    def __init__(self) -> None:
        self.minutes: dict[int, list[int]] = {}  # minute -> [attempts ended, failed]
        # (minute, seconds), the newest
        self.durations: deque[tuple[int, float]] = deque(maxlen=MAX_SAMPLES)


class _OwnerFigures:
    __slots__ = ("minutes", "steps")

    def __init__(self) -> None:
        self.minutes: dict[int, list[int]] = {}  # minute -> [completed, failed]
        self.steps: dict[str, _StepFigures] = {}

    def prune(self, oldest: int) -> bool:
        """Forget what is older than minute `oldest`; whether anything is left."""
        for stale in [m for m in self.minutes if m < oldest]:
            del self.minutes[stale]
        left = bool(self.minutes)
        for step in self.steps.values():
            for stale in [m for m in step.minutes if m < oldest]:
                del step.minutes[stale]
            while step.durations and step.durations[0][0] < oldest:
                step.durations.popleft()
            left = left or bool(step.minutes)
        return left


class StatsBoard:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.since = clock()
        self._owners: dict[str, _OwnerFigures] = {}
        self._everyone = _OwnerFigures()  # the same counts, all owners together
        self._pruned = 0  # the minute of the last prune: at most one a minute
        self._versions: OrderedDict[str, int] = OrderedDict()
        self._minutes: dict[str, int] = {}  # "YYYY-MM-DDTHH:MM" -> its minute
        self._active: dict[str, tuple[str, bool]] = {}  # running id -> (owner, waiting)
        self._running: Counter[str] = Counter()
        self._waiting: Counter[str] = Counter()

    # -- counting ---------------------------------------------------------------------------

    def record(
        self,
        workflow_id: str,
        owner: str,
        version: int,
        changes: Iterable[tuple[str, str | None]],
        document: dict[str, Any],
    ) -> bool:
        """Count one change notification; False when it was counted already (a duplicate,
        or older than one counted) and changed nothing."""
        if not self._newer(workflow_id, version):
            return False
        updated = document.get("updated_at")
        minute = self._minute(updated)
        figures = self._owners.get(owner)
        if figures is None:
            figures = self._owners[owner] = _OwnerFigures()
        both = (figures, self._everyone)
        finished = reviewed = False  # the workflow ended; a review began or ended
        for kind, step in changes:
            action = _ACTIONS.get(kind)
            if action is None:  # a dispatch, most of them: nothing to count
                continue
            if action >= 0:
                finished = True
                for counted in both:
                    counted.minutes.setdefault(minute, [0, 0])[action] += 1
                continue
            if action != _REVIEW and step is not None:
                self._attempt_ended(both, document, step, updated, minute)
            if action != _ATTEMPT:
                reviewed = True
        old = self._active.get(workflow_id)
        running = document.get("status") == RUNNING
        if finished or reviewed or old is None or not running:
            # whether it waits for a review changes only with a review; read from its steps
            # then, or when it was first heard after its upload
            waiting = None if reviewed or (old is None and version > 1) else bool(old and old[1])
            self._track(workflow_id, owner, document, waiting)
        if minute > self._pruned:
            self._prune(minute)
        return True

    def _newer(self, workflow_id: str, version: int) -> bool:
        seen = self._versions.get(workflow_id)
        if seen is not None and seen >= version:
            return False
        self._versions[workflow_id] = version
        self._versions.move_to_end(workflow_id)
        if len(self._versions) > MAX_VERSIONS:
            self._versions.popitem(last=False)
        return True

    def _minute(self, timestamp: Any) -> int:
        """The minute (since the epoch) of a timestamp `isoformat` wrote, or of now if it is
        not one. Parsing a timestamp costs more than the rest of `record`: each minute's is
        parsed once."""
        if not (isinstance(timestamp, str) and len(timestamp) == len(_SHAPE)):
            return int(self.clock() // 60)
        key = timestamp[:16]
        minute = self._minutes.get(key)
        if minute is None:
            try:
                minute = int(epoch(timestamp) // 60)
            except ValueError:
                return int(self.clock() // 60)
            if len(self._minutes) >= MINUTES:
                self._minutes.clear()
            self._minutes[key] = minute
        return minute

    def _attempt_ended(
        self,
        targets: Iterable[_OwnerFigures],
        document: dict[str, Any],
        name: str,
        ended: Any,
        minute: int,
    ) -> None:
        """Count the end of step `name`'s last attempt (its record says how) in `minute`;
        `ended` is when (the document's `updated_at`)."""
        try:  # the document's shape checked by the lookups themselves, in one pass
            record = next(s for s in document["steps"] if s["name"] == name)["attempts"][-1]
            outcome, began = record["outcome"], record["dispatched_at"]
        except (KeyError, TypeError, IndexError, StopIteration):
            return
        failed = outcome in (FAILED, TIMED_OUT)
        duration = None if outcome == TIMED_OUT else _seconds_between(began, ended)
        for figures in targets:
            step = figures.steps.get(name)
            if step is None:
                step = figures.steps[name] = _StepFigures()
            counts = step.minutes.get(minute)
            if counts is None:
                counts = step.minutes[minute] = [0, 0]
            counts[0] += 1
            counts[1] += failed
            if duration is not None:
                step.durations.append((minute, duration))

    def _track(
        self, workflow_id: str, owner: str, document: dict[str, Any], waiting: bool | None = None
    ) -> None:
        """Keep the running and waiting counts: a workflow's state after this change
        (`waiting`: whether it waits for a review, None to read it from its steps)."""
        old = self._active.pop(workflow_id, None)
        if old is not None:
            self._running[old[0]] -= 1
            self._waiting[old[0]] -= old[1]
        status = document.get("status")
        if status == RUNNING:
            if waiting is None:
                steps = document.get("steps")
                waiting = isinstance(steps, list) and any(
                    isinstance(s, dict) and s.get("status") == WAITING for s in steps
                )
            self._active[workflow_id] = (owner, waiting)
            self._running[owner] += 1
            self._waiting[owner] += waiting
        elif status not in TERMINAL_STATUSES:
            log.debug("workflow %s has an unknown status %r", workflow_id, status)

    def _prune(self, minute: int) -> None:
        """Forget what is older than the window, once a minute (the view skips it anyway),
        and the owners with nothing left in it."""
        self._pruned = minute
        oldest = minute - MINUTES + 1
        self._everyone.prune(oldest)
        for name in [n for n, f in self._owners.items() if not f.prune(oldest)]:
            del self._owners[name]

    async def seed(self, orchestrator: Orchestrator) -> int:
        """Read the running workflows from the store (at most SEED_LIMIT, newest first):
        what ran before this instance heard of it. A notification heard meanwhile wins over
        the older version read. The number read."""
        before: tuple[str, str] | None = None
        read = 0
        while read < SEED_LIMIT:
            page = await orchestrator.list_workflows(None, RUNNING, SEED_PAGE, before)
            for workflow in page:
                if self._newer(workflow.id, workflow.version):
                    self._track(workflow.id, workflow.owner, workflow.public())
            read += len(page)
            if len(page) < SEED_PAGE:
                break
            before = (page[-1].created_at, page[-1].id)
        if read >= SEED_LIMIT:
            log.warning("stats: more than %d running workflows; the counts miss some", read)
        return read

    # -- the figures ------------------------------------------------------------------------

    def view(self, owner: str | None) -> dict[str, Any]:
        """The figures of `owner`'s workflows (None: everyone's), as GET /api/v1/stats
        answers them."""
        now = self.clock()
        current = int(now // 60)
        oldest = current - MINUTES + 1
        figures = self._everyone if owner is None else self._owners.get(owner)
        finished = {m: [0, 0] for m in range(oldest, current + 1)}
        steps: dict[str, tuple[list[int], list[float]]] = {}
        if figures is not None:
            for minute, (completed, failed) in figures.minutes.items():
                if minute in finished:
                    finished[minute][0] += completed
                    finished[minute][1] += failed
            for name, step in figures.steps.items():
                counts, durations = steps.setdefault(name, ([0, 0], []))
                for minute, (ended, failed) in step.minutes.items():
                    if oldest <= minute <= current:
                        counts[0] += ended
                        counts[1] += failed
                durations.extend(d for m, d in step.durations if oldest <= m <= current)
                durations.sort()
        if owner is None:
            running, waiting = sum(self._running.values()), sum(self._waiting.values())
        else:
            running, waiting = self._running[owner], self._waiting[owner]
        return {
            "since": isoformat(self.since),
            "minutes": [
                {"start": isoformat(m * 60), "completed": c, "failed": f}
                for m, (c, f) in finished.items()
            ],
            "completed": sum(c for c, _ in finished.values()),
            "failed": sum(f for _, f in finished.values()),
            "steps": [
                {
                    "step": name,
                    "attempts": ended,
                    "failures": failed,
                    "failure_rate": failed / ended if ended else 0.0,
                    "p50": _percentile(durations, 0.50),
                    "p95": _percentile(durations, 0.95),
                }
                for name, ([ended, failed], durations) in sorted(steps.items())
                if ended
            ],
            "running": running,
            "waiting": waiting,
        }


def _percentile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank percentile of `ordered` (None when empty)."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _seconds_between(began: Any, ended: Any) -> float | None:
    """The seconds from one timestamp `isoformat` wrote to a later one (0 if it is earlier);
    None when either is not one. Most are in the same minute: their seconds subtracted."""
    if not (isinstance(began, str) and isinstance(ended, str)):
        return None
    try:
        if began[:16] == ended[:16] and len(began) == len(ended) == len(_SHAPE):
            return max(0.0, float(ended[17:-1]) - float(began[17:-1]))
        return max(0.0, epoch(ended) - epoch(began))
    except ValueError:
        return None


class StatsFeed:
    """The sockets that watch the figures, by view (an owner; None: everyone's), and the
    pushes to them: at most one a view every `interval` seconds, after a change, and only
    when the figures differ from the last ones sent."""

    def __init__(
        self,
        board: StatsBoard,
        drop: Callable[[Subscription], None],
        interval: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.board = board
        self.drop = drop  # unsubscribes a socket whose send failed
        self.interval = interval
        self.monotonic = monotonic
        self._subs: dict[str | None, set[Subscription]] = {}
        self._last: dict[str | None, tuple[float, bytes]] = {}  # view -> (sent at, figures)
        self._timers: dict[str | None, asyncio.TimerHandle] = {}
        self._pushes = 0

    @property
    def subscribers(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def add(self, sub: Subscription) -> bool:
        """Watch `sub`'s view; it is sent the figures now. False once the socket is gone."""
        self._subs.setdefault(sub.owner, set()).add(sub)
        figures = dumps(self.board.view(sub.owner))
        self._last.setdefault(sub.owner, (self.monotonic(), figures))
        return sub.send(self._message(figures))

    def remove(self, sub: Subscription) -> None:
        members = self._subs.get(sub.owner)
        if members is None or sub not in members:
            return
        members.discard(sub)
        if not members:
            del self._subs[sub.owner]
            self._last.pop(sub.owner, None)
            timer = self._timers.pop(sub.owner, None)
            if timer is not None:
                timer.cancel()

    def changed(self, owner: str) -> None:
        """A workflow of `owner` changed: its view and everyone's may have."""
        for view in (owner, None):
            if view in self._subs and view not in self._timers:
                last = self._last.get(view)
                delay = 0.0 if last is None else last[0] + self.interval - self.monotonic()
                loop = asyncio.get_running_loop()
                self._timers[view] = loop.call_later(max(0.0, delay), self._push, view)

    def _push(self, view: str | None) -> None:
        self._timers.pop(view, None)
        members = self._subs.get(view)
        if not members:
            return
        figures = dumps(self.board.view(view))
        last = self._last.get(view)
        if last is not None and last[1] == figures:
            return  # nothing the charts show moved
        self._last[view] = (self.monotonic(), figures)
        message = self._message(figures)
        for sub in list(members):
            if not sub.send(message):
                self.drop(sub)

    def _message(self, figures: bytes) -> bytes:
        from stox.hub import encode  # stox.hub imports this module

        self._pushes += 1
        return encode("stats", "", self._pushes, figures)

    def close(self) -> None:
        """Stop pushing (the hub closes the sockets)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
