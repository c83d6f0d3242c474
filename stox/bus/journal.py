"""Where the in-process bus keeps messages for its durable queues until they are acknowledged.

`LocalBus` confirms a publish only once the message is in the journal, and drops it from the
journal once a consumer has acknowledged it (or it was dead-lettered). After a crash, the
next start finds what was confirmed but not yet handled and delivers it again, as a durable
RabbitMQ queue would: a dispatch "confirmed" into memory alone would be lost with the process
and its step would wait out its deadline. Exclusive queues (the WebSocket hub's) are not
journalled: they belong to the process and end with it, on RabbitMQ too.

`SQLiteJournal` keeps them in a table of a SQLite file: the embedded store's own file, on the
store's connection and thread (no second writer to contend with), or a file of its own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from stox.store.sqlite_db import SQLiteDatabase


@dataclass(frozen=True, slots=True)
class Kept:
    """One message for one durable queue, as the journal keeps it (`key`: its place)."""

    queue: str
    routing_key: str
    message_id: str
    correlation_id: str | None
    timestamp: float
    headers: str  # JSON
    body: str  # JSON, exactly as published
    key: int = 0


class Journal(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def add(self, messages: Sequence[Kept]) -> list[int]:
        """Keep `messages` (all or none); their keys, in order."""

    async def remove(self, keys: Sequence[int]) -> None:
        """Forget acknowledged messages; unknown keys are ignored."""

    async def load(self) -> list[Kept]:
        """Everything kept, oldest first."""


_SCHEMA = """CREATE TABLE IF NOT EXISTS bus_messages (
    key INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    message_id TEXT NOT NULL,
    correlation_id TEXT,
    timestamp REAL NOT NULL,
    headers TEXT NOT NULL,
    body TEXT NOT NULL
)"""
_COLUMNS = "queue, routing_key, message_id, correlation_id, timestamp, headers, body"
_INSERT = f"INSERT INTO bus_messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
_LOAD = f"SELECT {_COLUMNS}, key FROM bus_messages ORDER BY key"
_DELETE_AT_ONCE = 500  # keys per DELETE, well under SQLite's limit of bound parameters


class SQLiteJournal:
    """A `Journal` in the table `bus_messages` of `database` (opened and closed here only if
    `owned`: a store shares its own, already open)."""

    def __init__(self, database: SQLiteDatabase, *, owned: bool) -> None:
        self.database = database
        self.owned = owned

    @classmethod
    def beside(cls, store: SQLiteDatabase) -> SQLiteJournal:
        return cls(store, owned=False)

    @classmethod
    def at(cls, path: str) -> SQLiteJournal:
        return cls(SQLiteDatabase(path), owned=True)

    async def open(self) -> None:
        if self.owned:
            await self.database.open()
        await self.database.write(lambda conn: conn.execute(_SCHEMA))

    async def close(self) -> None:
        if self.owned:
            await self.database.close()

    async def add(self, messages: Sequence[Kept]) -> list[int]:
        rows = [
            (
                m.queue,
                m.routing_key,
                m.message_id,
                m.correlation_id,
                m.timestamp,
                m.headers,
                m.body,
            )
            for m in messages
        ]
        return await self.database.write(
            lambda conn: [int(conn.execute(_INSERT, row).lastrowid or 0) for row in rows]
        )

    async def remove(self, keys: Sequence[int]) -> None:
        await self.database.write(lambda conn: _delete(conn, list(keys)))

    async def load(self) -> list[Kept]:
        rows = await self.database.run(self.database.query, _LOAD, (), sqlite3.Cursor.fetchall)
        return [Kept(*row) for row in rows]


def _delete(conn: sqlite3.Connection, keys: list[int]) -> None:
    for start in range(0, len(keys), _DELETE_AT_ONCE):
        chunk = keys[start : start + _DELETE_AT_ONCE]
        marks = ", ".join("?" * len(chunk))
        conn.execute(f"DELETE FROM bus_messages WHERE key IN ({marks})", chunk)
