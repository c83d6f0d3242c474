"""The calls a store wrapper (faults, timing) passes to the store it wraps untouched."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stox.store.base import WorkflowStore


class PassThrough:
    """`open`, `close` and `drop_published` of `inner`, as they are."""

    def __init__(self, inner: WorkflowStore) -> None:
        self.inner = inner

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    def drop_published(
        self,
        workflow_id: str,
        version: int,
        message_ids: Sequence[str],
        kept: Sequence[dict[str, Any]],
    ) -> None:
        self.inner.drop_published(workflow_id, version, message_ids, kept)
