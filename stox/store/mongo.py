"""The production store: MongoDB through PyMongo's async API (`AsyncMongoClient`, not Motor).

One collection, `workflows`, holds the documents `Workflow.to_doc` produces, with `_id` set to
the workflow id; reads strip `_id` again, so they return exactly the shape written. A change
`$set`s only what changes (the product, written at upload, is never sent again), and
dropping published events sets the outbox without a new version: in the workflow's next
change, which leaves them out of the outbox it sets, or, when none comes within DEFER_DELAY,
in one `bulk_write` with the other workflows' drops.

Only operations that behave the same on MongoDB and on nx-27017 (a MongoDB wire-protocol
server on SQLite, used by the tests) are used: insert_one, find_one, update_one with $set on
{_id, version} (no upsert; not $push or $pull, which nx-27017 gets wrong on arrays of
documents), $unset of top-level fields, find with $lte, a sort on one or two keys, limit,
create_index (unique, sparse on one field), an aggregation of $match, $unwind and $group
with $push (nx-27017's `distinct`, projections and $elemMatch on array elements do not match
MongoDB's), and the `ping` command. Two
nx-27017 quirks shape the queries:

- A secondary index that names `_id` makes every later insert fail ("JSON path error near
  '_id'"). The `id` field is kept in the stored document, and the indexes and sorts use it
  instead; `id` always equals `_id`, so on MongoDB this costs nothing.
- A query value that looks like a date (`2026-01-01T...`) is compared with SQLite's
  `datetime()`, which drops the fractional seconds: `$lt`, `$lte` and equality on our
  timestamps are only exact to the second (sorting is exact). So timestamp bounds are
  queried inclusively, which gives a superset on both servers, and the extra documents
  (which sort at one end of the result) are filtered out here. On MongoDB that filter
  drops at most the page cursor's own document and its exact-timestamp ties.

An upload's idempotency key is three fields of its document (`_KEY_FIELDS`), written by its
insert, never by a change, `$unset` once expired, and hidden from reads. The key field is one
string (owner and key) under a unique *sparse* index: documents without it are not indexed,
on MongoDB, and on nx-27017 (which does not pass `sparse` on to its SQLite index, whose unique
indexes let rows without the value be many anyway). Not a partial index: nx-27017 ignores
`partialFilterExpression`, and a compound sparse index would still index every document by
its owner.

Both collections are used with write concern `majority` with `j: true` and read concern
`majority` (`WRITE_CONCERN`, `READ_CONCERN`), whatever the URL says:

- A compare-and-swap acknowledged by the primary alone can be rolled back by a failover (a
  new primary elected without it): the transition, acknowledged to its caller (a 202, a 200
  to a service) and its events perhaps already published, would be lost. With `majority` the
  acknowledgement waits until a majority of the replica set has the write, and a majority
  is what any new primary must come from.
- `j: true` has each of those members write it to its journal first, so a member that
  crashes and restarts still has it. A replica set's default (writeConcernMajorityJournalDefault)
  already journals majority writes; stating it keeps that true on a standalone server or a
  set configured otherwise, at no extra cost on a default set.
- The reads that decide a transition (the load before the compare-and-swap, the sweeper's and
  the relay's scans, the idempotency key) see only majority-committed data: a decision is
  never made, nor an outbox event published, from a write that a failover may still undo.
  Such a read can be a moment behind the primary's newest write; the compare-and-swap on
  `version` then misses and the orchestrator reloads, as after any concurrent change.

nx-27017 accepts both and means the same on its one node: `w: majority` is the node itself,
`j: true` makes it sync SQLite at each write (`synchronous=FULL`), and read concern is what it
has committed.

`MongoUserStore` keeps the AuthService's users in the collection `users` (`_id` the user id,
a unique index on `username`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from typing import Any, TypeVar

import bson
import bson.errors
from bson.raw_bson import RawBSONDocument
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, UpdateOne
from pymongo.errors import DuplicateKeyError, PyMongoError
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from stox.logs import detached
from stox.store.base import (
    DEFER_DELAY,
    NO_FILTERS,
    AlreadyExists,
    Filters,
    IdempotencyKey,
    KeyTaken,
    NewEvent,
    StoreError,
    slot,
)
from stox.store.mongo_url import database_from_url
from stox.workflow import DEFAULT_PIPELINE, DISPATCHED, PENDING, RUNNING, outbox_at, unpublished

log = logging.getLogger(__name__)

COLLECTION = "workflows"
USERS = "users"
SERVER_SELECTION_TIMEOUT_MS = 5000
# why: the module docstring (a failover must not roll back an acknowledged transition)
WRITE_CONCERN = WriteConcern(w="majority", j=True)
READ_CONCERN = ReadConcern("majority")
M = TypeVar("M", bound="MongoCollection")

# what a change writes: all but the fields fixed at upload (id, owner, product, created_at)
_MUTABLE = (
    "status",
    "steps",
    "current_step",
    "version",
    "updated_at",
    "outbox",
    "wake_at",
    "outbox_at",
    "history",
    "history_dropped",
)
_NEWEST_FIRST = [("created_at", DESCENDING), ("id", DESCENDING)]
_INDEXES = (
    [("owner", ASCENDING), *_NEWEST_FIRST],
    [("status", ASCENDING), *_NEWEST_FIRST],
    [("pipeline.name", ASCENDING), *_NEWEST_FIRST],
    _NEWEST_FIRST,
    [("wake_at", ASCENDING)],
    [("outbox_at", ASCENDING)],
)


def _filtered(filters: Filters) -> dict[str, Any]:
    """The query of `filters` (the same meaning on MongoDB and on nx-27017): a regular
    expression of the text, escaped, matched case-insensitively against the product's name
    and category; a workflow without a stored definition runs on the default pipeline."""
    query: dict[str, Any] = {}
    clauses: list[dict[str, Any]] = []
    if filters.text:
        pattern = {"$regex": re.escape(filters.text), "$options": "i"}
        clauses.append({"$or": [{"product.name": pattern}, {"product.category": pattern}]})
    if filters.pipeline is not None:
        named: dict[str, Any] = {"pipeline.name": filters.pipeline}
        if filters.pipeline == DEFAULT_PIPELINE:
            named = {"$or": [named, {"pipeline": {"$exists": False}}]}
        clauses.append(named)
    if clauses:
        query["$and"] = clauses
    created: dict[str, str] = {}
    if filters.created_after is not None:
        created["$gte"] = filters.created_after
    if filters.created_before is not None:
        created["$lt"] = filters.created_before
    if created:
        query["created_at"] = created
    return query


def _bson(doc: dict[str, Any]) -> RawBSONDocument:
    """`doc` encoded here, once: PyMongo sends the bytes as they are, and we know the size."""
    try:
        return RawBSONDocument(bson.encode(doc))
    except (bson.errors.BSONError, OverflowError) as exc:
        raise StoreError(f"MongoDB: cannot encode the document: {exc}") from exc


_KEY, _KEY_HASH, _KEY_EXPIRES = _KEY_FIELDS = (
    "idempotency_key",
    "idempotency_hash",
    "idempotency_expires_at",
)
_KEY_INDEXES = (
    ([(_KEY, ASCENDING)], {"unique": True, "sparse": True}),
    ([(_KEY_EXPIRES, ASCENDING)], {"sparse": True}),
)


def _from_mongo(doc: dict[str, Any]) -> dict[str, Any]:
    del doc["_id"]
    for name in _KEY_FIELDS:
        doc.pop(name, None)
    return doc


class MongoCollection:
    """One collection and its indexes (`INDEXES`: keys, options). The client is made in
    `open()`, on the loop it will run on."""

    COLLECTION = COLLECTION
    INDEXES: tuple[tuple[list[tuple[str, int]], dict[str, Any]], ...] = ()

    def __init__(self, url: str, database: str | None = None) -> None:
        self.url = url
        self.database = database or database_from_url(url)
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._collection: Any = None

    @classmethod
    def from_url(cls: type[M], url: str) -> M:
        return cls(url)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(database={self.database!r})"

    def _col(self) -> Any:
        col = self._collection
        if col is None:
            raise StoreError("the MongoDB store is not open")
        return col

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            return
        options: dict[str, Any] = {}
        if "serverselectiontimeoutms" not in self.url.lower():
            options["serverSelectionTimeoutMS"] = SERVER_SELECTION_TIMEOUT_MS
        try:
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(self.url, **options)
        except PyMongoError as exc:  # a malformed URL or option
            raise StoreError(f"MongoDB: {exc}") from exc
        collection = client[self.database].get_collection(
            self.COLLECTION, write_concern=WRITE_CONCERN, read_concern=READ_CONCERN
        )
        try:
            for keys, options in self.INDEXES:
                await collection.create_index(keys, **options)
        except PyMongoError as exc:
            await client.close()
            raise StoreError(f"MongoDB: cannot create indexes: {exc}") from exc
        except BaseException:
            await client.close()
            raise
        self._client, self._collection = client, collection

    async def close(self) -> None:
        client, self._client, self._collection = self._client, None, None
        if client is not None:
            await client.close()

    async def ping(self) -> None:
        client = self._client
        if client is None:
            raise StoreError("the MongoDB store is not open")
        try:
            await client[self.database].command("ping")
        except PyMongoError as exc:
            raise StoreError(f"MongoDB: {exc}") from exc

    async def _insert(
        self, doc: dict[str, Any], what: str, extra: dict[str, Any] | None = None
    ) -> int:
        """Insert with `_id` set to the document's id (and the fields `extra`); the size of
        the stored BSON."""
        col = self._col()
        raw = _bson({"_id": doc["id"], **doc, **(extra or {})})
        try:
            await col.insert_one(raw)
        except DuplicateKeyError as exc:
            raise AlreadyExists(f"{what} already exists") from exc
        except PyMongoError as exc:
            raise StoreError(f"MongoDB: {exc}") from exc
        return len(raw.raw)

    async def _find_one(self, query: dict[str, Any]) -> dict[str, Any] | None:
        col = self._col()
        try:
            doc = await col.find_one(query)
        except PyMongoError as exc:
            raise StoreError(f"MongoDB: {exc}") from exc
        return None if doc is None else _from_mongo(doc)


class _Drop:
    """Published events waiting to be dropped from one workflow's outbox."""

    __slots__ = ("ids", "kept", "version")

    def __init__(self, version: int, ids: set[str], kept: list[dict[str, Any]]) -> None:
        self.version, self.ids, self.kept = version, ids, kept

    def outbox(self, outbox: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """`outbox` without the dropped events, and its `outbox_at`: the fields to set."""
        kept = unpublished(list(outbox), self.ids)
        return {"outbox": kept, "outbox_at": outbox_at(kept)}


class MongoStore(MongoCollection):
    """WorkflowStore on the MongoDB collection `workflows`."""

    INDEXES = (*((keys, {}) for keys in _INDEXES), *_KEY_INDEXES)

    def __init__(self, url: str, database: str | None = None) -> None:
        super().__init__(url, database)
        self._drops: dict[str, _Drop] = {}  # workflow id -> what waits to be dropped
        self._drop_timer: asyncio.TimerHandle | None = None
        self._dropping: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        await self.flush()
        await super().close()

    # -- documents -----------------------------------------------------------------------

    async def insert(
        self,
        doc: dict[str, Any],
        events: Sequence[NewEvent] | None = None,
        key: IdempotencyKey | None = None,
    ) -> int:
        what = f"workflow {doc['id']}"
        if key is None:
            return await self._insert(doc, what)
        held = {_KEY: key.slot, _KEY_HASH: key.body_hash, _KEY_EXPIRES: key.expires_at}
        try:
            return await self._insert(doc, what, held)
        except AlreadyExists as exc:  # which unique index refused it: nx-27017 does not say
            if await self.get(doc["id"]) is not None:
                raise
            raise KeyTaken(f"idempotency key {key.key!r} is held") from exc

    async def get(self, workflow_id: str) -> dict[str, Any] | None:
        return await self._find_one({"_id": workflow_id})

    async def keyed(self, owner: str, key: str) -> tuple[dict[str, Any], IdempotencyKey] | None:
        doc = await self._keyed(slot(owner, key))
        if doc is None:
            return None
        held = IdempotencyKey(owner, key, doc[_KEY_HASH], doc[_KEY_EXPIRES])
        return _from_mongo(doc), held

    async def _keyed(self, key_slot: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] | None = await self._col().find_one({_KEY: key_slot})
        except PyMongoError as exc:
            raise StoreError(f"MongoDB: {exc}") from exc
        return found

    async def release_keys(self, now: str, limit: int, owner_key: tuple[str, str] | None) -> int:
        # inclusive, then filtered here: nx-27017 compares timestamps to the second (above);
        # each update names the key and expiry it saw, so a key taken again meanwhile stays
        query: dict[str, Any] = {_KEY_EXPIRES: {"$lte": now}}
        if owner_key is not None:
            query[_KEY] = slot(*owner_key)
        if limit <= 0:
            return 0
        col = self._col()
        try:
            found = await col.find(query, sort=[(_KEY_EXPIRES, ASCENDING)], limit=limit).to_list()
            updates = [
                UpdateOne(
                    {"_id": doc["_id"], _KEY: doc[_KEY], _KEY_EXPIRES: doc[_KEY_EXPIRES]},
                    {"$unset": dict.fromkeys(_KEY_FIELDS, "")},
                )
                for doc in found
                if doc[_KEY_EXPIRES] <= now
            ]
            if not updates:
                return 0
            result = await col.bulk_write(updates, ordered=False)
        except PyMongoError as exc:
            raise StoreError(f"MongoDB: {exc}") from exc
        return int(result.modified_count)

    async def replace(
        self, doc: dict[str, Any], expected_version: int, new_events: Sequence[NewEvent]
    ) -> int:
        # $set of what changes, never the product (nx-27017's $push mangles arrays of
        # documents, so the outbox is set whole: the version filter keeps that safe)
        fields = {key: doc[key] for key in _MUTABLE}
        drop = self._drops.pop(doc["id"], None)
        if drop is not None:  # the events waiting to be dropped go with this change
            fields.update(drop.outbox(fields["outbox"]))
        changed = _bson({"$set": fields})
        if await self._update(doc["id"], expected_version, changed):
            return len(changed.raw)
        if drop is not None:  # still to be dropped, with whatever was added meanwhile
            waiting = self._drops.setdefault(doc["id"], drop)
            waiting.ids |= drop.ids
        return 0

    def drop_published(
        self,
        workflow_id: str,
        version: int,
        message_ids: Sequence[str],
        kept: Sequence[dict[str, Any]],
    ) -> None:
        self._col()
        drop = self._drops.get(workflow_id)
        ids = set(message_ids) | (drop.ids if drop is not None else set())
        if drop is None or drop.version <= version:
            self._drops[workflow_id] = _Drop(version, ids, list(kept))
        else:  # what waits is of a newer version already: add these ids to it
            drop.ids = ids
        if self._drop_timer is None:
            loop = asyncio.get_running_loop()
            # the drops of many workflows: not the context of the first one's
            self._drop_timer = loop.call_later(DEFER_DELAY, self._drop_soon, context=detached())

    def _drop_soon(self) -> None:
        self._drop_timer = None
        task = asyncio.ensure_future(self._write_drops())
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)

    async def flush(self) -> None:
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        await self._write_drops()
        while self._dropping:
            await asyncio.gather(*list(self._dropping), return_exceptions=True)

    async def _write_drops(self) -> None:
        """Every drop waiting, in one round trip; one whose version moved on is left to the
        relay (the change that moved it may have been decided before the events were sent)."""
        drops, self._drops = self._drops, {}
        if not drops:
            return
        updates = [
            UpdateOne(
                {"_id": workflow_id, "version": drop.version},
                {"$set": drop.outbox(drop.kept)},
            )
            for workflow_id, drop in drops.items()
        ]
        try:
            await self._col().bulk_write(updates, ordered=False)
        except (PyMongoError, StoreError) as exc:
            log.warning("published events of %d workflows left for the relay: %s", len(drops), exc)

    async def _update(self, workflow_id: str, version: int, update: RawBSONDocument) -> bool:
        try:
            result = await self._col().update_one({"_id": workflow_id, "version": version}, update)
        except PyMongoError as exc:
            raise StoreError(f"MongoDB: {exc}") from exc
        return bool(result.matched_count == 1)

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
        query: dict[str, Any] = _filtered(filters)
        if owner is not None:
            query["owner"] = owner
        if status is not None:
            query["status"] = status
        if before is None:
            return await self._find(query, _NEWEST_FIRST, limit)
        # Exact would be created_at < c or (created_at == c and id < i); see the module
        # docstring for why this asks for created_at <= c and drops the newer head here.
        cursor = (before[0], before[1])
        created = query.setdefault("created_at", {})
        created["$lte"] = min(cursor[0], created.get("$lte", cursor[0]))
        fetch = limit + 1
        while True:
            docs = await self._find(query, _NEWEST_FIRST, fetch)
            kept = [doc for doc in docs if (doc["created_at"], doc["id"]) < cursor]
            if len(kept) >= limit or len(docs) < fetch:
                return kept[:limit]
            fetch *= 4  # many ties within the cursor's second (nx-27017 only)

    async def due(self, now: str, limit: int) -> list[dict[str, Any]]:
        # Neither server matches a null or missing wake_at with a string bound. Sorted by
        # wake_at, nx-27017's extras (later in the same second) come last, so dropping
        # them still leaves the first `limit` due workflows.
        docs = await self._find({"wake_at": {"$lte": now}}, [("wake_at", ASCENDING)], limit)
        return [doc for doc in docs if doc["wake_at"] <= now]

    async def unpublished(self, written_before: str, limit: int) -> list[dict[str, Any]]:
        query = {"outbox_at": {"$lte": written_before}}
        docs = await self._find(query, [("outbox_at", ASCENDING)], limit)
        return [doc for doc in docs if doc["outbox_at"] <= written_before]

    async def outbox_backlog(self) -> tuple[int, str | None]:
        waiting = {"outbox_at": {"$gt": ""}}  # a string: not null (served by its index)
        col = self._col()
        try:
            count = await col.count_documents(waiting)
            oldest = await col.find_one(waiting, {"outbox_at": 1}, sort=[("outbox_at", ASCENDING)])
        except PyMongoError as exc:
            raise StoreError(f"MongoDB: {exc}") from exc
        return count, None if oldest is None else oldest["outbox_at"]

    async def steps_in_use(self) -> dict[str, list[str]]:
        pipeline = [
            {"$match": {"status": RUNNING}},
            {"$unwind": "$steps"},
            {"$match": {"steps.status": {"$in": [PENDING, DISPATCHED]}}},
            {"$group": {"_id": "$steps.name", "ids": {"$push": "$id"}}},
        ]
        try:
            cursor = await self._col().aggregate(pipeline)
            groups = await cursor.to_list()
        except PyMongoError as exc:
            raise StoreError(f"MongoDB: {exc}") from exc
        return {group["_id"]: list(group["ids"]) for group in groups}

    async def _find(
        self, query: dict[str, Any], sort: list[tuple[str, int]], limit: int
    ) -> list[dict[str, Any]]:
        if limit <= 0:  # limit(0) would mean "no limit" to MongoDB
            return []
        col = self._col()
        try:
            docs = await col.find(query, sort=sort, limit=limit).to_list()
        except PyMongoError as exc:
            raise StoreError(f"MongoDB: {exc}") from exc
        return [_from_mongo(doc) for doc in docs]


class MongoUserStore(MongoCollection):
    """UserStore on the MongoDB collection `users`, its user names unique."""

    COLLECTION = USERS
    INDEXES = (([("username", ASCENDING)], {"unique": True}),)

    async def insert_user(self, user: dict[str, Any]) -> None:
        await self._insert(user, f"user {user['username']}")

    async def user_by_id(self, user_id: str) -> dict[str, Any] | None:
        return await self._find_one({"_id": user_id})

    async def user_by_name(self, username: str) -> dict[str, Any] | None:
        return await self._find_one({"username": username})

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        try:
            await self._col().update_one(
                {"_id": user_id}, {"$set": {"password_hash": password_hash}}
            )
        except PyMongoError as exc:
            raise StoreError(f"MongoDB: {exc}") from exc
