"""The WorkflowStore contract: every test runs on every store (see the `store` fixture)."""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import sqlite3
import warnings
from pathlib import Path
from typing import Any

import pytest
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern
from support import T0, eventually, free_port

from stox.store import (
    AlreadyExists,
    IdempotencyKey,
    KeyTaken,
    NewEvent,
    StoreError,
    WorkflowStore,
    make_store,
)
from stox.store.base import Filters
from stox.store.mongo import MongoStore, MongoUserStore
from stox.store.mongo_url import database_from_url
from stox.store.sqlite import LAYOUT, SQLiteStore
from stox.workflow import (
    COMPLETED,
    FAILED,
    REVIEW,
    RUNNING,
    Pipeline,
    Report,
    StepSpec,
    Workflow,
    complete,
    isoformat,
    start,
)


def new_doc(
    owner: str = "alice",
    now: float = T0,
    product: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A real workflow document, as the orchestrator would first insert it."""
    if product is None:
        product = {
            "name": "Desk lamp",
            "description": "A lamp",
            "images": ["https://example.com/lamp.jpg"],
            "category": "home",
            "price": 19.5,
            "metadata": {},
        }
    wf, _ = start(Pipeline(), owner, product, now)
    doc = wf.to_doc()
    doc.update(fields)
    return doc


def legacy_doc(**fields: Any) -> dict[str, Any]:
    """A document as gateways stored it before workflows kept their pipeline's definition."""
    doc = new_doc(**fields)
    del doc["pipeline"]
    return doc


def ids(docs: list[dict[str, Any]]) -> list[str]:
    return [doc["id"] for doc in docs]


def newest_first(docs: list[dict[str, Any]]) -> list[str]:
    return ids(sorted(docs, key=lambda d: (d["created_at"], d["id"]), reverse=True))


async def insert_all(store: WorkflowStore, docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        await store.insert(doc)


# -- insert / get ------------------------------------------------------------------------


async def test_insert_then_get_round_trips_the_document(store: WorkflowStore) -> None:
    doc = new_doc()
    written = copy.deepcopy(doc)
    await store.insert(doc)
    assert doc == written, "insert must not modify the caller's document"
    got = await store.get(doc["id"])
    assert got == written
    assert got is not doc
    assert "_id" not in got


TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03"


async def test_a_traced_workflow_keeps_its_trace_and_an_untraced_one_has_none(
    store: WorkflowStore,
) -> None:
    wf, _ = start(Pipeline(), "alice", {"name": "Lamp"}, T0, trace=TRACE)
    traced, untraced = wf.to_doc(), new_doc()
    assert "trace" not in untraced  # the field only when tracing was on at the upload
    for doc in (traced, untraced):
        await store.insert(doc)
        changed = Workflow.from_doc(doc)
        complete(changed, Pipeline(), Report(doc["id"], str(changed.step.step_id), True), T0)
        assert await store.replace(changed.to_doc(), doc["version"], []) > 0
    traced_got, untraced_got = await store.get(traced["id"]), await store.get(untraced["id"])
    assert traced_got is not None and untraced_got is not None
    assert traced_got["trace"] == TRACE and "trace" not in untraced_got
    assert Workflow.from_doc(traced_got).trace == TRACE  # kept across a change
    assert Workflow.from_doc(untraced_got).trace is None  # an older document loads


async def test_get_returns_a_copy_not_shared_state(store: WorkflowStore) -> None:
    doc = new_doc()
    await store.insert(doc)
    got = await store.get(doc["id"])
    assert got is not None
    got["status"] = "mangled"
    got["steps"][0]["status"] = "mangled"
    assert await store.get(doc["id"]) == doc


async def test_get_of_a_missing_id_is_none(store: WorkflowStore) -> None:
    assert await store.get("0" * 32) is None


async def test_duplicate_insert_raises_already_exists(store: WorkflowStore) -> None:
    doc = new_doc()
    await store.insert(doc)
    other = new_doc(owner="mallory", id=doc["id"])
    with pytest.raises(AlreadyExists):
        await store.insert(other)
    assert issubclass(AlreadyExists, StoreError)
    assert await store.get(doc["id"]) == doc


# -- idempotency keys ----------------------------------------------------------------------


def held(owner: str = "alice", key: str = "order-1", expires: float = T0 + 3600) -> IdempotencyKey:
    return IdempotencyKey(owner, key, "hash-of-the-body", isoformat(expires))


async def test_a_key_is_held_by_the_workflow_inserted_with_it(store: WorkflowStore) -> None:
    doc = new_doc()
    await store.insert(doc, None, held())
    assert await store.get(doc["id"]) == doc  # the key is not part of the document
    assert await store.keyed("alice", "order-1") == (doc, held())
    assert await store.keyed("alice", "order-2") is None
    assert await store.list_workflows(owner="alice", status=None, limit=10) == [doc]


async def test_a_held_key_refuses_another_workflow(store: WorkflowStore) -> None:
    first, second = new_doc(), new_doc()
    await store.insert(first, None, held())
    with pytest.raises(KeyTaken):
        await store.insert(second, None, held())
    assert issubclass(KeyTaken, AlreadyExists)
    assert await store.get(second["id"]) is None  # nothing of it was written
    assert await store.unpublished(isoformat(T0 + 10), 10) == [first]
    await store.insert(second)  # without the key it may be inserted
    with pytest.raises(AlreadyExists) as info:  # its id taken: not the key
        await store.insert(new_doc(id=first["id"]), None, held(key="order-2"))
    assert not isinstance(info.value, KeyTaken)
    assert await store.keyed("alice", "order-2") is None


async def test_keys_are_per_owner(store: WorkflowStore) -> None:
    alices, bobs = new_doc(), new_doc(owner="bob")
    await store.insert(alices, None, held())
    await store.insert(bobs, None, held(owner="bob"))
    assert await store.keyed("alice", "order-1") == (alices, held())
    assert await store.keyed("bob", "order-1") == (bobs, held(owner="bob"))
    # the owner and the key are kept apart: no concatenation makes another pair
    await store.insert(new_doc(owner="ali"), None, held(owner="ali", key="ceorder-1"))
    assert await store.keyed("alice", "order-1") == (alices, held())


async def test_many_workflows_without_keys_never_conflict(store: WorkflowStore) -> None:
    """A unique index that indexed the documents without a key would refuse the second."""
    docs = [new_doc(now=T0 + i) for i in range(3)]
    await insert_all(store, docs)
    await store.insert(new_doc(), None, held())
    assert len(await store.list_workflows(owner="alice", status=None, limit=10)) == 4


async def test_concurrent_inserts_with_one_key_store_one_workflow(store: WorkflowStore) -> None:
    docs = [new_doc() for _ in range(5)]
    outcomes = await asyncio.gather(
        *(store.insert(doc, None, held()) for doc in docs), return_exceptions=True
    )
    won = [doc for doc, outcome in zip(docs, outcomes, strict=True) if isinstance(outcome, int)]
    assert len(won) == 1, outcomes
    assert all(isinstance(o, KeyTaken) for o in outcomes if not isinstance(o, int)), outcomes
    assert await store.list_workflows(owner="alice", status=None, limit=10) == won
    assert await store.keyed("alice", "order-1") == (won[0], held())


async def test_release_keys_frees_the_expired_ones_and_keeps_the_workflows(
    store: WorkflowStore,
) -> None:
    soon, later, other = new_doc(), new_doc(), new_doc()
    await store.insert(soon, None, held(key="soon", expires=T0 + 10))
    await store.insert(later, None, held(key="later", expires=T0 + 100))
    await store.insert(other, None, held(key="other", expires=T0 + 10))
    assert await store.release_keys(isoformat(T0 + 9.5), 10, None) == 0  # none expired yet
    assert await store.release_keys(isoformat(T0 + 10), 10, ("alice", "soon")) == 1
    assert await store.keyed("alice", "soon") is None
    assert await store.keyed("alice", "other") is not None  # not the one named
    assert await store.release_keys(isoformat(T0 + 50), 10, None) == 1
    assert await store.keyed("alice", "other") is None
    assert await store.keyed("alice", "later") == (later, held(key="later", expires=T0 + 100))
    assert await store.get(soon["id"]) == soon and await store.get(other["id"]) == other
    again = new_doc()
    await store.insert(again, None, held(key="soon"))  # a freed key may be held again
    assert await store.keyed("alice", "soon") == (again, held(key="soon"))
    assert await store.release_keys(isoformat(T0 + 50), 10, None) == 0


async def test_release_keys_takes_at_most_limit(store: WorkflowStore) -> None:
    for i in range(3):
        await store.insert(new_doc(), None, held(key=f"k{i}", expires=T0 + i))
    assert await store.release_keys(isoformat(T0 + 10), 2, None) == 2
    assert await store.release_keys(isoformat(T0 + 10), 0, None) == 0
    assert await store.release_keys(isoformat(T0 + 10), 2, None) == 1


async def test_a_key_outlives_the_store_process(store_url: str) -> None:
    """Written with the workflow, in the store: a restarted gateway still finds it."""
    doc = new_doc()
    first = make_store(store_url)
    await first.open()
    try:
        await first.insert(doc, None, held())
    finally:
        await first.close()
    second = make_store(store_url)
    await second.open()
    try:
        assert await second.keyed("alice", "order-1") == (doc, held())
        with pytest.raises(KeyTaken):
            await second.insert(new_doc(), None, held())
    finally:
        await second.close()


# -- compare-and-swap ----------------------------------------------------------------------


async def test_replace_with_the_expected_version_writes(store: WorkflowStore) -> None:
    doc = new_doc()
    await store.insert(doc)
    updated = copy.deepcopy(doc)
    updated.update(status=COMPLETED, version=doc["version"] + 1, wake_at=None)
    updated["steps"][0]["status"] = COMPLETED
    assert await store.replace(updated, doc["version"], []) > 0
    assert await store.get(doc["id"]) == updated


async def test_writes_return_the_stored_size(store: WorkflowStore) -> None:
    doc = new_doc()
    small = await store.insert(doc)
    assert len(json.dumps(doc)) // 2 < small < 2 * len(json.dumps(doc))
    bigger = copy.deepcopy(doc)
    bigger["version"] += 1
    bigger["steps"][0]["result"] = {"x": "y" * 10_000}
    size = await store.replace(bigger, doc["version"], [])
    assert 10_000 <= size < small + 11_000
    assert await store.replace(bigger, doc["version"], []) == 0  # not written: nothing stored


def advanced(doc: dict[str, Any], **changes: Any) -> tuple[dict[str, Any], list[NewEvent]]:
    """`doc` one change on, as a transition leaves it: its new events at the outbox's end."""
    wf = Workflow.from_doc(copy.deepcopy(doc))
    report = Report(wf.id, str(wf.step.step_id), True, result=changes or {"ok": True})
    complete(wf, Pipeline(), report, T0 + 5)
    after = wf.to_doc()
    return after, [NewEvent.of(entry) for entry in after["outbox"][len(doc["outbox"]) :]]


def entries(events: list[NewEvent]) -> list[dict[str, Any]]:
    return [event.entry for event in events]


async def test_replace_adds_its_new_events_after_the_earlier_ones(store: WorkflowStore) -> None:
    doc = new_doc()
    await store.insert(doc)
    after, new_events = advanced(doc)
    assert len(new_events) == 2  # the next dispatch and the change notification
    assert await store.replace(after, doc["version"], new_events) > 0
    stored = await store.get(doc["id"])
    assert stored == after
    assert stored is not None and stored["outbox"] == doc["outbox"] + entries(new_events)


async def test_replace_writes_the_history_and_the_deliveries(store: WorkflowStore) -> None:
    doc = new_doc()
    await store.insert(doc)
    # an entry of this transition says its version: a store may write only the new ones
    entry = {"at": isoformat(T0 + 1), "version": doc["version"] + 1, "event": "x", "by": "y"}
    delivery = {"id": "d1", "status": "pending", "attempts": 1, "next_at": isoformat(T0 + 11)}
    changed = dict(
        doc,
        version=doc["version"] + 1,
        history=[*doc["history"], entry],
        history_dropped=2,
        deliveries=[delivery],
    )
    assert await store.replace(changed, doc["version"], []) > 0
    stored = await store.get(doc["id"])
    assert stored is not None
    assert stored["history"] == changed["history"] and stored["history_dropped"] == 2
    assert stored["deliveries"] == [delivery]


async def test_replace_never_writes_the_product_again(store: WorkflowStore) -> None:
    doc = new_doc()
    await store.insert(doc)
    changed = dict(doc, version=doc["version"] + 1, product={"name": "something else"})
    assert await store.replace(changed, doc["version"], []) > 0
    stored = await store.get(doc["id"])
    assert stored is not None
    assert stored["product"] == doc["product"] and stored["version"] == doc["version"] + 1


async def test_replace_never_writes_the_pipeline_definition_again(store: WorkflowStore) -> None:
    doc = new_doc()
    await store.insert(doc)
    other = dict(doc["pipeline"], name="apparel", version="0123456789ab")
    changed = dict(doc, version=doc["version"] + 1, pipeline=other)
    assert await store.replace(changed, doc["version"], []) > 0
    stored = await store.get(doc["id"])
    assert stored is not None and stored["version"] == doc["version"] + 1
    assert stored["pipeline"] == doc["pipeline"]


async def test_a_document_without_a_pipeline_reads_back_without_one(store: WorkflowStore) -> None:
    doc = legacy_doc()
    await store.insert(doc)
    assert await store.get(doc["id"]) == doc


async def test_drop_published_removes_those_events_and_keeps_the_version(
    store: WorkflowStore,
) -> None:
    doc = new_doc()
    await store.insert(doc)
    first, rest = doc["outbox"][:1], doc["outbox"][1:]
    dropped = [e["message_id"] for e in first]
    store.drop_published(doc["id"], doc["version"], dropped, rest)
    await store.flush()
    stored = await store.get(doc["id"])
    assert stored is not None
    assert stored["outbox"] == rest and stored["outbox_at"] == rest[0]["created_at"]
    assert stored["version"] == doc["version"]
    assert {k: v for k, v in stored.items() if not k.startswith("outbox")} == {
        k: v for k, v in doc.items() if not k.startswith("outbox")
    }
    everything = [e["message_id"] for e in rest]
    store.drop_published(doc["id"], doc["version"], everything, [])
    await store.flush()
    stored = await store.get(doc["id"])
    assert stored is not None and stored["outbox"] == [] and stored["outbox_at"] is None


async def test_drop_published_for_an_older_version_never_loses_newer_events(
    store: WorkflowStore,
) -> None:
    """A change written meanwhile brought events of its own: a drop of the old version's
    events either goes through without touching them, or is left undone (for the relay, or
    a later drop on the current version)."""
    doc = new_doc()
    await store.insert(doc)
    after, new_events = advanced(doc)
    assert await store.replace(after, doc["version"], new_events)
    dropped = [e["message_id"] for e in doc["outbox"]]
    store.drop_published(doc["id"], doc["version"], dropped, [])
    await store.flush()
    stored = await store.get(doc["id"])
    assert stored is not None
    added = entries(new_events)
    assert stored["outbox"] in (added, doc["outbox"] + added)
    store.drop_published(doc["id"], after["version"], dropped, added)
    await store.flush()
    stored = await store.get(doc["id"])
    assert stored is not None and stored["outbox"] == added


async def test_a_drop_goes_with_the_next_change_of_its_workflow(store: WorkflowStore) -> None:
    """No write of its own: the next replace carries it (in its transaction, or in the
    outbox it sets), and the version stays what that replace wrote."""
    doc = new_doc()
    await store.insert(doc)
    dropped = [e["message_id"] for e in doc["outbox"]]
    store.drop_published(doc["id"], doc["version"], dropped, [])
    after, new_events = advanced(doc)
    assert await store.replace(after, doc["version"], new_events)
    stored = await store.get(doc["id"])
    assert stored is not None
    assert stored["outbox"] == entries(new_events) and stored["version"] == after["version"]
    assert stored["outbox_at"] == entries(new_events)[0]["created_at"]


async def test_a_drop_with_no_change_after_it_is_written_on_its_own_soon(
    store: WorkflowStore,
) -> None:
    doc = new_doc()
    await store.insert(doc)
    store.drop_published(doc["id"], doc["version"], [e["message_id"] for e in doc["outbox"]], [])

    async def dropped() -> bool:
        stored = await store.get(doc["id"])
        return stored is not None and stored["outbox"] == []

    await eventually(dropped, within=5)


async def test_replace_with_a_stale_version_changes_nothing(store: WorkflowStore) -> None:
    doc = new_doc()
    await store.insert(doc)
    first = dict(doc, status=COMPLETED, version=doc["version"] + 1)
    assert await store.replace(first, doc["version"], []) > 0

    stale = dict(doc, status=FAILED, owner="mallory", version=doc["version"] + 1)
    assert await store.replace(stale, doc["version"], []) == 0
    assert await store.get(doc["id"]) == first
    newer = dict(doc, status=FAILED, version=first["version"] + 5)
    assert await store.replace(newer, first["version"] + 1, []) == 0  # a version not yet seen
    assert await store.get(doc["id"]) == first
    # the stale write did not leak into the indexed fields either
    assert await store.list_workflows(owner="mallory", status=None, limit=10) == []
    assert await store.list_workflows(owner=None, status=FAILED, limit=10) == []


async def test_replace_of_a_missing_workflow_writes_nothing(store: WorkflowStore) -> None:
    doc = new_doc()
    assert await store.replace(doc, doc["version"], []) == 0
    assert await store.get(doc["id"]) is None


async def cas_increment(store: WorkflowStore, workflow_id: str, times: int) -> int:
    """Read-modify-CAS `times` times with retry; returns how many races were lost."""
    lost = 0
    for _ in range(times):
        while True:
            current = await store.get(workflow_id)
            assert current is not None
            updated = copy.deepcopy(current)
            updated["version"] = current["version"] + 1
            updated["current_step"] = current["current_step"] + 1  # the counter
            if await store.replace(updated, current["version"], []):
                break
            lost += 1
    return lost


async def test_concurrent_cas_loses_no_update(store: WorkflowStore) -> None:
    doc = new_doc()
    await store.insert(doc)
    await asyncio.gather(*(cas_increment(store, doc["id"], 20) for _ in range(5)))
    final = await store.get(doc["id"])
    assert final is not None
    assert final["version"] == doc["version"] + 100
    assert final["current_step"] == doc["current_step"] + 100


async def test_concurrent_cas_across_two_store_instances(
    store: WorkflowStore, store_url: str
) -> None:
    """Two gateway instances on one database: still no lost update."""
    doc = new_doc()
    await store.insert(doc)
    other = make_store(store_url)
    await other.open()
    try:
        await asyncio.gather(
            *(cas_increment(s, doc["id"], 20) for s in (store, other, store, other))
        )
    finally:
        await other.close()
    final = await store.get(doc["id"])
    assert final is not None
    assert final["version"] == doc["version"] + 80
    assert final["current_step"] == doc["current_step"] + 80


# -- list ------------------------------------------------------------------------------------


@pytest.fixture
async def listed(store: WorkflowStore) -> list[dict[str, Any]]:
    """Ten workflows, one second apart: alternating owners, every third one completed."""
    docs = []
    for i in range(10):
        status = COMPLETED if i % 3 == 0 else RUNNING
        docs.append(new_doc(owner="alice" if i % 2 else "bob", now=T0 + i, status=status))
    await insert_all(store, docs[::-1])  # insertion order must not matter
    return docs


async def test_list_is_newest_first(store: WorkflowStore, listed: list[dict[str, Any]]) -> None:
    got = await store.list_workflows(owner=None, status=None, limit=100)
    assert ids(got) == newest_first(listed)
    assert got[0] == listed[-1]  # whole documents, exactly as written


async def test_list_filters_by_owner(store: WorkflowStore, listed: list[dict[str, Any]]) -> None:
    got = await store.list_workflows(owner="alice", status=None, limit=100)
    assert ids(got) == newest_first([d for d in listed if d["owner"] == "alice"])
    assert await store.list_workflows(owner="nobody", status=None, limit=100) == []


async def test_list_filters_by_status(store: WorkflowStore, listed: list[dict[str, Any]]) -> None:
    got = await store.list_workflows(owner=None, status=COMPLETED, limit=100)
    assert ids(got) == newest_first([d for d in listed if d["status"] == COMPLETED])
    assert await store.list_workflows(owner=None, status=FAILED, limit=100) == []


async def test_list_filters_by_owner_and_status(
    store: WorkflowStore, listed: list[dict[str, Any]]
) -> None:
    got = await store.list_workflows(owner="bob", status=COMPLETED, limit=100)
    expected = [d for d in listed if d["owner"] == "bob" and d["status"] == COMPLETED]
    assert len(expected) == 2
    assert ids(got) == newest_first(expected)


async def test_list_honours_limit(store: WorkflowStore, listed: list[dict[str, Any]]) -> None:
    assert (
        ids(await store.list_workflows(owner=None, status=None, limit=3))
        == newest_first(listed)[:3]
    )
    alice = newest_first([d for d in listed if d["owner"] == "alice"])
    assert ids(await store.list_workflows(owner="alice", status=None, limit=2)) == alice[:2]
    assert await store.list_workflows(owner=None, status=None, limit=0) == []


async def test_list_before_is_strict(store: WorkflowStore, listed: list[dict[str, Any]]) -> None:
    order = newest_first(listed)
    by_id = {d["id"]: d for d in listed}
    pivot = by_id[order[3]]
    got = await store.list_workflows(owner=None, status=None, limit=100, before=cursor(pivot))
    assert ids(got) == order[4:]
    # a cursor that matches no stored workflow works as a position too
    between = (isoformat(T0 + 4.5), "")
    got = await store.list_workflows(owner=None, status=None, limit=100, before=between)
    assert ids(got) == newest_first([d for d in listed if d["created_at"] < between[0]])


def cursor(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["created_at"], doc["id"]


async def walk(
    store: WorkflowStore, owner: str | None, status: str | None, page_size: int
) -> list[str]:
    seen: list[str] = []
    before = None
    for _ in range(1000):
        page = await store.list_workflows(
            owner=owner, status=status, limit=page_size, before=before
        )
        assert len(page) <= page_size
        seen.extend(ids(page))
        if len(page) < page_size:
            return seen
        before = cursor(page[-1])
    raise AssertionError("pagination did not end")


@pytest.mark.parametrize("page_size", [1, 3, 4, 7, 100])
@pytest.mark.parametrize("spacing", [1.0, 0.000123], ids=["seconds", "microseconds"])
async def test_keyset_pagination_walks_every_page_without_gaps_or_duplicates(
    store: WorkflowStore, page_size: int, spacing: float
) -> None:
    # 23 workflows on only 4 distinct timestamps: pages must break inside runs of ties,
    # and (with microsecond spacing) inside one second.
    docs = []
    for i in range(23):
        docs.append(
            new_doc(
                owner=("alice", "bob", "carol")[i % 3],
                now=T0 + (i % 4) * spacing,
                status=FAILED if i % 4 == 0 else RUNNING,
            )
        )
    await insert_all(store, docs)
    assert len({d["created_at"] for d in docs}) == 4
    for owner, status in [(None, None), ("alice", None), (None, FAILED), ("bob", RUNNING)]:
        expected = newest_first(
            [
                d
                for d in docs
                if (owner is None or d["owner"] == owner)
                and (status is None or d["status"] == status)
            ]
        )
        seen = await walk(store, owner, status, page_size)
        assert len(seen) == len(set(seen)), "a workflow appeared on two pages"
        assert seen == expected, f"owner={owner} status={status}"


# -- search --------------------------------------------------------------------------------

APPAREL = Pipeline(
    (StepSpec("image_processing"), StepSpec("copy_review", kind=REVIEW)), name="apparel"
)


def product(name: str, category: str = "") -> dict[str, Any]:
    return {"name": name, "description": "", "images": [], "category": category, "metadata": {}}


@pytest.fixture
async def searched(store: WorkflowStore) -> list[dict[str, Any]]:
    """Workflows one second apart with names and categories to search, on two pipelines,
    one stored without a definition (it runs on the default)."""
    named = [
        ("Desk Lamp", "home"),
        ("Red dress", "Apparel"),
        ("LAMP shade", "lighting"),
        ("100% cotton_shirt", "apparel"),
        ('The "quoted" mug', "kitchen"),
        ("Back\\slash", "odd"),
        ("Ämter-Öl", "ünïcode"),
    ]
    docs = []
    for i, (name, category) in enumerate(named):
        pipeline = APPAREL if i % 2 else Pipeline()
        wf, _ = start(pipeline, "alice" if i < 5 else "bob", product(name, category), T0 + i)
        docs.append(wf.to_doc())
    del docs[0]["pipeline"]  # stored before workflows kept their definition
    await insert_all(store, docs)
    return docs


async def found(store: WorkflowStore, owner: str | None = None, **filters: Any) -> list[str]:
    return ids(
        await store.list_workflows(owner=owner, status=None, limit=100, filters=Filters(**filters))
    )


async def test_text_matches_part_of_the_name_or_category_in_any_case(
    store: WorkflowStore, searched: list[dict[str, Any]]
) -> None:
    d = [doc["id"] for doc in searched]
    assert await found(store, text="lamp") == [d[2], d[0]]
    assert await found(store, text="APPAREL") == [d[3], d[1]]  # the category
    assert await found(store, text="ss") == [d[1]]  # shorter than a trigram
    assert await found(store, text="e") == newest_first(
        [
            doc
            for doc in searched
            if "e" in (doc["product"]["name"] + doc["product"]["category"]).lower()
        ]
    )
    assert await found(store, text="nothing like it") == []
    assert await found(store, owner="bob", text="lamp") == []


async def test_text_is_literal_whatever_characters_it_holds(
    store: WorkflowStore, searched: list[dict[str, Any]]
) -> None:
    d = [doc["id"] for doc in searched]
    assert await found(store, text="0% c") == [d[3]]
    assert await found(store, text="%") == [d[3]]
    assert await found(store, text="_") == [d[3]]
    assert await found(store, text="n_s") == [d[3]]
    assert await found(store, text='"quoted"') == [d[4]]
    assert await found(store, text="k\\s") == [d[5]]
    assert await found(store, text=".*") == []
    assert await found(store, text="mter-ö") == [d[6]]


async def test_pipeline_names_the_pipeline_and_the_default_takes_workflows_without_one(
    store: WorkflowStore, searched: list[dict[str, Any]]
) -> None:
    by_pipeline = {
        name: newest_first(
            [doc for doc in searched if doc.get("pipeline", {"name": "default"})["name"] == name]
        )
        for name in ("default", "apparel")
    }
    assert len(by_pipeline["default"]) == 4 and len(by_pipeline["apparel"]) == 3
    assert await found(store, pipeline="default") == by_pipeline["default"]
    assert await found(store, pipeline="apparel") == by_pipeline["apparel"]
    assert await found(store, pipeline="other") == []


async def test_created_after_is_inclusive_and_created_before_exclusive(
    store: WorkflowStore, searched: list[dict[str, Any]]
) -> None:
    d = [doc["id"] for doc in searched]
    after, before = isoformat(T0 + 2), isoformat(T0 + 5)
    assert await found(store, created_after=after, created_before=before) == [d[4], d[3], d[2]]
    assert await found(store, created_after=isoformat(T0 + 6)) == [d[6]]
    assert await found(store, created_before=isoformat(T0 + 1)) == [d[0]]


@pytest.mark.parametrize("page_size", [1, 2, 5])
async def test_pages_of_a_filtered_list_have_no_gaps_or_duplicates(
    store: WorkflowStore, page_size: int
) -> None:
    docs = []
    for i in range(17):  # on 3 distinct timestamps: pages break inside runs of ties
        name = ("Lamp", "Chair", "lamp post")[i % 3]
        wf, _ = start(APPAREL if i % 2 else Pipeline(), "alice", product(name), T0 + i % 3)
        docs.append(wf.to_doc())
    await insert_all(store, docs)
    filters = Filters(text="lamp", pipeline="default", created_after=isoformat(T0))
    expected = newest_first(
        [
            d
            for d in docs
            if "lamp" in d["product"]["name"].lower() and d["pipeline"]["name"] == "default"
        ]
    )
    seen: list[str] = []
    before = None
    while True:
        page = await store.list_workflows(
            owner="alice", status=None, limit=page_size, before=before, filters=filters
        )
        seen.extend(ids(page))
        if len(page) < page_size:
            break
        before = cursor(page[-1])
    assert seen == expected and len(expected) >= 4


# -- timers and outbox -------------------------------------------------------------------------


async def test_due_returns_only_workflows_whose_wake_at_has_come(store: WorkflowStore) -> None:
    now = isoformat(T0 + 100)
    past = new_doc(wake_at=isoformat(T0 + 1))
    exactly_now = new_doc(wake_at=now)
    just_after = new_doc(wake_at=isoformat(T0 + 100.000001))
    future = new_doc(wake_at=isoformat(T0 + 3600))
    never = new_doc(wake_at=None, status=COMPLETED)
    await insert_all(store, [past, exactly_now, just_after, future, never])

    got = await store.due(now, 100)
    assert sorted(ids(got)) == sorted([past["id"], exactly_now["id"]])
    assert {d["id"]: d for d in got}[past["id"]] == past
    assert len(await store.due(now, 1)) == 1
    assert await store.due(now, 0) == []
    assert await store.due(isoformat(T0), 100) == []
    # a far-future `now` still never returns the workflow without a wake_at
    assert never["id"] not in ids(await store.due("9999-12-31T23:59:59.999999Z", 100))


async def test_due_follows_replace(store: WorkflowStore) -> None:
    doc = new_doc(wake_at=isoformat(T0 + 10))
    await store.insert(doc)
    now = isoformat(T0 + 20)
    assert ids(await store.due(now, 10)) == [doc["id"]]
    done = dict(doc, wake_at=None, status=COMPLETED, version=doc["version"] + 1)
    assert await store.replace(done, doc["version"], [])
    assert await store.due(now, 10) == []


async def test_unpublished_returns_only_outboxes_written_by_then(store: WorkflowStore) -> None:
    cutoff = isoformat(T0 + 100)
    old = new_doc(now=T0 + 1)  # its events were written when it was made
    at_cutoff = new_doc(now=T0 + 100)
    fresh = new_doc(now=T0 + 101)
    published = new_doc(outbox_at=None, outbox=[])
    await insert_all(store, [old, at_cutoff, fresh, published])

    got = await store.unpublished(cutoff, 100)
    assert sorted(ids(got)) == sorted([old["id"], at_cutoff["id"]])
    assert {d["id"]: d for d in got}[old["id"]] == old
    assert len(await store.unpublished(cutoff, 1)) == 1
    assert await store.unpublished(cutoff, 0) == []
    assert published["id"] not in ids(await store.unpublished("9999-12-31T23:59:59Z", 100))

    sent = [e["message_id"] for e in old["outbox"]]
    store.drop_published(old["id"], old["version"], sent, [])
    await store.flush()
    assert ids(await store.unpublished(cutoff, 100)) == [at_cutoff["id"]]


async def test_outbox_backlog_counts_workflows_with_events_and_names_the_oldest(
    store: WorkflowStore,
) -> None:
    assert await store.outbox_backlog() == (0, None)
    old, fresh = new_doc(now=T0 + 1), new_doc(now=T0 + 50)
    await insert_all(store, [fresh, old, new_doc(outbox_at=None, outbox=[])])
    assert await store.outbox_backlog() == (2, old["outbox"][0]["created_at"])

    sent = [e["message_id"] for e in old["outbox"]]
    store.drop_published(old["id"], old["version"], sent, [])
    await store.flush()
    assert await store.outbox_backlog() == (1, fresh["outbox"][0]["created_at"])


# -- documents -----------------------------------------------------------------------------------


async def test_unicode_and_nested_metadata_round_trip_exactly(store: WorkflowStore) -> None:
    product = {
        "name": 'Café ☕ «déjà vu» 日本語 🚀 "quoted" \\ back\\slash',
        "description": "line one\nline two\ttabbed\r\n\u00a0nbsp \u2028 sep \x00 nul",
        "images": ["https://例え.jp/画像.png", ""],
        "category": "ünïcödé",
        "price": 1234.56,
        "metadata": {
            "nested": {"deeper": {"deepest": [1, 2.5, -3, True, False, None, "x"]}},
            "empty_dict": {},
            "empty_list": [],
            "mixed": [{"a": 1}, [1, [2, [3]]], "🙂"],
            "big": 2**53,
            "negative": -(2**40),
            "tiny": 1e-7,
            "tenth": 0.1,
            "zero": 0,
            "Ключ": "значение",
            "emoji 🔑": "value",
        },
    }
    doc = new_doc(owner="ütf-8 öwner ✓", product=product)
    expected = copy.deepcopy(doc)
    await store.insert(doc)
    assert await store.get(doc["id"]) == expected
    assert await store.list_workflows(owner="ütf-8 öwner ✓", status=None, limit=5) == [expected]

    updated = copy.deepcopy(expected)
    updated["version"] += 1
    updated["steps"][0]["result"] = {"nested": product["metadata"], "added": {"ß": ["ẞ"]}}
    assert await store.replace(updated, expected["version"], [])
    assert await store.get(doc["id"]) == updated


# -- health ----------------------------------------------------------------------------------------


async def test_ping(store: WorkflowStore) -> None:
    await store.ping()


async def test_a_closed_store_raises_store_error(store_url: str) -> None:
    opened = make_store(store_url)
    await opened.open()
    await opened.open()  # idempotent
    await opened.ping()
    await opened.close()
    with pytest.raises(StoreError):
        await opened.ping()
    with pytest.raises(StoreError):
        await opened.get("x")
    await opened.close()  # idempotent


# -- SQLite only -----------------------------------------------------------------------------------


async def test_sqlite_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "stox.db"  # parent directories are made
    url = f"sqlite:///{path}"
    first = SQLiteStore.from_url(url)
    await first.open()
    doc = new_doc()
    await first.insert(doc)
    updated = dict(doc, version=doc["version"] + 1, status=COMPLETED)
    assert await first.replace(updated, doc["version"], [])
    await first.close()

    assert path.is_file()
    second = SQLiteStore.from_url(url)
    await second.open()
    try:
        assert await second.get(doc["id"]) == updated
        assert ids(await second.list_workflows(owner="alice", status=COMPLETED, limit=5)) == [
            doc["id"]
        ]
        with pytest.raises(AlreadyExists):
            await second.insert(doc)
    finally:
        await second.close()


async def test_sqlite_file_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "stox.db"
    store = SQLiteStore.from_url(f"sqlite:///{path}")
    await store.open()
    try:
        await store.insert(new_doc())
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            columns = {row[1] for row in conn.execute("PRAGMA table_info(workflows)")}
            assert {"id", "owner", "status", "created_at", "version", "wake_at"} <= columns
            assert {"doc", "product"} <= columns
            assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 3
        finally:
            conn.close()
    finally:
        await store.close()


async def test_sqlite_memory_database_keeps_its_data() -> None:
    store = SQLiteStore.from_url("sqlite://:memory:")
    await store.open()
    try:
        doc = new_doc()
        await store.insert(doc)
        await store.ping()
        assert await store.get(doc["id"]) == doc
        assert ids(await store.list_workflows(owner=None, status=None, limit=5)) == [doc["id"]]
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///stox.db", "stox.db"),
        ("sqlite:///data/dir/stox.db", "data/dir/stox.db"),
        ("sqlite:////var/lib/stox/stox.db", "/var/lib/stox/stox.db"),
        ("sqlite://:memory:", ":memory:"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_sqlite_url_paths(url: str, path: str) -> None:
    assert SQLiteStore.from_url(url).path == path
    assert isinstance(make_store(url), SQLiteStore)


@pytest.mark.parametrize("url", ["sqlite:", "sqlite://", "sqlite:///", "sqlite://host/x.db"])
def test_sqlite_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        make_store(url)


# -- MongoDB only (no server needed) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "database"),
    [
        ("mongodb://localhost", "stox"),
        ("mongodb://localhost/", "stox"),
        ("mongodb://localhost:27017/shop", "shop"),
        ("mongodb://u:p@a:1,b:2/shop?replicaSet=rs0", "shop"),
        ("mongodb://a:1,b:2/?replicaSet=rs0", "stox"),
        ("mongodb+srv://cluster.example.com/prod?retryWrites=true", "prod"),
    ],
)
def test_mongo_database_from_url(url: str, database: str) -> None:
    assert database_from_url(url) == database
    assert isinstance(make_store(url), MongoStore)


async def test_mongo_unreachable_server_raises_store_error() -> None:
    port = free_port()
    store = MongoStore.from_url(f"mongodb://127.0.0.1:{port}/x?serverSelectionTimeoutMS=200")
    with pytest.raises(StoreError):
        await store.open()
    with pytest.raises(StoreError):
        await store.ping()
    await store.close()
    # PyMongo 4.20's monitor leaves the socket of a refused connection to the garbage
    # collector; collect it here, where that is expected, rather than in some later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.mark.mongo
async def test_mongo_writes_and_reads_with_majority_concerns(mongo_url: str) -> None:
    """Whatever the URL asks for (here w=1 and read concern local), both collections write
    with w=majority, j=true and read with read concern majority (see stox/store/mongo.py)."""
    url = f"{mongo_url}?w=1&readConcernLevel=local"
    for made in (MongoStore.from_url(url), MongoUserStore.from_url(url)):
        await made.open()
        try:
            collection = made._col()
            assert collection.write_concern == WriteConcern(w="majority", j=True)
            assert collection.write_concern.acknowledged
            assert collection.read_concern == ReadConcern("majority")
        finally:
            await made.close()
    store = MongoStore.from_url(url)  # and the server takes them: a CAS round trip
    await store.open()
    try:
        doc = new_doc()
        await store.insert(doc)
        changed = {**doc, "version": 2, "status": COMPLETED}
        assert await store.replace(changed, 1, []) > 0
        assert await store.replace(changed, 1, []) == 0
        assert (await store.get(doc["id"]) or {})["version"] == 2
    finally:
        await store.close()


# -- steps running workflows still need ------------------------------------------------------


async def test_steps_in_use_names_the_unfinished_steps_of_running_workflows(
    store: WorkflowStore,
) -> None:
    assert await store.steps_in_use() == {}
    fresh = new_doc()  # its first step dispatched, the other two pending
    halfway = new_doc()
    halfway["steps"][0]["status"] = COMPLETED
    done = new_doc(status=COMPLETED)
    for step in done["steps"]:
        step["status"] = COMPLETED
    failed = new_doc(status=FAILED)
    for doc in (fresh, halfway, done, failed):
        await store.insert(doc)

    in_use = await store.steps_in_use()
    assert {name: sorted(ids) for name, ids in in_use.items()} == {
        "image_processing": [fresh["id"]],
        "ai_enhancement": sorted([fresh["id"], halfway["id"]]),
        "seo_generation": sorted([fresh["id"], halfway["id"]]),
    }


async def test_sqlite_writes_committed_together_fail_alone(tmp_path: Path) -> None:
    """Writes queued at once share one commit; one that fails (its id taken) undoes only
    itself, and every caller hears its own outcome."""
    store = SQLiteStore(str(tmp_path / "stox.db"))
    await store.open()
    try:
        taken = new_doc()
        await store.insert(taken)
        others = [new_doc() for _ in range(20)]
        outcomes = await asyncio.gather(
            *(store.insert(doc) for doc in others[:10]),
            store.insert(taken),
            *(store.insert(doc) for doc in others[10:]),
            return_exceptions=True,
        )
        assert [type(o) for o in outcomes].count(AlreadyExists) == 1
        assert isinstance(outcomes[10], AlreadyExists)
        for doc in others:
            assert await store.get(doc["id"]) == doc
    finally:
        await store.close()


LAYOUT_0 = (
    """CREATE TABLE workflows (id TEXT PRIMARY KEY, owner TEXT, status TEXT, created_at TEXT,
    version INTEGER, wake_at TEXT NULL, outbox_at TEXT NULL, doc TEXT)""",
    "CREATE INDEX idx_workflows_owner ON workflows (owner, created_at, id)",
    "CREATE INDEX idx_workflows_status ON workflows (status, created_at, id)",
    "CREATE INDEX idx_workflows_created ON workflows (created_at, id)",
    "CREATE INDEX idx_workflows_wake_at ON workflows (wake_at)",
    "CREATE INDEX idx_workflows_outbox_at ON workflows (outbox_at)",
)


async def test_a_file_of_the_earlier_layout_is_moved_to_the_new_one_once(tmp_path: Path) -> None:
    """Version 0.1 kept each whole document, outbox and product included, in `doc`."""
    path = tmp_path / "stox.db"
    pending = legacy_doc(now=T0 + 1)
    sent = legacy_doc(status=COMPLETED, outbox=[], outbox_at=None, wake_at=None)
    conn = sqlite3.connect(path)
    for statement in LAYOUT_0:
        conn.execute(statement)
    for doc in (pending, sent):
        conn.execute(
            "INSERT INTO workflows VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                *(doc["id"], doc["owner"], doc["status"], doc["created_at"], doc["version"]),
                *(doc["wake_at"], doc["outbox_at"], json.dumps(doc)),
            ),
        )
    conn.commit()
    conn.close()

    for _ in range(2):  # the second open finds nothing left to move
        store = SQLiteStore(str(path))
        await store.open()
        try:
            assert await store.get(pending["id"]) == pending
            assert await store.get(sent["id"]) == sent
            assert ids(await store.unpublished(isoformat(T0 + 10), 10)) == [pending["id"]]
            after, new_events = advanced(pending)
            assert await store.replace(after, pending["version"], new_events)
            assert await store.get(pending["id"]) == after
            pending = after
        finally:
            await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == LAYOUT
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(workflows)")}
        assert "idx_workflows_outbox_at" not in indexes
        assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == len(pending["outbox"])
    finally:
        conn.close()


def write_layout(path: Path, layout: int, old: dict[str, Any], key_columns: str = "") -> None:
    """A file of `layout` 1 (no key columns) or 2 (`key_columns`) holding `old`."""
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE workflows (id TEXT PRIMARY KEY, owner TEXT, status TEXT, created_at TEXT,"
        f" version INTEGER, wake_at TEXT NULL, doc TEXT, product TEXT{key_columns})"
    )
    state = {k: v for k, v in old.items() if k not in ("product", "outbox", "outbox_at")}
    row = (
        *(old["id"], old["owner"], old["status"], old["created_at"], old["version"]),
        *(old["wake_at"], json.dumps(state), json.dumps(old["product"])),
    )
    columns = "id, owner, status, created_at, version, wake_at, doc, product"
    conn.execute(f"INSERT INTO workflows ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
    conn.execute(f"PRAGMA user_version = {layout}")
    conn.commit()
    conn.close()


async def test_a_file_of_layout_2_gets_a_pipeline_column_its_workflows_none(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stox.db"
    old = legacy_doc()
    key_columns = ", idem_key TEXT NULL, idem_hash TEXT NULL, idem_expires TEXT NULL"
    write_layout(path, 2, old, key_columns)
    store = SQLiteStore(str(path))
    await store.open()
    try:
        assert await store.get(old["id"]) == dict(old, outbox=[], outbox_at=None)
        new = new_doc()
        await store.insert(new)
        assert await store.get(new["id"]) == new
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        # the definition in a column of its own, written once: not in the state rewritten
        text, definition = conn.execute(
            "SELECT doc, pipeline FROM workflows WHERE id = ?", (new["id"],)
        ).fetchone()
        assert "pipeline" not in json.loads(text)
        assert json.loads(definition) == new["pipeline"]
    finally:
        conn.close()


async def test_a_file_of_layout_1_takes_idempotency_keys(tmp_path: Path) -> None:
    """Layout 1 had no key columns: they are added on open, and its workflows hold none."""
    path = tmp_path / "stox.db"
    old = legacy_doc()
    write_layout(path, 1, old)
    store = SQLiteStore(str(path))
    await store.open()
    try:
        assert await store.get(old["id"]) == dict(old, outbox=[], outbox_at=None)
        keyed = new_doc()
        await store.insert(keyed, None, held())
        assert await store.keyed("alice", "order-1") == (keyed, held())
        with pytest.raises(KeyTaken):
            await store.insert(new_doc(), None, held())
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == LAYOUT == 3
    finally:
        conn.close()


async def test_drops_of_a_turn_survive_a_write_of_their_batch_that_fails(tmp_path: Path) -> None:
    """SQLite runs a failed batch again write by write: the drops waiting in it (one statement
    for all of them) run again too, and the failing write undoes only itself."""
    store = SQLiteStore(str(tmp_path / "stox.db"))
    await store.open()
    try:
        first, second = new_doc(), new_doc()
        await insert_all(store, [first, second])
        for doc in (first, second):
            store.drop_published(
                doc["id"], doc["version"], [e["message_id"] for e in doc["outbox"]], []
            )
        with pytest.raises(AlreadyExists):
            await store.insert(first)  # in the same batch as the drops, and it fails
        for doc in (first, second):
            stored = await store.get(doc["id"])
            assert stored is not None and stored["outbox"] == []
    finally:
        await store.close()


async def test_writes_of_turns_within_a_commit_interval_share_one_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit right after another waits out COMMIT_INTERVAL, and carries the writes queued
    meanwhile, from several turns of the loop, in one transaction."""
    from support import Calls

    from stox.store import sqlite_db

    # long enough that a slow or busy host still queues all three within it
    monkeypatch.setattr(sqlite_db, "COMMIT_INTERVAL", 0.05)
    store = SQLiteStore(str(tmp_path / "stox.db"))
    await store.open()
    try:
        await store.insert(new_doc())  # a commit just now
        transactions = Calls(monkeypatch, sqlite_db, "_together")
        loop = asyncio.get_running_loop()
        started = loop.time()
        docs = [new_doc() for _ in range(3)]
        writes = []
        for doc in docs:  # each in a turn of its own
            writes.append(asyncio.ensure_future(store.insert(doc)))
            await asyncio.sleep(0)
        await asyncio.gather(*writes)
        assert transactions.count == 1
        assert loop.time() - started >= sqlite_db.COMMIT_INTERVAL * 0.5
        assert [await store.get(doc["id"]) for doc in docs] == docs
    finally:
        await store.close()


async def test_connections_to_one_file_share_one_checkpointer(tmp_path: Path) -> None:
    from stox.store.sqlite import SQLiteUserStore

    path = str(tmp_path / "stox.db")
    workflows, users = SQLiteStore(path), SQLiteUserStore(path)
    await workflows.open()
    await users.open()
    try:
        first, second = workflows._checkpointer, users._checkpointer
        assert first is second and first is not None and first.is_alive()
    finally:
        await users.close()
        assert first is not None and first.is_alive(), (
            "still checkpointing for the other connection"
        )
        await workflows.close()
    assert not first.is_alive()
