"""One SQLite connection used on the IOLoop's own thread, with group commit for writes.

Statements run on the loop, not on a worker thread: in WAL mode with `synchronous=NORMAL` a
commit appends to the WAL file without waiting for the disk, and a point read is served from
the page cache, so each costs microseconds, less than handing it to a thread and back (a
future, a wake-up of each thread, and the GIL changing hands twice, which under load made the
loop wait for the worker). What does wait for the disk, copying the WAL back into the
database file and syncing it (a checkpoint), runs on a thread of its own, on a connection of
its own (`Checkpointer`); the loop's connection never checkpoints. (`synchronous=FULL`, the
setting that survives a power loss, makes each commit wait for a sync of the WAL, on the loop.)

Writes go through `write()`: every write queued in one turn of the loop is committed in one
transaction with the others, at the start of the next turn (group commit), and at most one
commit a COMMIT_INTERVAL: at a moderate rate the turns are short and each would commit a write
or two, at a fixed cost per commit (the pages of the indexes, written to the WAL again each
time); waiting up to a millisecond for the next commit lets it carry the writes of several
turns (at 300 workflows/s in bench/e2e.py's open loop, a tenth less of the gateway's CPU).
Should one of them raise (a unique key taken), the batch is rolled back and each is run again
in a transaction of its own, so one that fails undoes only itself. A caller hears back only
once its transaction has committed, so nothing is acknowledged before it is in the file; what
the batch trades is a write waiting for the rest of its turn of the loop (and at most
COMMIT_INTERVAL after the commit before it), and what it buys is one commit for all the writes
of those turns instead of one each. A write nobody waits for (`defer`) goes with the next
batch, or on its own after DEFER_DELAY when none comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from stox.logs import detached
from stox.store.base import DEFER_DELAY, AlreadyExists, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")
D = TypeVar("D", bound="SQLiteDatabase")
Write = Callable[[sqlite3.Connection], Any]

MEMORY = ":memory:"
SCHEMES = ("sqlite:",)
EXAMPLE = "sqlite:///PATH"
CHECKPOINT_INTERVAL = 0.5  # seconds between checkpoints of a WAL that has grown
COMMIT_INTERVAL = 0.001  # seconds: at most a commit a millisecond (see the docstring)
# storage.sqlite_synchronous -> the PRAGMA: in WAL mode, NORMAL syncs the WAL only at a
# checkpoint (a process crash loses nothing committed; a power loss may lose the commits since
# the last sync), FULL syncs it at every commit (a power loss loses nothing committed either)
SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}


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


def data_folder(url: str) -> Path | None:
    """The folder of the database file; None in memory."""
    path = path_from_url(url)
    return None if path == MEMORY else Path(path).expanduser().resolve().parent


def rowcount(cursor: sqlite3.Cursor) -> int:
    return cursor.rowcount


class SQLiteDatabase:
    """One connection, used on the loop's thread, its tables made by `SCHEMA` on open (then
    `migrate`, for what an older file lacks)."""

    SCHEMA: tuple[str, ...] = ()

    def __init__(self, path: str, synchronous: str = "normal") -> None:
        if synchronous not in SYNCHRONOUS:
            raise ValueError(
                f"synchronous: expected {' or '.join(SYNCHRONOUS)}, got {synchronous!r}"
            )
        self.path = path
        self.synchronous = synchronous
        self._conn: sqlite3.Connection | None = None
        self._checkpointer: Checkpointer | None = None
        self._writes: deque[tuple[Write, asyncio.Future[Any] | None]] = deque()
        self._flush_soon: asyncio.Handle | None = None  # the flush of this turn's writes
        self._last_flush = 0.0
        self._deferred: asyncio.TimerHandle | None = None  # a flush of deferred writes alone

    @classmethod
    def from_url(cls: type[D], url: str, synchronous: str = "normal") -> D:
        return cls(path_from_url(url), synchronous)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    # -- plumbing ------------------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, where `connection()` may be used (a read, or a write on its own)."""
        self.connection()
        return fn(*args)

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(connection)`, committed in one transaction with the writes queued beside it
        in this turn of the loop; its result once committed. What `work` raises undoes its
        own statements only (sqlite3 errors become StoreError). It may run twice (the second
        time alone, when another write of its batch raised): it must only write."""
        self.connection()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._writes.append((work, future))
        if self._flush_soon is None:
            wait = self._last_flush + COMMIT_INTERVAL - loop.time()
            # the batch's commit is for every write in it, not the first one's workflow
            if wait > 0:
                self._flush_soon = loop.call_later(wait, self._flush, context=detached())
            else:
                self._flush_soon = loop.call_soon(self._flush, context=detached())
        return await future

    def defer(self, work: Write) -> None:
        """`work(connection)` with the next batch of writes, or on its own within DEFER_DELAY:
        a write that nobody waits for (and that may be lost in a crash before it runs), so
        that it adds a statement to a transaction under way, not a transaction."""
        self.connection()
        self._writes.append((work, None))
        if self._flush_soon is None and self._deferred is None:
            self._deferred = asyncio.get_running_loop().call_later(
                DEFER_DELAY, self._flush, context=detached()
            )

    async def flush(self) -> None:
        """Commit the deferred writes now (and whatever else is queued)."""
        if self._writes:
            await self.write(_nothing)

    def _flush(self) -> None:
        self._flush_soon = None
        self._last_flush = asyncio.get_running_loop().time()
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        batch = list(self._writes)
        self._writes.clear()
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
            if self._conn is not None:  # a COMMIT that failed leaves its transaction open
                with contextlib.suppress(sqlite3.Error):
                    _rollback(self._conn)
            outcomes = [(future, None, failed) for _, future in batch]
        _settle(outcomes)

    def connection(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            raise StoreError(f"the SQLite database {self.path!r} is not open")
        return conn

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self._conn is not None:
            return
        self._conn = self._open_sync()
        if self.path != MEMORY:
            self._checkpointer = Checkpointer.of(self.path)

    def _open_sync(self) -> sqlite3.Connection:
        try:
            if self.path != MEMORY:
                parent = os.path.dirname(os.path.abspath(self.path))
                os.makedirs(parent, exist_ok=True)
                _check_writable(self.path, parent)
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={SYNCHRONOUS[self.synchronous]}")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # the Checkpointer's job
            for statement in self.SCHEMA:
                conn.execute(statement)
            self.migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot set up SQLite database {self.path!r}: {exc}") from exc
        return conn

    def migrate(self, conn: sqlite3.Connection) -> None:
        """Bring a file made by an older version up to date (after SCHEMA, on open)."""

    async def close(self) -> None:
        if self._conn is None:
            return
        if self._writes:  # what was written is committed before closing
            if self._flush_soon is not None:
                self._flush_soon.cancel()
            self._flush()
        conn, self._conn = self._conn, None
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None and checkpointer.release():
            await asyncio.to_thread(checkpointer.stop)
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


def _check_writable(path: str, folder: str) -> None:
    """StoreError naming what is read-only: the file, or its folder, where SQLite keeps the
    file's -wal and -shm beside it (a read-only mount refuses even root)."""
    for where, what in ((path, "file"), (folder, "folder")):
        if os.path.exists(where) and not os.access(where, os.W_OK):
            raise StoreError(
                f"the SQLite database {path!r} cannot be written: its {what} {where!r} is "
                "read-only (the gateway writes the file, and its -wal and -shm files beside it)"
            )


Outcome = tuple[asyncio.Future[Any] | None, Any, BaseException | None]
Batch = list[tuple[Write, asyncio.Future[Any] | None]]


class _OneFailed(Exception):
    """A write of the batch raised; the batch was rolled back."""


def _together(conn: sqlite3.Connection, batch: Batch) -> list[Outcome]:
    conn.execute("BEGIN")
    try:
        results: list[Outcome] = [(future, work(conn), None) for work, future in batch]
    except Exception as exc:
        _rollback(conn)
        raise _OneFailed from exc
    except BaseException:
        _rollback(conn)
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
        _rollback(conn)
        if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
            return None, StoreError(f"SQLite: {exc}")
        return None, exc
    conn.execute("COMMIT")
    return result, None


def _rollback(conn: sqlite3.Connection) -> None:
    """Undo the transaction under way, if any: on some errors (a full disk, an I/O error)
    SQLite has rolled it back already, and a ROLLBACK would fail and hide that error."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _nothing(conn: sqlite3.Connection) -> None:
    pass


def _settle(outcomes: list[Outcome]) -> None:
    for future, result, problem in outcomes:
        if future is None:  # deferred: nobody waits
            if problem is not None:
                log.warning("a deferred write failed: %s", problem)
        elif future.done():  # the caller gave up (cancelled); the write stands
            continue
        elif problem is None:
            future.set_result(result)
        else:
            future.set_exception(problem)


class Checkpointer(threading.Thread):
    """Copies the WAL back into the database file, on a connection and thread of its own:
    the part of a write that waits for the disk, kept off the loop. PASSIVE checkpoints never
    wait for or block a writer; one last TRUNCATE at `stop` leaves the WAL empty. One serves
    every connection of the process to a file (the workflows' and the users' share one)."""

    _running: dict[str, Checkpointer] = {}  # by the file's real path

    def __init__(self, path: str, interval: float = CHECKPOINT_INTERVAL) -> None:
        super().__init__(name="stox-sqlite-checkpoint", daemon=True)
        self.path = path
        self.interval = interval
        self.users = 0
        self._stopping = threading.Event()

    @classmethod
    def of(cls, path: str) -> Checkpointer:
        """The file's checkpointer, started if none runs; `release` it when done."""
        key = os.path.realpath(path)
        running = cls._running.get(key)
        if running is None:
            running = cls._running[key] = cls(path)
            running.start()
        running.users += 1
        return running

    def release(self) -> bool:
        """One user fewer; True when none is left (then `stop` it)."""
        self.users -= 1
        if self.users:
            return False
        self._running.pop(os.path.realpath(self.path), None)
        return True

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            log.error("cannot open %s to checkpoint it: %s", self.path, exc)
            return
        try:
            while not self._stopping.wait(self.interval):
                self._checkpoint(conn, "PASSIVE")
            self._checkpoint(conn, "TRUNCATE")
        finally:
            conn.close()

    def _checkpoint(self, conn: sqlite3.Connection, mode: str) -> None:
        try:
            conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        except sqlite3.Error as exc:  # busy or failing: the WAL waits for the next one
            log.warning("checkpoint of %s failed: %s", self.path, exc)

    def stop(self) -> None:
        self._stopping.set()
        self.join()
