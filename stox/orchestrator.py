"""Applies the domain's transitions: load → decide → save (compare-and-swap) → publish.

Events are written into the workflow's outbox in the same write as the state that caused
them, published afterwards, and dropped from the outbox once the broker confirms them (with
the store's next write: see `WorkflowStore.drop_published`). A write that loses the
compare-and-swap race reloads the workflow and decides again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from stox import observe, tracecontext
from stox import workflow as wf_rules
from stox.bus.base import Event, EventBus, PublishError
from stox.changes import ChangeBatcher
from stox.codec import canonical
from stox.ids import new_id
from stox.logs import bind, event_log_fields, log_context, start_context
from stox.store.base import (
    NO_FILTERS,
    Filters,
    IdempotencyKey,
    KeyTaken,
    NewEvent,
    StoreError,
    WorkflowStore,
    encode_json,
)
from stox.workflow import (
    CHANGE_ROUTING_KEY,
    DEFAULT_PIPELINE,
    Change,
    Pipeline,
    Report,
    Review,
    Workflow,
)

log = logging.getLogger(__name__)

Decide = Callable[[Workflow], list[Change]]


class WebhookSender(Protocol):
    """What the orchestrator asks of webhooks (stox/webhooks.py): where new events go, and
    one delivery's attempt."""

    @property
    def retry_for(self) -> float: ...

    def targets(
        self, workflow: Workflow, entries: list[dict[str, Any]]
    ) -> list[tuple[str, str, dict[str, Any]]]: ...

    async def send(self, delivery: dict[str, Any]) -> str | None: ...

    def callback_refusal(self, url: str) -> str | None: ...


class CallbackRefused(Exception):
    """An upload's callback_url this gateway will not call (the message says why)."""


HISTORY_LIMIT = 100  # history entries kept per workflow (storage.history_limit)


class NotFound(Exception):
    """No such workflow, or one the caller may not see."""


class Contention(Exception):
    """The compare-and-swap kept losing; the caller may try again."""


class UnknownPipeline(Exception):
    """An upload naming a pipeline this gateway is not configured with."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name, self.known = name, known


class KeyReused(Exception):
    """An idempotency key sent again with a different body."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What a bulk action did to one workflow: `outcome` is the action's past tense
    ("retried", "cancelled"), "not_allowed" (its state; `message` says why), "not_found"
    (none, or another's) or "unavailable" (the store; try it again)."""

    workflow_id: str
    outcome: str
    status: str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class Applied:
    workflow: Workflow
    written: bool  # False when the decision was to do nothing


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
        cache_size: int = 10_000,
        cache_bytes: int = 64 * 1024 * 1024,
        idempotency_retention: float = 24 * 3600.0,
        observers: observe.Observers | None = None,
        new_trace: Callable[[], str] | None = None,
        pipelines: Mapping[str, Pipeline] | None = None,
        history_limit: int = HISTORY_LIMIT,
        webhooks: WebhookSender | None = None,
    ) -> None:
        """`pipeline`: the default (of uploads that name none, and of workflows stored
        without their definition); `pipelines`: the others an upload may name. Each
        workflow then runs on the definition it stored, with `pipeline`'s reply addresses."""
        self.store = store
        self.bus = bus
        self.changes = ChangeBatcher(bus, clock)
        self.pipeline = pipeline
        self.pipelines = {DEFAULT_PIPELINE: pipeline, **(pipelines or {})}
        self.history_limit = history_limit  # entries kept per workflow, the newest
        self.webhooks = webhooks  # None: no webhooks configured
        self._delivering: dict[str, asyncio.Task[None]] = {}  # delivery id -> its attempt
        # the definitions workflows run on, by version (the configured ones, then any a
        # stored workflow brings: a definition changed or removed since it started)
        self._definitions = {p.version: p for p in self.pipelines.values()}
        self.clock = clock
        self.max_races = max_races
        self.cache_size = cache_size  # documents
        self.cache_bytes = cache_bytes  # their size, all together
        self.idempotency_retention = idempotency_retention  # seconds a key finds its workflow
        self.observers = observers if observers is not None else observe.Observers()
        self.new_trace = new_trace  # a new workflow's root traceparent, when traces are on
        self._recent: OrderedDict[str, _Cached] = OrderedDict()
        self._recent_bytes = 0
        self._bodies: dict[str, str] = {}  # message id -> its payload, encoded (see _keep_bodies)
        self._publishing: set[asyncio.Task[None]] = set()
        # workflows whose outbox is being published -> a newer state to publish next, if any
        self._newer: dict[str, Workflow | None] = {}

    # -- commands -------------------------------------------------------------------------

    async def upload(
        self,
        owner: str,
        product: dict[str, Any],
        key: str | None = None,
        pipeline: str | None = None,
        owner_name: str | None = None,
        callback_url: str | None = None,
    ) -> Workflow:
        """A new workflow on `pipeline` (a configured name; None: the default); or, when
        `owner` sent `key` within the retention before, the one that upload made (KeyReused
        if its body differed). The key is stored with the workflow in one insert, unique per
        owner, so concurrent uploads with one key, on any instance, make one workflow, and a
        crash cannot separate them."""
        chosen = self.pipelines.get(pipeline or DEFAULT_PIPELINE)
        if chosen is None:
            raise UnknownPipeline(str(pipeline), sorted(self.pipelines))
        if callback_url is not None:
            refusal = (
                "this gateway sends no webhooks"
                if self.webhooks is None
                else self.webhooks.callback_refusal(callback_url)
            )
            if refusal is not None:
                raise CallbackRefused(refusal)
        now = self.clock()
        trace = self.new_trace() if self.new_trace is not None else None
        workflow, changes = wf_rules.start(
            chosen,
            owner,
            product,
            now,
            trace=trace,
            owner_name=owner_name,
            callback_url=callback_url,
        )
        by = f"user:{owner_name or owner}"
        wf_rules.record(workflow, [Change(wf_rules.STARTED), *changes], by, self.history_limit)
        self._add_deliveries(workflow, workflow.outbox, now)
        bind(workflow_id=workflow.id)  # on the lines its insert writes (a retry's: see below)
        doc = workflow.to_doc()
        events = [NewEvent.of(entry) for entry in doc["outbox"]]
        if key is None:
            base = await self.store.insert(doc, events)
        else:
            expires_at = wf_rules.isoformat(now + self.idempotency_retention)
            # the product alone on the default pipeline: keys stored before pipelines had names
            body: dict[str, Any] = product
            if pipeline is not None or callback_url is not None:
                body = {"pipeline": pipeline, "product": product, "callback_url": callback_url}
            held = IdempotencyKey(owner, key, body_hash(body), expires_at)
            for _ in range(self.max_races):
                try:
                    base = await self.store.insert(doc, events, held)
                    break
                except KeyTaken:
                    first = await self._first_upload(held)
                    if first is not None:
                        bind(workflow_id=first.id)
                        return first
            else:  # released and taken again each time
                raise Contention(workflow.id)
        self._remember(doc, base=base, latest=0)
        self._keep_bodies(events)
        self.observers.transitioned(workflow, changes, observe.UPLOAD)
        self._publish_soon(workflow)
        self._deliver_soon(workflow)
        return workflow

    async def _first_upload(self, key: IdempotencyKey) -> Workflow | None:
        """The workflow holding `key` (KeyReused when its body differed), or None when no
        workflow holds it (any more: an expired key is released here)."""
        found = await self.store.keyed(key.owner, key.key)
        if found is None:
            return None
        doc, held = found
        now = wf_rules.isoformat(self.clock())
        if held.expires_at <= now:
            await self.store.release_keys(now, 1, (key.owner, key.key))
            return None
        if held.body_hash != key.body_hash:
            raise KeyReused(key.key)
        return Workflow.from_doc(doc)

    async def report(self, report: Report) -> Outcome:
        """Apply a completion; DuplicateReport is answered as applied=False."""

        def decide(wf: Workflow) -> list[Change]:
            attempt = wf_rules.attempt_of(wf, report.step_id)
            if attempt is not None:  # on the lines about the report from now on
                bind(step=attempt[0], attempt=attempt[1])
            return wf_rules.complete(wf, self.pipeline_of(wf), report, self.clock())

        try:
            result = await self._apply(
                report.workflow_id, decide, cause=observe.REPORT, by=report.by or "service"
            )
        except wf_rules.DuplicateReport:
            self.observers.report_refused(report, observe.DUPLICATE)
            return Outcome(await self.get(report.workflow_id), applied=False)
        except wf_rules.StaleReport:
            self.observers.report_refused(report, observe.STALE)
            raise
        return Outcome(result.workflow, applied=True)

    async def cancel(self, workflow_id: str, owner: str | None, by: str = "user") -> Workflow:
        """`by`: who asked, for the history ("user:NAME")."""
        result = await self._apply(
            workflow_id,
            lambda wf: wf_rules.cancel(wf, self.pipeline_of(wf), self.clock()),
            cause=observe.CANCEL,
            doc=await self._load(workflow_id, owner),
            by=by,
        )
        return result.workflow

    async def retry(self, workflow_id: str, owner: str | None, by: str = "user") -> Workflow:
        """`by`: who asked, for the history ("user:NAME")."""
        result = await self._apply(
            workflow_id,
            lambda wf: wf_rules.retry(wf, self.pipeline_of(wf), self.clock()),
            cause=observe.RETRY,
            doc=await self._load(workflow_id, owner),
            by=by,
        )
        return result.workflow

    async def review(self, decision: Review, owner: str | None) -> Outcome:
        """A person's decision on a waiting review step (`owner`: NotFound unless the
        workflow is theirs; None for reviewers and admins). The same decision again is
        answered as applied=False."""

        def decide(wf: Workflow) -> list[Change]:
            attempt = wf_rules.attempt_of(wf, decision.step_id)
            if attempt is not None:
                bind(step=attempt[0], attempt=attempt[1])
            return wf_rules.review(wf, self.pipeline_of(wf), decision, self.clock())

        try:
            result = await self._apply(
                decision.workflow_id,
                decide,
                cause=observe.REVIEW,
                doc=await self._load(decision.workflow_id, owner),
                by=f"user:{decision.by}",
            )
        except wf_rules.DuplicateReport:
            return Outcome(await self.get(decision.workflow_id), applied=False)
        return Outcome(result.workflow, applied=True)

    def pipeline_of(self, workflow: Workflow) -> Pipeline:
        """The pipeline `workflow` runs on: the definition it stored, with this gateway's
        reply addresses (the default for one stored without a definition)."""
        definition = workflow.pipeline
        if definition is None:
            return self.pipeline
        found = self._definitions.get(definition["version"])
        if found is None:
            found = Pipeline.from_definition(
                definition, self.pipeline.completion_url, self.pipeline.completion_routing_key
            )
            self._definitions[definition["version"]] = found
        return found

    async def bulk(
        self, action: str, owner: str | None, workflow_ids: list[str], by: str = "user"
    ) -> list[BulkResult]:
        """Retry or cancel each of `workflow_ids` (each once, in order) as the single
        commands do, on `owner`'s workflows (None: anyone's); one that cannot be does not
        stop the others."""
        command = self.retry if action == "retry" else self.cancel
        done = "retried" if action == "retry" else "cancelled"
        results = []
        for workflow_id in dict.fromkeys(workflow_ids):
            with log_context(workflow_id=workflow_id):
                try:
                    workflow = await command(workflow_id, owner, by)
                except NotFound:
                    results.append(BulkResult(workflow_id, "not_found"))
                except wf_rules.NotAllowed as exc:
                    results.append(BulkResult(workflow_id, "not_allowed", message=str(exc)))
                except (Contention, StoreError) as exc:
                    log.warning("bulk %s of %s left undone: %s", action, workflow_id, exc)
                    results.append(BulkResult(workflow_id, "unavailable"))
                else:
                    results.append(BulkResult(workflow_id, done, workflow.status))
        return results

    # -- queries --------------------------------------------------------------------------

    async def get(self, workflow_id: str, owner: str | None = None) -> Workflow:
        """The workflow; NotFound also when `owner` is given and is not its owner."""
        return Workflow.from_doc(await self._load(workflow_id, owner))

    async def _load(self, workflow_id: str, owner: str | None) -> dict[str, Any]:
        doc = await self.store.get(workflow_id)
        if doc is None or (owner is not None and doc["owner"] != owner):
            raise NotFound(workflow_id)
        return doc

    async def list_workflows(
        self,
        owner: str | None,
        status: str | None,
        limit: int,
        before: tuple[str, str] | None = None,
        filters: Filters = NO_FILTERS,
    ) -> list[Workflow]:
        docs = await self.store.list_workflows(
            owner=owner, status=status, limit=limit, before=before, filters=filters
        )
        return [Workflow.from_doc(doc) for doc in docs]

    # -- background work ------------------------------------------------------------------

    async def sweep(self, limit: int = 500) -> int:
        """Fire due deadlines and retries; returns how many timers this instance fired."""
        now = self.clock()
        fired = 0
        for doc in await self.store.due(wf_rules.isoformat(now), limit):
            with log_context(workflow_id=doc["id"]):
                try:
                    result = await self._apply(
                        doc["id"],
                        lambda wf: wf_rules.wake(wf, self.pipeline_of(wf), self.clock()),
                        cause=observe.WAKE,
                        by="sweeper",
                        doc=doc,
                    )
                except (NotFound, Contention):
                    continue
                except StoreError as exc:  # this one waits for the next round; the others go on
                    log.warning("deadline of %s left for the next sweep: %s", doc["id"], exc)
                    continue
            fired += result.written  # not when another instance fired it first
            self._deliver_soon(result.workflow)  # its webhook deliveries that are due
        return fired

    async def expire_keys(self, limit: int = 500) -> int:
        """Free every idempotency key past its retention, `limit` a write (an upload that
        meets one frees it itself); how many."""
        now = wf_rules.isoformat(self.clock())
        freed = 0
        while (released := await self.store.release_keys(now, limit, None)) == limit:
            freed += released
        return freed + released

    async def relay(self, min_age: float = 5.0, limit: int = 500) -> int:
        """Re-publish outbox entries left behind (a crash, a broker outage)."""
        cutoff = wf_rules.isoformat(self.clock() - min_age)
        docs = await self.store.unpublished(cutoff, limit)
        for doc in docs:
            if doc["id"] not in self._newer:  # else it is being published right now
                with log_context(workflow_id=doc["id"]):
                    await self._publish(Workflow.from_doc(doc))
        if docs:  # not the hot path: what it published leaves the outbox before its next run
            await self.store.flush()
        return len(docs)

    async def drain(self) -> None:
        """Wait for publishes under way and the outbox drops they made (at shutdown, and in
        tests)."""
        # only the unfinished: a finished task stays in the set until its done callback runs,
        # and since Python 3.12 gather() of finished tasks returns without yielding to the
        # loop, so waiting for it again would spin and the callback would never run
        while pending := [task for task in self._publishing if not task.done()]:
            await asyncio.gather(*pending, return_exceptions=True)
        await self.store.flush()

    async def stop_deliveries(self) -> None:
        """Abandon the deliveries under way (at shutdown): each is still pending in its
        workflow, so whichever instance sweeps next sends it again."""
        tasks = list(self._delivering.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- webhooks -------------------------------------------------------------------------

    def _add_deliveries(
        self, workflow: Workflow, entries: list[dict[str, Any]], now: float
    ) -> None:
        if self.webhooks is not None and entries:
            wf_rules.add_deliveries(workflow, self.webhooks.targets(workflow, entries), now, new_id)

    def _deliver_soon(self, workflow: Workflow) -> None:
        """Send the workflow's deliveries that are due, each in a task of its own (one at a
        time per delivery on this instance)."""
        if self.webhooks is None or not workflow.deliveries:
            return
        for delivery in wf_rules.deliveries_due(workflow, self.clock()):
            if delivery["id"] not in self._delivering:
                task = asyncio.ensure_future(self._deliver(workflow.id, delivery))
                self._delivering[delivery["id"]] = task

    async def _deliver(self, workflow_id: str, delivery: dict[str, Any]) -> None:
        start_context(workflow_id=workflow_id)
        webhooks = self.webhooks
        assert webhooks is not None
        try:
            error = await webhooks.send(delivery)
            detail = {"url": delivery["url"], "delivery": delivery["id"]}
            if error is not None:
                detail["error"] = error
                log.info("delivery %s to %s failed: %s", delivery["id"], delivery["url"], error)

            def attempted(wf: Workflow) -> list[Change]:
                return wf_rules.delivery_attempted(
                    wf,
                    self.pipeline_of(wf),
                    delivery["id"],
                    error,
                    self.clock(),
                    webhooks.retry_for,
                )

            await self._apply(
                workflow_id, attempted, cause=observe.WEBHOOK, by="webhooks", detail=detail
            )
        except (NotFound, Contention, StoreError) as exc:  # it stays pending: sent again later
            log.warning("delivery %s of %s left for later: %s", delivery["id"], workflow_id, exc)
        except Exception:
            log.exception("delivery %s of %s failed", delivery["id"], workflow_id)
        finally:
            self._delivering.pop(delivery["id"], None)

    # -- internals ------------------------------------------------------------------------

    async def _apply(
        self,
        workflow_id: str,
        decide: Decide,
        *,
        cause: str,
        by: str,
        doc: dict[str, Any] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> Applied:
        """Decide on the workflow, then compare-and-swap; a lost race reloads and decides again.

        The last document this instance wrote is tried first, saving a read on the hot path.
        It is only a hint: a successful compare-and-swap proves it was current, and anything
        else decided on it (a rejection, nothing to do) is decided again on a fresh read.
        """
        fresh = doc is not None
        if doc is None and (cached := self._recent.get(workflow_id)) is not None:
            doc = cached.doc
        for _ in range(self.max_races):
            if doc is None:
                doc = await self.store.get(workflow_id)
                fresh = True
                if doc is None:
                    raise NotFound(workflow_id)
            workflow = Workflow.from_doc(doc)
            expected = workflow.version
            published_before = len(workflow.outbox)
            try:
                changes = decide(workflow)
            except wf_rules.WorkflowError:
                if fresh:
                    raise
                doc = None
                continue
            if not changes:
                if fresh:
                    return Applied(workflow, written=False)
                doc = None
                continue
            wf_rules.record(workflow, changes, by, self.history_limit, detail)
            if cause != observe.WEBHOOK:  # a delivery's own record is not delivered again
                self._add_deliveries(workflow, workflow.outbox[published_before:], self.clock())
            written = workflow.to_doc()
            new_events = [NewEvent.of(entry) for entry in written["outbox"][published_before:]]
            size = await self.store.replace(written, expected, new_events)
            if size:
                written = self._published_meanwhile(workflow, written, expected, published_before)
                self._remember(written, base=self._base_size(written), latest=size)
                self._keep_bodies(new_events)
                self.observers.transitioned(workflow, changes, cause)
                self._publish_soon(workflow)
                self._deliver_soon(workflow)
                return Applied(workflow, written=True)
            doc = None
        self._forget(workflow_id)
        raise Contention(workflow_id)

    def _published_meanwhile(
        self, workflow: Workflow, written: dict[str, Any], decided_on: int, older: int
    ) -> dict[str, Any]:
        """`written` without the events that were published and dropped while it was being
        written (the cached document of the version it was decided on lost them then), so
        that they are not sent again; the store is told to drop them at the new version.
        `older`: how many entries of its outbox came from that version."""
        cached = self._recent.get(workflow.id)
        if cached is None or cached.doc["version"] != decided_on:
            return written
        still = {entry["message_id"] for entry in cached.doc["outbox"]}
        gone = {e["message_id"] for e in written["outbox"][:older] if e["message_id"] not in still}
        if not gone:
            return written
        wf_rules.drop_published(workflow, gone)
        self.store.drop_published(workflow.id, workflow.version, sorted(gone), workflow.outbox)
        return {**written, "outbox": workflow.outbox, "outbox_at": workflow.outbox_at}

    @property
    def cached(self) -> tuple[int, int]:
        """How many documents the write cache holds, and their size in bytes."""
        return len(self._recent), self._recent_bytes

    def _remember(self, doc: dict[str, Any], *, base: int, latest: int) -> None:
        """Keep the document just written, within both bounds, least recently written out.

        Its size is counted as `base` (what its upload stored: the product, written once,
        and the first events) plus `latest` (what its latest change stored).
        """
        self._forget(doc["id"])
        total = base + latest
        if total > self.cache_bytes:
            return
        self._recent[doc["id"]] = _Cached(doc, base, total)
        self._recent_bytes += total
        while len(self._recent) > self.cache_size or self._recent_bytes > self.cache_bytes:
            _, evicted = self._recent.popitem(last=False)
            self._recent_bytes -= evicted.size

    def _base_size(self, doc: dict[str, Any]) -> int:
        cached = self._recent.get(doc["id"])
        if cached is not None:
            return cached.base
        return len(encode_json(doc["product"]))  # decided on a document read from the store

    def _keep_bodies(self, events: list[NewEvent]) -> None:
        """The payloads just encoded for the store, for the bus to send as they are (each is
        taken by its first publish; the oldest go beyond the bound, to be encoded again)."""
        for event in events:
            self._bodies[event.entry["message_id"]] = event.body
        while len(self._bodies) > self.cache_size:
            del self._bodies[next(iter(self._bodies))]

    def _forget(self, workflow_id: str) -> None:
        cached = self._recent.pop(workflow_id, None)
        if cached is not None:
            self._recent_bytes -= cached.size

    def _publish_soon(self, workflow: Workflow) -> None:
        """Publish the outbox in the background, one round at a time per workflow.

        A change written while a round is under way waits for that round (only the newest
        state is kept), so events confirmed but not yet cleared are not sent a second time.
        A broker that takes a few milliseconds to confirm makes that window common.
        """
        if workflow.id in self._newer:
            self._newer[workflow.id] = workflow
            return
        self._newer[workflow.id] = None
        task = asyncio.ensure_future(self._publish_rounds(workflow))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish_rounds(self, workflow: Workflow) -> None:
        # its own task: about this workflow, not the request or report that started it
        start_context(workflow_id=workflow.id)
        confirmed: set[str] = set()
        try:
            while True:
                confirmed |= await self._publish(workflow, confirmed)
                newer = self._newer.get(workflow.id)
                if newer is None:
                    return
                self._newer[workflow.id] = None
                workflow = newer
        finally:
            self._newer.pop(workflow.id, None)

    async def _publish(self, workflow: Workflow, already: set[str] | None = None) -> set[str]:
        """Publish the outbox but for `already` confirmed ids, then drop what the broker
        confirmed; returns those ids. Failures wait for the relay."""
        confirmed: set[str] = set()
        for entry in workflow.outbox:
            if already and entry["message_id"] in already:
                confirmed.add(entry["message_id"])
                continue
            body = self._bodies.pop(entry["message_id"], None)
            try:
                if entry["routing_key"] == CHANGE_ROUTING_KEY:  # with the others of this turn
                    payload = entry["payload"]
                    body = body or encode_json(payload)
                    await self.changes.publish(entry["message_id"], payload, body)
                else:
                    await self.bus.publish(
                        Event(
                            routing_key=entry["routing_key"],
                            payload=entry["payload"],
                            message_id=entry["message_id"],
                            correlation_id=workflow.id,
                            timestamp=self.clock(),
                            headers=tracecontext.headers(entry["payload"]),
                            body=body,
                        )
                    )
            except PublishError as exc:
                log.warning(
                    "event %s of %s left for the relay: %s",
                    entry["message_id"],
                    workflow.id,
                    exc,
                    extra=event_log_fields(entry["payload"]),
                )
                break  # keep order: later events wait behind the unconfirmed one
            confirmed.add(entry["message_id"])
        if confirmed:
            self._clear_outbox(workflow, confirmed)
        return confirmed

    def _clear_outbox(self, workflow: Workflow, confirmed: set[str]) -> None:
        """Drop confirmed events from the outbox, the cached one now and the stored one with
        the store's next write: not a transition, the version stays."""
        dropped = [e["message_id"] for e in workflow.outbox if e["message_id"] in confirmed]
        if not dropped:
            return
        kept = wf_rules.unpublished(workflow.outbox, confirmed)
        self.store.drop_published(workflow.id, workflow.version, dropped, kept)
        self._drop_cached(workflow.id, confirmed)

    def _drop_cached(self, workflow_id: str, confirmed: set[str]) -> None:
        """The cached document, whatever its version, without the dropped events (a new
        document: the one cached may be in use; what it shares, nothing changes in place)."""
        cached = self._recent.get(workflow_id)
        if cached is None:
            return
        kept = wf_rules.unpublished(cached.doc["outbox"], confirmed)
        if len(kept) < len(cached.doc["outbox"]):
            cached.doc = {**cached.doc, "outbox": kept, "outbox_at": wf_rules.outbox_at(kept)}


def body_hash(product: dict[str, Any]) -> str:
    """What tells two uploads' bodies apart: the validated product, keys sorted."""
    return hashlib.sha256(canonical(product)).hexdigest()


@dataclass(slots=True)
class _Cached:
    doc: dict[str, Any]
    base: int  # the size of what its upload stored, carried from version to version
    size: int  # that and the size of its latest write: what it counts against cache_bytes
