"""A workflow's history: an entry per change, written in the transition's own write (no
extra store write), bounded per workflow with a count of what was dropped, on both stores,
served by GET /api/v1/workflow/history to the owner or an admin."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support import CANCEL, RETRY, STATUS, Calls, RunningGateway, report, running_gateway

import settings as settings_module
from stox import workflow as w

HISTORY = "/api/v1/workflow/history"


def one_attempt_no_backoff(limit: int = 100) -> Any:
    def configure(settings: settings_module.Settings) -> None:
        settings.storage.history_limit = limit
        for step in settings.pipeline.steps:
            step.max_attempts = 2
            step.backoff = settings_module.Duration(0)

    return configure


@pytest.fixture(params=["sqlite", "mongodb"])
async def gw(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    overrides: dict[str, Any] = {}
    if request.param == "mongodb":
        overrides["storage__url"] = request.getfixturevalue("mongo_url")
    async with running_gateway(tmp_path, configure=one_attempt_no_backoff(), **overrides) as g:
        yield g


async def document(gw: RunningGateway, workflow_id: str) -> dict[str, Any]:
    answer = await gw.fetch("GET", f"{STATUS}?workflow_id={workflow_id}", token=gw.token())
    body: dict[str, Any] = answer.body
    return body


async def history(gw: RunningGateway, workflow_id: str, token: str | None = None) -> Any:
    return await gw.fetch("GET", f"{HISTORY}?workflow_id={workflow_id}", token=token or gw.token())


async def test_each_change_is_recorded_with_who_caused_it(gw: RunningGateway) -> None:
    workflow_id = await gw.upload(gw.token())
    doc = await document(gw, workflow_id)
    await report(gw, workflow_id, doc["steps"][0], success=False, error="disk full")
    doc = await document(gw, workflow_id)
    await report(gw, workflow_id, doc["steps"][0], success=False, error="disk full again")
    await gw.fetch("POST", RETRY, {"workflow_id": workflow_id}, token=gw.token())
    await gw.fetch("POST", CANCEL, {"workflow_id": workflow_id}, token=gw.token())

    answer = await history(gw, workflow_id)

    assert answer.status == 200 and answer.body["dropped"] == 0
    entries = answer.body["entries"]
    assert [(e["event"], e.get("step"), e.get("attempt"), e["by"]) for e in entries] == [
        ("workflow_started", None, None, "user:alice"),
        ("step_dispatched", "image_processing", 1, "user:alice"),
        ("step_retrying", "image_processing", 1, "service:worker"),
        ("step_dispatched", "image_processing", 2, "service:worker"),
        ("step_failed", "image_processing", 2, "service:worker"),
        ("workflow_failed", None, None, "service:worker"),
        ("step_dispatched", "image_processing", 1, "user:alice"),
        ("workflow_cancelled", None, None, "user:alice"),
    ]
    assert entries[2]["error"] == "disk full" and entries[4]["error"] == "disk full again"
    assert all(e["at"] <= later["at"] for e, later in itertools.pairwise(entries))
    assert "history" not in await document(gw, workflow_id)  # not in the document clients get


async def test_the_owner_and_an_admin_read_it_others_get_404(gw: RunningGateway) -> None:
    workflow_id = await gw.upload(gw.token())
    assert (await history(gw, workflow_id, gw.token("bob"))).status == 404
    assert (await history(gw, workflow_id, gw.token("root", role="admin"))).status == 200
    assert (await history(gw, "0" * 32)).status == 404
    assert (await history(gw, "nope")).status == 400
    assert (await history(gw, workflow_id, gw.service_token())).status == 403


async def test_the_history_rides_in_the_transitions_own_write(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = gw.gateway.store
    writes = [Calls(monkeypatch, store, name) for name in ("insert", "replace")]
    workflow_id = await gw.upload(gw.token())
    for index in range(3):
        doc = await document(gw, workflow_id)
        await report(gw, workflow_id, doc["steps"][index])
    await gw.gateway.orchestrator.drain()
    assert [calls.count for calls in writes] == [1, 3]  # as without a history
    entries = (await history(gw, workflow_id)).body["entries"]
    assert [e["event"] for e in entries][-2:] == ["step_completed", "workflow_completed"]


async def test_only_the_newest_entries_are_kept_and_the_rest_counted(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, configure=one_attempt_no_backoff(limit=3)) as gw:
        workflow_id = await gw.upload(gw.token())
        for index in range(3):
            doc = await document(gw, workflow_id)
            await report(gw, workflow_id, doc["steps"][index])
        body = (await history(gw, workflow_id)).body
        # started, dispatched, then completed + dispatched twice, completed + workflow_completed
        assert body["dropped"] == 8 - 3
        assert [e["event"] for e in body["entries"]] == [
            "step_dispatched",
            "step_completed",
            "workflow_completed",
        ]


def test_record_keeps_the_newest_and_counts_the_dropped() -> None:
    wf, changes = w.start(w.Pipeline(), "alice", {"name": "Mug"}, 1_700_000_000.0)
    w.record(wf, [w.Change(w.STARTED), *changes], "user:alice", limit=1)
    assert [w.history_entry(e) for e in wf.history] == [
        {
            "at": wf.updated_at,
            "version": 1,
            "event": "step_dispatched",
            "by": "user:alice",
            "step": "image_processing",
            "attempt": 1,
        }
    ]
    assert wf.history_dropped == 1
    assert w.Workflow.from_doc(wf.to_doc()) == wf


def test_entries_are_read_back_with_their_error_and_detail_and_older_ones_as_they_were() -> None:
    wf, changes = w.start(w.Pipeline(), "alice", {"name": "Mug"}, 1_700_000_000.0)
    w.record(wf, [w.Change(w.STARTED), *changes], "user:alice", limit=10)
    step = wf.steps[0]
    step.attempts.append({"attempt": 1, "error": "disk full", "outcome": "failed"})
    w.record(wf, [w.Change("step_failed", step.name)], "service:img", limit=10)
    hook = {"url": "https://hooks.example/x", "delivery": "d1", "error": "HTTP 500"}
    w.record(wf, [w.Change("webhook_retrying")], "webhooks", limit=10, detail=hook)
    older = {"at": wf.updated_at, "version": 1, "event": "step_dispatched", "by": "sweeper"}
    wf.history.append(older)  # as a gateway before compact entries stored it
    entries = [w.history_entry(e) for e in wf.history]
    base = {"at": wf.updated_at, "version": 1}
    assert entries == [
        {**base, "event": "workflow_started", "by": "user:alice"},
        {**base, "event": "step_dispatched", "by": "user:alice", "step": step.name, "attempt": 1},
        {**base, "event": "step_failed", "by": "service:img", "step": step.name, "attempt": 1}
        | {"error": "disk full"},
        {**base, "event": "webhook_retrying", "by": "webhooks", **hook},
        older,
    ]
