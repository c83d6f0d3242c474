"""The RabbitMQ bus: pika's `TornadoConnection` on the server's own IOLoop; the exchange,
queues and messages it carries: docs/architecture.md#events-and-the-queue-topology.

It keeps the promises of `LocalBus`, so the same contract suite runs on both:

* topology: a durable topic exchange (`rabbitmq.exchange`); every queue declared through
  `declare()` is dead-lettered to `<prefix>.dead` (a fanout exchange and a durable queue of
  that name); an `exclusive` queue is this instance's own: not durable, and not tied to the
  connection either, so that what is routed to it while a reconnect is under way waits there
  (a connection-exclusive queue would go with the dropped connection, and the hub would miss
  the changes published meanwhile). `close()` deletes it; if the instance dies, the broker
  does, once it has gone unused for `private_queue_expires` (`x-expires`);
* queue types: the durable queues (the dead letters' and every non-exclusive one) are of
  `queue_type`, classic or quorum (`x-queue-type`; replicated, see the README's production
  checklist); an instance's own queue is always classic (a quorum queue must be durable).
  A queue that exists with another type refuses the declaration (PRECONDITION_FAILED), and
  the bus raises `QueueTypeMismatch` naming the queue and `rabbitmq.queue_type`;
* publishing: persistent JSON with `message_id`, `correlation_id`, `timestamp` (AMQP carries
  whole seconds, so the exact float travels in the `x-stox-timestamp` header too) and
  `content_type`. `publish()` returns once the broker confirms; a nack, a timeout, a lost
  connection, or the return of an event meant for a durable queue declared here (`mandatory`)
  is retried `rabbitmq.max_retries` times `rabbitmq.retry_delay` apart, then raises
  `PublishError`, and the event waits in the outbox for the relay. A return first redeclares
  the topology: someone deleted a queue. Other events nobody is bound to are dropped, as by
  an exchange without `mandatory` (and by `LocalBus`);
* consuming: manual acks after the handler returns, a prefetch per consumer; failures follow
  `Redelivery` (stox/bus/base.py), as on `LocalBus`: `Rejected` is nacked without requeue (it
  dead-letters once); another exception puts the message back after its delay, at most its
  limit of times, then it is dead-lettered. The count
  travels with the message (a copy carrying `x-stox-failures` replaces it in its queue), so a
  message that fails on every instance is tried that many times in all, not that many times
  on each. A body that cannot be decoded into a JSON object (whatever the decoder raises, a
  RecursionError included) never reaches a handler: it is dead-lettered at once, and nothing
  a message holds can close the connection;
* recovery, which pika leaves to us: heartbeats, a blocked-connection timeout, and after a
  lost connection or a broker restart a reconnect with backoff that redeclares everything
  declared so far and resumes every consumer. Publishes in flight when the connection drops
  are retried, then fail; none hangs. `connected` says whether the broker is connected now.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pika
import pika.exceptions
from pika.adapters.tornado_connection import TornadoConnection
from pika.channel import Channel
from tornado.ioloop import IOLoop

from settings import RabbitMQSettings
from stox import codec
from stox.bus import pika_writes
from stox.bus.base import (
    REDELIVERED,
    Event,
    Handler,
    PublishError,
    Redelivery,
    log_dead_letter,
    topic_matches,
)
from stox.bus.pika_calls import (
    Lost,
    OpenChannel,
    call,
    open_channel,
    settle_once,
    temporary_channel,
)
from stox.codec import dumps
from stox.logs import message_context, workflow_fields

log = logging.getLogger(__name__)

CLASSIC, QUORUM = QUEUE_TYPES = ("classic", "quorum")
# "... but current is 'classic'", "... is the value 'quorum' of type 'longstr'", "... is none"
_CURRENT_TYPE = re.compile(r"current is (?:the value )?'?(\w+)")

pika_writes.coalesce()  # the frames of a loop turn in one system call (see pika_writes.py)

JSON = "application/json"
TIMESTAMP_HEADER = "x-stox-timestamp"  # the exact float; AMQP timestamps are whole seconds
FAILURES_HEADER = "x-stox-failures"  # how many times handlers failed on this message so far
PERSISTENT = 2
_DEFAULTS = RabbitMQSettings()


class QueueTypeMismatch(Lost):
    """A queue exists in the broker with another type than `rabbitmq.queue_type`."""


def _type_mismatch(queue: str, wanted: str, exc: Lost) -> QueueTypeMismatch | None:
    """The mismatch the broker's refusal of `queue`'s declaration reports, if it is one."""
    reason = exc.reason
    if not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
        return None
    text = str(reason.reply_text)
    if reason.reply_code != 406 or "x-queue-type" not in text:
        return None
    found = _CURRENT_TYPE.search(text)
    current = found[1] if found else "other"
    current = CLASSIC if current == "none" else current  # declared without x-queue-type
    return QueueTypeMismatch(
        f"queue {queue!r} exists in RabbitMQ as a {current} queue, but rabbitmq.queue_type is "
        f"{wanted}, and a queue's type cannot change: set rabbitmq.queue_type: {current}, or "
        f"move its messages and delete the queue (see the README's production checklist)"
    )


@dataclass(eq=False)
class _Declared:
    name: str
    exclusive: bool
    bindings: list[str] = field(default_factory=list)


@dataclass(eq=False)
class _Consumer:
    queue: str
    handler: Handler


@dataclass(eq=False)
class _Publish:
    message_id: str | None
    future: asyncio.Future[str | None]  # None: confirmed; else why not
    deadline: float  # loop time by which the broker must have confirmed it
    returned: bool = False


class _Link:
    """One connection and its two channels; a reconnect replaces it whole."""

    def __init__(self, connection: TornadoConnection, lost: asyncio.Future[Any]) -> None:
        self.connection = connection
        self.lost = lost  # resolves to the reason when the connection closes
        self.closing = False  # we are closing it
        self.publisher: OpenChannel | None = None
        self.consumer: OpenChannel | None = None
        # in publish order, so in deadline order: one timer watches the oldest
        self.unconfirmed: OrderedDict[int, _Publish] = OrderedDict()
        self.next_tag = 0
        self._deadline_timer: asyncio.TimerHandle | None = None

    @property
    def open(self) -> bool:
        return not self.closing and not self.lost.done()

    def close(self, reason: str) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError):
            if self.connection.is_open:
                self.connection.close(reply_text=reason)

    def settle_all(self, why: str) -> None:
        for pending in self.unconfirmed.values():
            if not pending.future.done():
                pending.future.set_result(why)
        self.unconfirmed.clear()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None

    def watch_deadlines(self, why: str) -> None:
        """Settle each publish the broker has not confirmed by its deadline with `why`.

        One timer for the connection, at the oldest publish's deadline, rather than one
        per publish: publishes are in deadline order, so only the front needs watching."""
        if self._deadline_timer is not None or not self.unconfirmed:
            return
        loop = asyncio.get_running_loop()
        first = next(iter(self.unconfirmed.values()))
        self._deadline_timer = loop.call_at(first.deadline, self._deadlines_passed, why)

    def _deadlines_passed(self, why: str) -> None:
        self._deadline_timer = None
        now = asyncio.get_running_loop().time()
        while self.unconfirmed:
            tag, pending = next(iter(self.unconfirmed.items()))
            if pending.deadline > now:
                break
            del self.unconfirmed[tag]
            if not pending.future.done():
                pending.future.set_result(why)
        self.watch_deadlines(why)


class RabbitMQBus:
    """An `EventBus` on RabbitMQ; one connection, named `connection_name` in the broker."""

    kind = "rabbitmq"
    remote_consumers = True  # services and other gateway instances share the broker

    def __init__(
        self,
        url: str,
        *,
        connection_name: str = "stox",
        exchange: str = _DEFAULTS.exchange,
        prefix: str = _DEFAULTS.prefix,
        prefetch: int = _DEFAULTS.prefetch,
        max_retries: int = _DEFAULTS.max_retries,
        retry_delay: float = _DEFAULTS.retry_delay,
        confirm_timeout: float = _DEFAULTS.confirm_timeout,
        heartbeat: float = _DEFAULTS.heartbeat,
        blocked_timeout: float = _DEFAULTS.blocked_timeout,
        redelivery: Redelivery | None = None,
        reconnect_delay: float = 0.2,
        max_reconnect_delay: float = 30.0,
        private_queue_expires: float = 120.0,
        queue_type: str = _DEFAULTS.queue_type,
    ) -> None:
        if not url:
            raise ValueError("rabbitmq.url is required")
        if queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type: expected classic or quorum, got {queue_type!r}")
        self.queue_type = queue_type
        self.url = url
        self.connection_name = connection_name
        self.exchange = exchange
        self.dead_letters = f"{prefix}.dead"  # the exchange and the queue
        self.prefetch = prefetch
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.confirm_timeout = confirm_timeout
        self.heartbeat = heartbeat
        self.blocked_timeout = blocked_timeout
        self.redelivery = redelivery or Redelivery()
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.private_queue_expires = private_queue_expires
        self._declared: dict[str, _Declared] = {}
        self._consumers: list[_Consumer] = []
        self._must_route: dict[str, bool] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._link: _Link | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._started = False
        self._closed = False

    @classmethod
    def from_settings(
        cls, settings: RabbitMQSettings, *, connection_name: str = "stox", **options: Any
    ) -> RabbitMQBus:
        """The bus `settings` describe; `options` override them or add the other keyword
        arguments."""
        described: dict[str, Any] = {
            "exchange": settings.exchange,
            "prefix": settings.prefix,
            "prefetch": settings.prefetch,
            "max_retries": settings.max_retries,
            "retry_delay": settings.retry_delay,
            "confirm_timeout": settings.confirm_timeout,
            "heartbeat": settings.heartbeat,
            "blocked_timeout": settings.blocked_timeout,
            "queue_type": settings.queue_type,
        }
        return cls(settings.url, connection_name=connection_name, **{**described, **options})

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.open and not self._closed

    @property
    def where(self) -> str:
        """The broker's address without credentials, for messages."""
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or 5672}{parts.path or '/'}"

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("RabbitMQBus cannot be restarted after close()")
        if self._started:
            return
        try:
            link = await self._connect()
        except (OSError, Lost, pika.exceptions.AMQPError) as exc:
            raise ConnectionError(f"cannot use RabbitMQ at {self.where}: {exc}") from None
        self._started = True
        self._link = link
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(link), name="RabbitMQBus reconnect"
        )
        log.info("connected to RabbitMQ at %s as %r", self.where, self.connection_name)

    async def close(self) -> None:
        """Stop consuming and disconnect; unacknowledged messages go back to their queues."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        current = asyncio.current_task()
        tasks = [t for t in (self._supervisor, *self._handlers) if t and t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._handlers.clear()
        link, self._link = self._link, None
        if link is not None:
            await self._delete_private_queues(link)
            link.closing = True
            link.close("stox bus closed")
            await asyncio.wait({link.lost}, timeout=5)
            link.settle_all("the bus was closed")

    # -- the EventBus protocol ------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        if not self._started or self._closed:
            raise PublishError(f"bus is not connected; {event.routing_key} not published")
        body = event.body.encode() if event.body is not None else dumps(event.payload)
        properties = pika.BasicProperties(
            content_type=JSON,
            delivery_mode=PERSISTENT,
            message_id=event.message_id,
            correlation_id=event.correlation_id,
            timestamp=int(event.timestamp),
            headers={**event.headers, TIMESTAMP_HEADER: repr(float(event.timestamp))},
        )
        mandatory = self._routes_to_a_durable_queue(event.routing_key)
        attempts = 1 + max(0, self.max_retries)
        problem: str | None = "not attempted"
        for attempt in range(1, attempts + 1):
            problem = await self._publish_once(
                self.exchange, event.routing_key, body, properties, mandatory
            )
            if problem is None:
                return
            if self._closed or attempt == attempts:
                break
            log.warning(
                "publish of %s (message_id=%s) failed: %s; attempt %d of %d in %.2gs",
                event.routing_key,
                event.message_id,
                problem,
                attempt + 1,
                attempts,
                self.retry_delay,
            )
            if problem == "returned unroutable":
                await self._redeclare()
            await self._pause(self.retry_delay)
        raise PublishError(
            f"{event.routing_key} (message_id={event.message_id}) not confirmed: {problem}"
        )

    async def declare(
        self, queue: str, bindings: Sequence[str], *, exclusive: bool = False
    ) -> None:
        link = self._require_connected()
        if isinstance(bindings, str):
            raise TypeError("bindings must be a sequence of binding keys, not one string")
        known = self._declared.get(queue)
        if known is not None and known.exclusive != exclusive:
            raise ValueError(f"queue {queue!r} already declared with exclusive={known.exclusive}")
        wanted = _Declared(
            queue, exclusive, list(dict.fromkeys([*(known.bindings if known else []), *bindings]))
        )
        try:
            async with temporary_channel(link.connection, link.lost) as chan:
                await self._declare_queue(chan, wanted)
        except QueueTypeMismatch as exc:
            raise ConnectionError(str(exc)) from None
        except Lost as exc:  # refused (declared before with other arguments), or cut off
            raise ConnectionError(f"RabbitMQ did not declare queue {queue!r}: {exc}") from None
        self._declared[queue] = wanted
        self._must_route.clear()

    async def consume(self, queue: str, handler: Handler) -> None:
        link = self._require_connected()
        if queue not in self._declared:
            raise LookupError(f"queue {queue!r} is not declared")
        consumer = _Consumer(queue, handler)
        self._consumers.append(consumer)  # a reconnect resumes it from here on
        with contextlib.suppress(Lost):  # the reconnect will start it
            await self._start_consumer(link, consumer)

    # -- connecting -----------------------------------------------------------------------

    def _parameters(self) -> pika.URLParameters:
        params = pika.URLParameters(self.url)
        query = parse_qs(urlsplit(self.url).query)
        if "heartbeat" not in query:
            params.heartbeat = max(1, round(self.heartbeat))
        if "blocked_connection_timeout" not in query:
            params.blocked_connection_timeout = float(self.blocked_timeout)
        params.client_properties = {"connection_name": self.connection_name}
        return params

    async def _connect(self) -> _Link:
        """Open a connection and its channels, declare everything, start every consumer."""
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[Any] = loop.create_future()
        lost: asyncio.Future[Any] = loop.create_future()

        def on_open_error(_: Any, exc: BaseException | str) -> None:
            if not opened.done():
                opened.set_exception(Lost(f"connection failed: {exc!r}"))

        connection = TornadoConnection(
            self._parameters(),
            on_open_callback=settle_once(opened),
            on_open_error_callback=on_open_error,
            on_close_callback=settle_once(lost),
            custom_ioloop=IOLoop.current(),
        )
        link = _Link(connection, lost)
        lost.add_done_callback(lambda _: self._on_link_lost(link))
        try:
            await opened
            connection.add_on_connection_blocked_callback(
                lambda *_: log.warning("RabbitMQ is blocking publishes (resource alarm)")
            )
            connection.add_on_connection_unblocked_callback(
                lambda *_: log.info("RabbitMQ accepts publishes again")
            )
            link.publisher = pub = await open_channel(link.connection, link.lost)
            await call(
                pub, pub.channel.confirm_delivery, ack_nack_callback=partial(self._on_confirm, link)
            )
            pub.channel.add_on_return_callback(partial(self._on_return, link))
            link.consumer = sub = await open_channel(link.connection, link.lost)
            await call(sub, sub.channel.basic_qos, prefetch_count=self.prefetch)
            sub.channel.add_on_cancel_callback(
                lambda _: self._restart(link, "the broker cancelled a consumer")
            )
            async with temporary_channel(link.connection, link.lost) as chan:
                await self._declare_base(chan)
                for declared in list(self._declared.values()):
                    await self._declare_queue(chan, declared)
            for consumer in list(self._consumers):
                await self._start_consumer(link, consumer)
        except BaseException:
            link.closing = True
            link.close("stox bus could not set up")
            raise
        for chan in (pub, sub):
            chan.closed.add_done_callback(
                lambda f: self._restart(link, f"a channel closed: {f.result()!r}")
            )
        return link

    async def _supervise(self, link: _Link) -> None:
        """Wait for the connection to drop, then reconnect with backoff; until close()."""
        while True:
            await asyncio.wait({link.lost})
            log.warning("RabbitMQ connection lost (%s); reconnecting", link.lost.result())
            delay = self.reconnect_delay
            while True:
                await self._pause(delay)
                if self._closed:
                    return
                try:
                    link = await self._connect()
                except (OSError, Lost, pika.exceptions.AMQPError) as exc:
                    log.warning(
                        "RabbitMQ at %s unavailable (%s); next attempt in %.1fs",
                        self.where,
                        exc,
                        min(delay * 2, self.max_reconnect_delay),
                    )
                    delay = min(delay * 2, self.max_reconnect_delay)
                    continue
                self._link = link
                log.info("reconnected to RabbitMQ at %s", self.where)
                break

    def _on_link_lost(self, link: _Link) -> None:
        link.settle_all("the connection was lost")
        if self._link is link:
            self._link = None

    def _restart(self, link: _Link, why: str) -> None:
        """A channel of `link` is gone or a consumer cancelled: reconnect from scratch."""
        if link.open and not self._closed:  # closing deletes private queues: no reconnect
            log.warning("RabbitMQ: %s; reconnecting", why)
            link.close(why[:200])

    def _require_connected(self) -> _Link:
        link = self._link
        if not self._started or self._closed or link is None or not link.open:
            raise RuntimeError("bus is not connected; call start() first")
        return link

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the bus closes."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    # -- declaring ------------------------------------------------------------------------

    async def _declare_base(self, chan: OpenChannel) -> None:
        ch = chan.channel
        await call(chan, ch.exchange_declare, self.exchange, "topic", durable=True)
        await call(chan, ch.exchange_declare, self.dead_letters, "fanout", durable=True)
        await self._queue_declare(chan, self.dead_letters, {})
        await call(chan, ch.queue_bind, self.dead_letters, self.dead_letters, routing_key="")

    async def _declare_queue(self, chan: OpenChannel, queue: _Declared) -> None:
        ch = chan.channel
        arguments: dict[str, object] = {"x-dead-letter-exchange": self.dead_letters}
        if queue.exclusive:
            arguments["x-expires"] = max(1, round(self.private_queue_expires * 1000))
            await call(chan, ch.queue_declare, queue.name, durable=False, arguments=arguments)
        else:
            await self._queue_declare(chan, queue.name, arguments)
        for binding in queue.bindings:
            await call(chan, ch.queue_bind, queue.name, self.exchange, routing_key=binding)

    async def _queue_declare(
        self, chan: OpenChannel, name: str, arguments: dict[str, object]
    ) -> None:
        """Declare a durable queue of `queue_type`; QueueTypeMismatch if it has another."""
        if self.queue_type == QUORUM:  # classic is the default: no argument, as before
            arguments = {**arguments, "x-queue-type": QUORUM}
        try:
            await call(chan, chan.channel.queue_declare, name, durable=True, arguments=arguments)
        except Lost as exc:
            raise _type_mismatch(name, self.queue_type, exc) or exc from None

    async def _delete_private_queues(self, link: _Link) -> None:
        """This instance's own queues go with it (if the broker cannot be asked now, they
        expire)."""
        private = [q.name for q in self._declared.values() if q.exclusive]
        if not private or not link.open:
            return
        try:
            async with temporary_channel(link.connection, link.lost) as chan:
                for name in private:
                    await call(chan, chan.channel.queue_delete, name)
        except Lost as exc:
            log.warning("deleting this instance's queues failed (they expire): %s", exc)

    async def _redeclare(self) -> None:
        """Declare everything again (after a return: a queue was deleted under us)."""
        link = self._link
        if link is None or not link.open:
            return
        try:
            async with temporary_channel(link.connection, link.lost) as chan:
                await self._declare_base(chan)
                for declared in list(self._declared.values()):
                    await self._declare_queue(chan, declared)
        except Lost as exc:
            log.warning("redeclaring the RabbitMQ topology failed: %s", exc)

    # -- publishing -----------------------------------------------------------------------

    def _routes_to_a_durable_queue(self, routing_key: str) -> bool:
        """Whether a durable queue declared here is bound to it: then it must not be lost."""
        must = self._must_route.get(routing_key)
        if must is None:
            must = any(
                topic_matches(binding, routing_key)
                for queue in self._declared.values()
                if not queue.exclusive
                for binding in queue.bindings
            )
            if len(self._must_route) > 4096:
                self._must_route.clear()
            self._must_route[routing_key] = must
        return must

    async def _publish_once(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties,
        mandatory: bool,
    ) -> str | None:
        """None once the broker confirms; otherwise what went wrong."""
        link = self._link
        if link is None or not link.open or link.publisher is None:
            return "not connected"
        loop = asyncio.get_running_loop()
        timeout = self.confirm_timeout
        pending = _Publish(properties.message_id, loop.create_future(), loop.time() + timeout)
        link.next_tag += 1
        tag = link.next_tag
        link.unconfirmed[tag] = pending
        try:
            link.publisher.channel.basic_publish(exchange, routing_key, body, properties, mandatory)
        except pika.exceptions.AMQPError as exc:
            link.unconfirmed.pop(tag, None)
            link.next_tag -= 1
            return f"cannot publish: {exc!r}"
        link.watch_deadlines(f"no confirm within {timeout:g}s")
        return await pending.future

    @staticmethod
    def _on_confirm(link: _Link, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        settled: list[_Publish | None] = []
        if method.multiple:  # tags ascend in the dict: take the front up to this one
            while link.unconfirmed and next(iter(link.unconfirmed)) <= method.delivery_tag:
                settled.append(link.unconfirmed.popitem(last=False)[1])
        else:
            settled.append(link.unconfirmed.pop(method.delivery_tag, None))
        for pending in settled:
            if pending is None or pending.future.done():
                continue
            if pending.returned:
                pending.future.set_result("returned unroutable")
            else:
                pending.future.set_result(None if acked else "nacked by the broker")

    @staticmethod
    def _on_return(link: _Link, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        # the broker returns a message before it confirms it: mark the oldest such publish
        for pending in link.unconfirmed.values():
            if pending.message_id == properties.message_id and not pending.returned:
                pending.returned = True
                break
        log.debug(
            "returned %s: %s",
            method.routing_key,
            method.reply_text,
            extra=workflow_fields(properties.correlation_id),
        )

    # -- consuming ------------------------------------------------------------------------

    async def _start_consumer(self, link: _Link, consumer: _Consumer) -> None:
        sub = link.consumer
        assert sub is not None
        await call(
            sub,
            sub.channel.basic_consume,
            consumer.queue,
            partial(self._on_message, link, consumer),
        )

    def _on_message(
        self,
        link: _Link,
        consumer: _Consumer,
        channel: Channel,
        method: Any,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        if self._closed or not link.open:
            return  # the broker requeues it when the channel goes
        # an exclusive queue is this gateway's own (the hub's): it carries what gateways
        # publish, encoded by them (stox/codec.py), so the faster decoder is exact for it;
        # what services send, on the durable queues, gets the standard library's
        declared = self._declared.get(consumer.queue)
        decoder = codec.loads if declared is not None and declared.exclusive else json.loads
        try:
            event = _decode(method, properties, body, decoder)
        except Exception as exc:  # whatever a body can make a decoder raise, RecursionError too
            reason = f"the body is not a JSON object ({type(exc).__name__})"
            log.warning(
                "dead-lettered %s from %s (message_id=%s): %s",
                method.routing_key,
                consumer.queue,
                properties.message_id,
                reason,
                extra=workflow_fields(properties.correlation_id),
            )
            _settle(channel, method.delivery_tag, "dead-letter")
            return
        delivery = _Delivery(channel, method.delivery_tag, properties, body)
        task = asyncio.get_running_loop().create_task(self._handle(delivery, consumer, event))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(self, delivery: _Delivery, consumer: _Consumer, event: Event) -> None:
        message_context(event.correlation_id)  # this task's lines are about it
        try:
            await consumer.handler(event)
        except Exception as exc:
            queue, failures = consumer.queue, delivery.failures
            reason = self.redelivery.dead_letter_reason(log, queue, event, exc, failures)
            if reason is None:
                await self._redeliver_later(delivery, queue, event)
            else:
                log_dead_letter(log, queue, event, reason)
                delivery.settle("dead-letter")
            return
        delivery.settle("ack")

    async def _redeliver_later(self, delivery: _Delivery, queue: str, event: Event) -> None:
        """Put the message back, its failure count raised, after the redelivery delay."""
        failures = delivery.failures
        await self._pause(self.redelivery.delay)
        if not delivery.channel.is_open:
            return  # the broker has put it back already (its count not raised, this once)
        # A copy with the count raised goes to the queue's tail through the default exchange;
        # the original is acknowledged only once the broker has confirmed the copy.
        properties = delivery.properties
        headers = {**(properties.headers or {}), FAILURES_HEADER: failures + 1}
        copy = pika.BasicProperties(**{**vars(properties), "headers": headers})
        problem = await self._publish_once("", queue, delivery.body, copy, True)
        if problem is None:
            delivery.settle("ack")
        else:
            log.warning("could not requeue %s with its count (%s)", event.message_id, problem)
            delivery.settle("requeue")


@dataclass(eq=False)
class _Delivery:
    """A message as it came from the broker, until it is settled."""

    channel: Channel
    tag: int
    properties: pika.BasicProperties
    body: bytes

    @property
    def failures(self) -> int:
        count = (self.properties.headers or {}).get(FAILURES_HEADER, 0)
        return count if isinstance(count, int) and count >= 0 else 0

    def settle(self, how: str) -> None:
        _settle(self.channel, self.tag, how)


def _decode(
    method: Any,
    properties: pika.BasicProperties,
    body: bytes,
    decoder: Callable[[bytes], Any] = json.loads,
) -> Event:
    """The delivery as an Event; ValueError (or whatever `decoder` raises) unless it is an
    object."""
    payload = decoder(body)
    if not isinstance(payload, dict):
        raise ValueError("not a JSON object")
    headers = dict(properties.headers or {})
    exact = headers.pop(TIMESTAMP_HEADER, None)
    try:
        timestamp = float(exact) if exact is not None else float(properties.timestamp or 0)
    except (TypeError, ValueError):
        timestamp = float(properties.timestamp or 0)
    if method.redelivered or headers.pop(FAILURES_HEADER, None) is not None:
        headers[REDELIVERED] = True
    return Event(
        routing_key=method.routing_key,
        payload=payload,
        message_id=properties.message_id or "",
        correlation_id=properties.correlation_id,
        timestamp=timestamp,
        headers=headers,
    )


def _settle(channel: Channel, tag: int, how: str) -> None:
    """Ack, requeue or dead-letter a delivery; on a closed channel the broker requeued it."""
    if not channel.is_open:
        return
    with contextlib.suppress(pika.exceptions.AMQPError):
        if how == "ack":
            channel.basic_ack(tag)
        else:
            channel.basic_nack(tag, requeue=how == "requeue")
