"""What the RabbitMQ bus does beyond the shared contract: the AMQP properties and topology,
publisher confirms (nack, return, timeout), bounded redelivery, and recovery from a lost
connection. Against a real broker; every test has its own exchange and names (`rabbit_ns`).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pika.exceptions
import pytest
import rabbit
from support import eventually, free_port

from settings import Duration, RabbitMQSettings
from stox.bus import pika_writes
from stox.bus.base import Event, PublishError, Redelivery
from stox.bus.rabbitmq import TIMESTAMP_HEADER, RabbitMQBus

TIMEOUT = 10.0

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def buses(rabbit_ns: rabbit.Namespace) -> AsyncIterator[Callable[..., RabbitMQBus]]:
    """Makes started-later buses in the test's namespace; closes them afterwards."""
    made: list[RabbitMQBus] = []

    def make(**options: object) -> RabbitMQBus:
        bus = rabbit_ns.bus(**options)  # type: ignore[arg-type]
        made.append(bus)
        return bus

    yield make
    for bus in made:
        await bus.close()


def event(routing_key: str, **payload: object) -> Event:
    return Event(routing_key, dict(payload), uuid.uuid4().hex, uuid.uuid4().hex, 1_714_564_800.5)


async def with_step_queue(
    buses: Callable[..., RabbitMQBus], ns: rabbit.Namespace, step: str, **options: object
) -> tuple[RabbitMQBus, str]:
    """A started bus that has declared `step`'s durable queue, as a gateway does."""
    bus = buses(**options)
    await bus.start()
    queue = ns.step_queue(step)
    await bus.declare(queue, [f"step.{step}"])
    return bus, queue


def queue_arguments(name: str) -> dict[str, object]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "durable", "arguments", "--formatter", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    for row in json.loads(out):
        if row["name"] == name:
            args = {key: value for key, _kind, value in row["arguments"]}
            return {"durable": row["durable"], **args}
    raise LookupError(name)


# -- what goes over the wire -------------------------------------------------------------


async def test_events_are_persistent_json_with_amqp_properties(
    buses: Callable[..., RabbitMQBus], rabbit_ns: rabbit.Namespace
) -> None:
    ns = rabbit_ns
    bus, queue = await with_step_queue(buses, ns, "image_processing")
    sent = Event(
        "step.image_processing",
        {"event": "step.image_processing", "name": "Ünïcødé"},
        "m-" + uuid.uuid4().hex,
        "0f" * 16,
        1_714_564_800.123456,
        {"x-trace": "abc"},
    )
    await bus.publish(sent)

    [message] = await asyncio.to_thread(ns.drain, queue)
    props = message.properties
    assert message.routing_key == "step.image_processing"
    assert json.loads(message.body) == sent.payload
    assert props.delivery_mode == 2
    assert props.content_type == "application/json"
    assert props.message_id == sent.message_id
    assert props.correlation_id == "0f" * 16
    assert props.timestamp == 1_714_564_800  # AMQP: whole seconds
    assert props.headers == {"x-trace": "abc", TIMESTAMP_HEADER: repr(sent.timestamp)}

    arguments = await asyncio.to_thread(queue_arguments, queue)
    assert arguments == {"durable": True, "x-dead-letter-exchange": ns.dead}
    assert (await asyncio.to_thread(queue_arguments, ns.dead))["durable"] is True
    assert await asyncio.to_thread(rabbit.connections_named, f"stox test {ns.prefix}")


def test_parameters_turn_heartbeats_on_and_name_the_connection() -> None:
    settings = RabbitMQSettings(url="amqp://u:p@mq.example:5673/shop", heartbeat=Duration(15))
    params = RabbitMQBus.from_settings(settings, connection_name="stox gateway a1")._parameters()
    assert (params.host, params.port, params.virtual_host) == ("mq.example", 5673, "shop")
    assert params.heartbeat == 15
    assert params.blocked_connection_timeout == 60
    assert params.client_properties == {"connection_name": "stox gateway a1"}

    params = RabbitMQBus(
        "amqp://mq.example/?heartbeat=5&blocked_connection_timeout=7"
    )._parameters()
    assert (params.heartbeat, params.blocked_connection_timeout) == (5, 7)  # the URL wins


def test_the_server_says_why_it_cannot_start_without_its_broker(tmp_path: Path) -> None:
    port = free_port()
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    store = f"sqlite:///{tmp_path}/s.db"
    done = subprocess.run(
        [sys.executable, "server.py", "--storage-url", store, "--rabbitmq-url", url],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "STOX_JWT_SECRET": "x" * 40},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert f"stox: cannot start: cannot use RabbitMQ at 127.0.0.1:{port}/" in done.stderr
    assert "Traceback" not in done.stderr


async def test_an_unreachable_broker_fails_start_quickly() -> None:
    port = free_port()
    bus = RabbitMQBus(f"amqp://guest:guest@127.0.0.1:{port}/")
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        await bus.start()
    assert time.monotonic() - started < 5
    assert not bus.connected
    await bus.close()


async def test_a_queue_declared_before_with_other_arguments_is_refused_clearly(
    buses: Callable[..., RabbitMQBus], rabbit_ns: rabbit.Namespace
) -> None:
    ns = rabbit_ns
    queue = ns.step_queue("image_processing")
    await asyncio.to_thread(ns._channel_do, lambda ch: ch.queue_declare(queue, durable=True))
    bus = buses()
    await bus.start()
    with pytest.raises(ConnectionError, match="PRECONDITION_FAILED"):
        await bus.declare(queue, ["step.image_processing"])  # ours dead-letters; that one not
    assert bus.connected  # only the declaring channel was closed
    await bus.declare(f"{ns.prefix}.other", ["k"], exclusive=True)


# -- publisher confirms ------------------------------------------------------------------


async def test_a_nacked_event_is_retried_then_raises(
    buses: Callable[..., RabbitMQBus], rabbit_ns: rabbit.Namespace
) -> None:
    ns = rabbit_ns
    full = f"{ns.prefix}.full"
    ns.extra_queues.append(full)

    def make_full_queue(channel: object) -> None:
        # a queue that holds nothing and refuses more: the broker nacks what it routes there
        args = {"x-max-length": 0, "x-overflow": "reject-publish"}
        channel.queue_declare(full, durable=True, arguments=args)  # type: ignore[attr-defined]
        channel.queue_bind(full, ns.exchange, "refused")  # type: ignore[attr-defined]

    bus = buses()
    await bus.start()
    await asyncio.to_thread(ns._channel_do, make_full_queue)
    started = time.monotonic()
    with pytest.raises(PublishError, match="nacked"):
        await bus.publish(event("refused"))
    assert time.monotonic() - started >= 2 * 0.05  # max_retries=2, retry_delay=50ms
    assert bus.connected
    await bus.publish(event("anything.else"))  # the bus itself is fine


async def test_a_returned_event_redeclares_the_topology_and_gets_through(
    buses: Callable[..., RabbitMQBus], rabbit_ns: rabbit.Namespace
) -> None:
    ns = rabbit_ns
    bus, queue = await with_step_queue(buses, ns, "seo_generation")
    await asyncio.to_thread(ns._channel_do, lambda ch: ch.queue_delete(queue))

    sent = event("step.seo_generation", n=1)
    await bus.publish(sent)  # returned (no queue), redeclared, published again

    [message] = await asyncio.to_thread(ns.drain, queue)
    assert message.properties.message_id == sent.message_id


async def test_an_event_nobody_is_bound_to_is_dropped_like_local_bus(
    buses: Callable[..., RabbitMQBus],
) -> None:
    bus = buses()
    await bus.start()
    await bus.publish(event("workflow.started.nobody.listens"))  # no error, no retries


async def test_an_unconfirmed_event_times_out_then_raises(
    buses: Callable[..., RabbitMQBus],
) -> None:
    bus = buses()
    await bus.start()
    bus.confirm_timeout = 0.1
    link = bus._link
    assert link is not None and link.publisher is not None
    link.publisher.channel.basic_publish = lambda *a, **k: None
    started = time.monotonic()
    with pytest.raises(PublishError, match=r"no confirm within 0\.1s"):
        await bus.publish(event("k"))
    assert 0.3 <= time.monotonic() - started < 3  # three attempts of 0.1s, 50ms apart


async def test_unconfirmed_publishes_each_time_out_at_their_own_deadline(
    buses: Callable[..., RabbitMQBus],
) -> None:
    """One timer watches the oldest publish: a later one still gets its full timeout, and
    the timer goes once nothing waits."""
    bus = buses()
    await bus.start()
    bus.confirm_timeout = 0.3
    bus.max_retries = 0
    link = bus._link
    assert link is not None and link.publisher is not None
    link.publisher.channel.basic_publish = lambda *a, **k: None
    started = time.monotonic()
    first = asyncio.ensure_future(bus.publish(event("k")))
    await asyncio.sleep(0.2)
    second = asyncio.ensure_future(bus.publish(event("k")))
    with pytest.raises(PublishError, match=r"no confirm within 0\.3s"):
        await asyncio.wait_for(first, 5)
    assert not second.done()  # 0.3 s after the first, 0.1 s after the second
    with pytest.raises(PublishError, match=r"no confirm within 0\.3s"):
        await asyncio.wait_for(second, 5)
    assert 0.5 <= time.monotonic() - started < 2
    assert not link.unconfirmed and link._deadline_timer is None


async def test_a_publish_in_flight_when_the_connection_drops_is_retried_after_reconnect(
    buses: Callable[..., RabbitMQBus], rabbit_ns: rabbit.Namespace
) -> None:
    ns = rabbit_ns
    bus, queue = await with_step_queue(buses, ns, "ai_enhancement", reconnect_delay=0.05)
    bus.max_retries = 20
    link = bus._link
    assert link is not None and link.publisher is not None
    link.publisher.channel.basic_publish = lambda *a, **k: None  # never confirmed
    sent = event("step.ai_enhancement")
    publishing = asyncio.ensure_future(bus.publish(sent))
    await asyncio.sleep(0.05)
    assert not publishing.done()

    await asyncio.to_thread(rabbit.close_connections, f"stox test {ns.prefix}")
    await asyncio.wait_for(publishing, TIMEOUT)  # settled by the drop, retried on the new link

    [message] = await asyncio.to_thread(ns.drain, queue)
    assert message.properties.message_id == sent.message_id


async def test_publish_while_disconnected_raises_within_its_retries(
    buses: Callable[..., RabbitMQBus], rabbit_ns: rabbit.Namespace
) -> None:
    bus = buses(reconnect_delay=5.0)  # stays down for the test
    await bus.start()
    await asyncio.to_thread(rabbit.close_connections, f"stox test {rabbit_ns.prefix}")
    await eventually(lambda: not bus.connected)
    started = time.monotonic()
    with pytest.raises(PublishError, match="not connected"):
        await bus.publish(event("k"))
    assert time.monotonic() - started < 1


# -- consuming -------------------------------------------------------------------------


async def test_a_handler_that_keeps_failing_is_dead_lettered_after_its_redeliveries(
    buses: Callable[..., RabbitMQBus], rabbit_ns: rabbit.Namespace
) -> None:
    ns = rabbit_ns
    bus = buses(redelivery=Redelivery(delay=0.01, limit=2))
    await bus.start()
    attempts: list[Event] = []

    async def always_fails(e: Event) -> None:
        attempts.append(e)
        raise ValueError("bug")

    await bus.declare(f"{ns.prefix}.q", ["k"], exclusive=True)
    await bus.consume(f"{ns.prefix}.q", always_fails)
    sent = event("k", n=1)
    await bus.publish(sent)

    [dead] = await ns.drained(ns.dead)
    await asyncio.sleep(0.1)
    assert len(attempts) == 3
    assert "x-redelivered" not in attempts[0].headers
    assert all(a.headers["x-redelivered"] is True for a in attempts[1:])
    assert {a.message_id for a in attempts} == {sent.message_id}
    assert dead.properties.message_id == sent.message_id
    assert json.loads(dead.body) == {"n": 1}


async def test_a_message_failing_on_several_instances_is_counted_once_across_them(
    buses: Callable[..., RabbitMQBus], rabbit_ns: rabbit.Namespace
) -> None:
    """Two gateways compete for one queue: the failure count travels with the message, so a
    poison message is dead-lettered after the same number of tries, not hopping for ever."""
    ns = rabbit_ns
    queue = ns.step_queue("image_processing")
    attempts: list[tuple[str, Event]] = []

    def failing(name: str) -> Callable[[Event], Any]:
        async def handler(e: Event) -> None:
            attempts.append((name, e))
            raise RecursionError("maximum recursion depth exceeded")

        return handler

    for name in ("a", "b"):
        bus = buses(redelivery=Redelivery(delay=0.01, limit=3), connection_name=f"test {name}")
        await bus.start()
        await bus.declare(queue, ["step.image_processing"])
        await bus.consume(queue, failing(name))
    sent = event("step.image_processing", n=1)
    await bus.publish(sent)

    [dead] = await ns.drained(ns.dead)
    await asyncio.sleep(0.3)
    assert len(attempts) == 4, [name for name, _ in attempts]
    assert {e.message_id for _, e in attempts} == {sent.message_id}
    assert dead.properties.message_id == sent.message_id
    assert json.loads(dead.body) == {"n": 1}
    assert await asyncio.to_thread(ns.count, queue) == 0


# -- recovery ----------------------------------------------------------------------------


async def test_after_the_broker_closes_the_connection_everything_resumes(
    buses: Callable[..., RabbitMQBus], rabbit_ns: rabbit.Namespace
) -> None:
    ns = rabbit_ns
    bus = buses(reconnect_delay=0.05)
    await bus.start()
    durable, mine = f"{ns.prefix}.step.image_processing", f"{ns.prefix}.hub.me"
    seen: dict[str, list[int]] = {durable: [], mine: []}
    for queue, binding in ((durable, "step.image_processing"), (mine, "workflow.changed")):
        await bus.declare(queue, [binding], exclusive=queue == mine)

        async def handle(e: Event, queue: str = queue) -> None:
            seen[queue].append(e.payload["i"])

        await bus.consume(queue, handle)

    confirmed: list[int] = []
    refused: list[int] = []
    was_down = asyncio.Event()

    async def keep_publishing() -> None:
        """Publish until 50 more are confirmed after the connection came back."""
        i = after = 0
        while after < 50:
            try:
                await bus.publish(event("step.image_processing", i=i))
                confirmed.append(i)
                after += was_down.is_set()
            except PublishError:
                refused.append(i)
            i += 1
            await asyncio.sleep(0.002)

    publishing = asyncio.ensure_future(keep_publishing())
    await eventually(lambda: len(confirmed) > 20)
    closing = asyncio.ensure_future(
        asyncio.to_thread(rabbit.close_connections, f"stox test {ns.prefix}")
    )
    await eventually(lambda: not bus.connected)
    was_down.set()
    assert await closing == 1
    await asyncio.wait_for(publishing, 30)

    assert bus.connected
    # every confirmed event reached the durable queue's consumer (some maybe twice: at least once)
    await eventually(lambda: set(confirmed) <= set(seen[durable]))
    assert len(confirmed) > 70
    # the exclusive queue came back with its binding, and its consumer with it
    await bus.publish(event("workflow.changed", i=-1))
    await eventually(lambda: seen[mine] == [-1])


async def test_a_broker_that_goes_away_and_comes_back_is_reconnected_with_backoff(
    buses: Callable[..., RabbitMQBus], rabbit_ns: rabbit.Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    ns = rabbit_ns
    proxy = rabbit.BrokerProxy(ns.url)  # the "broker" the bus sees
    await proxy.start()
    bus = buses(url=proxy.url(ns.url), reconnect_delay=0.05)
    try:
        await bus.start()
        queue = ns.step_queue("image_processing")
        await bus.declare(queue, ["step.image_processing"])
        await bus.declare(f"{ns.prefix}.hub.me", ["workflow.changed"], exclusive=True)
        seen: list[str] = []

        async def handle(e: Event) -> None:
            seen.append(e.routing_key)

        await bus.consume(queue, handle)
        await bus.consume(f"{ns.prefix}.hub.me", handle)

        await proxy.stop()  # the broker goes away: connections cut, new ones refused
        await eventually(lambda: not bus.connected)
        with pytest.raises(PublishError):
            await bus.publish(event("step.image_processing"))
        await asyncio.sleep(1.0)  # reconnect attempts fail meanwhile, further and further apart
        await proxy.start()  # and it is back, on the same address
        await eventually(lambda: bus.connected)

        await bus.publish(event("step.image_processing"))
        await bus.publish(event("workflow.changed"))
        await eventually(lambda: sorted(seen) == ["step.image_processing", "workflow.changed"])
    finally:
        await bus.close()
        await proxy.stop()
    failures = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert 2 <= len(failures) <= 6  # a few attempts with a growing pause, not a busy loop


async def test_what_reaches_a_private_queue_while_the_bus_reconnects_waits_for_it(
    buses: Callable[..., RabbitMQBus], rabbit_ns: rabbit.Namespace
) -> None:
    """The hub's own queue is not tied to the connection: changes other instances publish
    while this one is cut off are delivered once it is back (bench/chaos.py found watchers
    missing versions when the queue went with the dropped connection). Closing the bus
    deletes it."""
    ns = rabbit_ns
    proxy = rabbit.BrokerProxy(ns.url)
    await proxy.start()
    bus = buses(url=proxy.url(ns.url), reconnect_delay=0.05)
    mine = f"{ns.prefix}.hub.me"
    try:
        await bus.start()
        await bus.declare(mine, ["workflow.changed"], exclusive=True)
        seen: list[int] = []

        async def handle(e: Event) -> None:
            seen.append(e.payload["v"])

        await bus.consume(mine, handle)
        await proxy.stop()  # this instance is cut off
        await eventually(lambda: not bus.connected)
        for v in (1, 2, 3):  # another instance's changes, meanwhile
            await asyncio.to_thread(ns.publish, "workflow.changed", json.dumps({"v": v}).encode())
        await proxy.start()
        await eventually(lambda: seen == [1, 2, 3])
    finally:
        await bus.close()
        await proxy.stop()
    assert await asyncio.to_thread(queue_exists, ns, mine) is False


def queue_exists(ns: rabbit.Namespace, queue: str) -> bool:
    try:
        ns.count(queue)
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404, exc
        return False
    return True


async def test_what_services_send_is_decoded_exactly_and_the_hubs_own_queue_as_fast(
    buses: Callable[..., RabbitMQBus], rabbit_ns: rabbit.Namespace
) -> None:
    """A durable queue carries what services send: a whole number beyond 64 bits arrives as
    that number (for the schema to refuse by name), not as the float a faster decoder would
    make of it. An exclusive queue (the hub's) carries what gateways encode themselves."""
    ns = rabbit_ns
    bus, queue = await with_step_queue(buses, ns, "image_processing")
    hub_queue = f"{ns.prefix}.hub.test"
    ns.extra_queues.append(hub_queue)
    await bus.declare(hub_queue, ["workflow.changed"], exclusive=True)
    got: dict[str, Event] = {}

    async def keep(event: Event) -> None:
        got[event.routing_key] = event

    await bus.consume(queue, keep)
    await bus.consume(hub_queue, keep)
    await asyncio.to_thread(ns.publish, "step.image_processing", b'{"n": 1180591620717411303424}')
    await bus.publish(Event("workflow.changed", {"n": 7, "name": "Ünïcødé"}, uuid.uuid4().hex))
    await eventually(lambda: len(got) == 2)
    assert got["step.image_processing"].payload == {"n": 2**70}
    assert got["workflow.changed"].payload == {"n": 7, "name": "Ünïcødé"}


async def test_the_frames_of_a_turn_go_to_the_broker_in_few_system_calls(
    buses: Callable[..., RabbitMQBus], rabbit_ns: rabbit.Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pika sends each frame alone (three per publish); stox.bus.pika_writes joins what one
    turn buffered, so twenty publishes made together cost a handful of sends, not sixty."""
    from pika.adapters.utils import io_services_utils

    assert pika_writes.coalesce()
    transport = io_services_utils._AsyncTransportBase
    original = transport._sigint_safe_send
    sends: list[int] = []

    def counted(sock: object, data: bytes) -> int:
        sends.append(len(data))
        return int(original(sock, data))

    monkeypatch.setattr(transport, "_sigint_safe_send", staticmethod(counted))
    bus, queue = await with_step_queue(buses, rabbit_ns, "image_processing")
    sends.clear()
    events = [
        Event("step.image_processing", {"n": n}, uuid.uuid4().hex, "0f" * 16) for n in range(20)
    ]
    await asyncio.gather(*(bus.publish(event) for event in events))
    assert len(sends) <= 5, sends
    got = await asyncio.to_thread(rabbit_ns.drain, queue)
    assert sorted(json.loads(m.body)["n"] for m in got) == list(range(20))
