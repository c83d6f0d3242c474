"""The in-process topic bus: the default when no RabbitMQ URL is configured.

It mirrors what the gateway relies on from RabbitMQ so one contract suite runs on both:
a topic exchange routing to named queues by AMQP binding keys, queues that keep messages
until a consumer appears, competing consumers with a prefetch limit, ack on return,
dead-lettering on `Rejected`, and delayed redelivery on any other error.

Payloads are serialised to JSON once at publish and decoded for each delivery, so every
queue (and every redelivery) gets its own copy, exactly as it would arrive from a broker,
and a payload RabbitMQ could not carry fails here too. A message that cannot be decoded
(whatever the decoder raises) is dead-lettered and its queue moves on.

With a `journal`, messages for durable (not exclusive) queues are journalled before publish
returns and forgotten once handled, so a crash loses none of them: the next start delivers
them again as soon as their queue is declared (see stox/bus/journal.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence

from stox.bus.base import (
    REDELIVERED,
    Event,
    Handler,
    PublishError,
    Redelivery,
    log_dead_letter,
    topic_matches,
)
from stox.bus.journal import Journal, Kept
from stox.codec import dumps_text, loads
from stox.logs import detached, message_context

log = logging.getLogger(__name__)

DEAD_LETTER_LIMIT = 1000  # the newest dead letters kept for inspection

# Routing keys are few in practice (step.<name>, workflow.*); the bound only stops a caller
# that puts ids into routing keys from growing the cache without limit.
_ROUTE_CACHE_MAX = 4096


class _Message:
    __slots__ = ("body", "event", "key", "redeliveries")

    def __init__(self, event: Event, body: str, key: int = 0) -> None:
        self.event = event  # the published event; its payload is decoded afresh from `body`
        self.body = body
        self.key = key  # its place in the journal; 0 when not journalled
        self.redeliveries = 0

    def materialize(self) -> Event:
        event = self.event
        headers = dict(event.headers)
        if self.redeliveries:
            headers[REDELIVERED] = True
        return Event(
            event.routing_key,
            loads(self.body),
            event.message_id,
            event.correlation_id,
            event.timestamp,
            headers,
        )


class _Consumer:
    __slots__ = ("handler", "in_flight")

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.in_flight = 0


class _Queue:
    __slots__ = ("bindings", "consumers", "exclusive", "messages", "name", "next", "task", "wakeup")

    def __init__(self, name: str, exclusive: bool) -> None:
        self.name = name
        self.exclusive = exclusive
        self.bindings: list[str] = []
        self.messages: deque[_Message] = deque()
        self.consumers: list[_Consumer] = []
        self.next = 0  # round-robin position among consumers
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def matches(self, routing_key: str) -> bool:
        return any(topic_matches(binding, routing_key) for binding in self.bindings)

    def ready_consumer(self, prefetch: int) -> _Consumer | None:
        """The next consumer in round-robin order with room under its prefetch limit."""
        consumers = self.consumers
        n = len(consumers)
        for i in range(n):
            index = (self.next + i) % n
            consumer = consumers[index]
            if consumer.in_flight < prefetch:
                self.next = (index + 1) % n
                return consumer
        return None


class LocalBus:
    """An in-process `EventBus` with RabbitMQ's topic-exchange semantics.

    `prefetch` bounds the handlers in flight per consumer (1 gives strict FIFO handling);
    a handler that raises is dealt with by `redelivery` (stox/bus/base.py: put back later,
    or dead-lettered). Dead letters are kept in `dead_letters` as (queue, event, reason).
    """

    kind = "in-process"
    remote_consumers = False  # only this process reaches its queues

    def __init__(
        self,
        *,
        prefetch: int = 100,
        redelivery: Redelivery | None = None,
        journal: Journal | None = None,
    ) -> None:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self.prefetch = prefetch
        self.redelivery = redelivery or Redelivery()
        self.journal = journal
        self.dead_letters: deque[tuple[str, Event, str]] = deque(maxlen=DEAD_LETTER_LIMIT)
        self._recovered: dict[str, list[_Message]] = {}  # journalled, for queues not declared yet
        self._handled: list[int] = []  # journal keys to forget
        self._forgetting: asyncio.Task[None] | None = None
        self._queues: dict[str, _Queue] = {}
        self._routes: dict[str, tuple[_Queue, ...]] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._timers: dict[_Message, asyncio.TimerHandle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._started and not self._closed

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("LocalBus cannot be restarted after close()")
        self._loop = asyncio.get_running_loop()
        if self.journal is not None and not self._started:
            await self.journal.open()
            for kept in await self.journal.load():
                self._recover(kept)
        self._started = True

    def _recover(self, kept: Kept) -> None:
        try:
            headers = loads(kept.headers)
            if not isinstance(headers, dict):
                raise ValueError("the headers are not an object")
        except (ValueError, RecursionError) as exc:
            headers = {}
            problem: Exception | None = exc
        else:
            problem = None
        event = Event(
            kept.routing_key, {}, kept.message_id, kept.correlation_id, kept.timestamp, headers
        )
        message = _Message(event, kept.body, kept.key)
        if problem is not None:
            self._dead_letter(kept.queue, message, f"undecodable headers ({problem!r})")
            return
        self._recovered.setdefault(kept.queue, []).append(message)

    async def close(self) -> None:
        """Stop delivering; handlers already running are cancelled. Messages still queued for
        durable queues stay in the journal, if there is one; all others are lost."""
        if self._closed:
            return
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        tasks: list[asyncio.Task[None]] = [q.task for q in self._queues.values() if q.task]
        tasks.extend(self._handlers)
        # close() may be called from a handler: never cancel or wait for the caller itself.
        current = asyncio.current_task()
        tasks = [task for task in tasks if task is not current]
        for task in tasks:
            task.cancel()
        # A cancelled task re-raises CancelledError; that is the expected outcome here.
        await asyncio.gather(*tasks, return_exceptions=True)
        self._handlers.clear()
        for q in self._queues.values():
            q.task = None
            q.consumers.clear()
            q.messages.clear()
        if self._forgetting is not None:
            await asyncio.gather(self._forgetting, return_exceptions=True)
        await self._forget_handled()
        if self.journal is not None and self._started:
            await self.journal.close()

    async def publish(self, event: Event) -> None:
        if not self._started or self._closed:
            raise PublishError(f"bus is not connected; {event.routing_key} not published")
        body = event.body if event.body is not None else dumps_text(event.payload)
        queues = self._routes.get(event.routing_key)
        if queues is None:
            queues = self._route(event.routing_key)
        if not queues:
            return  # like an AMQP exchange publish without `mandatory`: unroutable, dropped
        keys = await self._journal(event, body, queues)
        if self._closed:
            raise PublishError(f"bus closed; {event.routing_key} not published")
        for q in queues:
            q.messages.append(_Message(event, body, keys.get(q.name, 0)))
            if q.consumers:
                q.wakeup.set()

    async def _journal(self, event: Event, body: str, queues: Sequence[_Queue]) -> dict[str, int]:
        """Journal the message for each durable queue: its key there, by queue name."""
        durable = [q.name for q in queues if not q.exclusive]
        if self.journal is None or not durable:
            return {}
        headers = dumps_text(event.headers)
        kept = [
            Kept(
                queue,
                event.routing_key,
                event.message_id,
                event.correlation_id,
                event.timestamp,
                headers,
                body,
            )
            for queue in durable
        ]
        try:
            keys = await self.journal.add(kept)
        except Exception as exc:  # unconfirmed: the event stays in the outbox for the relay
            raise PublishError(f"{event.routing_key} not journalled: {exc}") from exc
        return dict(zip(durable, keys, strict=True))

    async def declare(
        self, queue: str, bindings: Sequence[str], *, exclusive: bool = False
    ) -> None:
        self._require_connected()
        if isinstance(bindings, str):
            raise TypeError("bindings must be a sequence of binding keys, not one string")
        q = self._queues.get(queue)
        if q is None:
            q = self._queues[queue] = _Queue(queue, exclusive)
            recovered = self._recovered.pop(queue, [])
            if recovered:
                log.info("%d messages kept for %s are delivered again", len(recovered), queue)
                q.messages.extend(recovered)
        elif q.exclusive != exclusive:
            # RabbitMQ answers a redeclaration with other properties with PRECONDITION_FAILED.
            raise ValueError(f"queue {queue!r} already declared with exclusive={q.exclusive}")
        added = [b for b in dict.fromkeys(bindings) if b not in q.bindings]
        if added:
            q.bindings.extend(added)
            self._routes.clear()

    async def consume(self, queue: str, handler: Handler) -> None:
        self._require_connected()
        q = self._queues.get(queue)
        if q is None:
            raise LookupError(f"queue {queue!r} is not declared")
        q.consumers.append(_Consumer(handler))
        if q.task is None:
            assert self._loop is not None
            q.task = self._loop.create_task(self._deliver(q), name=f"LocalBus deliver {queue}")
        q.wakeup.set()

    # -- internals ---------------------------------------------------------------------

    def _require_connected(self) -> None:
        if not self.connected:
            raise RuntimeError("bus is not connected; call start() first")

    def _route(self, routing_key: str) -> tuple[_Queue, ...]:
        queues = tuple(q for q in self._queues.values() if q.matches(routing_key))
        if len(self._routes) >= _ROUTE_CACHE_MAX:
            self._routes.clear()
        self._routes[routing_key] = queues
        return queues

    async def _deliver(self, q: _Queue) -> None:
        """Hand queued messages to consumers with room, round-robin; runs until close()."""
        loop = asyncio.get_running_loop()
        messages, wakeup, prefetch = q.messages, q.wakeup, self.prefetch
        while True:
            while messages:
                consumer = q.ready_consumer(prefetch)
                if consumer is None:
                    break  # every consumer is at its prefetch limit; a finishing one wakes us
                message = messages.popleft()
                consumer.in_flight += 1
                task = loop.create_task(self._handle(q, consumer, message))
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)
            wakeup.clear()
            await wakeup.wait()

    async def _handle(self, q: _Queue, consumer: _Consumer, message: _Message) -> None:
        message_context(message.event.correlation_id)  # this task's lines are about it
        try:
            try:
                event = message.materialize()
            except Exception as exc:  # whatever the body makes the decoder raise
                self._dead_letter(q.name, message, f"the body is not JSON ({type(exc).__name__})")
                return
            try:
                await consumer.handler(event)
            except Exception as exc:
                failures = message.redeliveries
                reason = self.redelivery.dead_letter_reason(log, q.name, event, exc, failures)
                if reason is None:
                    self._redeliver_later(q, message)
                else:
                    self._dead_letter(q.name, message, reason, event)
            else:
                self._handled_message(message)
        finally:
            consumer.in_flight -= 1
            if q.messages:
                q.wakeup.set()

    def _dead_letter(
        self, queue: str, message: _Message, reason: str, event: Event | None = None
    ) -> None:
        """`event`: the message as delivered, when it could be decoded."""
        event = event or message.event
        log_dead_letter(log, queue, event, reason)
        self.dead_letters.append((queue, event, reason))
        self._handled_message(message)

    def _handled_message(self, message: _Message) -> None:
        """Acknowledged or dead-lettered: forget it in the journal (batched, in order)."""
        if not message.key:
            return
        self._handled.append(message.key)
        if self._forgetting is None and self._loop is not None:
            # for the messages of many workflows: not the context of the one that started it
            self._forgetting = self._loop.create_task(self._forget_soon(), context=detached())

    async def _forget_soon(self) -> None:
        try:
            await self._forget_handled()
        finally:
            self._forgetting = None
            if self._handled and not self._closed and self._loop is not None:
                self._forgetting = self._loop.create_task(self._forget_soon(), context=detached())

    async def _forget_handled(self) -> None:
        keys, self._handled = self._handled, []
        if not keys or self.journal is None:
            return
        try:
            await self.journal.remove(keys)
        except Exception:  # delivered again after a restart: at least once, as promised
            log.exception("could not drop %d handled messages from the journal", len(keys))

    def _redeliver_later(self, q: _Queue, message: _Message) -> None:
        message.redeliveries += 1
        if self._closed or self._loop is None:
            return
        self._timers[message] = self._loop.call_later(
            self.redelivery.delay, self._requeue, q, message
        )

    def _requeue(self, q: _Queue, message: _Message) -> None:
        self._timers.pop(message, None)
        if self._closed:
            return
        # RabbitMQ puts a requeued message back near the head of its queue, not at the tail.
        q.messages.appendleft(message)
        if q.consumers:
            q.wakeup.set()
