"""The embedded default store: one SQLite file (WAL), used on the loop's thread (sqlite_db.py).

A workflow is a row of `workflows`: the indexed columns, its state as JSON (`doc`: all but
the product and the outbox) and its product as JSON, written once at upload and never again.
Its outbox is rows of `outbox`, one per event, inserted in the same transaction as the state
that caused them and deleted once published, so a transition rewrites only the small state,
touches only the indexes whose columns it changes (status, wake_at), and publishing costs a
delete instead of another rewrite of the document. Reads put the document back together in
the shape `Workflow.to_doc` makes. An upload's idempotency key is three columns of its row
(written with it, unique per owner by a partial index, set to NULL once expired).

`SQLiteStore` keeps workflows; `SQLiteUserStore` keeps the AuthService's users in the same
file (a table of its own, the user name unique), on a connection of its own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from stox.codec import loads
from stox.store.base import (
    NO_FILTERS,
    AlreadyExists,
    Filters,
    IdempotencyKey,
    KeyTaken,
    NewEvent,
    encode_json,
    slot,
)
from stox.store.sqlite_db import SQLiteDatabase, rowcount
from stox.workflow import DEFAULT_PIPELINE, DISPATCHED, PENDING, RUNNING

LAYOUT = 3  # PRAGMA user_version: 0 was the whole document in `doc`, outbox included; 1 had
# no idempotency keys; 2 no pipeline definitions

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS workflows (
        id TEXT PRIMARY KEY,
        owner TEXT,
        status TEXT,
        created_at TEXT,
        version INTEGER,
        wake_at TEXT NULL,
        doc TEXT,
        product TEXT,
        pipeline TEXT NULL,
        pipeline_name TEXT NULL,
        idem_key TEXT NULL,
        idem_hash TEXT NULL,
        idem_expires TEXT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS outbox (
        seq INTEGER PRIMARY KEY,
        workflow_id TEXT NOT NULL,
        message_id TEXT NOT NULL,
        routing_key TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS idx_workflows_owner ON workflows (owner, created_at, id)",
    "CREATE INDEX IF NOT EXISTS idx_workflows_status ON workflows (status, created_at, id)",
    "CREATE INDEX IF NOT EXISTS idx_workflows_created ON workflows (created_at, id)",
    "CREATE INDEX IF NOT EXISTS idx_workflows_wake_at ON workflows (wake_at)",
    "CREATE INDEX IF NOT EXISTS idx_outbox_workflow ON outbox (workflow_id)",
    # the search of `list_workflows`: each workflow's product name and category, by the
    # workflow's rowid, in trigrams (a case-insensitive substring of 3 characters or more is
    # an index lookup); brought up to date by each search (`_CATCH_UP`), not by uploads
    "CREATE VIRTUAL TABLE IF NOT EXISTS workflow_text USING fts5(text, tokenize='trigram')",
)
# after `migrate`, which adds their columns to an older file; only the rows holding a key
_KEY_INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS idx_workflows_idem_key ON workflows (idem_key)"
    " WHERE idem_key IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS idx_workflows_idem_expires ON workflows (idem_expires)"
    " WHERE idem_expires IS NOT NULL",
)
_KEY_COLUMNS = ("idem_key", "idem_hash", "idem_expires")
_ADDED_COLUMNS = (*_KEY_COLUMNS, "pipeline", "pipeline_name")  # layouts 2 and 3
_PIPELINE_INDEX = (
    "CREATE INDEX IF NOT EXISTS idx_workflows_pipeline ON workflows (pipeline_name, created_at, id)"
)
# layout 3: older rows run on the default pipeline
_LAYOUT_3 = (
    f"UPDATE workflows SET pipeline_name = '{DEFAULT_PIPELINE}' WHERE pipeline_name IS NULL",
)
# The search index's rows of the workflows written since it was last brought up to date: by
# the search, in one statement, so an upload pays nothing for it (workflows are never
# deleted, so rowids only grow and the newest indexed one is where to go on from).
_CATCH_UP = (
    "INSERT INTO workflow_text (rowid, text) SELECT rowid,"
    " coalesce(json_extract(product, '$.name'), '') || char(10) ||"
    " coalesce(json_extract(product, '$.category'), '') FROM workflows WHERE rowid >"
    " coalesce((SELECT rowid FROM workflow_text ORDER BY rowid DESC LIMIT 1), 0)"
)

_INSERT = (
    "INSERT INTO workflows (id, owner, status, created_at, version, wake_at, doc, product,"
    " pipeline, pipeline_name, idem_key, idem_hash, idem_expires)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# owner and created_at never change: leaving them out spares their indexes on every write
_REPLACE = (
    "UPDATE workflows SET status = ?, version = ?, wake_at = ?, doc = ?"
    " WHERE id = ? AND version = ?"
)
_INSERT_EVENT = (
    "INSERT INTO outbox (workflow_id, message_id, routing_key, payload, created_at)"
    " VALUES (?, ?, ?, ?, ?)"
)
_DROP_EVENT = "DELETE FROM outbox WHERE workflow_id = ? AND message_id = ?"
_COLUMNS = "id, doc, product, pipeline"
_GET = f"SELECT {_COLUMNS} FROM workflows WHERE id = ?"
_DUE = f"SELECT {_COLUMNS} FROM workflows WHERE wake_at <= ? ORDER BY wake_at LIMIT ?"
_UNPUBLISHED = (
    f"SELECT {_COLUMNS} FROM workflows WHERE id IN (SELECT workflow_id FROM outbox"
    " WHERE created_at <= ? GROUP BY workflow_id ORDER BY min(seq) LIMIT ?)"
)
_BACKLOG = "SELECT count(DISTINCT workflow_id), min(created_at) FROM outbox"
_OUTBOXES = (
    "SELECT workflow_id, message_id, routing_key, payload, created_at FROM outbox"
    " WHERE workflow_id IN ({}) ORDER BY seq"
)
_STEPS_IN_USE = (
    "SELECT json_extract(step.value, '$.name'), w.id"
    " FROM workflows AS w, json_each(w.doc, '$.steps') AS step"
    " WHERE w.status = ? AND json_extract(step.value, '$.status') IN (?, ?)"
)
_KEY_HELD = "SELECT id, idem_hash, idem_expires FROM workflows WHERE idem_key = ?"
_RELEASE_KEYS = (
    "UPDATE workflows SET idem_key = NULL, idem_hash = NULL, idem_expires = NULL"
    " WHERE id IN (SELECT id FROM workflows WHERE idem_expires <= ?{} ORDER BY idem_expires"
    " LIMIT ?)"
)
_AT_ONCE = 500  # bound parameters in one IN (…), well under SQLite's limit

# Kept out of the state column: written once (product, the pipeline's definition), or rows of
# their own (outbox).
_NOT_STATE = frozenset({"product", "pipeline", "outbox", "outbox_at"})
_DEFINITIONS_KEPT = 64  # decoded pipeline definitions, by their text: most rows share a few

_encode = encode_json
_decode = loads


def _state(doc: dict[str, Any]) -> str:
    state = dict(doc)  # then the few keys dropped: a comprehension visits every key
    for key in _NOT_STATE:
        state.pop(key, None)
    return _encode(state)


def _catch_up(conn: sqlite3.Connection) -> None:
    conn.execute(_CATCH_UP)


def _text_filter(text: str) -> str:
    """A trigram lookup for 3 characters or more; a scan of the text table for fewer (the
    trigram index has nothing to look up)."""
    if len(text) >= 3:
        return "rowid IN (SELECT rowid FROM workflow_text WHERE workflow_text MATCH ?)"
    return "rowid IN (SELECT rowid FROM workflow_text WHERE text LIKE ? ESCAPE '\\')"


def _text_pattern(text: str) -> str:
    if len(text) >= 3:  # one phrase: its trigrams in a row, so a substring
        return '"' + text.replace('"', '""') + '"'
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _events(workflow_id: str, events: Iterable[NewEvent]) -> list[tuple[str, ...]]:
    """Outbox rows of `events`, their payloads as encoded when they were made."""
    return [
        (
            workflow_id,
            event.entry["message_id"],
            event.entry["routing_key"],
            event.body,
            event.entry["created_at"],
        )
        for event in events
    ]


class SQLiteStore(SQLiteDatabase):
    """WorkflowStore on a SQLite file; see the module docstring for the layout."""

    SCHEMA = _SCHEMA

    def __init__(self, path: str, synchronous: str = "normal") -> None:
        super().__init__(path, synchronous)
        self._drops: list[tuple[str, str]] | None = None  # outbox rows waiting to be deleted
        # shared by the documents read: nothing mutates a workflow's stored definition
        self._definitions: dict[str, dict[str, Any]] = {}

    def migrate(self, conn: sqlite3.Connection) -> None:
        """A file of layout 0 kept each whole document, outbox included, in `doc` and indexed
        `outbox_at`: its products move to their column and its pending events to `outbox`.
        One of layout 1 lacks the idempotency key columns (its workflows hold none), one of
        layout 2 the pipeline column (its workflows run on the default pipeline). Once, in
        one transaction; then the key indexes."""
        layout = conn.execute("PRAGMA user_version").fetchone()[0]
        if layout < LAYOUT:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(workflows)")}
            conn.execute("BEGIN")
            if layout < 1:
                self._layout_1(conn, columns)
            for column in _ADDED_COLUMNS:
                if column not in columns:
                    conn.execute(f"ALTER TABLE workflows ADD COLUMN {column} TEXT NULL")
            for statement in _LAYOUT_3:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {LAYOUT}")
            conn.execute("COMMIT")
        for statement in (*_KEY_INDEXES, _PIPELINE_INDEX):
            conn.execute(statement)

    def _layout_1(self, conn: sqlite3.Connection, columns: set[str]) -> None:
        if "product" not in columns:
            conn.execute("ALTER TABLE workflows ADD COLUMN product TEXT")
        if "outbox_at" in columns:
            conn.execute("DROP INDEX IF EXISTS idx_workflows_outbox_at")
            conn.execute("UPDATE workflows SET outbox_at = NULL")
        ids = [row[0] for row in conn.execute("SELECT id FROM workflows WHERE product IS NULL")]
        for start in range(0, len(ids), _AT_ONCE):
            chunk = ids[start : start + _AT_ONCE]
            sql = f"SELECT id, doc FROM workflows WHERE id IN ({', '.join('?' * len(chunk))})"
            for workflow_id, text in conn.execute(sql, chunk).fetchall():
                doc = _decode(text)
                events = map(NewEvent.of, doc.get("outbox", []))
                conn.executemany(_INSERT_EVENT, _events(workflow_id, events))
                conn.execute(
                    "UPDATE workflows SET doc = ?, product = ? WHERE id = ?",
                    (_state(doc), _encode(doc["product"]), workflow_id),
                )

    # -- writes --------------------------------------------------------------------------

    async def insert(
        self,
        doc: dict[str, Any],
        events: Sequence[NewEvent] | None = None,
        key: IdempotencyKey | None = None,
    ) -> int:
        if events is None:
            events = [NewEvent.of(entry) for entry in doc["outbox"]]
        workflow_id = doc["id"]
        state, product = _state(doc), _encode(doc["product"])
        definition = doc.get("pipeline")
        pipeline = None if definition is None else _encode(definition)
        name = DEFAULT_PIPELINE if definition is None else definition["name"]
        held = (None, None, None) if key is None else (key.slot, key.body_hash, key.expires_at)
        row = (
            *(workflow_id, doc["owner"], doc["status"], doc["created_at"], doc["version"]),
            *(doc.get("wake_at"), state, product, pipeline, name, *held),
        )
        rows = _events(workflow_id, events)

        def write(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(_INSERT, row)
            except sqlite3.IntegrityError as exc:
                if key is not None and conn.execute(_KEY_HELD, (key.slot,)).fetchone():
                    raise KeyTaken(f"idempotency key {key.key!r} is held") from exc
                raise AlreadyExists(f"workflow {workflow_id} already exists") from exc
            conn.executemany(_INSERT_EVENT, rows)

        await self.write(write)
        stored = len(state) + len(product) + len(pipeline or "")
        return stored + sum(len(event.body) for event in events)

    async def replace(
        self, doc: dict[str, Any], expected_version: int, new_events: Sequence[NewEvent]
    ) -> int:
        workflow_id = doc["id"]
        state = _state(doc)
        row = (doc["status"], doc["version"], doc.get("wake_at"), state, workflow_id)
        rows = _events(workflow_id, new_events)

        def write(conn: sqlite3.Connection) -> bool:
            if conn.execute(_REPLACE, (*row, expected_version)).rowcount != 1:
                return False
            conn.executemany(_INSERT_EVENT, rows)
            return True

        if not await self.write(write):
            return 0
        return len(state) + sum(len(event.body) for event in new_events)

    def drop_published(
        self,
        workflow_id: str,
        version: int,
        message_ids: Sequence[str],
        kept: Sequence[dict[str, Any]],
    ) -> None:
        # rows of their own, so no version to agree on: deleted in the next batch of writes,
        # all the drops made until then in one statement
        rows = self._drops
        if rows is None:
            rows = self._drops = []

            def write(conn: sqlite3.Connection) -> None:
                if self._drops is rows:  # drops from now on go with a later batch
                    self._drops = None
                conn.executemany(_DROP_EVENT, rows)  # the same rows if it runs again

            self.defer(write)
        rows.extend((workflow_id, message_id) for message_id in message_ids)

    async def release_keys(self, now: str, limit: int, owner_key: tuple[str, str] | None) -> int:
        if limit <= 0:
            return 0
        params: tuple[Any, ...]
        if owner_key is None:
            sql, params = _RELEASE_KEYS.format(""), (now, limit)
        else:
            sql, params = _RELEASE_KEYS.format(" AND idem_key = ?"), (now, slot(*owner_key), limit)

        def write(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, params).rowcount

        return await self.write(write)

    # -- reads ---------------------------------------------------------------------------

    async def keyed(self, owner: str, key: str) -> tuple[dict[str, Any], IdempotencyKey] | None:
        return await self.run(self._keyed_sync, owner, key)

    def _keyed_sync(self, owner: str, key: str) -> tuple[dict[str, Any], IdempotencyKey] | None:
        row = self.query(_KEY_HELD, (slot(owner, key),), sqlite3.Cursor.fetchone)
        if row is None:
            return None
        workflow_id, body_hash, expires_at = row
        docs = self._select_sync(_GET, (workflow_id,))
        return docs[0], IdempotencyKey(owner, key, body_hash, expires_at)

    async def get(self, workflow_id: str) -> dict[str, Any] | None:
        docs = await self.run(self._select_sync, _GET, (workflow_id,))
        return docs[0] if docs else None

    async def list_workflows(
        self,
        *,
        owner: str | None,
        status: str | None,
        limit: int,
        before: tuple[str, str] | None = None,
        filters: Filters = NO_FILTERS,
    ) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        where: list[str] = []
        params: list[Any] = []
        if filters.text:
            await self.write(_catch_up)
            where.append(_text_filter(filters.text))
            params.append(_text_pattern(filters.text))
        if filters.pipeline is not None:
            where.append("pipeline_name = ?")
            params.append(filters.pipeline)
        if filters.created_after is not None:
            where.append("created_at >= ?")
            params.append(filters.created_after)
        if filters.created_before is not None:
            where.append("created_at < ?")
            params.append(filters.created_before)
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
        sql = f"SELECT {_COLUMNS} FROM workflows"
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

    async def outbox_backlog(self) -> tuple[int, str | None]:
        count, oldest = await self.run(self.query, _BACKLOG, (), sqlite3.Cursor.fetchone)
        return int(count), oldest

    async def steps_in_use(self) -> dict[str, list[str]]:
        params = (RUNNING, PENDING, DISPATCHED)
        rows = await self.run(self.query, _STEPS_IN_USE, params, sqlite3.Cursor.fetchall)
        in_use: dict[str, list[str]] = {}
        for name, workflow_id in rows:
            in_use.setdefault(name, []).append(workflow_id)
        return in_use

    def _select_sync(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        """The documents the query selects (id, doc, product, pipeline), each with its
        outbox."""
        rows = self.query(sql, params, sqlite3.Cursor.fetchall)
        outboxes = self._outboxes_sync([row[0] for row in rows])
        docs = []
        for workflow_id, state, product, pipeline in rows:
            doc = _decode(state)
            doc["product"] = _decode(product)
            if pipeline is not None:
                doc["pipeline"] = self._definition(pipeline)
            outbox = outboxes.get(workflow_id, [])
            doc["outbox"] = outbox
            doc["outbox_at"] = outbox[0]["created_at"] if outbox else None
            docs.append(doc)
        return docs

    def _definition(self, text: str) -> dict[str, Any]:
        definition = self._definitions.get(text)
        if definition is None:
            if len(self._definitions) >= _DEFINITIONS_KEPT:
                self._definitions.clear()
            definition = self._definitions[text] = _decode(text)
        return definition

    def _outboxes_sync(self, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        outboxes: dict[str, list[dict[str, Any]]] = {}
        for start in range(0, len(ids), _AT_ONCE):
            chunk = ids[start : start + _AT_ONCE]
            sql = _OUTBOXES.format(", ".join("?" * len(chunk)))
            for workflow_id, message_id, routing_key, payload, created_at in self.query(
                sql, tuple(chunk), sqlite3.Cursor.fetchall
            ):
                outboxes.setdefault(workflow_id, []).append(
                    {
                        "message_id": message_id,
                        "routing_key": routing_key,
                        "payload": _decode(payload),
                        "created_at": created_at,
                    }
                )
        return outboxes


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
        await self.run(self.insert_row, _INSERT_USER, row, f"user {user['username']}")

    async def user_by_id(self, user_id: str) -> dict[str, Any] | None:
        return await self.run(self._user_sync, "id", user_id)

    async def user_by_name(self, username: str) -> dict[str, Any] | None:
        return await self.run(self._user_sync, "username", username)

    def _user_sync(self, column: str, value: str) -> dict[str, Any] | None:
        row = self.query(_SELECT_USER + f"{column} = ?", (value,), sqlite3.Cursor.fetchone)
        return None if row is None else dict(zip(_USER_COLUMNS, row, strict=True))

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        sql = "UPDATE users SET password_hash = ? WHERE id = ?"
        await self.run(self.query, sql, (password_hash, user_id), rowcount)
