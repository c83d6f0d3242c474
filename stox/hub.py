"""WebSocket subscriptions and fan-out of workflow changes.

The hub consumes this instance's change notifications (`workflow.changed`, published by
whichever instance made the change) and sends each subscriber a snapshot first, then every
newer change of its workflows in `version` order: a change older than what a subscriber
already has is skipped, and changes arriving while its snapshot loads wait behind it. Each
message is encoded once and the same bytes go to every subscriber.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any, Protocol

from stox.bus.base import Event
from stox.orchestrator import Orchestrator
from stox.workflow import isoformat

log = logging.getLogger(__name__)

SNAPSHOT_LIMIT = 100  # newest workflows sent when subscribing to all of a user's


class Connection(Protocol):
    """What the hub needs of a WebSocket: send bytes (False once dropped), and close."""

    def send(self, message: bytes) -> bool: ...

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


_dumps = json.JSONEncoder(separators=(",", ":")).encode


def encode(kind: str, workflow_id: str, version: int, data_json: str) -> bytes:
    """One WebSocket message around `data_json`, already encoded: a change notification
    sends its workflow document once however many changes it reports."""
    head = _dumps(
        {"type": kind, "workflow_id": workflow_id, "version": version, "ts": isoformat(time.time())}
    )
    return f'{head[:-1]},"data":{data_json}}}'.encode()


class Subscription:
    """One socket's interest: one workflow, or every workflow of an owner (None: all)."""

    __slots__ = ("connection", "owner", "pending", "ready", "seen", "workflow_id")

    def __init__(self, connection: Connection, owner: str | None, workflow_id: str | None):
        self.connection = connection
        self.owner = owner
        self.workflow_id = workflow_id
        self.seen: dict[str, int] = {}  # workflow id -> last version sent
        self.ready = False
        self.pending: list[tuple[str, int, list[bytes]]] = []

    def offer(self, workflow_id: str, version: int, messages: list[bytes]) -> bool:
        """Send if newer than what this subscriber has; False when the socket is gone."""
        if not self.ready:
            self.pending.append((workflow_id, version, messages))
            return True
        if self.seen.get(workflow_id, 0) >= version:
            return True
        self.seen[workflow_id] = version
        return all(self.connection.send(message) for message in messages)


class Hub:
    def __init__(self, orchestrator: Orchestrator, snapshot_limit: int = SNAPSHOT_LIMIT) -> None:
        self.orchestrator = orchestrator
        self.snapshot_limit = snapshot_limit
        self._by_workflow: dict[str, set[Subscription]] = {}
        self._by_owner: dict[str | None, set[Subscription]] = {}

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._by_workflow.values()) + sum(
            len(s) for s in self._by_owner.values()
        )

    async def subscribe(
        self, connection: Connection, *, owner: str | None, workflow_id: str | None
    ) -> Subscription:
        """Register, send snapshots, then release changes that arrived meanwhile.

        `owner` limits what may be seen (None: an admin, who sees everything). With a
        `workflow_id` another owner's workflow raises NotFound, as the HTTP API answers 404.
        """
        sub = Subscription(connection, owner, workflow_id)
        # Registered before the snapshot loads, so changes made meanwhile are held in
        # `pending` rather than missed; they are released once the snapshot has gone out.
        if workflow_id is not None:
            self._by_workflow.setdefault(workflow_id, set()).add(sub)
        else:
            self._by_owner.setdefault(owner, set()).add(sub)
        try:
            if workflow_id is not None:
                snapshots = [await self.orchestrator.get(workflow_id, owner)]
            else:
                snapshots = await self.orchestrator.list(owner, None, self.snapshot_limit)
        except BaseException:
            self.unsubscribe(sub)
            raise
        if not self._registered(sub):  # closed or dropped while the snapshot loaded
            return sub
        for workflow in reversed(snapshots):
            sub.seen[workflow.id] = workflow.version
            data = encode("snapshot", workflow.id, workflow.version, _dumps(workflow.public()))
            if not connection.send(data):
                self.unsubscribe(sub)
                return sub
        sub.ready = True
        for wid, version, messages in sorted(sub.pending, key=lambda item: item[1]):
            if not sub.offer(wid, version, messages):
                self.unsubscribe(sub)
                break
        sub.pending.clear()
        return sub

    def _registered(self, sub: Subscription) -> bool:
        if sub.workflow_id is not None:
            return sub in self._by_workflow.get(sub.workflow_id, ())
        return sub in self._by_owner.get(sub.owner, ())

    def unsubscribe(self, sub: Subscription) -> None:
        key_sets: Iterable[tuple[dict[Any, set[Subscription]], Any]] = (
            (self._by_workflow, sub.workflow_id),
            (self._by_owner, sub.owner),
        )
        for index, key in key_sets:
            members = index.get(key)
            if members is not None and sub in members:
                members.discard(sub)
                if not members:
                    del index[key]

    async def on_change(self, event: Event) -> None:
        """Bus handler for `workflow.changed` notifications."""
        parsed = _parse_change(event.payload)
        if parsed is None:
            log.warning("ignoring a malformed change notification %s", event.message_id)
            return
        workflow_id, owner, version, changes, document = parsed
        targets = [
            *self._by_workflow.get(workflow_id, ()),
            *self._by_owner.get(owner, ()),
            *(self._by_owner.get(None, ()) if owner is not None else ()),
        ]
        if not targets:
            return
        document_json = _dumps(document)
        messages = [
            encode(
                kind, workflow_id, version, f'{{"step":{_dumps(step)},"workflow":{document_json}}}'
            )
            for kind, step in changes
        ]
        for sub in targets:
            if not sub.offer(workflow_id, version, messages):
                self.unsubscribe(sub)

    async def close(self) -> None:
        for index in (self._by_workflow, self._by_owner):
            for members in list(index.values()):
                for sub in list(members):
                    sub.connection.close(1001, "server shutting down")
            index.clear()


def _parse_change(
    payload: Any,
) -> tuple[str, str, int, list[tuple[str, str | None]], dict[str, Any]] | None:
    """The parts of a `workflow.changed` payload the hub uses; None when it is malformed."""
    if not isinstance(payload, dict):
        return None
    workflow_id = payload.get("workflow_id")
    owner = payload.get("owner")
    version = payload.get("version")
    changes = payload.get("changes")
    document = payload.get("workflow")
    if (
        not isinstance(workflow_id, str)
        or not isinstance(owner, str)
        or not isinstance(version, int)
        or isinstance(version, bool)
        or not isinstance(changes, list)
        or not isinstance(document, dict)
    ):
        return None
    parsed: list[tuple[str, str | None]] = []
    for change in changes:
        if not isinstance(change, dict):
            return None
        kind, step = change.get("type"), change.get("step")
        if not isinstance(kind, str) or not (step is None or isinstance(step, str)):
            return None
        parsed.append((kind, step))
    return workflow_id, owner, version, parsed, document
