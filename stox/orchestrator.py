"""Applies the domain's transitions: load → decide → save (compare-and-swap) → publish.

Events are written into the workflow's outbox in the same write as the state that caused
them, published afterwards, and dropped from the outbox once the broker confirms them. A
write that loses the compare-and-swap race reloads the workflow and decides again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stox import workflow as wf_rules
from stox.bus.base import Event, EventBus, PublishError
from stox.store.base import WorkflowStore
from stox.workflow import Change, Pipeline, Report, Workflow

log = logging.getLogger(__name__)

Decide = Callable[[Workflow], list[Change]]


class NotFound(Exception):
    """No such workflow, or one the caller may not see."""


class Contention(Exception):
    """The compare-and-swap kept losing; the caller may try again."""


@dataclass(frozen=True, slots=True)
class Outcome:
    workflow: Workflow
    applied: bool  # False for an acknowledged duplicate


class Orchestrator:
    def __init__(
        self,
        store: WorkflowStore,
        bus: EventBus,
        pipeline: Pipeline,
        *,
        clock: Callable[[], float] = time.time,
        max_races: int = 50,
    ) -> None:
        self.store = store
        self.bus = bus
        self.pipeline = pipeline
        self.clock = clock
        self.max_races = max_races
        self._publishing: set[asyncio.Task[None]] = set()

    # -- commands -------------------------------------------------------------------------

    async def upload(self, owner: str, product: dict[str, Any]) -> Workflow:
        workflow, _ = wf_rules.start(self.pipeline, owner, product, self.clock())
        await self.store.insert(workflow.to_doc())
        self._publish_soon(workflow)
        return workflow

    async def report(self, report: Report) -> Outcome:
        """Apply a completion; DuplicateReport is answered as applied=False."""
        try:
            workflow = await self._apply(
                report.workflow_id,
                lambda wf: wf_rules.complete(wf, self.pipeline, report, self.clock()),
            )
        except wf_rules.DuplicateReport:
            return Outcome(await self.get(report.workflow_id), applied=False)
        return Outcome(workflow, applied=True)

    async def cancel(self, workflow_id: str, owner: str | None) -> Workflow:
        await self.get(workflow_id, owner)
        return await self._apply(
            workflow_id, lambda wf: wf_rules.cancel(wf, self.pipeline, self.clock())
        )

    async def retry(self, workflow_id: str, owner: str | None) -> Workflow:
        await self.get(workflow_id, owner)
        return await self._apply(
            workflow_id, lambda wf: wf_rules.retry(wf, self.pipeline, self.clock())
        )

    # -- queries --------------------------------------------------------------------------

    async def get(self, workflow_id: str, owner: str | None = None) -> Workflow:
        """The workflow; NotFound also when `owner` is given and is not its owner."""
        doc = await self.store.get(workflow_id)
        if doc is None or (owner is not None and doc["owner"] != owner):
            raise NotFound(workflow_id)
        return Workflow.from_doc(doc)

    async def list(
        self,
        owner: str | None,
        status: str | None,
        limit: int,
        before: tuple[str, str] | None = None,
    ) -> list[Workflow]:
        docs = await self.store.list(owner=owner, status=status, limit=limit, before=before)
        return [Workflow.from_doc(doc) for doc in docs]

    # -- background work ------------------------------------------------------------------

    async def sweep(self, limit: int = 500) -> int:
        """Fire due deadlines and retries; returns how many workflows changed."""
        now = self.clock()
        changed = 0
        for doc in await self.store.due(wf_rules.isoformat(now), limit):
            fired: list[bool] = []  # the last decision is the one that was written

            def wake(wf: Workflow, fired: list[bool] = fired) -> list[Change]:
                changes = wf_rules.wake(wf, self.pipeline, self.clock())
                fired.append(bool(changes))
                return changes

            try:
                await self._apply(doc["id"], wake)
            except (NotFound, Contention):
                continue
            # not when another instance fired the timer first (the reload found nothing due)
            changed += fired[-1]
        return changed

    async def relay(self, min_age: float = 5.0, limit: int = 500) -> int:
        """Re-publish outbox entries left behind (a crash, a broker outage)."""
        cutoff = wf_rules.isoformat(self.clock() - min_age)
        docs = await self.store.unpublished(cutoff, limit)
        for doc in docs:
            await self._publish(Workflow.from_doc(doc))
        return len(docs)

    async def drain(self) -> None:
        """Wait for publishes under way (at shutdown, and in tests)."""
        while self._publishing:
            await asyncio.gather(*list(self._publishing), return_exceptions=True)

    # -- internals ------------------------------------------------------------------------

    async def _apply(self, workflow_id: str, decide: Decide, *, publish: bool = True) -> Workflow:
        """Load, decide, compare-and-swap; on a lost race reload and decide again."""
        for _ in range(self.max_races):
            doc = await self.store.get(workflow_id)
            if doc is None:
                raise NotFound(workflow_id)
            workflow = Workflow.from_doc(doc)
            expected = workflow.version
            if not decide(workflow):
                return workflow  # nothing to do (a timer another instance already fired)
            if await self.store.replace(workflow.to_doc(), expected):
                if publish:
                    self._publish_soon(workflow)
                return workflow
        raise Contention(workflow_id)

    def _publish_soon(self, workflow: Workflow) -> None:
        task = asyncio.ensure_future(self._publish(workflow))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish(self, workflow: Workflow) -> None:
        """Publish the outbox, then drop what the broker confirmed. Failures wait for the relay."""
        confirmed: set[str] = set()
        for entry in workflow.outbox:
            event = Event(
                routing_key=entry["routing_key"],
                payload=entry["payload"],
                message_id=entry["message_id"],
                correlation_id=workflow.id,
                timestamp=self.clock(),
            )
            try:
                await self.bus.publish(event)
            except PublishError as exc:
                log.warning(
                    "event %s of %s left for the relay: %s", event.message_id, workflow.id, exc
                )
                break  # keep order: later events wait behind the unconfirmed one
            confirmed.add(entry["message_id"])
        if confirmed:
            await self._clear_outbox(workflow.id, confirmed)

    async def _clear_outbox(self, workflow_id: str, confirmed: set[str]) -> None:
        try:
            await self._apply(
                workflow_id,
                lambda wf: (
                    [Change("outbox")]
                    if wf_rules.confirm_published(wf, confirmed, self.clock())
                    else []
                ),
                publish=False,
            )
        except (NotFound, Contention) as exc:
            log.info("outbox of %s not cleared now (%s); the relay will retry", workflow_id, exc)
