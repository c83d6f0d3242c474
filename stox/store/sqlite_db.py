"""One SQLite connection on a thread of its own, with group commit for writes.

All work on the connection runs on one dedicated worker thread that owns it, so the IOLoop
never waits on disk and the connection is never used from two threads at once (which also
keeps a `:memory:` database alive: there is only ever one connection). Reads are single
statements in autocommit mode.

Writes go through `write()`: every write queued while the thread is busy is committed in one
transaction with the others (group commit). Should one of them raise (a unique key taken),
the batch is rolled back and each is run again in a transaction of its own, so one that
fails undoes only itself. A caller hears back only once its transaction has committed, so
nothing is acknowledged before it is in the file; what the batch trades is a write waiting
for at most the batch before it, and what it buys is one commit for many writes instead of
one each (SQLite's cost of a commit, not of a statement, dominates a small write).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from stox.store.base import AlreadyExists, StoreError

T = TypeVar("T")
D = TypeVar("D", bound="SQLiteDatabase")
Write = Callable[[sqlite3.Connection], Any]

MEMORY = ":memory:"


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


def rowcount(cursor: sqlite3.Cursor) -> int:
    return cursor.rowcount


class SQLiteDatabase:
    """One connection on its own worker thread, its tables made by `SCHEMA` on open (then
    `migrate`, for what an older file lacks)."""

    SCHEMA: tuple[str, ...] = ()

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._writes: deque[tuple[Write, asyncio.Future[Any]]] = deque()
        self._flushing = False  # a flush is queued on the thread and has not yet taken them

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

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(connection)` on the database's thread, committed in one transaction with the
        writes queued beside it; its result once committed. What `work` raises undoes its
        own statements only (sqlite3 errors become StoreError). It may run twice (the second
        time alone, when another write of its batch raised): it must only write."""
        executor = self._executor
        if executor is None:
            raise StoreError("the SQLite store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._writes.append((work, future))
        if not self._flushing:
            self._flushing = True
            executor.submit(self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        # reset before taking the queue: a write queued from now on schedules another flush
        self._flushing = False
        batch = [self._writes.popleft() for _ in range(len(self._writes))]
        if not batch:
            return
        try:
            conn = self.connection()
            try:
                outcomes = _together(conn, batch)
            except _OneFailed:  # rolled back: each again, in a transaction of its own
                outcomes = [(future, *_alone(conn, work)) for work, future in batch]
        except (sqlite3.Error, StoreError) as exc:
            failed = exc if isinstance(exc, StoreError) else StoreError(f"SQLite: {exc}")
            outcomes = [(future, None, failed) for _, future in batch]
        loop.call_soon_threadsafe(_settle, outcomes)

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
            self.migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot set up SQLite database {self.path!r}: {exc}") from exc
        self._conn = conn

    def migrate(self, conn: sqlite3.Connection) -> None:
        """Bring a file made by an older version up to date (after SCHEMA, on open)."""

    async def close(self) -> None:
        executor = self._executor
        if executor is None:
            return
        try:  # queued after any flush still to run: nothing written is lost
            await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        finally:
            self._executor = None
            executor.shutdown(wait=True)

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def ping(self) -> None:
        await self.run(self.query, "SELECT 1", (), sqlite3.Cursor.fetchone)

    def insert_row(self, sql: str, row: tuple[Any, ...], what: str) -> None:
        """One INSERT in autocommit; AlreadyExists when a unique key is taken."""
        try:
            self.connection().execute(sql, row)
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"{what} already exists") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite: {exc}") from exc

    def query(self, sql: str, params: tuple[Any, ...], read: Callable[[sqlite3.Cursor], T]) -> T:
        """Run one statement and `read` its result; StoreError for any SQLite failure."""
        try:
            return read(self.connection().execute(sql, params))
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite: {exc}") from exc


Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]


class _OneFailed(Exception):
    """A write of the batch raised; the batch was rolled back."""


def _together(
    conn: sqlite3.Connection, batch: list[tuple[Write, asyncio.Future[Any]]]
) -> list[Outcome]:
    conn.execute("BEGIN")
    try:
        results = [(future, work(conn), None) for work, future in batch]
    except Exception as exc:
        conn.execute("ROLLBACK")
        raise _OneFailed from exc
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return results


def _alone(conn: sqlite3.Connection, work: Write) -> tuple[Any, BaseException | None]:
    """(result, None) or (None, what it raised, sqlite3 errors as StoreError): one write in a
    transaction of its own, rolled back if it raises."""
    conn.execute("BEGIN")
    try:
        result = work(conn)
    except Exception as exc:
        conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
            return None, StoreError(f"SQLite: {exc}")
        return None, exc
    conn.execute("COMMIT")
    return result, None


def _settle(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, problem in outcomes:
        if future.done():  # the caller gave up (cancelled); the write stands
            continue
        if problem is None:
            future.set_result(result)
        else:
            future.set_exception(problem)
