"""The EventBus protocol every bus implements (in-process, RabbitMQ)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Event:
    routing_key: str
    payload: dict[str, Any]
    message_id: str
    correlation_id: str | None = None  # the workflow id
    timestamp: float = 0.0
    headers: dict[str, Any] = field(default_factory=dict)
    # `payload` already encoded as JSON, when the publisher has it: a bus sends it as it is
    body: str | None = field(default=None, compare=False, repr=False)


class PublishError(Exception):
    """The broker did not confirm an event; it stays in the outbox for the relay."""


class Rejected(Exception):
    """Raised by a handler for a message that can never be handled: it is dead-lettered."""


Handler = Callable[[Event], Awaitable[None]]

REDELIVERED = "x-redelivered"  # the header of a message delivered before


@dataclass(frozen=True, slots=True)
class Redelivery:
    """What becomes of a message whose handler raised, on every bus: `Rejected` sends it to
    the dead letters at once; any other exception puts it back after `delay` seconds, at
    most `limit` times, and then it is dead-lettered too."""

    delay: float = 0.5
    limit: int = 5

    def __post_init__(self) -> None:
        if self.delay < 0:
            raise ValueError("redelivery_delay must not be negative")
        if self.limit < 0:
            raise ValueError("max_redeliveries must not be negative")

    def dead_letter_reason(
        self, log: logging.Logger, queue: str, event: Event, exc: Exception, failures: int
    ) -> str | None:
        """Why the message is dead-lettered now, or None: deliver it again after `delay`.
        `failures`: how many times handlers failed on it before this one."""
        if isinstance(exc, Rejected):
            return f"rejected: {exc}" if str(exc) else "rejected"
        if failures >= self.limit:
            log.error(
                "handler for %s on %s failed %d times (message_id=%s)",
                event.routing_key,
                queue,
                failures + 1,
                event.message_id,
                exc_info=exc,
            )
            return f"failed after {failures} redeliveries: {exc!r}"
        log.warning(
            "handler for %s on %s failed (message_id=%s); redelivering in %.2fs",
            event.routing_key,
            queue,
            event.message_id,
            self.delay,
            exc_info=exc,
        )
        return None


def log_dead_letter(log: logging.Logger, queue: str, event: Event, reason: str) -> None:
    """The warning every bus writes when it dead-letters a message."""
    log.warning(
        "dead-lettered %s from %s (message_id=%s): %s",
        event.routing_key,
        queue,
        event.message_id,
        reason,
    )


class EventBus(Protocol):
    """Topic routing with AMQP binding keys (`*` one word, `#` zero or more words).

    A handler that returns acknowledges its message; one that raises `Rejected` sends it to
    the dead-letter queue; any other exception redelivers it later.
    """

    @property
    def connected(self) -> bool: ...

    @property
    def kind(self) -> str:
        """What carries the events, for the start-up line and readiness: `rabbitmq`, ..."""

    @property
    def remote_consumers(self) -> bool:
        """Whether processes other than this one can consume its queues (services, other
        gateway instances); without them a queue only this process reads is the only kind
        worth declaring."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, event: Event) -> None:
        """Return once the broker has confirmed the event; PublishError otherwise."""

    async def declare(
        self, queue: str, bindings: Sequence[str], *, exclusive: bool = False
    ) -> None:
        """A queue that keeps matching events until consumed (exclusive: this instance's own,
        not kept across its restarts, nor given to other instances)."""

    async def consume(self, queue: str, handler: Handler) -> None:
        """Deliver the queue's events to `handler`; consumers of one queue compete."""


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching of one binding key against one routing key."""
    return _match(_words(pattern), _words(routing_key))


def _words(key: str) -> list[str]:
    return key.split(".") if key else []  # as RabbitMQ: the empty key has no words


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _match(rest, words[1:])
