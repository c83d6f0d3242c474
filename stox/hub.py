"""WebSocket subscriptions and fan-out of workflow changes.

The hub consumes this instance's change notifications (`workflow.changed`, published by
whichever instance made the change) and sends each subscriber a snapshot first, then every
newer change of its workflows in `version` order: a change older than what a subscriber
already has is skipped, and changes arriving while its snapshot is sent wait behind it.

What one socket may cost is bounded in bytes (`max_backlog`): what was handed to it and not
yet flushed to the kernel, plus the changes waiting behind its snapshot. A change that would
pass the bound closes the socket with 4008; one message larger than the bound goes alone.
A snapshot is loaded a page at a time and paced by the socket: each message waits until the
backlog has room (half the bound, leaving the rest for changes that arrive meanwhile), and a
socket that does not drain within `send_timeout` is closed with 4008. At most
SNAPSHOT_BUILDERS pages are loaded at once, and the loop is given back after every message.

Snapshots encode each workflow's document once per version, kept in an LRU bounded in bytes
(`DocumentCache`) and shared by every subscriber; a change is encoded once for all of its
subscribers. Messages are built around those bytes, never by encoding the document again.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from stox.bus.base import Event
from stox.changes import CHANGES_ROUTING_KEY
from stox.codec import dumps
from stox.orchestrator import Orchestrator
from stox.stats import StatsBoard, StatsFeed
from stox.workflow import Workflow, isoformat

if TYPE_CHECKING:
    from settings import WebSocketSettings

log = logging.getLogger(__name__)

CLOSE_TOO_SLOW = 4008
SNAPSHOT_LIMIT = 100  # newest workflows sent when subscribing to all of a user's
SNAPSHOT_PAGE = 10  # workflows loaded (and decoded) at a time for one snapshot
SNAPSHOT_BUILDERS = 4  # snapshot pages loaded at once, across all subscribers


class Connection(Protocol):
    """What the hub needs of a WebSocket."""

    def send(self, message: bytes) -> asyncio.Future[None] | None:
        """Hand `message` to the socket: a future that resolves once it is flushed to the
        kernel; None when the socket is closed."""

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class TooManySockets(Exception):
    """The user already has `limit` sockets open on this instance."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"too many open sockets: at most {limit} per user")
        self.limit = limit


class ServerFull(Exception):
    """This instance already has `limit` sockets open, all users together."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"server busy: at most {limit} open sockets")
        self.limit = limit


def encode(kind: str, workflow_id: str, version: int, *data: bytes, ts: str | None = None) -> bytes:
    """One WebSocket message whose `data` is the concatenation of `data`, already encoded:
    the workflow document inside is copied once, never encoded again. `ts`: now, unless
    given (the messages of one change share theirs)."""
    ts = ts or isoformat(time.time())
    head = dumps({"type": kind, "workflow_id": workflow_id, "version": version, "ts": ts})
    return b"".join((head[:-1], b',"data":', *data, b"}"))


class DocumentCache:
    """Each workflow's public document, encoded, at the newest version asked for: an LRU
    bounded in bytes, shared by every subscriber (a document larger than it is not kept)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self._bytes = 0

    def get(self, workflow_id: str, version: int, encode: Callable[[], bytes]) -> bytes:
        """The document at `version`, from the cache or from `encode()`."""
        entry = self._entries.get(workflow_id)
        if entry is not None and entry[0] == version:
            self._entries.move_to_end(workflow_id)
            return entry[1]
        data = encode()
        if entry is None or entry[0] < version:  # an older version is of no more use
            self._put(workflow_id, version, data)
        return data

    def _put(self, workflow_id: str, version: int, data: bytes) -> None:
        old = self._entries.pop(workflow_id, None)
        if old is not None:
            self._bytes -= len(old[1])
        if len(data) > self.max_bytes:
            return
        self._entries[workflow_id] = (version, data)
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= len(dropped)


class Tally:
    """Messages handed to the sockets, and those dropped for slow clients: plain counts, read
    by the metrics when scraped (nothing more on the hot path than an addition)."""

    __slots__ = ("dropped", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.dropped = 0


class Subscription:
    """One socket's interest (one workflow, or every workflow of an owner; None: all) and
    what is queued for it: `backlog`, bytes handed to the socket and not yet flushed, and
    `pending`, changes waiting behind its snapshot (`pending_bytes` of them)."""

    __slots__ = (
        "_order",
        "_progress",
        "active",
        "backlog",
        "connection",
        "max_backlog",
        "owner",
        "pending",
        "pending_bytes",
        "ready",
        "seen",
        "stats",
        "tally",
        "user",
        "workflow_id",
    )

    def __init__(
        self,
        connection: Connection,
        *,
        user: str,
        owner: str | None,
        workflow_id: str | None,
        max_backlog: int,
        tally: Tally | None = None,
        stats: bool = False,
    ) -> None:
        self.connection = connection
        self.stats = stats  # also watches the figures (stox/stats.py)
        self.tally = tally or Tally()
        self.user = user
        self.owner = owner
        self.workflow_id = workflow_id
        self.max_backlog = max_backlog
        self.seen: dict[str, int] = {}  # workflow id -> last version sent
        self.ready = False  # the snapshot and the changes that waited behind it are sent
        self.active = True  # registered with the hub
        self.backlog = 0
        # a heap of (version, arrival, workflow id, messages): released in version order
        self.pending: list[tuple[int, int, str, list[bytes]]] = []
        self.pending_bytes = 0
        self._order = itertools.count()
        self._progress: asyncio.Event | None = None

    @property
    def queued(self) -> int:
        return self.backlog + self.pending_bytes

    def offer(self, workflow_id: str, version: int, messages: list[bytes]) -> bool:
        """Send a change newer than what this subscriber has, or queue it behind the
        snapshot; False once the socket is dropped (closed with 4008 if too slow)."""
        if not self.ready:
            size = sum(map(len, messages))
            # what waits cannot drain before the snapshot is out: bounded even when nothing
            # is in flight (only the first change may be larger than the bound)
            if self.queued and self.queued + size > self.max_backlog:
                reason = f"too slow: over {self.max_backlog} bytes waiting"
                return self.too_slow(reason, refused=len(messages))
            heapq.heappush(self.pending, (version, next(self._order), workflow_id, messages))
            self.pending_bytes += size
            return True
        if self.seen.get(workflow_id, 0) >= version:
            return True
        self.seen[workflow_id] = version
        return all(self.send(message) for message in messages)

    def send(self, message: bytes) -> bool:
        """Hand one message to the socket unless that passes the bound (a message larger
        than the bound goes when nothing is in flight); False once the socket is dropped."""
        size = len(message)
        if not self.has_room(size, self.max_backlog):
            return self.too_slow(f"too slow: over {self.max_backlog} bytes waiting")
        future = self.connection.send(message)
        if future is None:
            return False
        self.tally.sent += 1
        self.backlog += size
        future.add_done_callback(lambda done: self._flushed(done, size))
        return True

    def has_room(self, size: int, limit: int) -> bool:
        """Whether `size` more bytes keep what is queued within `limit`, or nothing is in
        flight (the only way a message larger than the bound can go)."""
        return self.backlog == 0 or self.queued + size <= limit

    async def progress(self) -> None:
        """Until a write is flushed or the subscription ends."""
        if self._progress is None:
            self._progress = asyncio.Event()
        await self._progress.wait()
        self._progress = None

    def too_slow(self, reason: str, refused: int = 1) -> bool:
        """Close the socket with 4008; False, for the caller to return. The `refused`
        messages and those waiting behind the snapshot count as dropped."""
        self.tally.dropped += refused + sum(len(waiting[3]) for waiting in self.pending)
        self.connection.close(CLOSE_TOO_SLOW, reason)
        return False

    def end(self) -> None:
        self.active = False
        self.pending.clear()
        self.pending_bytes = 0
        self._wake()

    def _flushed(self, future: asyncio.Future[None], size: int) -> None:
        self.backlog -= size
        if not future.cancelled():
            future.exception()  # a write to a closed socket is expected here; mark it seen
        self._wake()

    def _wake(self) -> None:
        if self._progress is not None:
            self._progress.set()


class Hub:
    def __init__(
        self,
        orchestrator: Orchestrator,
        *,
        max_backlog: int,
        send_timeout: float,
        max_sockets_per_user: int,
        snapshot_cache: int,
        max_sockets: int,
        snapshot_limit: int = SNAPSHOT_LIMIT,
        stats: StatsBoard | None = None,
    ) -> None:
        """The limits are those of `websocket.*` in settings.py (see `from_settings`);
        `stats` counts every change notification, for GET /api/v1/stats and the sockets
        that watch the figures."""
        self.orchestrator = orchestrator
        self.max_backlog = max_backlog
        self.send_timeout = send_timeout
        self.max_sockets_per_user = max_sockets_per_user
        self.max_sockets = max_sockets
        self.snapshot_limit = snapshot_limit
        self.documents = DocumentCache(snapshot_cache)
        self._builders = asyncio.Semaphore(SNAPSHOT_BUILDERS)
        self._by_workflow: dict[str, set[Subscription]] = {}
        self._by_owner: dict[str | None, set[Subscription]] = {}
        self._sockets: Counter[str] = Counter()  # user -> subscriptions
        self._total = 0  # subscriptions, all users together
        self.tally = Tally()
        self.stats = stats or StatsBoard()
        self.feed = StatsFeed(self.stats, self.unsubscribe)

    @classmethod
    def from_settings(
        cls,
        orchestrator: Orchestrator,
        settings: WebSocketSettings,
        stats: StatsBoard | None = None,
    ) -> Hub:
        return cls(
            orchestrator,
            max_backlog=settings.max_backlog,
            send_timeout=settings.send_timeout,
            max_sockets_per_user=settings.max_sockets_per_user,
            snapshot_cache=settings.snapshot_cache,
            max_sockets=settings.max_sockets,
            stats=stats,
        )

    @property
    def socket_count(self) -> int:
        """Open sockets, all users together."""
        return self._total

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._by_workflow.values()) + sum(
            len(s) for s in self._by_owner.values()
        )

    def subscribe(
        self,
        connection: Connection,
        *,
        user: str,
        owner: str | None,
        workflow_id: str | None,
        stats: bool = False,
    ) -> Subscription:
        """Register a socket of `user`; changes from now on wait behind its snapshot, which
        `send_snapshot` sends. TooManySockets when `user` has max_sockets_per_user already.

        `owner` limits what may be seen (None: an admin, who sees everything). With `stats`
        (and no `workflow_id`) the socket also watches the figures of `owner`'s workflows
        (StatsFeed): once its snapshot is out, it is sent them, then their pushes.
        """
        if self._sockets[user] >= self.max_sockets_per_user:
            raise TooManySockets(self.max_sockets_per_user)
        if self._total >= self.max_sockets:
            raise ServerFull(self.max_sockets)
        sub = Subscription(
            connection,
            user=user,
            owner=owner,
            workflow_id=workflow_id,
            max_backlog=self.max_backlog,
            tally=self.tally,
            stats=stats,
        )
        self._sockets[user] += 1
        self._total += 1
        if workflow_id is not None:
            self._by_workflow.setdefault(workflow_id, set()).add(sub)
        else:
            self._by_owner.setdefault(owner, set()).add(sub)
        return sub

    async def send_snapshot(self, sub: Subscription) -> None:
        """Send the snapshot, then the changes that arrived meanwhile; from then on changes
        go straight out. With a `workflow_id`, another owner's workflow raises NotFound, as
        the HTTP API answers 404. A subscription that fails is unsubscribed."""
        try:
            sent = await self._send_snapshot(sub) and await self._release_pending(sub)
            if sent and sub.stats and sub.workflow_id is None:
                sent = self.feed.add(sub)
        except BaseException:
            self.unsubscribe(sub)
            raise
        if not sent:
            self.unsubscribe(sub)

    async def _send_snapshot(self, sub: Subscription) -> bool:
        before: tuple[str, str] | None = None
        remaining = 1 if sub.workflow_id is not None else self.snapshot_limit
        while remaining > 0:
            page_size = min(SNAPSHOT_PAGE, remaining)
            page, before = await self._load_page(sub, page_size, before)
            if not sub.active:  # closed or dropped while the page loaded
                return False
            for workflow_id, version, document in page:
                sub.seen[workflow_id] = version
                message = encode("snapshot", workflow_id, version, document)
                if not await self._send_paced(sub, message, self.max_backlog // 2):
                    return False
            if len(page) < page_size:
                break
            remaining -= len(page)
        return True

    async def _load_page(
        self, sub: Subscription, limit: int, before: tuple[str, str] | None
    ) -> tuple[list[tuple[str, int, bytes]], tuple[str, str] | None]:
        """(id, version, encoded document) of the next page, newest first, and its cursor.

        Only the encoded documents outlive the page: the decoded ones are dropped here.
        """
        async with self._builders:
            if not sub.active:  # closed while it waited for a builder: the store may be too
                return [], None
            if sub.workflow_id is not None:
                workflows = [await self.orchestrator.get(sub.workflow_id, sub.owner)]
            else:
                workflows = await self.orchestrator.list_workflows(sub.owner, None, limit, before)
            page = [(w.id, w.version, self._document(w)) for w in workflows]
        cursor = (workflows[-1].created_at, workflows[-1].id) if workflows else None
        return page, cursor

    def _document(self, workflow: Workflow) -> bytes:
        return self.documents.get(workflow.id, workflow.version, lambda: dumps(workflow.public()))

    async def _release_pending(self, sub: Subscription) -> bool:
        """Send what waited behind the snapshot, oldest version first, paced like it."""
        while sub.pending:
            version, _, workflow_id, messages = heapq.heappop(sub.pending)
            sub.pending_bytes -= sum(map(len, messages))
            if sub.seen.get(workflow_id, 0) >= version:
                continue
            sub.seen[workflow_id] = version
            for message in messages:
                if not await self._send_paced(sub, message, self.max_backlog):
                    return False
        sub.ready = True
        return True

    async def _send_paced(self, sub: Subscription, message: bytes, limit: int) -> bool:
        """Send once the backlog leaves room for `message` within `limit`; False when the
        socket is gone, or did not drain within send_timeout (then closed with 4008)."""
        if not sub.has_room(len(message), limit):
            try:
                async with asyncio.timeout(self.send_timeout):
                    while sub.active and not sub.has_room(len(message), limit):
                        await sub.progress()
            except TimeoutError:
                return sub.too_slow(f"too slow: not drained within {self.send_timeout:g}s")
        if not (sub.active and sub.send(message)):
            return False
        await asyncio.sleep(0)  # one message at a time: the loop serves others in between
        return sub.active

    def unsubscribe(self, sub: Subscription) -> None:
        if not sub.active:
            return
        sub.end()
        self._sockets[sub.user] -= 1
        self._total -= 1
        if not self._sockets[sub.user]:
            del self._sockets[sub.user]
        if sub.stats:
            self.feed.remove(sub)
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
        """Bus handler for change notifications: batches of them (`workflow.changes`, see
        stox/changes.py), or one (`workflow.changed`, from an instance of an earlier version)."""
        if event.routing_key != CHANGES_ROUTING_KEY:
            self._notify(event.payload, event.message_id)
            return
        notifications = event.payload.get("notifications")
        if not isinstance(notifications, list):
            log.warning("ignoring a malformed batch of change notifications %s", event.message_id)
            return
        for item in notifications:
            if isinstance(item, dict):
                self._notify(item.get("payload"), str(item.get("message_id")))
            else:
                log.warning("ignoring a malformed change notification in %s", event.message_id)

    def _notify(self, payload: Any, message_id: str) -> None:
        """Send one change notification to its subscribers."""
        parsed = _parse_change(payload)
        if parsed is None:
            log.warning("ignoring a malformed change notification in %s", message_id)
            return
        workflow_id, owner, version, changes, document = parsed
        if self.stats.record(workflow_id, owner, version, changes, document):
            self.feed.changed(owner)
        targets = [
            *self._by_workflow.get(workflow_id, ()),
            *self._by_owner.get(owner, ()),
            *(self._by_owner.get(None, ()) if owner is not None else ()),
        ]
        if not targets:
            return
        # not cached: a stored document of the same version may differ in outbox_at, which
        # dropping published events changes without a new version
        document_json = dumps(document)
        now = isoformat(time.time())
        messages = [
            encode(
                kind,
                workflow_id,
                version,
                b'{"step":',
                dumps(step),
                b',"workflow":',
                document_json,
                b"}",
                ts=now,
            )
            for kind, step in changes
        ]
        for sub in targets:
            if not sub.offer(workflow_id, version, messages):
                self.unsubscribe(sub)

    async def close(self) -> None:
        self.feed.close()
        for index in (self._by_workflow, self._by_owner):
            for members in list(index.values()):
                for sub in list(members):
                    sub.connection.close(1001, "server shutting down")
                    self.unsubscribe(sub)


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
