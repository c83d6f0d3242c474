"""The EventBus contract: every bus implementation passes the same tests.

The contract tests use only the protocol (start, declare, consume, publish, close, `Rejected`,
`PublishError`), so a RabbitMQ bus can be added to the `bus_factory` params unchanged. Every
test works in its own routing-key namespace and declares its queues `exclusive`, so runs can
share one broker. Absence is checked with a barrier where possible: a later message on the
same queue arrives only after anything routed there before it.

Tests named `test_local_*` at the end exercise details of `LocalBus` only.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from stox.bus.base import Event, EventBus, PublishError, Redelivery, Rejected
from stox.bus.local import LocalBus

TIMEOUT = 5.0  # an upper bound for things that should happen almost at once

BusFactory = Callable[..., Awaitable[EventBus]]


# -- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(params=["local", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def bus_factory(request: pytest.FixtureRequest) -> AsyncIterator[BusFactory]:
    """Makes buses of one implementation (not started), and closes them after the test."""
    made: list[EventBus] = []

    async def make(*, start: bool = True, **options: Any) -> EventBus:
        """`options` (prefetch, redelivery) go to the bus's constructor."""
        options = {"redelivery": Redelivery(delay=0.01), **options}
        if request.param == "local":
            bus: EventBus = LocalBus(**options)
        elif request.param == "rabbitmq":  # in the test's own exchange and queue names
            bus = request.getfixturevalue("rabbit_ns").bus(**options)
        else:  # pragma: no cover - a new param without a branch here
            raise AssertionError(f"unknown bus {request.param}")
        made.append(bus)
        if start:
            await bus.start()
        return bus

    yield make
    for bus in made:
        await bus.close()


@pytest.fixture
async def bus(bus_factory: BusFactory) -> EventBus:
    return await bus_factory()


@pytest.fixture
def ns() -> str:
    """A routing-key and queue-name prefix of this test alone."""
    return f"t{uuid.uuid4().hex[:12]}"


def make_event(routing_key: str, **payload: object) -> Event:
    return Event(
        routing_key=routing_key,
        payload=dict(payload),
        message_id=uuid.uuid4().hex,
        correlation_id=uuid.uuid4().hex,
        timestamp=1_700_000_000.25,
    )


class Inbox:
    """A handler that records what it is given and lets a test wait for it."""

    def __init__(self, name: str = "inbox") -> None:
        self.name = name
        self.events: list[Event] = []
        self._arrived: asyncio.Queue[Event] = asyncio.Queue()

    async def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._arrived.put_nowait(event)

    async def get(self) -> Event:
        return await asyncio.wait_for(self._arrived.get(), TIMEOUT)

    async def until(self, message_id: str) -> list[Event]:
        """Everything that arrives up to and including the message `message_id`."""
        got: list[Event] = []
        while not got or got[-1].message_id != message_id:
            got.append(await self.get())
        return got

    @property
    def ids(self) -> list[str]:
        return [e.message_id for e in self.events]


async def publish(bus: EventBus, routing_key: str, **payload: object) -> Event:
    event = make_event(routing_key, **payload)
    await bus.publish(event)
    return event


# -- routing -----------------------------------------------------------------------------


async def test_the_bus_says_what_it_is_and_who_can_consume(bus: EventBus) -> None:
    """The gateway asks the bus (not the settings) whether services can read its queues."""
    expected: dict[type[EventBus], tuple[str, bool]] = {LocalBus: ("in-process", False)}
    kind, remote = expected.get(type(bus), ("rabbitmq", True))
    assert (bus.kind, bus.remote_consumers) == (kind, remote)


async def test_exact_binding_receives_only_its_routing_key(bus: EventBus, ns: str) -> None:
    inbox = Inbox()
    await bus.declare(f"{ns}.q", [f"{ns}.step.image", f"{ns}.barrier"], exclusive=True)
    await bus.consume(f"{ns}.q", inbox)

    for key in ("step.seo", "step", "step.image.extra", "x.step.image", "step.images"):
        await publish(bus, f"{ns}.{key}")
    wanted = await publish(bus, f"{ns}.step.image")
    barrier = await publish(bus, f"{ns}.barrier")

    assert [e.message_id for e in await inbox.until(barrier.message_id)] == [
        wanted.message_id,
        barrier.message_id,
    ]


async def test_star_matches_exactly_one_word(bus: EventBus, ns: str) -> None:
    inbox = Inbox()
    await bus.declare(f"{ns}.q", [f"{ns}.step.*", f"{ns}.barrier"], exclusive=True)
    await bus.consume(f"{ns}.q", inbox)

    image = await publish(bus, f"{ns}.step.image")
    await publish(bus, f"{ns}.step")
    await publish(bus, f"{ns}.step.image.retry")
    await publish(bus, f"{ns}.workflow.image")
    seo = await publish(bus, f"{ns}.step.seo")
    barrier = await publish(bus, f"{ns}.barrier")

    got = [e.routing_key for e in await inbox.until(barrier.message_id)]
    assert got == [image.routing_key, seo.routing_key, barrier.routing_key]


async def test_hash_matches_zero_or_more_words(bus: EventBus, ns: str) -> None:
    inbox = Inbox()
    await bus.declare(f"{ns}.q", [f"{ns}.workflow.#", f"{ns}.#.failed"], exclusive=True)
    await bus.consume(f"{ns}.q", inbox)

    keys = [
        f"{ns}.workflow",  # zero words after the prefix
        f"{ns}.workflow.completed",
        f"{ns}.workflow.a.b.c",
        f"{ns}.failed",  # zero words before the suffix
        f"{ns}.step.image.failed",
    ]
    for key in ("step.image", "workflows.completed", "step.failed.not"):
        await publish(bus, f"{ns}.{key}")
    sent = [await publish(bus, key) for key in keys]

    got = await inbox.until(sent[-1].message_id)
    assert [e.routing_key for e in got] == keys


async def test_overlapping_bindings_deliver_once_to_each_queue(bus: EventBus, ns: str) -> None:
    a, b = Inbox("a"), Inbox("b")
    # Queue a has two bindings that both match; it must still get one copy.
    await bus.declare(f"{ns}.a", [f"{ns}.step.*", f"{ns}.step.image"], exclusive=True)
    await bus.declare(f"{ns}.b", [f"{ns}.#"], exclusive=True)
    await bus.consume(f"{ns}.a", a)
    await bus.consume(f"{ns}.b", b)

    event = await publish(bus, f"{ns}.step.image", n=1)
    barrier = await publish(bus, f"{ns}.step.barrier")

    for inbox in (a, b):
        got = await inbox.until(barrier.message_id)
        assert [e.message_id for e in got] == [event.message_id, barrier.message_id]
        assert got[0].payload == {"n": 1}


async def test_redeclaring_a_queue_adds_bindings(bus: EventBus, ns: str) -> None:
    inbox = Inbox()
    await bus.declare(f"{ns}.q", [f"{ns}.a"], exclusive=True)
    await bus.declare(f"{ns}.q", [f"{ns}.a", f"{ns}.b"], exclusive=True)
    await bus.consume(f"{ns}.q", inbox)

    first = await publish(bus, f"{ns}.a")
    second = await publish(bus, f"{ns}.b")

    got = await inbox.until(second.message_id)
    assert [e.message_id for e in got] == [first.message_id, second.message_id]


# -- queues and consumers ----------------------------------------------------------------


async def test_competing_consumers_share_the_load_exactly_once(bus: EventBus, ns: str) -> None:
    seen: list[tuple[str, str]] = []
    arrived: asyncio.Queue[str] = asyncio.Queue()

    def consumer(name: str) -> Callable[[Event], Awaitable[None]]:
        async def handle(event: Event) -> None:
            seen.append((name, event.message_id))
            arrived.put_nowait(event.message_id)
            await asyncio.sleep(0)  # a handler that yields, as real ones do

        return handle

    await bus.declare(f"{ns}.q", [f"{ns}.work"], exclusive=True)
    await bus.consume(f"{ns}.q", consumer("one"))
    await bus.consume(f"{ns}.q", consumer("two"))

    sent = [(await publish(bus, f"{ns}.work", i=i)).message_id for i in range(40)]
    barrier = (await publish(bus, f"{ns}.work", barrier=True)).message_id
    while await asyncio.wait_for(arrived.get(), TIMEOUT) != barrier:
        pass

    handled = [message_id for _, message_id in seen if message_id != barrier]
    assert sorted(handled) == sorted(sent)  # every message once, none twice
    per_consumer = {name: sum(1 for n, _ in seen if n == name) for name in ("one", "two")}
    assert per_consumer["one"] > 0
    assert per_consumer["two"] > 0


async def test_messages_wait_in_the_queue_until_a_consumer_appears(bus: EventBus, ns: str) -> None:
    await bus.declare(f"{ns}.q", [f"{ns}.step.#"], exclusive=True)
    sent = [await publish(bus, f"{ns}.step.image", i=i) for i in range(3)]

    inbox = Inbox()
    await bus.consume(f"{ns}.q", inbox)

    got = await inbox.until(sent[-1].message_id)
    assert [e.message_id for e in got] == [e.message_id for e in sent]


async def test_a_single_consumer_sees_messages_in_publish_order(bus: EventBus, ns: str) -> None:
    inbox = Inbox()
    await bus.declare(f"{ns}.q", [f"{ns}.#"], exclusive=True)
    await bus.consume(f"{ns}.q", inbox)

    sent = [await publish(bus, f"{ns}.step.s{i % 3}", i=i) for i in range(100)]

    got = await inbox.until(sent[-1].message_id)
    assert [e.payload["i"] for e in got] == list(range(100))


async def test_event_fields_arrive_intact(bus: EventBus, ns: str) -> None:
    inbox = Inbox()
    await bus.declare(f"{ns}.q", [f"{ns}.step.completed"], exclusive=True)
    await bus.consume(f"{ns}.q", inbox)
    payload = {
        "event": "step.completed",
        "workflow_id": "0f" * 16,
        "occurred_at": "2024-05-01T12:00:00.123456+00:00",
        "success": True,
        "result": {"images": ["a.png", "b.png"], "score": 0.875, "tags": [], "note": None},
        "name": "Ünïcødé ✓ 商品",
        "count": 2**53,
    }
    sent = Event(
        routing_key=f"{ns}.step.completed",
        payload=payload,
        message_id="m-" + uuid.uuid4().hex,
        correlation_id="0f" * 16,
        timestamp=1_714_564_800.123,
    )
    await bus.publish(sent)

    got = await inbox.get()
    assert got.routing_key == sent.routing_key
    assert got.payload == payload
    assert got.message_id == sent.message_id
    assert got.correlation_id == sent.correlation_id
    assert got.timestamp == sent.timestamp


async def test_a_failing_handler_sees_the_message_again(bus: EventBus, ns: str) -> None:
    attempts: list[Event] = []
    done = asyncio.Event()

    async def flaky(event: Event) -> None:
        attempts.append(event)
        if len(attempts) == 1:
            raise RuntimeError("database briefly unavailable")
        done.set()

    await bus.declare(f"{ns}.q", [f"{ns}.step.completed"], exclusive=True)
    await bus.consume(f"{ns}.q", flaky)
    sent = await publish(bus, f"{ns}.step.completed", step_id="s1")

    await asyncio.wait_for(done.wait(), TIMEOUT)
    assert [e.message_id for e in attempts] == [sent.message_id, sent.message_id]
    assert attempts[1].payload == {"step_id": "s1"}


async def test_a_rejected_message_is_not_delivered_again(bus: EventBus, ns: str) -> None:
    seen: list[str] = []
    retried = asyncio.Event()
    barrier_seen = asyncio.Event()

    async def handle(event: Event) -> None:
        kind = event.payload["kind"]
        seen.append(kind)
        if kind == "poison":
            raise Rejected("malformed completion")
        if kind == "flaky" and seen.count("flaky") == 1:
            raise RuntimeError("try again")
        if kind == "flaky":
            retried.set()
        if kind == "barrier":
            barrier_seen.set()

    await bus.declare(f"{ns}.q", [f"{ns}.step.completed"], exclusive=True)
    await bus.consume(f"{ns}.q", handle)
    await publish(bus, f"{ns}.step.completed", kind="poison")
    # A generic failure published after the poison message is redelivered; once it has been,
    # a redelivery of the poison message would have happened too.
    await publish(bus, f"{ns}.step.completed", kind="flaky")
    await asyncio.wait_for(retried.wait(), TIMEOUT)
    await publish(bus, f"{ns}.step.completed", kind="barrier")
    await asyncio.wait_for(barrier_seen.wait(), TIMEOUT)

    assert seen.count("poison") == 1
    assert seen.count("flaky") == 2


async def test_prefetch_bounds_the_handlers_in_flight(bus_factory: BusFactory, ns: str) -> None:
    bus = await bus_factory(prefetch=3)
    gate = asyncio.Event()
    active: list[int] = []
    done: list[int] = []
    three_active, all_done = asyncio.Event(), asyncio.Event()

    async def handle(event: Event) -> None:
        active.append(event.payload["i"])
        if len(active) == 3:
            three_active.set()
        await gate.wait()
        done.append(event.payload["i"])
        if len(done) == 10:
            all_done.set()

    await bus.declare(f"{ns}.q", [f"{ns}.k"], exclusive=True)
    await bus.consume(f"{ns}.q", handle)
    for i in range(10):
        await publish(bus, f"{ns}.k", i=i)
    await asyncio.wait_for(three_active.wait(), TIMEOUT)
    await asyncio.sleep(0.1)  # time for a (wrong) fourth delivery
    assert active == [0, 1, 2]
    gate.set()
    await asyncio.wait_for(all_done.wait(), TIMEOUT)
    assert active == list(range(10))


# -- lifecycle ---------------------------------------------------------------------------


async def test_connected_between_start_and_close(bus_factory: BusFactory) -> None:
    bus = await bus_factory(start=False)
    assert not bus.connected
    await bus.start()
    assert bus.connected
    await bus.close()
    assert not bus.connected


async def test_publish_before_start_raises(bus_factory: BusFactory, ns: str) -> None:
    bus = await bus_factory(start=False)
    with pytest.raises(PublishError):
        await bus.publish(make_event(f"{ns}.step.image"))


async def test_publish_after_close_raises(bus: EventBus, ns: str) -> None:
    await bus.declare(f"{ns}.q", [f"{ns}.#"], exclusive=True)
    await bus.publish(make_event(f"{ns}.step.image"))
    await bus.close()
    with pytest.raises(PublishError):
        await bus.publish(make_event(f"{ns}.step.image"))


async def test_close_is_idempotent(bus: EventBus) -> None:
    await bus.close()
    await bus.close()
    assert not bus.connected


async def test_close_does_not_wait_for_a_pending_redelivery(
    bus_factory: BusFactory, ns: str
) -> None:
    bus = await bus_factory(redelivery=Redelivery(delay=60))
    failed = asyncio.Event()

    async def fail(event: Event) -> None:
        failed.set()
        raise RuntimeError("later")

    await bus.declare(f"{ns}.q", [f"{ns}.k"], exclusive=True)
    await bus.consume(f"{ns}.q", fail)
    await publish(bus, f"{ns}.k")
    await asyncio.wait_for(failed.wait(), TIMEOUT)
    await asyncio.wait_for(bus.close(), 2)  # not a minute, and no timer left behind


async def test_no_delivery_after_close(bus: EventBus, ns: str) -> None:
    calls: list[str] = []
    first = asyncio.Event()
    never = asyncio.Event()

    async def slow(event: Event) -> None:
        calls.append(event.message_id)
        first.set()
        await never.wait()

    await bus.declare(f"{ns}.q", [f"{ns}.#"], exclusive=True)
    await bus.consume(f"{ns}.q", slow)
    for i in range(300):  # more than any sensible prefetch, so some are still queued
        await publish(bus, f"{ns}.work", i=i)
    await asyncio.wait_for(first.wait(), TIMEOUT)

    await bus.close()
    handled_at_close = len(calls)
    never.set()
    await asyncio.sleep(0.05)  # give a misbehaving bus the chance to deliver more

    assert len(calls) == handled_at_close
    assert handled_at_close < 300


# -- LocalBus only -----------------------------------------------------------------------


@pytest.fixture
async def local_bus() -> AsyncIterator[LocalBus]:
    bus = LocalBus(redelivery=Redelivery(delay=0.0, limit=2))
    await bus.start()
    yield bus
    await bus.close()


async def wait(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), TIMEOUT)


async def test_local_rejected_goes_to_dead_letters_once(
    local_bus: LocalBus, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0
    rejected = asyncio.Event()

    async def reject(event: Event) -> None:
        nonlocal calls
        calls += 1
        rejected.set()  # the bus dead-letters it as this raises, before the test resumes
        raise Rejected("no such workflow")

    await local_bus.declare("q", ["step.completed"])
    await local_bus.consume("q", reject)
    with caplog.at_level(logging.WARNING, logger="stox.bus.local"):
        sent = await publish(local_bus, "step.completed", x=1)
        await wait(rejected)
        await asyncio.sleep(0.05)  # time for a (wrong) redelivery with delay 0

    assert calls == 1
    [(queue, event, reason)] = local_bus.dead_letters
    assert queue == "q"
    assert event.message_id == sent.message_id
    assert event.payload == {"x": 1}
    assert "no such workflow" in reason
    assert any(
        r.levelno == logging.WARNING and "dead-lettered" in r.message for r in caplog.records
    )


async def test_local_redelivery_is_marked_and_bounded(local_bus: LocalBus) -> None:
    attempts: list[Event] = []
    gave_up = asyncio.Event()

    async def always_fails(event: Event) -> None:
        attempts.append(event)
        if len(attempts) == 1 + local_bus.redelivery.limit:
            gave_up.set()
        raise ValueError("bug")

    await local_bus.declare("q", ["step.completed"])
    await local_bus.consume("q", always_fails)
    sent = await publish(local_bus, "step.completed")
    await wait(gave_up)
    await asyncio.sleep(0.05)  # time for a (wrong) further redelivery with delay 0

    assert len(attempts) == 1 + local_bus.redelivery.limit
    assert "x-redelivered" not in attempts[0].headers
    assert all(e.headers["x-redelivered"] is True for e in attempts[1:])
    [(queue, event, reason)] = local_bus.dead_letters
    assert (queue, event.message_id) == ("q", sent.message_id)
    assert "ValueError" in reason


async def test_local_redelivery_waits_for_the_delay() -> None:
    bus = LocalBus(redelivery=Redelivery(delay=0.2))
    await bus.start()
    times: list[float] = []
    again = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def fail_once(event: Event) -> None:
        times.append(loop.time())
        if len(times) == 1:
            raise RuntimeError("later")
        again.set()

    try:
        await bus.declare("q", ["k"])
        await bus.consume("q", fail_once)
        await publish(bus, "k")
        await asyncio.wait_for(again.wait(), TIMEOUT)
    finally:
        await bus.close()
    assert times[1] - times[0] >= 0.19


async def test_local_prefetch_one_handles_strictly_one_at_a_time() -> None:
    bus = LocalBus(prefetch=1)
    await bus.start()
    order: list[int] = []
    active = max_active = 0
    all_done = asyncio.Event()

    async def handle(event: Event) -> None:
        nonlocal active, max_active
        active += 1
        max_active = max(max_active, active)
        for _ in range(3):
            await asyncio.sleep(0)
        order.append(event.payload["i"])
        active -= 1
        if len(order) == 20:
            all_done.set()

    try:
        await bus.declare("q", ["k"])
        await bus.consume("q", handle)
        for i in range(20):
            await publish(bus, "k", i=i)
        await wait(all_done)
    finally:
        await bus.close()
    assert max_active == 1
    assert order == list(range(20))


async def test_local_slow_handler_does_not_block_the_queue(local_bus: LocalBus) -> None:
    stuck = asyncio.Event()
    handled: list[int] = []
    others_done = asyncio.Event()

    async def handle(event: Event) -> None:
        if event.payload["i"] == 0:
            await stuck.wait()  # never set during the test
        handled.append(event.payload["i"])
        if len(handled) == 4:
            others_done.set()

    await local_bus.declare("q", ["k"])
    await local_bus.consume("q", handle)
    for i in range(5):
        await publish(local_bus, "k", i=i)
    await wait(others_done)
    assert handled == [1, 2, 3, 4]


async def test_local_delivery_is_never_inside_publish(local_bus: LocalBus) -> None:
    inbox = Inbox()
    await local_bus.declare("q", ["k"])
    await local_bus.consume("q", inbox)
    await asyncio.sleep(0)  # let the delivery task reach its wait
    sent = await publish(local_bus, "k")
    assert inbox.events == []  # publish only enqueues
    assert (await inbox.get()).message_id == sent.message_id


async def test_local_each_queue_gets_its_own_payload_copy(local_bus: LocalBus) -> None:
    a, b = Inbox("a"), Inbox("b")

    async def mutate(event: Event) -> None:
        event.payload["items"].append("changed")
        await a(event)

    await local_bus.declare("a", ["k"])
    await local_bus.declare("b", ["k"])
    await local_bus.consume("a", mutate)
    await local_bus.consume("b", b)
    payload = {"items": [1]}
    await local_bus.publish(Event("k", payload, uuid.uuid4().hex))
    await a.get()
    got_b = await b.get()

    assert payload == {"items": [1]}
    assert got_b.payload == {"items": [1]}


async def test_local_route_cache_follows_new_declarations(local_bus: LocalBus) -> None:
    await publish(local_bus, "step.image")  # routes nowhere; that answer is cached
    inbox = Inbox()
    await local_bus.declare("q", ["step.*"])
    await local_bus.consume("q", inbox)
    sent = await publish(local_bus, "step.image")
    assert (await inbox.get()).message_id == sent.message_id
    await local_bus.declare("q", ["workflow.#"])
    sent = await publish(local_bus, "workflow.completed")
    assert (await inbox.get()).message_id == sent.message_id


async def test_local_misuse_is_refused(local_bus: LocalBus) -> None:
    with pytest.raises(LookupError):
        await local_bus.consume("nope", Inbox())
    with pytest.raises(TypeError):
        await local_bus.declare("q", "step.image")
    await local_bus.declare("q", ["k"])
    with pytest.raises(ValueError):
        await local_bus.declare("q", ["k"], exclusive=True)
    with pytest.raises(TypeError):  # not JSON: RabbitMQ could not carry it either
        await local_bus.publish(Event("k", {"when": object()}, "m1"))
    unstarted = LocalBus()
    with pytest.raises(RuntimeError):
        await unstarted.declare("q", ["k"])


async def test_local_close_leaves_no_tasks_behind() -> None:
    bus = LocalBus()
    await bus.start()
    stuck = asyncio.Event()
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def handle(event: Event) -> None:
        started.set()
        try:
            await stuck.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    for name in ("a", "b"):
        await bus.declare(name, ["k"])
        await bus.consume(name, handle)
    await publish(bus, "k")
    await asyncio.wait_for(started.wait(), TIMEOUT)
    await bus.close()

    assert cancelled.is_set()
    assert asyncio.all_tasks() == {asyncio.current_task()}
