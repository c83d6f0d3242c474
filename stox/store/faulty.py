"""Seeded faults around any WorkflowStore: a testing aid for fault runs (`storage.faults`).

A share of the calls fails as a remote store's do: at once (the connection was lost) or
after waiting (a timeout), and a failing write either does not land or lands and then fails,
so that its caller cannot know which (an unknown outcome). Another share is only slow. The
draws come from one seeded generator, so a run with the same seed and the same calls
injects the same faults. `open`, `close` and `drop_published` (which nobody waits for) pass
through untouched, and so does everything until the store is `armed` (a gateway arms it once
started: faults are for serving, not for start-up).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from stox.store.base import NO_FILTERS, Filters, IdempotencyKey, NewEvent, StoreError, WorkflowStore
from stox.store.wrapper import PassThrough

T = TypeVar("T")

LOST = "connection_lost"  # failed at once, not landed
TIMEOUT = "timeout"  # failed after waiting, not landed
LANDED = "landed_then_failed"  # a write that landed, then failed: its outcome unknown
SLOW = "slow"  # answered, late


class InjectedFault(StoreError):
    """A failure FaultyStore made up."""


class FaultyStore(PassThrough):
    """`inner`, with `fail_share` of its calls failing and `slow_share` slow (`slow_seconds`);
    `counts` says how many of each kind were injected. `calls` (names of methods) and
    `write_faults` (kinds) narrow what is injected, for tests that aim at one case."""

    def __init__(
        self,
        inner: WorkflowStore,
        *,
        seed: int = 0,
        fail_share: float = 0.0,
        slow_share: float = 0.0,
        slow_seconds: float = 0.5,
        armed: bool = True,
        calls: frozenset[str] | None = None,
        write_faults: tuple[str, ...] = (LOST, TIMEOUT, LANDED),
    ) -> None:
        if min(fail_share, slow_share) < 0 or fail_share + slow_share > 1:
            raise ValueError("fail_share and slow_share: shares from 0 to 1, at most 1 together")
        super().__init__(inner)
        self.fail_share = fail_share
        self.slow_share = slow_share
        self.slow_seconds = slow_seconds
        self.armed = armed
        self.calls = calls  # the names of the calls that may fail or be slow; None: all
        self.write_faults = write_faults
        self.counts: Counter[str] = Counter()
        self._random = random.Random(seed)

    def __repr__(self) -> str:
        return f"FaultyStore({self.inner!r}, fail_share={self.fail_share}, ...)"

    async def _call(self, name: str, call: Callable[[], Awaitable[T]], *, write: bool) -> T:
        if not self.armed or (self.calls is not None and name not in self.calls):
            return await call()
        draw = self._random.random()
        if draw < self.fail_share:
            kinds = self.write_faults if write else (LOST, TIMEOUT)
            kind = self._random.choice(kinds)
            self.counts[kind] += 1
            if kind == TIMEOUT:
                await asyncio.sleep(self.slow_seconds)
            elif kind == LANDED:
                await call()
            raise InjectedFault(f"injected fault: {name}: {kind.replace('_', ' ')}")
        if draw < self.fail_share + self.slow_share:
            self.counts[SLOW] += 1
            await asyncio.sleep(self.slow_seconds)
        return await call()

    # open, close and drop_published: untouched (PassThrough)

    # -- with faults -----------------------------------------------------------------------

    async def ping(self) -> None:
        await self._call("ping", self.inner.ping, write=False)

    async def insert(
        self,
        doc: dict[str, Any],
        events: Sequence[NewEvent] | None = None,
        key: IdempotencyKey | None = None,
    ) -> int:
        return await self._call("insert", lambda: self.inner.insert(doc, events, key), write=True)

    async def get(self, workflow_id: str) -> dict[str, Any] | None:
        return await self._call("get", lambda: self.inner.get(workflow_id), write=False)

    async def keyed(self, owner: str, key: str) -> tuple[dict[str, Any], IdempotencyKey] | None:
        return await self._call("keyed", lambda: self.inner.keyed(owner, key), write=False)

    async def release_keys(self, now: str, limit: int, owner_key: tuple[str, str] | None) -> int:
        return await self._call(
            "release_keys", lambda: self.inner.release_keys(now, limit, owner_key), write=True
        )

    async def replace(
        self, doc: dict[str, Any], expected_version: int, new_events: Sequence[NewEvent]
    ) -> int:
        return await self._call(
            "replace", lambda: self.inner.replace(doc, expected_version, new_events), write=True
        )

    async def flush(self) -> None:
        await self._call("flush", self.inner.flush, write=True)

    async def list_workflows(
        self,
        *,
        owner: str | None,
        status: str | None,
        limit: int,
        before: tuple[str, str] | None = None,
        filters: Filters = NO_FILTERS,
    ) -> list[dict[str, Any]]:
        return await self._call(
            "list_workflows",
            lambda: self.inner.list_workflows(
                owner=owner, status=status, limit=limit, before=before, filters=filters
            ),
            write=False,
        )

    async def due(self, now: str, limit: int) -> list[dict[str, Any]]:
        return await self._call("due", lambda: self.inner.due(now, limit), write=False)

    async def unpublished(self, written_before: str, limit: int) -> list[dict[str, Any]]:
        return await self._call(
            "unpublished", lambda: self.inner.unpublished(written_before, limit), write=False
        )

    async def steps_in_use(self) -> dict[str, list[str]]:
        return await self._call("steps_in_use", self.inner.steps_in_use, write=False)

    async def outbox_backlog(self) -> tuple[int, str | None]:
        return await self._call("outbox_backlog", self.inner.outbox_backlog, write=False)
