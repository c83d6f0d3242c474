"""Unit tests of the WebSocket hub (stox/hub.py), with the real handler for its byte bound.

The hub runs on a real Orchestrator over an in-memory fake store (whose reads can be held
open, to put changes in flight while a snapshot loads) and a fake bus that records what is
published; the `workflow.changed` notifications the orchestrator publishes are handed to
`Hub.on_change` by the test, in whatever order a test needs.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
from collections.abc import Iterable
from typing import Any, TypeVar

import pytest
import tornado.httputil
import tornado.web
import tornado.websocket
from support import Calls

from handlers.ws import WorkflowSocket, text_frame
from settings import WebSocketSettings
from stox.bus.base import Event
from stox.changes import CHANGES_ROUTING_KEY
from stox.hub import (
    CLOSE_TOO_SLOW,
    SNAPSHOT_BUILDERS,
    SNAPSHOT_LIMIT,
    SNAPSHOT_PAGE,
    Connection,
    DocumentCache,
    Hub,
    ServerFull,
    Subscription,
    TooManySockets,
)
from stox.orchestrator import NotFound, Orchestrator
from stox.store.base import NO_FILTERS, Filters
from stox.workflow import CHANGE_ROUTING_KEY, Pipeline, Report, Workflow

MESSAGE_KEYS = {"type", "workflow_id", "version", "data", "ts"}


# -- fakes ---------------------------------------------------------------------------------


T = TypeVar("T")


class FakeStore:
    """A dict of documents; `hold_next_read()` makes the next get/list wait for `release()`.

    A held read takes its result when it is called and hands it back only once released,
    as a query whose answer is still on the wire while the workflow moves on.
    """

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self._hold: asyncio.Event | None = None
        self._holding: asyncio.Event | None = None
        self.read_started = asyncio.Event()
        self.listed: list[int] = []  # how many documents each list() returned

    def hold_next_read(self) -> None:
        self._hold = asyncio.Event()
        self.read_started.clear()

    def release(self) -> None:
        assert self._holding is not None, "no read is being held"
        self._holding.set()

    async def _held(self, result: T) -> T:
        hold, self._hold = self._hold, None
        if hold is not None:
            self._holding = hold
            self.read_started.set()
            await hold.wait()
        return result

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def insert(self, doc: dict[str, Any], events: Any = None) -> int:
        assert doc["id"] not in self.docs
        self.docs[doc["id"]] = copy.deepcopy(doc)
        return len(json.dumps(doc))

    async def get(self, workflow_id: str) -> dict[str, Any] | None:
        doc = self.docs.get(workflow_id)
        return await self._held(copy.deepcopy(doc) if doc is not None else None)

    async def replace(
        self, doc: dict[str, Any], expected_version: int, new_events: list[Any]
    ) -> int:
        stored = self.docs.get(doc["id"])
        if stored is None or stored["version"] != expected_version:
            return 0
        self.docs[doc["id"]] = copy.deepcopy(doc)
        return len(json.dumps(doc))

    def drop_published(
        self, workflow_id: str, version: int, message_ids: Any, kept: list[dict[str, Any]]
    ) -> None:
        self.docs[workflow_id]["outbox"] = copy.deepcopy(kept)

    async def flush(self) -> None:
        pass

    async def list_workflows(
        self,
        *,
        owner: str | None,
        status: str | None,
        limit: int,
        before: tuple[str, str] | None = None,
        filters: Filters = NO_FILTERS,
    ) -> list[dict[str, Any]]:
        assert filters == NO_FILTERS  # the hub's snapshots filter by owner alone
        docs = [
            d
            for d in self.docs.values()
            if (owner is None or d["owner"] == owner)
            and (status is None or d["status"] == status)
            and (before is None or (d["created_at"], d["id"]) < before)
        ]
        docs.sort(key=lambda d: (d["created_at"], d["id"]), reverse=True)
        page = [copy.deepcopy(d) for d in docs[:limit]]
        self.listed.append(len(page))
        return await self._held(page)

    async def due(self, now: str, limit: int) -> list[dict[str, Any]]:
        return []

    async def unpublished(self, written_before: str, limit: int) -> list[dict[str, Any]]:
        return []


class FakeBus:
    """Confirms every publish and keeps the events, as a broker would deliver them (JSON)."""

    kind = "fake"
    remote_consumers = False

    def __init__(self) -> None:
        self.published: list[Event] = []

    @property
    def connected(self) -> bool:
        return True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def publish(self, event: Event) -> None:
        payload = json.loads(json.dumps(event.payload))
        self.published.append(Event(event.routing_key, payload, event.message_id))

    async def declare(self, queue: str, bindings: Any, *, exclusive: bool = False) -> None:
        pass

    async def consume(self, queue: str, handler: Any) -> None:
        pass


class FakeConnection:
    """What the hub sees of a socket; `accept=False` behaves like a dropped one."""

    def __init__(self, *, accept: bool = True) -> None:
        self.accept = accept
        self.sent: list[bytes] = []
        self.closed: tuple[int | None, str | None] | None = None

    def send(self, message: bytes) -> asyncio.Future[None] | None:
        if not self.accept:
            return None
        self.sent.append(message)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)  # flushed at once
        return future

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.closed = (code, reason)

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.sent]


# -- fixtures and helpers ------------------------------------------------------------------


class World:
    """A real Orchestrator on the fakes, and the hub under test."""

    def __init__(self, **hub_options: Any) -> None:
        self.store = FakeStore()
        self.bus = FakeBus()
        self.clock_now = 1_700_000_000.0
        self.orchestrator = Orchestrator(
            self.store,  # type: ignore[arg-type]
            self.bus,
            Pipeline(),
            clock=self.clock,
        )
        limits = dataclasses.replace(WebSocketSettings(), **hub_options)
        self.hub = Hub.from_settings(self.orchestrator, limits)
        self._delivered = 0

    def clock(self) -> float:
        self.clock_now += 1.0  # distinct created_at for every upload: a stable list order
        return self.clock_now

    async def subscribe(
        self, conn: Connection, *, owner: str | None, workflow_id: str | None, user: str = "alice"
    ) -> Subscription:
        """Subscribe and send the snapshot, as the handler does."""
        sub = self.hub.subscribe(conn, user=user, owner=owner, workflow_id=workflow_id)
        await self.hub.send_snapshot(sub)
        return sub

    async def upload(self, owner: str = "alice", **product: Any) -> Workflow:
        workflow = await self.orchestrator.upload(owner, {"name": "Mug", **product})
        await self.orchestrator.drain()
        return workflow

    async def complete_step(self, workflow_id: str) -> Workflow:
        current = await self.orchestrator.get(workflow_id)
        outcome = await self.orchestrator.report(
            Report(workflow_id, current.step.step_id or "", success=True, result={"ok": True})
        )
        await self.orchestrator.drain()
        return outcome.workflow

    def new_notifications(self) -> list[Event]:
        """Change notifications published since the last call, in order, each as an event
        of its own (the hub handles one of a batch as it handles one alone)."""
        return [
            Event(CHANGE_ROUTING_KEY, item["payload"], item["message_id"])
            for batch in self.new_batches()
            for item in batch.payload["notifications"]
        ]

    def new_batches(self) -> list[Event]:
        """Batches of change notifications published since the last call, in order."""
        fresh = self.bus.published[self._delivered :]
        self._delivered = len(self.bus.published)
        return [e for e in fresh if e.routing_key == CHANGES_ROUTING_KEY]

    async def deliver(self, events: Iterable[Event]) -> None:
        for event in events:
            await self.hub.on_change(event)


@pytest.fixture
def world() -> World:
    return World()


def notification(
    workflow_id: str,
    version: int,
    changes: list[dict[str, Any]] | None = None,
    owner: str = "alice",
) -> Event:
    """A hand-made `workflow.changed` event, shaped as stox.workflow seals them."""
    changes = changes if changes is not None else [{"type": "step_dispatched", "step": "s"}]
    payload = {
        "event": CHANGE_ROUTING_KEY,
        "workflow_id": workflow_id,
        "occurred_at": "2026-01-01T00:00:00.000000Z",
        "owner": owner,
        "version": version,
        "changes": changes,
        "workflow": {"id": workflow_id, "owner": owner, "version": version},
    }
    return Event(CHANGE_ROUTING_KEY, payload, f"m-{workflow_id}-{version}")


def kinds(messages: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(m["type"], m["version"]) for m in messages]


# -- snapshots and fan-out -----------------------------------------------------------------


async def test_snapshot_first_then_changes(world: World) -> None:
    wf = await world.upload()
    stored = await world.orchestrator.get(wf.id)
    world.new_notifications()
    conn = FakeConnection()
    await world.subscribe(conn, owner="alice", workflow_id=wf.id)

    [snapshot] = conn.messages()
    assert set(snapshot) == MESSAGE_KEYS
    assert snapshot["type"] == "snapshot"
    assert snapshot["workflow_id"] == wf.id
    assert snapshot["version"] == stored.version
    assert snapshot["data"] == stored.public()
    assert "outbox" not in snapshot["data"]

    after = await world.complete_step(wf.id)
    await world.deliver(world.new_notifications())
    changes = conn.messages()[1:]
    assert [(m["type"], m["data"]["step"]) for m in changes] == [
        ("step_completed", "image_processing"),
        ("step_dispatched", "ai_enhancement"),
    ]
    for message in changes:
        assert set(message) == MESSAGE_KEYS
        assert set(message["data"]) == {"step", "workflow"}
        assert message["version"] > snapshot["version"]
        assert message["data"]["workflow"]["version"] == message["version"]
        assert message["data"]["workflow"]["steps"][0]["status"] == "completed"
        assert "outbox" not in message["data"]["workflow"]
    assert after.version >= changes[-1]["version"]


async def test_each_message_is_encoded_once_for_all_subscribers(world: World) -> None:
    wf = await world.upload()
    world.new_notifications()
    by_workflow, by_owner, admin = FakeConnection(), FakeConnection(), FakeConnection()
    await world.subscribe(by_workflow, owner="alice", workflow_id=wf.id)
    await world.subscribe(by_owner, owner="alice", workflow_id=None)
    await world.subscribe(admin, owner=None, workflow_id=None)
    assert world.hub.subscriber_count == 3

    await world.complete_step(wf.id)
    await world.deliver(world.new_notifications())

    changes = [conn.sent[1:] for conn in (by_workflow, by_owner, admin)]
    assert [len(c) for c in changes] == [2, 2, 2]
    for index in range(2):
        first = changes[0][index]
        assert all(c[index] is first for c in changes[1:]), "encoded once, the same bytes"
        assert isinstance(first, bytes)


async def test_a_change_not_newer_than_what_a_subscriber_has_is_skipped(world: World) -> None:
    wf = await world.upload()
    upload_change = world.new_notifications()
    conn = FakeConnection()
    await world.subscribe(conn, owner="alice", workflow_id=wf.id)
    snapshot_version = conn.messages()[0]["version"]

    await world.complete_step(wf.id)
    first = world.new_notifications()
    await world.complete_step(wf.id)
    second = world.new_notifications()
    v3, v4 = first[0].payload["version"], second[0].payload["version"]
    assert snapshot_version < v3 < v4

    # the later change overtakes the earlier one; then stale and repeated ones arrive
    await world.deliver([*second, *first, *upload_change, *second])
    assert kinds(conn.messages()[1:]) == [("step_completed", v4), ("step_dispatched", v4)]


async def test_a_change_equal_to_the_snapshot_version_is_skipped(world: World) -> None:
    conn = FakeConnection()
    wf = await world.upload()
    await world.subscribe(conn, owner=None, workflow_id=wf.id)
    version = conn.messages()[0]["version"]
    await world.deliver([notification(wf.id, version), notification(wf.id, version - 1)])
    await world.deliver([notification(wf.id, version + 1)])
    assert kinds(conn.messages()) == [("snapshot", version), ("step_dispatched", version + 1)]


# -- changes in flight while a snapshot loads ----------------------------------------------


async def test_changes_during_a_workflow_snapshot_wait_behind_it(world: World) -> None:
    wf = await world.upload()
    upload_change = world.new_notifications()
    conn = FakeConnection()

    world.store.hold_next_read()
    subscribing = asyncio.ensure_future(world.subscribe(conn, owner="alice", workflow_id=wf.id))
    await asyncio.wait_for(world.store.read_started.wait(), 5)
    snapshot_version = (await world.orchestrator.get(wf.id)).version

    # the workflow moves on while the snapshot is on its way; notifications arrive late,
    # out of order and twice
    await world.complete_step(wf.id)
    first = world.new_notifications()
    await world.complete_step(wf.id)
    second = world.new_notifications()
    await world.deliver([*second, *upload_change, *first, *second])
    assert conn.sent == [], "nothing before the snapshot"

    world.store.release()
    await asyncio.wait_for(subscribing, 5)

    v3, v4 = first[0].payload["version"], second[0].payload["version"]
    assert kinds(conn.messages()) == [
        ("snapshot", snapshot_version),
        ("step_completed", v3),
        ("step_dispatched", v3),
        ("step_completed", v4),
        ("step_dispatched", v4),
    ]
    assert [m["data"]["step"] for m in conn.messages()[1:]] == [
        "image_processing",
        "ai_enhancement",
        "ai_enhancement",
        "seo_generation",
    ]

    # and afterwards changes flow straight through
    await world.complete_step(wf.id)
    await world.deliver(world.new_notifications())
    assert [m["type"] for m in conn.messages()[5:]] == ["step_completed", "workflow_completed"]


async def test_changes_during_an_owner_snapshot_wait_behind_it(world: World) -> None:
    older = await world.upload("alice")
    world.new_notifications()
    conn = FakeConnection()

    world.store.hold_next_read()
    subscribing = asyncio.ensure_future(world.subscribe(conn, owner="alice", workflow_id=None))
    await asyncio.wait_for(world.store.read_started.wait(), 5)
    snapshot_version = (await world.orchestrator.get(older.id)).version

    newer = await world.upload("alice")  # not in the snapshot being loaded
    bobs = await world.upload("bob")
    await world.complete_step(older.id)
    await world.deliver(reversed(world.new_notifications()))
    assert conn.sent == []

    world.store.release()
    await asyncio.wait_for(subscribing, 5)

    messages = conn.messages()
    assert (messages[0]["type"], messages[0]["workflow_id"]) == ("snapshot", older.id)
    assert messages[0]["version"] == snapshot_version
    rest = [(m["workflow_id"], m["type"]) for m in messages[1:]]
    assert sorted(rest) == sorted(
        [
            (newer.id, "step_dispatched"),
            (older.id, "step_completed"),
            (older.id, "step_dispatched"),
        ]
    )
    assert bobs.id not in {m["workflow_id"] for m in messages}
    versions = [m["version"] for m in messages[1:]]
    assert versions == sorted(versions), "released in version order"


async def test_a_snapshot_that_fails_to_load_leaves_no_subscription(world: World) -> None:
    wf = await world.upload("bob")
    conn = FakeConnection()
    world.store.hold_next_read()
    subscribing = asyncio.ensure_future(world.subscribe(conn, owner="alice", workflow_id=wf.id))
    await asyncio.wait_for(world.store.read_started.wait(), 5)
    await world.deliver([notification(wf.id, 99, owner="bob")])
    world.store.release()
    with pytest.raises(NotFound):
        await subscribing
    assert world.hub.subscriber_count == 0
    assert conn.sent == []
    await world.deliver([notification(wf.id, 100, owner="bob")])
    assert conn.sent == []


async def test_a_subscription_closed_while_its_snapshot_loads_gets_nothing(world: World) -> None:
    wf = await world.upload()
    conn = FakeConnection()
    world.store.hold_next_read()
    subscribing = asyncio.ensure_future(world.subscribe(conn, owner="alice", workflow_id=wf.id))
    await asyncio.wait_for(world.store.read_started.wait(), 5)
    await world.hub.close()  # the server shuts down meanwhile
    assert conn.closed is not None and conn.closed[0] == 1001
    world.store.release()
    await asyncio.wait_for(subscribing, 5)
    assert conn.sent == []
    assert world.hub.subscriber_count == 0


async def test_a_snapshot_waiting_for_a_builder_when_the_hub_closes_reads_nothing(
    world: World,
) -> None:
    # the fault run (bench/chaos.py) found it: at shutdown the store closes after the hub, so
    # a snapshot that got its builder only then read a closed store (an uncaught StoreError)
    await world.upload()
    conn = FakeConnection()
    for _ in range(SNAPSHOT_BUILDERS):
        await world.hub._builders.acquire()  # every builder busy with other snapshots
    subscribing = asyncio.ensure_future(world.subscribe(conn, owner="alice", workflow_id=None))
    await asyncio.sleep(0)
    await world.hub.close()
    reads = len(world.store.listed)
    for _ in range(SNAPSHOT_BUILDERS):
        world.hub._builders.release()
    await asyncio.wait_for(subscribing, 5)
    assert len(world.store.listed) == reads, "no read after the hub closed"
    assert conn.sent == []
    assert world.hub.subscriber_count == 0


async def test_another_owners_workflow_is_not_found(world: World) -> None:
    wf = await world.upload("bob")
    conn = FakeConnection()
    with pytest.raises(NotFound):
        await world.subscribe(conn, owner="alice", workflow_id=wf.id)
    with pytest.raises(NotFound):
        await world.subscribe(conn, owner="alice", workflow_id="f" * 32)
    assert world.hub.subscriber_count == 0
    assert conn.sent == []


# -- dropped connections -------------------------------------------------------------------


async def test_a_connection_whose_send_fails_is_unsubscribed(world: World) -> None:
    wf = await world.upload()
    world.new_notifications()
    healthy, dropping = FakeConnection(), FakeConnection()
    await world.subscribe(healthy, owner="alice", workflow_id=wf.id)
    await world.subscribe(dropping, owner="alice", workflow_id=None)
    assert world.hub.subscriber_count == 2

    dropping.accept = False
    await world.complete_step(wf.id)
    await world.deliver(world.new_notifications())
    assert world.hub.subscriber_count == 1
    assert len(healthy.sent) == 3

    await world.complete_step(wf.id)
    await world.deliver(world.new_notifications())
    assert len(dropping.sent) == 1  # the snapshot only
    assert len(healthy.sent) == 5


async def test_a_connection_that_fails_its_snapshot_is_unsubscribed(world: World) -> None:
    await world.upload()
    conn = FakeConnection(accept=False)
    await world.subscribe(conn, owner="alice", workflow_id=None)
    assert world.hub.subscriber_count == 0


# -- the byte bound, with the real handler on a client that never reads ---------------------


class _StubHTTPConnection(tornado.httputil.HTTPConnection):
    def set_close_callback(self, callback: Any) -> None:
        pass


class StalledSocket(WorkflowSocket):
    """The real WorkflowSocket, writing to a client that never reads: no write completes
    until the test flushes it."""

    def __init__(self, hub: Hub) -> None:
        app = tornado.web.Application([], hub=hub, allowed_origins=[])
        request = tornado.httputil.HTTPServerRequest(
            start_line=tornado.httputil.RequestStartLine("GET", "/ws", "HTTP/1.1"),
            headers=tornado.httputil.HTTPHeaders({"Host": "127.0.0.1"}),
            connection=_StubHTTPConnection(),
        )
        super().__init__(app, request)
        self.written: list[bytes] = []
        self.writes: list[asyncio.Future[None]] = []
        self.closed_with: list[tuple[int | None, str | None]] = []
        self.refuse_writes = False

    def is_closing(self) -> bool:
        return self.refuse_writes  # a closed socket

    def write_messages(self, messages: list[bytes]) -> asyncio.Future[None]:
        if self.refuse_writes:
            raise tornado.websocket.WebSocketClosedError()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.written.extend(messages)
        self.writes.append(future)
        return future

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.closed_with.append((code, reason))

    async def let_client_read(self, count: int | None = None) -> None:
        """Let the client read the oldest `count` writes (default: all so far)."""
        for future in [f for f in self.writes if not f.done()][:count]:
            future.set_result(None)
        await settle()  # done callbacks run on the loop

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.written]


BOUND = 64 * 1024
TOO_SLOW = (CLOSE_TOO_SLOW, f"too slow: over {BOUND} bytes waiting")


def sized_notification(workflow_id: str, version: int, size: int) -> Event:
    """A change whose one message is `size` bytes of padding and a little more."""
    event = notification(workflow_id, version)
    event.payload["workflow"]["padding"] = "x" * size
    return event


async def settle() -> None:
    """Let every task run until it waits on something other than the loop."""
    for _ in range(50):
        await asyncio.sleep(0)


async def test_a_live_change_that_would_pass_the_bound_closes_the_socket() -> None:
    world = World(max_backlog=BOUND)
    wf = await world.upload()
    socket = StalledSocket(world.hub)
    sub = await world.subscribe(socket, owner="alice", workflow_id=wf.id)
    assert sub.backlog == len(socket.written[0])  # the snapshot, never flushed

    version = (await world.orchestrator.get(wf.id)).version
    for step in range(1, 100):
        await world.hub.on_change(sized_notification(wf.id, version + step, 10_000))
        await asyncio.sleep(0)  # written at the end of the turn
        if socket.closed_with:
            break
    assert socket.closed_with == [TOO_SLOW]
    assert world.hub.subscriber_count == 0
    written = sum(map(len, socket.written))
    assert sub.backlog == written <= BOUND < written + 10_000, "nothing written past the bound"
    assert len(socket.written) == 7  # the snapshot and six changes of ~10 KB

    await world.hub.on_change(sized_notification(wf.id, version + 100, 10))

    await asyncio.sleep(0)  # written at the end of the turn
    assert len(socket.written) == 7, "a dropped socket gets nothing more"


async def test_a_message_larger_than_the_bound_goes_when_nothing_is_in_flight() -> None:
    world = World(max_backlog=BOUND)
    wf = await world.upload()
    socket = StalledSocket(world.hub)
    sub = await world.subscribe(socket, owner="alice", workflow_id=wf.id)
    version = (await world.orchestrator.get(wf.id)).version
    await socket.let_client_read()
    assert sub.backlog == 0

    await world.hub.on_change(sized_notification(wf.id, version + 1, 2 * BOUND))

    await asyncio.sleep(0)  # written at the end of the turn
    assert sub.backlog > BOUND
    assert socket.closed_with == []
    await socket.let_client_read()
    await world.hub.on_change(sized_notification(wf.id, version + 2, 2 * BOUND))
    await asyncio.sleep(0)  # written at the end of the turn
    assert socket.closed_with == []
    assert [m["version"] for m in socket.messages()[1:]] == [version + 1, version + 2]

    await world.hub.on_change(sized_notification(wf.id, version + 3, 10))  # behind the big one
    assert socket.closed_with == [TOO_SLOW]
    assert world.hub.subscriber_count == 0


async def test_flushed_and_failed_writes_shrink_the_backlog() -> None:
    world = World(max_backlog=BOUND)
    wf = await world.upload()
    socket = StalledSocket(world.hub)
    sub = await world.subscribe(socket, owner="alice", workflow_id=wf.id)
    version = (await world.orchestrator.get(wf.id)).version
    for step in range(1, 6):
        await world.hub.on_change(sized_notification(wf.id, version + step, 10_000))
        await asyncio.sleep(0)  # written at the end of the turn
    sizes = [len(m) for m in socket.written]
    assert sub.backlog == sum(sizes)

    await socket.let_client_read(2)
    socket.writes[2].set_exception(tornado.websocket.WebSocketClosedError())
    await settle()
    assert sub.backlog == sum(sizes[3:])
    for step in range(6, 9):  # the room made is used again
        await world.hub.on_change(sized_notification(wf.id, version + step, 10_000))
        await asyncio.sleep(0)  # written at the end of the turn
    assert socket.closed_with == []
    assert sub.backlog == sum(len(m) for m in socket.written[3:])


async def test_a_write_to_a_closed_socket_is_a_failed_send() -> None:
    world = World()
    wf = await world.upload()
    socket = StalledSocket(world.hub)
    socket.refuse_writes = True
    assert socket.send(b"{}") is None
    sub = await world.subscribe(socket, owner="alice", workflow_id=wf.id)
    assert sub.backlog == 0
    assert world.hub.subscriber_count == 0


async def test_a_snapshot_is_paced_by_the_socket_and_loaded_in_pages() -> None:
    world = World(max_backlog=BOUND)
    uploaded = [await world.upload(description="d" * 10_000) for _ in range(30)]
    socket = StalledSocket(world.hub)
    sub = world.hub.subscribe(socket, user="alice", owner="alice", workflow_id=None)
    sending = asyncio.ensure_future(world.hub.send_snapshot(sub))
    await settle()

    # up to half the bound is in flight (messages of ~11 KB), the rest waits for the client
    sizes = [len(m) for m in socket.written]
    in_flight = len(sizes)
    assert in_flight >= 2 and sum(sizes) <= BOUND // 2 < sum(sizes) + sizes[0]
    # and what it waits with is one page of documents, not the 30 (or 100) of the snapshot
    assert world.store.listed == [SNAPSHOT_PAGE]

    await socket.let_client_read(1)
    await settle()
    assert len(socket.written) == in_flight + 1
    while not sending.done():
        await socket.let_client_read()
        await settle()
    await sending
    assert socket.closed_with == []
    assert [m["workflow_id"] for m in socket.messages()] == [w.id for w in reversed(uploaded)]
    assert world.store.listed == [SNAPSHOT_PAGE] * 3 + [0]


async def test_a_socket_that_does_not_drain_within_the_send_timeout_is_closed() -> None:
    world = World(max_backlog=BOUND, send_timeout=0.05)
    for _ in range(10):
        await world.upload(description="d" * 10_000)
    socket = StalledSocket(world.hub)
    sub = world.hub.subscribe(socket, user="alice", owner="alice", workflow_id=None)
    await asyncio.wait_for(world.hub.send_snapshot(sub), 5)
    assert socket.closed_with == [(CLOSE_TOO_SLOW, "too slow: not drained within 0.05s")]
    assert 2 <= len(socket.written) < 10
    assert world.hub.subscriber_count == 0


async def test_changes_waiting_behind_a_snapshot_count_against_the_bound() -> None:
    world = World(max_backlog=BOUND)
    for _ in range(20):
        await world.upload(description="d" * 10_000)
    newest = (await world.orchestrator.list_workflows("alice", None, 1))[0]
    socket = StalledSocket(world.hub)
    sub = world.hub.subscribe(socket, user="alice", owner="alice", workflow_id=None)
    sending = asyncio.ensure_future(world.hub.send_snapshot(sub))
    await settle()
    in_flight = sub.backlog
    assert in_flight <= BOUND // 2

    for step in range(1, 10):
        queued = sub.queued
        await world.hub.on_change(sized_notification(newest.id, newest.version + step, 10_000))
        if socket.closed_with:
            break
    assert socket.closed_with == [TOO_SLOW]
    # those before waited (in flight and waiting <= the bound); this one would have passed it
    assert step >= 3 and in_flight < queued <= BOUND < queued + 11_000
    await asyncio.wait_for(sending, 5)
    assert sub.backlog == in_flight, "the snapshot stops there"
    assert world.hub.subscriber_count == 0
    assert sub.pending == [] and sub.pending_bytes == 0


# -- sockets per user ----------------------------------------------------------------------


async def test_sockets_per_user_are_limited_admins_too() -> None:
    world = World(max_sockets_per_user=2)
    wf = await world.upload()
    first = await world.subscribe(FakeConnection(), owner="alice", workflow_id=wf.id)
    await world.subscribe(FakeConnection(), owner="alice", workflow_id=None)
    with pytest.raises(TooManySockets, match=r"^too many open sockets: at most 2 per user$"):
        world.hub.subscribe(FakeConnection(), user="alice", owner="alice", workflow_id=None)
    assert world.hub.subscriber_count == 2

    # another user has slots of their own; an admin is counted like anyone
    await world.subscribe(FakeConnection(), owner="bob", workflow_id=None, user="bob")
    for _ in range(2):
        await world.subscribe(FakeConnection(), owner=None, workflow_id=wf.id, user="root")
    with pytest.raises(TooManySockets):
        world.hub.subscribe(FakeConnection(), user="root", owner=None, workflow_id=None)

    # a socket that goes frees its slot
    world.hub.unsubscribe(first)
    world.hub.unsubscribe(first)
    await world.subscribe(FakeConnection(), owner="alice", workflow_id=None)
    with pytest.raises(TooManySockets):
        world.hub.subscribe(FakeConnection(), user="alice", owner="alice", workflow_id=None)
    # closing the hub frees them all
    await world.hub.close()
    assert world.hub.subscriber_count == 0
    await world.subscribe(FakeConnection(), owner="alice", workflow_id=None)


async def test_sockets_of_all_users_together_are_limited_per_instance() -> None:
    """Many users, each within max_sockets_per_user, cannot hold more than max_sockets: each
    socket may cost up to max_backlog, so their sum is what bounds the hub's memory."""
    world = World(max_sockets=3, max_sockets_per_user=2)
    subs = [
        await world.subscribe(FakeConnection(), owner=user, workflow_id=None, user=user)
        for user in ("alice", "bob", "carol")
    ]
    with pytest.raises(ServerFull, match=r"^server busy: at most 3 open sockets$"):
        world.hub.subscribe(FakeConnection(), user="dave", owner="dave", workflow_id=None)
    with pytest.raises(ServerFull):  # a user below their own limit too
        world.hub.subscribe(FakeConnection(), user="alice", owner="alice", workflow_id=None)
    assert world.hub.subscriber_count == 3

    world.hub.unsubscribe(subs[0])
    world.hub.unsubscribe(subs[0])  # twice frees one slot, not two
    await world.subscribe(FakeConnection(), owner="dave", workflow_id=None, user="dave")
    with pytest.raises(ServerFull):
        world.hub.subscribe(FakeConnection(), user="erin", owner="erin", workflow_id=None)
    await world.hub.close()
    await world.subscribe(FakeConnection(), owner="erin", workflow_id=None, user="erin")


async def test_a_refused_snapshot_frees_the_slot() -> None:
    world = World(max_sockets_per_user=1)
    bobs = await world.upload("bob")
    sub = world.hub.subscribe(FakeConnection(), user="alice", owner="alice", workflow_id=bobs.id)
    with pytest.raises(NotFound):
        await world.hub.send_snapshot(sub)
    await world.subscribe(FakeConnection(), owner="alice", workflow_id=None)


# -- snapshots do not hold up the loop -----------------------------------------------------


class Ticks:
    """Counts turns of the event loop: a callback that schedules itself again each turn."""

    def __init__(self) -> None:
        self.count = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


class TickedConnection(FakeConnection):
    """Notes the loop turn of every message it is sent."""

    def __init__(self, ticks: Ticks) -> None:
        super().__init__()
        self.ticks = ticks
        self.turns: list[int] = []

    def send(self, message: bytes) -> asyncio.Future[None] | None:
        self.turns.append(self.ticks.count)
        return super().send(message)


async def test_fifty_snapshots_encode_each_document_once_and_yield_between_messages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = World()
    for _ in range(SNAPSHOT_LIMIT):
        await world.upload()
    encodings = Calls(monkeypatch, Workflow, "public")
    loading = 0
    most_loading = 0
    real_list = world.orchestrator.list_workflows

    async def list_counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal loading, most_loading
        loading += 1
        most_loading = max(most_loading, loading)
        try:
            await asyncio.sleep(0)  # a store answers later
            return await real_list(*args, **kwargs)
        finally:
            loading -= 1

    monkeypatch.setattr(world.orchestrator, "list_workflows", list_counted)
    ticks = Ticks()
    connections = [TickedConnection(ticks) for _ in range(50)]
    try:
        await asyncio.gather(
            *(
                world.subscribe(conn, owner="alice", workflow_id=None, user=f"u{i}")
                for i, conn in enumerate(connections)
            )
        )
    finally:
        ticks.stop()

    assert [len(conn.sent) for conn in connections] == [SNAPSHOT_LIMIT] * 50
    assert encodings.count == SNAPSHOT_LIMIT, "each (workflow, version) encoded once, not 50 times"
    assert most_loading == SNAPSHOT_BUILDERS, "pages are loaded a bounded number at a time"
    for conn in connections:
        assert len(set(conn.turns)) == len(conn.turns), "one message per turn of the loop"

    # a workflow that changed is encoded once more, at its new version, for every subscriber
    wf = (await world.orchestrator.list_workflows("alice", None, 1))[0]
    await world.complete_step(wf.id)
    await world.deliver(world.new_notifications())
    before = encodings.count
    late: list[FakeConnection] = [FakeConnection(), FakeConnection()]
    for joining in late:
        await world.subscribe(joining, owner="alice", workflow_id=wf.id)
    assert encodings.count == before + 1
    current = (await world.orchestrator.get(wf.id)).public()
    assert [conn.messages()[0]["data"] for conn in late] == [current, current]


# -- the document cache --------------------------------------------------------------------


def test_the_document_cache_is_an_lru_bounded_in_bytes() -> None:
    cache = DocumentCache(max_bytes=30)
    made: list[str] = []

    def get(workflow_id: str, version: int, size: int = 10) -> bytes:
        def encode() -> bytes:
            made.append(f"{workflow_id}@{version}")
            return workflow_id.encode() * size

        return cache.get(workflow_id, version, encode)

    for name in "abc":
        assert get(name, 1) == name.encode() * 10
    get("a", 1)  # a hit: "a" becomes the most recently used
    assert made == ["a@1", "b@1", "c@1"]
    get("d", 1)  # 40 bytes: the least recently used ("b") goes
    get("a", 1)
    get("b", 1)
    assert made == ["a@1", "b@1", "c@1", "d@1", "b@1"]

    get("a", 2)  # a newer version replaces the older one
    get("a", 1)  # an older one is encoded for its caller but not kept
    get("a", 2)
    assert made[-2:] == ["a@2", "a@1"]
    get("e", 1, size=31)  # larger than the whole cache: never kept
    get("e", 1, size=31)
    assert made[-2:] == ["e@1", "e@1"]


# -- malformed notifications ---------------------------------------------------------------


MALFORMED: list[Any] = [
    {},
    None,
    "workflow.changed",
    ["a", "list"],
    {"workflow_id": "a" * 32},
    {"workflow_id": "a" * 32, "owner": "alice", "version": "three", "changes": [], "workflow": {}},
    {"workflow_id": "a" * 32, "owner": "alice", "version": None, "changes": [], "workflow": {}},
    {"workflow_id": "a" * 32, "owner": "alice", "version": 9, "changes": None, "workflow": {}},
    {"workflow_id": "a" * 32, "owner": "alice", "version": 9, "changes": 5, "workflow": {}},
    {"workflow_id": "a" * 32, "owner": "alice", "version": 9, "changes": [7], "workflow": {}},
    {"workflow_id": "a" * 32, "owner": "alice", "version": 9, "changes": [{}], "workflow": {}},
    {
        "workflow_id": "a" * 32,
        "owner": "alice",
        "version": 9,
        "changes": [{"type": 5}],
        "workflow": {},
    },
    {"workflow_id": ["a"], "owner": "alice", "version": 9, "changes": [], "workflow": {}},
    {"workflow_id": "a" * 32, "owner": ["alice"], "version": 9, "changes": [], "workflow": {}},
    {"workflow_id": "a" * 32, "owner": {"x": 1}, "version": 9, "changes": [], "workflow": {}},
]


@pytest.mark.parametrize("payload", MALFORMED, ids=[f"case{i}" for i in range(len(MALFORMED))])
async def test_malformed_notifications_are_ignored(world: World, payload: Any) -> None:
    wf = await world.upload()
    world.new_notifications()
    by_workflow, by_owner, admin = FakeConnection(), FakeConnection(), FakeConnection()
    await world.subscribe(by_workflow, owner="alice", workflow_id=wf.id)
    await world.subscribe(by_owner, owner="alice", workflow_id=None)
    await world.subscribe(admin, owner=None, workflow_id=None)
    if isinstance(payload, dict) and payload.get("workflow_id") == "a" * 32:
        payload = {**payload, "workflow_id": wf.id}

    await world.hub.on_change(Event(CHANGE_ROUTING_KEY, payload, "malformed"))

    assert [len(c.sent) for c in (by_workflow, by_owner, admin)] == [1, 1, 1]
    assert world.hub.subscriber_count == 3
    # the hub still works afterwards
    await world.complete_step(wf.id)
    await world.deliver(world.new_notifications())
    assert [len(c.sent) for c in (by_workflow, by_owner, admin)] == [3, 3, 3]


# -- who sees what -------------------------------------------------------------------------


async def test_an_admin_subscription_sees_every_owners_changes(world: World) -> None:
    alices = await world.upload("alice")
    bobs = await world.upload("bob")
    world.new_notifications()
    admin, alice = FakeConnection(), FakeConnection()
    await world.subscribe(admin, owner=None, workflow_id=None)
    await world.subscribe(alice, owner="alice", workflow_id=None)

    assert [(m["type"], m["workflow_id"]) for m in admin.messages()] == [
        ("snapshot", bobs.id),  # newest first
        ("snapshot", alices.id),
    ]
    assert [(m["type"], m["workflow_id"]) for m in alice.messages()] == [("snapshot", alices.id)]

    carols = await world.upload("carol")
    await world.complete_step(bobs.id)
    await world.complete_step(alices.id)
    await world.deliver(world.new_notifications())

    seen_by_admin = [m["workflow_id"] for m in admin.messages()[2:]]
    assert seen_by_admin == [carols.id, bobs.id, bobs.id, alices.id, alices.id]
    seen_by_alice = [m["workflow_id"] for m in alice.messages()[1:]]
    assert seen_by_alice == [alices.id, alices.id]


async def test_an_owner_subscription_sees_only_that_owners_workflows(world: World) -> None:
    conn = FakeConnection()
    await world.subscribe(conn, owner="alice", workflow_id=None)
    assert conn.sent == []  # no workflows yet: no snapshot
    await world.deliver([notification("b" * 32, 1, owner="bob")])
    await world.deliver([notification("a" * 32, 1, owner="alice")])
    assert kinds(conn.messages()) == [("step_dispatched", 1)]
    assert conn.messages()[0]["workflow_id"] == "a" * 32


async def test_unsubscribe_and_close(world: World) -> None:
    wf = await world.upload()
    one, two, three = FakeConnection(), FakeConnection(), FakeConnection()
    sub = await world.subscribe(one, owner="alice", workflow_id=wf.id)
    await world.subscribe(two, owner="alice", workflow_id=None)
    await world.subscribe(three, owner=None, workflow_id=None)
    assert world.hub.subscriber_count == 3
    world.hub.unsubscribe(sub)
    world.hub.unsubscribe(sub)  # twice is harmless
    assert world.hub.subscriber_count == 2
    await world.hub.close()
    assert world.hub.subscriber_count == 0
    assert one.closed is None
    assert two.closed == three.closed
    assert two.closed is not None and two.closed[0] == 1001


async def test_the_changes_of_one_turn_go_to_a_socket_in_one_write() -> None:
    world = World()
    wf = await world.upload()
    socket = StalledSocket(world.hub)
    await world.subscribe(socket, owner="alice", workflow_id=wf.id)
    await socket.let_client_read()
    writes = len(socket.writes)
    version = (await world.orchestrator.get(wf.id)).version
    for step in range(1, 4):
        await world.hub.on_change(sized_notification(wf.id, version + step, 10))
    await asyncio.sleep(0)
    assert len(socket.writes) == writes + 1
    assert [m["version"] for m in socket.messages()[1:]] == [version + 1, version + 2, version + 3]


@pytest.mark.parametrize("size", [0, 125, 126, 65_535, 65_536, 100_000])
def test_a_text_frame_is_what_tornado_writes(size: int) -> None:
    class Capture:
        def write(self, data: bytes) -> None:
            self.data = data

    protocol = tornado.websocket.WebSocketProtocol13.__new__(tornado.websocket.WebSocketProtocol13)
    protocol.mask_outgoing = False
    protocol._wire_bytes_out = 0
    protocol.stream = Capture()  # type: ignore[assignment]
    message = b"x" * size
    protocol._write_frame(True, 0x1, message)
    assert text_frame(message) == protocol.stream.data  # type: ignore[attr-defined]


async def test_the_changes_of_one_turn_reach_the_hub_as_one_batch(world: World) -> None:
    uploaded = [await world.upload() for _ in range(3)]
    world.new_batches()
    conn = FakeConnection()
    await world.subscribe(conn, owner="alice", workflow_id=None)
    await asyncio.gather(*(world.complete_step(wf.id) for wf in uploaded))
    [batch] = world.new_batches()
    assert batch.routing_key == CHANGES_ROUTING_KEY
    assert sorted(n["payload"]["workflow_id"] for n in batch.payload["notifications"]) == sorted(
        wf.id for wf in uploaded
    )
    await world.deliver([batch])
    changed = [m for m in conn.messages() if m["type"] == "step_completed"]
    assert sorted(m["workflow_id"] for m in changed) == sorted(wf.id for wf in uploaded)


async def test_a_malformed_batch_is_ignored_and_the_hub_goes_on(world: World) -> None:
    wf = await world.upload()
    conn = FakeConnection()
    await world.subscribe(conn, owner="alice", workflow_id=wf.id)
    version = (await world.orchestrator.get(wf.id)).version
    good = notification(wf.id, version + 1).payload
    batches = (
        {"notifications": "no"},
        {"notifications": [1, {"x": 1}, {"message_id": "n", "payload": good}]},
    )
    for payload in batches:
        await world.hub.on_change(Event(CHANGES_ROUTING_KEY, payload, "m"))
    assert [m["version"] for m in conn.messages()[1:]] == [version + 1]
