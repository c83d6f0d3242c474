"""The embedded default store: one SQLite file (WAL), documents as JSON beside indexed columns.

All SQLite work runs on one dedicated worker thread that owns the connection, so the IOLoop
never waits on disk and the connection is never used from two threads at once (which also
keeps a `:memory:` database alive: there is only ever one connection). Every statement runs
in autocommit mode; each write is a single statement, so each is atomic on its own.

`SQLiteStore` keeps workflows; `SQLiteUserStore` keeps the AuthService's users in the same
file (a table of its own, the user name unique), on a connection of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from stox.store.base import AlreadyExists, StoreError
from stox.workflow import DISPATCHED, PENDING, RUNNING

T = TypeVar("T")
D = TypeVar("D", bound="SQLiteDatabase")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS workflows (
        id TEXT PRIMARY KEY,
        owner TEXT,
        status TEXT,
        created_at TEXT,
        version INTEGER,
        wake_at TEXT NULL,
        outbox_at TEXT NULL,
        doc TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS idx_workflows_owner ON workflows (owner, created_at, id)",
    "CREATE INDEX IF NOT EXISTS idx_workflows_status ON workflows (status, created_at, id)",
    "CREATE INDEX IF NOT EXISTS idx_workflows_created ON workflows (created_at, id)",
    "CREATE INDEX IF NOT EXISTS idx_workflows_wake_at ON workflows (wake_at)",
    "CREATE INDEX IF NOT EXISTS idx_workflows_outbox_at ON workflows (outbox_at)",
)

_INSERT = (
    "INSERT INTO workflows (owner, status, created_at, version, wake_at, outbox_at, doc, id)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_REPLACE = (
    "UPDATE workflows SET owner = ?, status = ?, created_at = ?, version = ?, wake_at = ?,"
    " outbox_at = ?, doc = ? WHERE id = ? AND version = ?"
)


_DOC = 6  # where _row puts the JSON text (ASCII: its length is its size in bytes)


def _row(doc: dict[str, Any]) -> tuple[Any, ...]:
    """The indexed columns, the document as JSON, and the id, in the order both SQLs use.

    Encoded on the caller's thread, so the row is a snapshot of `doc` as it is now.
    """
    return (
        doc["owner"],
        doc["status"],
        doc["created_at"],
        doc["version"],
        doc.get("wake_at"),
        doc.get("outbox_at"),
        _encode(doc),
        doc["id"],
    )


_GET = "SELECT doc FROM workflows WHERE id = ?"
_STEPS_IN_USE = (
    "SELECT json_extract(step.value, '$.name'), w.id"
    " FROM workflows AS w, json_each(w.doc, '$.steps') AS step"
    " WHERE w.status = ? AND json_extract(step.value, '$.status') IN (?, ?)"
)
_DUE = "SELECT doc FROM workflows WHERE wake_at <= ? ORDER BY wake_at LIMIT ?"
_UNPUBLISHED = "SELECT doc FROM workflows WHERE outbox_at <= ? ORDER BY outbox_at LIMIT ?"

# ensure_ascii (the default) keeps even lone surrogates storable, as \uXXXX escapes.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_decode = json.loads

MEMORY = ":memory:"


def _rowcount(cursor: sqlite3.Cursor) -> int:
    return cursor.rowcount


def path_from_url(url: str) -> str:
    """`sqlite:///relative.db`, `sqlite:////abs/path.db` or `sqlite://:memory:` -> a path."""
    if not url.startswith("sqlite://"):
        raise ValueError(f"not a sqlite URL: {url!r}")
    rest = url[len("sqlite://") :]
    if rest in (MEMORY, "/" + MEMORY):
        return MEMORY
    if not rest.startswith("/") or len(rest) < 2:
        raise ValueError(
            f"expected sqlite:///relative/path.db, sqlite:////abs/path.db or "
            f"sqlite://:memory:, got {url!r}"
        )
    return rest[1:]


class SQLiteDatabase:
    """One connection on its own worker thread, its tables made by `SCHEMA` on open."""

    SCHEMA: tuple[str, ...] = ()

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    @classmethod
    def from_url(cls: type[D], url: str) -> D:
        return cls(path_from_url(url))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    # -- plumbing ------------------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the database's own thread, where `connection()` may be used."""
        executor = self._executor
        if executor is None:
            raise StoreError("the SQLite store is not open")
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def connection(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            raise StoreError("the SQLite store is closed")
        return conn

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stox-sqlite")
        try:
            await self.run(self._open_sync)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _open_sync(self) -> None:
        try:
            if self.path != MEMORY:
                parent = os.path.dirname(os.path.abspath(self.path))
                os.makedirs(parent, exist_ok=True)
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            for statement in self.SCHEMA:
                conn.execute(statement)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot set up SQLite database {self.path!r}: {exc}") from exc
        self._conn = conn

    async def close(self) -> None:
        executor = self._executor
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        finally:
            self._executor = None
            executor.shutdown(wait=True)

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def ping(self) -> None:
        await self.run(self._query, "SELECT 1", (), sqlite3.Cursor.fetchone)

    def _insert_sync(self, sql: str, row: tuple[Any, ...], what: str) -> None:
        try:
            self.connection().execute(sql, row)
        except sqlite3.IntegrityError as exc:  # a unique key is taken
            raise AlreadyExists(f"{what} already exists") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite: {exc}") from exc

    def _query(self, sql: str, params: tuple[Any, ...], read: Callable[[sqlite3.Cursor], T]) -> T:
        """Run one statement and `read` its result; StoreError for any SQLite failure."""
        try:
            return read(self.connection().execute(sql, params))
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite: {exc}") from exc


class SQLiteStore(SQLiteDatabase):
    """WorkflowStore on a SQLite file; see the module docstring for the threading model."""

    SCHEMA = _SCHEMA

    # -- documents -----------------------------------------------------------------------

    async def insert(self, doc: dict[str, Any]) -> int:
        row = _row(doc)
        await self.run(self._insert_sync, _INSERT, row, f"workflow {doc['id']}")
        return len(row[_DOC])

    async def get(self, workflow_id: str) -> dict[str, Any] | None:
        return await self.run(self._get_sync, workflow_id)

    def _get_sync(self, workflow_id: str) -> dict[str, Any] | None:
        row = self._query(_GET, (workflow_id,), sqlite3.Cursor.fetchone)
        return None if row is None else _decode(row[0])

    async def replace(self, doc: dict[str, Any], expected_version: int) -> int:
        row = _row(doc)
        written = await self.run(self._query, _REPLACE, (*row, expected_version), _rowcount)
        return len(row[_DOC]) if written == 1 else 0

    async def list(
        self,
        *,
        owner: str | None,
        status: str | None,
        limit: int,
        before: tuple[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        where: list[str] = []
        params: list[Any] = []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if before is not None:
            # A row-value comparison: SQLite serves it as one range scan of the index.
            where.append("(created_at, id) < (?, ?)")
            params.extend(before)
        sql = "SELECT doc FROM workflows"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        params.append(limit)
        return await self.run(self._select_sync, sql, tuple(params))

    async def due(self, now: str, limit: int) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        return await self.run(self._select_sync, _DUE, (now, limit))

    async def unpublished(self, written_before: str, limit: int) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        return await self.run(self._select_sync, _UNPUBLISHED, (written_before, limit))

    async def steps_in_use(self) -> dict[str, list[str]]:
        params = (RUNNING, PENDING, DISPATCHED)
        rows = await self.run(self._query, _STEPS_IN_USE, params, sqlite3.Cursor.fetchall)
        in_use: dict[str, list[str]] = {}
        for name, workflow_id in rows:
            in_use.setdefault(name, []).append(workflow_id)
        return in_use

    def _select_sync(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        return [_decode(row[0]) for row in self._query(sql, params, sqlite3.Cursor.fetchall)]


_USER_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS users (
        id TEXT PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        role TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
)
_USER_COLUMNS = ("id", "username", "password_hash", "role", "created_at")
_SELECT_USER = f"SELECT {', '.join(_USER_COLUMNS)} FROM users WHERE "
_INSERT_USER = f"INSERT INTO users ({', '.join(_USER_COLUMNS)}) VALUES (?, ?, ?, ?, ?)"


class SQLiteUserStore(SQLiteDatabase):
    """UserStore on a SQLite file: the `users` table, its user names unique."""

    SCHEMA = _USER_SCHEMA

    async def insert_user(self, user: dict[str, Any]) -> None:
        row = tuple(user[c] for c in _USER_COLUMNS)
        await self.run(self._insert_sync, _INSERT_USER, row, f"user {user['username']}")

    async def user_by_id(self, user_id: str) -> dict[str, Any] | None:
        return await self.run(self._user_sync, "id", user_id)

    async def user_by_name(self, username: str) -> dict[str, Any] | None:
        return await self.run(self._user_sync, "username", username)

    def _user_sync(self, column: str, value: str) -> dict[str, Any] | None:
        row = self._query(_SELECT_USER + f"{column} = ?", (value,), sqlite3.Cursor.fetchone)
        return None if row is None else dict(zip(_USER_COLUMNS, row, strict=True))

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        sql = "UPDATE users SET password_hash = ? WHERE id = ?"
        await self.run(self._query, sql, (password_hash, user_id), _rowcount)
