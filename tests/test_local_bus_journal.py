"""The in-process bus's journal: what it confirmed survives the process, until handled.

A publish to a durable queue returns only once the message is in the journal (the SQLite
store's own file), and the message leaves the journal once a consumer acknowledges it or it
is dead-lettered, so a gateway killed with messages in flight delivers them again when it
starts. Exclusive queues are not journalled. A kept message that cannot be decoded is
dead-lettered, and its queue moves on.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import pytest
from support import eventually

from stox.bus.base import Event, PublishError, Redelivery, Rejected
from stox.bus.journal import SQLiteJournal
from stox.bus.local import LocalBus
from stox.store.sqlite import SQLiteStore

QUEUE = "stox.step.image_processing"
KEY = "step.image_processing"


@asynccontextmanager
async def bus_on(path: Path, **options: Any) -> AsyncIterator[LocalBus]:
    """A started LocalBus journalling beside a SQLite store at `path`; both closed after."""
    store = SQLiteStore(str(path))
    await store.open()
    options = {"redelivery": Redelivery(delay=0.01), **options}
    bus = LocalBus(journal=SQLiteJournal.beside(store), **options)
    await bus.start()
    try:
        yield bus
    finally:
        await bus.close()
        await store.close()


def event(n: int, **headers: Any) -> Event:
    return Event(KEY, {"n": n}, uuid.uuid4().hex, "w" * 32, 1_700_000_000.5, headers)


def kept_rows(path: Path) -> list[tuple[Any, ...]]:
    # committed, then closed: Python 3.13 warns of a connection left to the collector
    with closing(sqlite3.connect(path)) as conn, conn:
        return conn.execute("SELECT queue, body FROM bus_messages ORDER BY key").fetchall()


class Inbox:
    def __init__(self, fail: Callable[[Event], Exception | None] = lambda _: None) -> None:
        self.events: list[Event] = []
        self.fail = fail

    async def __call__(self, e: Event) -> None:
        self.events.append(e)
        problem = self.fail(e)
        if problem is not None:
            raise problem

    @property
    def numbers(self) -> list[int]:
        return [e.payload["n"] for e in self.events]


async def test_what_was_confirmed_but_not_handled_is_delivered_after_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stox.db"
    sent = [event(n, authorization="Bearer t") for n in range(5)]
    async with bus_on(path) as bus:
        await bus.declare(QUEUE, [KEY])
        for e in sent:
            await bus.publish(e)  # confirmed: journalled; no consumer yet
    assert [body for _, body in kept_rows(path)] == [f'{{"n":{n}}}' for n in range(5)]

    async with bus_on(path) as bus:
        inbox = Inbox()
        await bus.declare(QUEUE, [KEY])
        await bus.consume(QUEUE, inbox)
        await eventually(lambda: len(inbox.events) == 5)
        assert inbox.numbers == [0, 1, 2, 3, 4]  # in publish order
        first = inbox.events[0]
        assert (first.message_id, first.correlation_id, first.timestamp) == (
            sent[0].message_id,
            sent[0].correlation_id,
            sent[0].timestamp,
        )
        assert first.headers == {"authorization": "Bearer t"}
        await eventually(lambda: kept_rows(path) == [])  # acknowledged: forgotten


async def test_handled_and_dead_lettered_messages_are_not_delivered_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stox.db"
    async with bus_on(path, redelivery=Redelivery(delay=0.01, limit=1)) as bus:
        inbox = Inbox(lambda e: {1: Rejected("bad"), 2: ValueError("bug")}.get(e.payload["n"]))
        await bus.declare(QUEUE, [KEY])
        await bus.consume(QUEUE, inbox)
        for n in range(4):
            await bus.publish(event(n))
        await eventually(lambda: len(bus.dead_letters) == 2 and len(inbox.events) == 5)
        await eventually(lambda: kept_rows(path) == [])

    async with bus_on(path) as bus:
        inbox = Inbox()
        await bus.declare(QUEUE, [KEY])
        await bus.consume(QUEUE, inbox)
        await bus.publish(event(9))
        await eventually(lambda: inbox.numbers == [9])


async def test_exclusive_queues_are_not_journalled(tmp_path: Path) -> None:
    path = tmp_path / "stox.db"
    async with bus_on(path) as bus:
        await bus.declare("stox.hub.me", ["workflow.changed"], exclusive=True)
        await bus.publish(Event("workflow.changed", {"n": 1}, uuid.uuid4().hex))
        assert kept_rows(path) == []


async def test_a_kept_message_that_cannot_be_decoded_is_dead_lettered_and_the_queue_moves_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stox.db"
    async with bus_on(path) as bus:
        await bus.declare(QUEUE, [KEY])
        for n in range(3):
            await bus.publish(event(n))
    # what a torn write or a bad disk might leave
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE bus_messages SET body = ? WHERE body = ?", ("[" * 100_000, '{"n":0}'))
        conn.execute("UPDATE bus_messages SET headers = 'not json' WHERE body = ?", ('{"n":1}',))

    async with bus_on(path, prefetch=1) as bus:
        inbox = Inbox()
        await bus.declare(QUEUE, [KEY])
        await bus.consume(QUEUE, inbox)
        await eventually(lambda: inbox.numbers == [2])
        reasons = sorted(reason for _, _, reason in bus.dead_letters)
        assert len(reasons) == 2
        assert "undecodable headers" in reasons[1] and "the body is not JSON" in reasons[0]
        await eventually(lambda: kept_rows(path) == [])


async def test_a_publish_the_journal_cannot_keep_is_not_confirmed(tmp_path: Path) -> None:
    path = tmp_path / "stox.db"
    async with bus_on(path) as bus:
        await bus.declare(QUEUE, [KEY])
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("DROP TABLE bus_messages")
        with pytest.raises(PublishError, match="not journalled"):
            await bus.publish(event(1))


async def test_messages_in_flight_when_the_bus_closes_stay_kept(tmp_path: Path) -> None:
    path = tmp_path / "stox.db"
    started = asyncio.Event()

    async def never_finishes(_: Event) -> None:
        started.set()
        await asyncio.sleep(3600)

    async with bus_on(path) as bus:
        await bus.declare(QUEUE, [KEY])
        await bus.consume(QUEUE, never_finishes)
        await bus.publish(event(7))
        await asyncio.wait_for(started.wait(), 5)
    assert [body for _, body in kept_rows(path)] == ['{"n":7}']
