"""Any WorkflowStore, each call timed into `stox_store_operation_duration_seconds` by the
name of its method (the gateway wraps its store in one when metrics are on).

`open`, `close` and `drop_published` (which nobody waits for) pass through untimed. Each
method hands back the timing coroutine itself, without a coroutine of its own around it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any, TypeVar

from stox.metrics.families import Buckets, HistogramFamily
from stox.store.base import NO_FILTERS, Filters, IdempotencyKey, NewEvent, WorkflowStore
from stox.store.wrapper import PassThrough

T = TypeVar("T")


async def _timed(histogram: Buckets, call: Awaitable[T]) -> T:
    start = time.perf_counter()
    try:
        return await call
    finally:
        histogram.observe(time.perf_counter() - start)


class TimedStore(PassThrough):
    def __init__(self, inner: WorkflowStore, histogram: HistogramFamily) -> None:
        super().__init__(inner)
        of = histogram.labels  # each operation's child, looked up once
        self._ping, self._insert, self._get = of("ping"), of("insert"), of("get")
        self._keyed, self._release = of("keyed"), of("release_keys")
        self._replace, self._flush, self._list = of("replace"), of("flush"), of("list_workflows")
        self._due, self._unpublished = of("due"), of("unpublished")
        self._in_use, self._backlog = of("steps_in_use"), of("outbox_backlog")

    def __repr__(self) -> str:
        return f"TimedStore({self.inner!r})"

    def ping(self) -> Coroutine[Any, Any, None]:
        return _timed(self._ping, self.inner.ping())

    def insert(
        self,
        doc: dict[str, Any],
        events: Sequence[NewEvent] | None = None,
        key: IdempotencyKey | None = None,
    ) -> Coroutine[Any, Any, int]:
        return _timed(self._insert, self.inner.insert(doc, events, key))

    def get(self, workflow_id: str) -> Coroutine[Any, Any, dict[str, Any] | None]:
        return _timed(self._get, self.inner.get(workflow_id))

    def keyed(
        self, owner: str, key: str
    ) -> Coroutine[Any, Any, tuple[dict[str, Any], IdempotencyKey] | None]:
        return _timed(self._keyed, self.inner.keyed(owner, key))

    def release_keys(
        self, now: str, limit: int, owner_key: tuple[str, str] | None
    ) -> Coroutine[Any, Any, int]:
        return _timed(self._release, self.inner.release_keys(now, limit, owner_key))

    def replace(
        self, doc: dict[str, Any], expected_version: int, new_events: Sequence[NewEvent]
    ) -> Coroutine[Any, Any, int]:
        return _timed(self._replace, self.inner.replace(doc, expected_version, new_events))

    def flush(self) -> Coroutine[Any, Any, None]:
        return _timed(self._flush, self.inner.flush())

    def list_workflows(
        self,
        *,
        owner: str | None,
        status: str | None,
        limit: int,
        before: tuple[str, str] | None = None,
        filters: Filters = NO_FILTERS,
    ) -> Coroutine[Any, Any, list[dict[str, Any]]]:
        call = self.inner.list_workflows(
            owner=owner, status=status, limit=limit, before=before, filters=filters
        )
        return _timed(self._list, call)

    def due(self, now: str, limit: int) -> Coroutine[Any, Any, list[dict[str, Any]]]:
        return _timed(self._due, self.inner.due(now, limit))

    def unpublished(
        self, written_before: str, limit: int
    ) -> Coroutine[Any, Any, list[dict[str, Any]]]:
        return _timed(self._unpublished, self.inner.unpublished(written_before, limit))

    def steps_in_use(self) -> Coroutine[Any, Any, dict[str, list[str]]]:
        return _timed(self._in_use, self.inner.steps_in_use())

    def outbox_backlog(self) -> Coroutine[Any, Any, tuple[int, str | None]]:
        return _timed(self._backlog, self.inner.outbox_backlog())
