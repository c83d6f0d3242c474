"""POST /api/v1/workflow/bulk on a real gateway: retry or cancel by ids or by filter,
owner-scoped (an admin: anyone's), bounded per call with a cursor to go on, and an answer
per workflow saying what happened."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import CANCEL, RunningGateway, assert_error, report, running_gateway

from stox.schemas import BULK_LIMIT

BULK = "/api/v1/workflow/bulk"


async def fail(gw: RunningGateway, workflow_id: str) -> None:
    """Report the workflow's first step failed until it fails (three attempts, no backoff)."""
    for _ in range(10):
        status = await gw.fetch(
            "GET",
            f"/api/v1/workflow/status?workflow_id={workflow_id}",
            token=gw.token("root", role="admin"),
        )
        if status.body["status"] == "failed":
            return
        step = status.body["steps"][status.body["current_step"]]
        await report(gw, workflow_id, step, success=False)
    raise AssertionError("the workflow did not fail")


def by_id(answer: Any) -> dict[str, tuple[str, str | None]]:
    return {r["workflow_id"]: (r["outcome"], r["status"]) for r in answer.body["results"]}


@pytest.fixture
async def gw(tmp_path: Path) -> Any:
    def no_backoff(settings: Any) -> None:
        for step in settings.pipeline.steps:
            step.backoff = type(step.backoff)(0)

    async with running_gateway(tmp_path, configure=no_backoff) as gateway:
        yield gateway


async def test_retry_by_ids_says_per_workflow_what_happened(gw: RunningGateway) -> None:
    alice = gw.token()
    failed = [await gw.upload(alice, name=f"failing {i}") for i in range(2)]
    for workflow_id in failed:
        await fail(gw, workflow_id)
    running = await gw.upload(alice, name="running")
    bobs = await gw.upload(gw.token("bob"), name="bob's")
    missing = "0" * 32

    answer = await gw.fetch(
        "POST",
        BULK,
        {"action": "retry", "ids": [*failed, running, bobs, missing, failed[0]]},
        token=alice,
    )

    assert answer.status == 200 and answer.body["action"] == "retry"
    assert answer.body["next_cursor"] is None
    results = by_id(answer)
    assert [r["workflow_id"] for r in answer.body["results"]] == [*failed, running, bobs, missing]
    assert results[failed[0]] == ("retried", "running") and results[failed[1]] == (
        "retried",
        "running",
    )
    assert results[running] == ("not_allowed", None)
    assert "only a failed workflow" in answer.body["results"][2]["message"]
    assert results[bobs] == ("not_found", None) and results[missing] == ("not_found", None)


async def test_cancel_all_running_by_filter_and_an_admin_acts_on_everyones(
    gw: RunningGateway,
) -> None:
    alice, bob = gw.token(), gw.token("bob")
    mine = [await gw.upload(alice, name=f"a{i}") for i in range(3)]
    theirs = await gw.upload(bob, name="b")
    await gw.fetch("POST", CANCEL, {"workflow_id": mine[0]}, token=alice)

    answer = await gw.fetch(
        "POST", BULK, {"action": "cancel", "filter": {"status": "running"}}, token=alice
    )
    assert by_id(answer) == {
        mine[2]: ("cancelled", "cancelled"),
        mine[1]: ("cancelled", "cancelled"),
    }

    admin = gw.token("root", role="admin")
    answer = await gw.fetch(
        "POST", BULK, {"action": "cancel", "filter": {"status": "running"}}, token=admin
    )
    assert by_id(answer) == {theirs: ("cancelled", "cancelled")}


async def test_a_filter_selects_at_most_the_bound_and_the_cursor_goes_on(
    gw: RunningGateway,
) -> None:
    alice = gw.token()
    ids = [await gw.upload(alice, name=f"p{i}") for i in range(BULK_LIMIT + 5)]
    seen: list[str] = []
    body: dict[str, Any] = {"action": "retry", "filter": {"status": "running"}}
    for _ in range(5):
        answer = await gw.fetch("POST", BULK, body, token=alice)
        assert len(answer.body["results"]) <= BULK_LIMIT
        assert {r["outcome"] for r in answer.body["results"]} == {"not_allowed"}
        seen.extend(r["workflow_id"] for r in answer.body["results"])
        if answer.body["next_cursor"] is None:
            break
        body = {**body, "cursor": answer.body["next_cursor"]}
    assert seen == ids[::-1]  # newest first, each once, though none changed status


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ids": ["0" * 32]}, "action"),
        ({"action": "delete", "ids": ["0" * 32]}, "action"),
        ({"action": "retry"}, "ids"),
        ({"action": "retry", "ids": ["0" * 32], "filter": {}}, "ids"),
        ({"action": "retry", "ids": []}, "ids"),
        ({"action": "retry", "ids": ["0" * 32] * (BULK_LIMIT + 1)}, "ids"),
        ({"action": "retry", "ids": ["not-hex"]}, "ids"),
        ({"action": "retry", "filter": {"status": "lost"}}, "filter"),
        ({"action": "retry", "filter": {"colour": "red"}}, "filter"),
        ({"action": "retry", "ids": ["0" * 32], "cursor": "x"}, "cursor"),
        ({"action": "retry", "filter": {}, "cursor": "not a cursor"}, "cursor"),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(
    gw: RunningGateway, body: dict[str, Any], field: str
) -> None:
    assert_error(await gw.fetch("POST", BULK, body, token=gw.token()), 400, "invalid_input", field)


async def test_services_may_not_and_anonymous_callers_are_401(gw: RunningGateway) -> None:
    body = {"action": "retry", "ids": ["0" * 32]}
    assert (await gw.fetch("POST", BULK, body, token=gw.service_token())).status == 403
    assert (await gw.fetch("POST", BULK, body)).status == 401
