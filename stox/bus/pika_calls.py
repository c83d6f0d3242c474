"""pika's callbacks as awaitables: open a channel, call a method that answers through
`callback`, and fail with `Lost` when the channel or the connection closes meanwhile.

pika's asynchronous adapters report every outcome through a callback; the RabbitMQ bus
wants `await`. This is the only place that bridges the two, so the bus reads as a sequence
of steps and none of its operations can hang on a channel that went away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pika.exceptions
from pika.channel import Channel
from pika.connection import Connection


class Lost(Exception):
    """A channel or the connection closed under an operation; `reason` is what pika gave
    for the close (a `ChannelClosedByBroker` carries the broker's reply code and text)."""

    def __init__(self, message: str, reason: object = None) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(eq=False)
class OpenChannel:
    channel: Channel
    closed: asyncio.Future[Any]  # resolves to the reason when the channel closes


def settle_once(future: asyncio.Future[Any]) -> Callable[..., None]:
    """A pika callback that resolves `future` to its last argument (the channel, the frame,
    the reason for a close), the first time only."""

    def settle(*args: Any) -> None:
        if not future.done():
            future.set_result(args[-1] if args else None)

    return settle


async def first(wanted: asyncio.Future[Any], *closed: asyncio.Future[Any]) -> Any:
    """`wanted`'s result, or `Lost` if one of `closed` resolves before it."""
    await asyncio.wait({wanted, *closed}, return_when=asyncio.FIRST_COMPLETED)
    if wanted.done():
        return wanted.result()
    reason = next(f.result() for f in closed if f.done())
    raise Lost(f"closed: {reason!r}", reason)


async def open_channel(connection: Connection, lost: asyncio.Future[Any]) -> OpenChannel:
    """A new channel on `connection`; `lost` resolves when the connection closes."""
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[Channel] = loop.create_future()
    closed: asyncio.Future[Any] = loop.create_future()
    try:
        channel = connection.channel(on_open_callback=settle_once(opened))
    except pika.exceptions.AMQPError as exc:
        raise Lost(repr(exc)) from None
    channel.add_on_close_callback(settle_once(closed))
    chan = OpenChannel(channel, closed)
    await first(opened, closed, lost)
    return chan


@contextlib.asynccontextmanager
async def temporary_channel(
    connection: Connection, lost: asyncio.Future[Any]
) -> AsyncIterator[OpenChannel]:
    """A channel for declarations: a refusal closes it, and nothing else."""
    chan = await open_channel(connection, lost)
    try:
        yield chan
    finally:
        if chan.channel.is_open:
            chan.channel.close()
            await asyncio.wait({chan.closed}, timeout=5)


async def call(chan: OpenChannel, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a pika method of `chan` that answers through `callback`; `Lost` if the channel
    closes first."""
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    try:
        method(*args, callback=settle_once(done), **kwargs)
    except pika.exceptions.AMQPError as exc:
        raise Lost(repr(exc)) from None
    return await first(done, chan.closed)
