"""The HTTP API (docs/architecture.md#the-http-api) against a real gateway (SQLite, in-process bus).

Every test talks to the gateway over HTTP as clients and services do, and checks answers,
the error shape, and what was stored.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import (
    CANCEL,
    COMPLETED,
    HEX32,
    LIST,
    RETRY,
    STATUS,
    UPLOAD,
    RunningGateway,
    assert_error,
    eventually,
    report,
    running_gateway,
)

import settings as settings_module
from stox.bus.base import Event
from stox.orchestrator import Contention, NotFound
from stox.schemas import MAX_JSON_DEPTH
from stox.store import StoreError
from stox.workflow import NotAllowed, StaleReport

STEPS = ["image_processing", "ai_enhancement", "seo_generation"]


# -- fixtures and helpers ------------------------------------------------------------------


def configure_steps(**changes: Any) -> Callable[[settings_module.Settings], None]:
    """A `configure` hook that sets the same fields on every pipeline step."""

    def configure(settings: settings_module.Settings) -> None:
        for step in settings.pipeline.steps:
            for name, value in changes.items():
                current = getattr(step, name)
                kind = settings_module.Duration if current is None else type(current)
                setattr(step, name, kind(value))

    return configure


async def stored(gw: RunningGateway, workflow_id: str) -> dict[str, Any]:
    """The stored document once background publishing has settled."""
    await gw.gateway.orchestrator.drain()
    doc = await gw.gateway.store.get(workflow_id)
    assert doc is not None
    return doc


def durable(doc: dict[str, Any]) -> dict[str, Any]:
    """The part of a document a rejected or duplicate report must not change."""
    keys = ("status", "steps", "current_step", "product", "owner", "wake_at")
    return {key: doc[key] for key in keys}


async def status_of(gw: RunningGateway, workflow_id: str, token: str) -> dict[str, Any]:
    response = await gw.fetch("GET", f"{STATUS}?workflow_id={workflow_id}", token=token)
    assert response.status == 200, response.body
    return dict(response.body)


class Spy:
    """Collects the events the gateway publishes under some binding keys."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    @classmethod
    async def on(cls, gw: RunningGateway, *bindings: str) -> Spy:
        spy = cls()
        queue = f"test.spy.{id(spy)}"

        async def handler(event: Event) -> None:
            spy.events.append(event)

        await gw.gateway.bus.declare(queue, list(bindings))
        await gw.gateway.bus.consume(queue, handler)
        return spy

    def keys(self) -> list[str]:
        return [event.routing_key for event in self.events]

    async def wait_for(self, count: int) -> None:
        await eventually(lambda: len(self.events), lambda n: n >= count, within=5)


# -- upload and status ---------------------------------------------------------------------


async def test_upload_is_accepted_and_dispatches_the_first_step(gw: RunningGateway) -> None:
    spy = await Spy.on(gw, "workflow.start", "step.*")
    product = {
        "name": "Mug",
        "description": "blue",
        "images": ["https://img.example/1.png"],
        "category": "kitchen",
        "price": 9.5,
        "metadata": {"sku": "M-1"},
    }
    response = await gw.fetch("POST", UPLOAD, product, token=gw.token("alice"))

    assert response.status == 202
    assert set(response.body) == {"workflow_id", "status", "message"}
    assert HEX32.match(response.body["workflow_id"])
    assert response.body["status"] == "running"
    assert isinstance(response.body["message"], str) and response.body["message"]

    doc = await stored(gw, response.body["workflow_id"])
    assert doc["owner"] == "alice"
    assert doc["status"] == "running"
    assert doc["product"] == product
    assert [s["name"] for s in doc["steps"]] == STEPS
    assert [s["status"] for s in doc["steps"]] == ["dispatched", "pending", "pending"]
    assert doc["steps"][0]["attempt"] == 1 and HEX32.match(doc["steps"][0]["step_id"])
    assert doc["outbox"] == []  # published and confirmed

    await spy.wait_for(2)
    assert spy.keys() == ["workflow.start", "step.image_processing"]
    dispatch = spy.events[1].payload
    assert dispatch["step_id"] == doc["steps"][0]["step_id"]
    assert dispatch["product"] == product
    assert dispatch["reply_to"]["http"].endswith(COMPLETED)


async def test_upload_fills_in_optional_product_fields(gw: RunningGateway) -> None:
    workflow_id = await gw.upload(gw.token())
    doc = await stored(gw, workflow_id)
    assert doc["product"] == {
        "name": "Mug",
        "description": "",
        "images": [],
        "category": "",
        "price": None,
        "metadata": {},
    }


async def test_status_returns_the_workflow_without_its_outbox(gw: RunningGateway) -> None:
    token = gw.token("alice")
    workflow_id = await gw.upload(token, price=3)
    body = await status_of(gw, workflow_id, token)

    assert "outbox" not in body
    assert body["id"] == workflow_id
    assert body["owner"] == "alice"
    assert body["status"] == "running"
    assert body["current_step"] == 0
    assert body["product"]["name"] == "Mug" and body["product"]["price"] == 3
    first, *rest = body["steps"]
    assert first["name"] == "image_processing"
    assert first["status"] == "dispatched"
    assert first["attempt"] == 1
    assert HEX32.match(first["step_id"])
    assert first["deadline"] > first["dispatched_at"]
    assert [s["status"] for s in rest] == ["pending", "pending"]
    assert all(s["step_id"] is None for s in rest)


async def test_status_of_an_unknown_workflow_is_404(gw: RunningGateway) -> None:
    response = await gw.fetch("GET", f"{STATUS}?workflow_id={'0' * 32}", token=gw.token())
    assert_error(response, 404, "not_found", "workflow_id")


async def test_status_needs_a_hex_workflow_id(gw: RunningGateway) -> None:
    for query in ("", "?workflow_id=", "?workflow_id=xyz", f"?workflow_id={'A' * 32}"):
        response = await gw.fetch("GET", STATUS + query, token=gw.token())
        assert_error(response, 400, "invalid_input", "workflow_id")


# -- completion reports --------------------------------------------------------------------


async def test_a_report_for_the_current_attempt_is_applied(gw: RunningGateway) -> None:
    spy = await Spy.on(gw, "step.ai_enhancement")
    token = gw.token()
    workflow_id = await gw.upload(token)
    first = (await status_of(gw, workflow_id, token))["steps"][0]

    response = await report(gw, workflow_id, first, result={"thumb": "t.png"})

    assert response.status == 200
    assert response.body["result"] == "applied"
    assert response.body["workflow_id"] == workflow_id
    assert response.body["status"] == "running"
    doc = await stored(gw, workflow_id)
    assert doc["current_step"] == 1
    assert doc["steps"][0]["status"] == "completed"
    assert doc["steps"][0]["result"] == {"thumb": "t.png"}
    assert doc["steps"][1]["status"] == "dispatched"
    assert doc["steps"][1]["attempt"] == 1
    await spy.wait_for(1)
    assert spy.events[0].payload["results"] == {"image_processing": {"thumb": "t.png"}}


async def test_the_same_report_again_is_a_duplicate_and_changes_nothing(
    gw: RunningGateway,
) -> None:
    token = gw.token()
    workflow_id = await gw.upload(token)
    first = (await status_of(gw, workflow_id, token))["steps"][0]
    assert (await report(gw, workflow_id, first)).body["result"] == "applied"
    before = await stored(gw, workflow_id)

    again = await report(gw, workflow_id, first)

    assert again.status == 200
    assert again.body["result"] == "duplicate"
    assert again.body["version"] == before["version"]
    after = await stored(gw, workflow_id)
    assert durable(after) == durable(before)
    assert after["version"] == before["version"]


async def test_a_failure_report_again_is_also_a_duplicate(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, configure_steps(backoff=0)) as gw:
        token = gw.token()
        workflow_id = await gw.upload(token)
        first = (await status_of(gw, workflow_id, token))["steps"][0]
        assert (await report(gw, workflow_id, first, success=False)).body["result"] == "applied"
        before = await stored(gw, workflow_id)

        again = await report(gw, workflow_id, first, success=False)

        assert again.status == 200 and again.body["result"] == "duplicate"
        assert durable(await stored(gw, workflow_id)) == durable(before)


async def test_a_report_for_an_older_attempt_is_409(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, configure_steps(backoff=0)) as gw:
        token = gw.token()
        workflow_id = await gw.upload(token)
        old = (await status_of(gw, workflow_id, token))["steps"][0]
        assert (await report(gw, workflow_id, old, success=False)).status == 200
        before = await stored(gw, workflow_id)
        assert before["steps"][0]["attempt"] == 2  # backoff 0: re-dispatched at once

        response = await report(gw, workflow_id, old, success=True)

        assert_error(response, 409, "stale_report")
        after = await stored(gw, workflow_id)
        assert durable(after) == durable(before)
        assert after["version"] == before["version"]


async def test_a_report_naming_another_step_is_409(gw: RunningGateway) -> None:
    token = gw.token()
    workflow_id = await gw.upload(token)
    first = (await status_of(gw, workflow_id, token))["steps"][0]
    before = await stored(gw, workflow_id)

    response = await report(gw, workflow_id, first, step_type="seo_generation")

    assert_error(response, 409, "stale_report")
    assert durable(await stored(gw, workflow_id)) == durable(before)


async def test_a_report_with_an_unknown_step_id_is_409(gw: RunningGateway) -> None:
    token = gw.token()
    workflow_id = await gw.upload(token)
    before = await stored(gw, workflow_id)

    response = await report(gw, workflow_id, {"step_id": "ab" * 16, "name": "image_processing"})

    assert_error(response, 409, "stale_report")
    assert durable(await stored(gw, workflow_id)) == durable(before)


async def test_a_report_for_a_completed_workflow_is_409(gw: RunningGateway) -> None:
    token = gw.token()
    workflow_id = await gw.upload(token)
    for index in range(3):
        step = (await status_of(gw, workflow_id, token))["steps"][index]
        assert (await report(gw, workflow_id, step)).body["result"] == "applied"
    before = await stored(gw, workflow_id)
    last = before["steps"][2]

    response = await report(gw, workflow_id, last, success=False)

    assert_error(response, 409, "stale_report")
    assert durable(await stored(gw, workflow_id)) == durable(before)


async def test_a_report_for_an_unknown_workflow_is_404(gw: RunningGateway) -> None:
    response = await report(gw, "f" * 32, {"step_id": "e" * 32, "name": "image_processing"})
    assert_error(response, 404, "not_found", "workflow_id")
    assert await gw.gateway.store.get("f" * 32) is None


async def test_the_happy_path_completes_the_workflow_with_every_result(
    gw: RunningGateway,
) -> None:
    spy = await Spy.on(gw, "workflow.completed")
    token = gw.token()
    workflow_id = await gw.upload(token)
    results = {name: {"output": f"{name}-done", "n": i} for i, name in enumerate(STEPS)}

    for index, name in enumerate(STEPS):
        body = await status_of(gw, workflow_id, token)
        assert body["current_step"] == index
        step = body["steps"][index]
        assert step["name"] == name and step["status"] == "dispatched"
        response = await report(gw, workflow_id, step, result=results[name])
        assert response.status == 200 and response.body["result"] == "applied"

    assert response.body["status"] == "completed"
    body = await status_of(gw, workflow_id, token)
    assert body["status"] == "completed"
    assert [s["status"] for s in body["steps"]] == ["completed"] * 3
    assert {s["name"]: s["result"] for s in body["steps"]} == results
    assert body["wake_at"] is None
    await spy.wait_for(1)
    assert spy.events[0].payload["results"] == results
    assert spy.events[0].payload["status"] == "completed"


async def test_twenty_concurrent_duplicates_apply_once_and_dispatch_once(
    gw: RunningGateway,
) -> None:
    spy = await Spy.on(gw, "step.ai_enhancement")
    token = gw.token()
    workflow_id = await gw.upload(token)
    first = (await status_of(gw, workflow_id, token))["steps"][0]
    service = gw.service_token()

    responses = await asyncio.gather(
        *(report(gw, workflow_id, first, token=service) for _ in range(20))
    )

    assert [r.status for r in responses] == [200] * 20
    outcomes = sorted(r.body["result"] for r in responses)
    assert outcomes == ["applied"] + ["duplicate"] * 19
    doc = await stored(gw, workflow_id)
    assert len(doc["steps"][0]["attempts"]) == 1
    assert doc["steps"][1]["status"] == "dispatched"
    assert doc["steps"][1]["attempt"] == 1
    assert doc["steps"][1]["attempts"] == []
    await asyncio.sleep(0.1)
    assert len(spy.events) == 1
    assert spy.events[0].payload["step_id"] == doc["steps"][1]["step_id"]


# -- retries, deadlines, cancel ------------------------------------------------------------


async def test_a_failure_is_retried_after_backoff_then_fails_then_retry_restarts(
    tmp_path: Path,
) -> None:
    configure = configure_steps(backoff=0.1, max_attempts=2)
    async with running_gateway(tmp_path, configure) as gw:
        token = gw.token()
        workflow_id = await gw.upload(token)
        attempt1 = (await status_of(gw, workflow_id, token))["steps"][0]

        response = await report(gw, workflow_id, attempt1, success=False, error="disk full")
        assert response.status == 200 and response.body["result"] == "applied"
        assert response.body["status"] == "running"
        waiting = (await stored(gw, workflow_id))["steps"][0]
        assert waiting["status"] == "pending"
        assert waiting["error"] == "disk full"
        assert waiting["retry_at"] is not None

        body = await eventually(
            lambda: status_of(gw, workflow_id, token),
            lambda b: b["steps"][0]["status"] == "dispatched",
            within=5,
        )
        attempt2 = body["steps"][0]
        assert attempt2["attempt"] == 2
        assert HEX32.match(attempt2["step_id"]) and attempt2["step_id"] != attempt1["step_id"]

        response = await report(gw, workflow_id, attempt2, success=False, error="still full")
        assert response.status == 200 and response.body["status"] == "failed"
        body = await status_of(gw, workflow_id, token)
        assert body["status"] == "failed"
        assert body["steps"][0]["status"] == "failed"
        assert body["steps"][0]["error"] == "still full"
        assert [s["status"] for s in body["steps"][1:]] == ["pending", "pending"]

        retried = await gw.fetch("POST", RETRY, {"workflow_id": workflow_id}, token=token)
        assert retried.status == 200
        assert "outbox" not in retried.body
        assert retried.body["status"] == "running"
        assert retried.body["current_step"] == 0
        restarted = retried.body["steps"][0]
        assert restarted["status"] == "dispatched"
        assert restarted["attempt"] == 1
        assert restarted["step_id"] not in (attempt1["step_id"], attempt2["step_id"])

        again = await gw.fetch("POST", RETRY, {"workflow_id": workflow_id}, token=token)
        assert_error(again, 409, "not_allowed")
        assert (await status_of(gw, workflow_id, token))["steps"][0] == restarted

        # the restarted attempt goes on as usual
        response = await report(gw, workflow_id, restarted)
        assert response.body["result"] == "applied"
        assert (await status_of(gw, workflow_id, token))["current_step"] == 1


async def test_retry_restarts_from_the_failed_step_not_the_first(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, configure_steps(max_attempts=1)) as gw:
        token = gw.token()
        workflow_id = await gw.upload(token)
        first = (await status_of(gw, workflow_id, token))["steps"][0]
        await report(gw, workflow_id, first, result={"kept": True})
        second = (await status_of(gw, workflow_id, token))["steps"][1]
        assert (await report(gw, workflow_id, second, success=False)).body["status"] == "failed"

        retried = await gw.fetch("POST", RETRY, {"workflow_id": workflow_id}, token=token)

        assert retried.status == 200 and retried.body["current_step"] == 1
        assert retried.body["steps"][0]["status"] == "completed"
        assert retried.body["steps"][0]["result"] == {"kept": True}
        assert retried.body["steps"][1]["status"] == "dispatched"


async def test_a_passed_deadline_is_retried_then_fails_the_workflow(tmp_path: Path) -> None:
    configure = configure_steps(timeout=0.2, backoff=0.05, max_attempts=2)
    async with running_gateway(tmp_path, configure) as gw:
        token = gw.token()
        workflow_id = await gw.upload(token)
        attempt1 = (await status_of(gw, workflow_id, token))["steps"][0]

        # the sweeper fails attempt 1 at its deadline and dispatches attempt 2 after backoff
        body = await eventually(
            lambda: status_of(gw, workflow_id, token),
            lambda b: b["steps"][0]["attempt"] == 2,
            within=5,
        )
        assert body["steps"][0]["attempts"][0]["step_id"] == attempt1["step_id"]
        assert body["steps"][0]["attempts"][0]["outcome"] == "timed_out"
        assert body["steps"][0]["step_id"] != attempt1["step_id"]

        # attempt 2 times out too, and that was the last one
        body = await eventually(
            lambda: status_of(gw, workflow_id, token),
            lambda b: b["status"] != "running",
            within=5,
        )
        assert body["status"] == "failed"
        assert body["steps"][0]["status"] == "failed"
        assert body["steps"][0]["attempt"] == 2
        assert [a["outcome"] for a in body["steps"][0]["attempts"]] == ["timed_out"] * 2
        assert [s["status"] for s in body["steps"][1:]] == ["pending", "pending"]

        before = await stored(gw, workflow_id)
        late = await report(gw, workflow_id, attempt1)
        assert_error(late, 409, "stale_report")
        assert durable(await stored(gw, workflow_id)) == durable(before)


async def test_cancel_then_cancel_again_and_a_late_report(gw: RunningGateway) -> None:
    spy = await Spy.on(gw, "workflow.cancelled")
    token = gw.token()
    workflow_id = await gw.upload(token)
    first = (await status_of(gw, workflow_id, token))["steps"][0]

    response = await gw.fetch("POST", CANCEL, {"workflow_id": workflow_id}, token=token)

    assert response.status == 200
    assert "outbox" not in response.body
    assert response.body["status"] == "cancelled"
    assert [s["status"] for s in response.body["steps"]] == ["cancelled"] * 3
    assert response.body["wake_at"] is None

    again = await gw.fetch("POST", CANCEL, {"workflow_id": workflow_id}, token=token)
    assert_error(again, 409, "not_allowed")

    before = await stored(gw, workflow_id)
    late = await report(gw, workflow_id, first)
    assert_error(late, 409, "stale_report")
    assert durable(await stored(gw, workflow_id)) == durable(before)
    retry = await gw.fetch("POST", RETRY, {"workflow_id": workflow_id}, token=token)
    assert_error(retry, 409, "not_allowed")
    await spy.wait_for(1)


async def test_cancel_and_retry_of_an_unknown_workflow_are_404(gw: RunningGateway) -> None:
    for path in (CANCEL, RETRY):
        response = await gw.fetch("POST", path, {"workflow_id": "1" * 32}, token=gw.token())
        assert_error(response, 404, "not_found", "workflow_id")


# -- domain errors: one mapping to HTTP ----------------------------------------------------

WORKFLOW_ID = "1" * 32
# what each orchestrator call answers when it raises a domain error
DOMAIN_CALLS = {
    "get": ("GET", f"{STATUS}?workflow_id={WORKFLOW_ID}", None),
    "cancel": ("POST", CANCEL, {"workflow_id": WORKFLOW_ID}),
    "retry": ("POST", RETRY, {"workflow_id": WORKFLOW_ID}),
    "report": (
        "POST",
        COMPLETED,
        {"workflow_id": WORKFLOW_ID, "step_id": "2" * 32, "success": True, "result": {}},
    ),
}


@pytest.mark.parametrize("call", sorted(DOMAIN_CALLS))
@pytest.mark.parametrize(
    ("error", "status", "code", "retry_after"),
    [
        pytest.param(NotFound(WORKFLOW_ID), 404, "not_found", None, id="NotFound"),
        pytest.param(NotAllowed("not in this state"), 409, "not_allowed", None, id="NotAllowed"),
        pytest.param(StaleReport("an older attempt"), 409, "stale_report", None, id="Stale"),
        pytest.param(Contention(WORKFLOW_ID), 503, "contention", "1", id="Contention"),
        pytest.param(StoreError("MongoDB: timed out"), 503, "store_unavailable", "1", id="Store"),
    ],
)
async def test_each_domain_error_has_one_answer_on_every_endpoint(
    gw: RunningGateway,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    call: str,
    error: Exception,
    status: int,
    code: str,
    retry_after: str | None,
) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(gw.gateway.orchestrator, call, refuse)
    method, path, body = DOMAIN_CALLS[call]
    token = gw.service_token() if call == "report" else gw.token()
    with caplog.at_level("WARNING"):
        response = await gw.fetch(method, path, body, token=token)
    answer = assert_error(response, status, code)
    assert response.headers.get("Retry-After") == retry_after
    if status == 409:
        assert answer["message"] == str(error)
    if status == 404:
        assert answer["message"] == f"no workflow {WORKFLOW_ID}"
        assert answer["fields"] == {"workflow_id": "not found"}
    # an answered refusal, not an uncaught exception (the access log's line aside)
    errors = [r for r in caplog.records if r.levelname == "ERROR" and r.name != "stox.access"]
    assert errors == [], caplog.text


async def test_a_subclass_of_a_domain_error_gets_its_answer(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Gone(NotFound):
        pass

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise Gone(WORKFLOW_ID)

    monkeypatch.setattr(gw.gateway.orchestrator, "get", refuse)
    response = await gw.fetch("GET", f"{STATUS}?workflow_id={WORKFLOW_ID}", token=gw.token())
    assert_error(response, 404, "not_found", "workflow_id")


async def test_a_workflow_that_keeps_losing_its_compare_and_swap_is_503_with_retry_after(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    workflow_id = await gw.upload(gw.token())
    before = await gw.status(workflow_id)

    async def lost(*args: Any, **kwargs: Any) -> int:
        return 0  # another writer won, every time

    monkeypatch.setattr(gw.gateway.store, "replace", lost)
    response = await gw.fetch("POST", CANCEL, {"workflow_id": workflow_id}, token=gw.token())
    assert_error(response, 503, "contention")
    assert response.headers["Retry-After"] == "1"
    monkeypatch.undo()
    assert (await gw.status(workflow_id))["version"] == before["version"]


# -- list ----------------------------------------------------------------------------------


async def upload_many(gw: RunningGateway, token: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        ids.append(await gw.upload(token, name=f"product {i}"))
    return ids


async def test_list_is_newest_first(gw: RunningGateway) -> None:
    token = gw.token()
    ids = await upload_many(gw, token, 4)

    response = await gw.fetch("GET", LIST, token=token)

    assert response.status == 200
    assert [w["id"] for w in response.body["workflows"]] == ids[::-1]
    assert response.body["next_cursor"] is None
    assert all("outbox" not in w for w in response.body["workflows"])


async def test_list_filters_by_status(gw: RunningGateway) -> None:
    token = gw.token()
    ids = await upload_many(gw, token, 3)
    await gw.fetch("POST", CANCEL, {"workflow_id": ids[1]}, token=token)

    cancelled = await gw.fetch("GET", f"{LIST}?status=cancelled", token=token)
    running = await gw.fetch("GET", f"{LIST}?status=running", token=token)
    completed = await gw.fetch("GET", f"{LIST}?status=completed", token=token)

    assert [w["id"] for w in cancelled.body["workflows"]] == [ids[1]]
    assert [w["id"] for w in running.body["workflows"]] == [ids[2], ids[0]]
    assert completed.body["workflows"] == []


async def test_list_limit_bounds(gw: RunningGateway) -> None:
    token = gw.token()
    ids = await upload_many(gw, token, 2)
    for bad in ("0", "101", "-1", "abc", "1.5"):
        response = await gw.fetch("GET", f"{LIST}?limit={bad}", token=token)
        assert_error(response, 400, "invalid_input", "limit")
    one = await gw.fetch("GET", f"{LIST}?limit=1", token=token)
    assert [w["id"] for w in one.body["workflows"]] == [ids[1]]
    assert one.body["next_cursor"]
    hundred = await gw.fetch("GET", f"{LIST}?limit=100", token=token)
    assert len(hundred.body["workflows"]) == 2 and hundred.body["next_cursor"] is None


async def test_cursor_pagination_visits_every_workflow_exactly_once(gw: RunningGateway) -> None:
    token = gw.token()
    ids = await upload_many(gw, token, 7)
    await gw.upload(gw.token("bob"))  # someone else's: never listed for alice

    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        query = f"?limit=3&cursor={cursor}" if cursor else "?limit=3"
        response = await gw.fetch("GET", LIST + query, token=token)
        assert response.status == 200, response.body
        page = [w["id"] for w in response.body["workflows"]]
        assert 1 <= len(page) <= 3
        seen.extend(page)
        pages += 1
        cursor = response.body["next_cursor"]
        if cursor is None:
            break
        assert pages < 10

    assert pages == 3
    assert seen == ids[::-1]


async def test_list_cursor_and_status_are_checked(gw: RunningGateway) -> None:
    token = gw.token()
    for bad in ("garbage!!", "%C3%A9", "bm90IGpzb24", "WzFd", "e30"):
        response = await gw.fetch("GET", f"{LIST}?cursor={bad}", token=token)
        assert_error(response, 400, "invalid_input", "cursor")
    for bad in ("done", "RUNNING", ""):
        response = await gw.fetch("GET", f"{LIST}?status={bad}", token=token)
        assert_error(response, 400, "invalid_input", "status")


def crafted_cursor(text: str) -> str:
    """A cursor as the server encodes one (unpadded base64url), around any JSON text."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "text",
    [
        '["\\ud800", "x"]',  # a lone surrogate: neither SQLite nor BSON can take it
        '["2026-01-01T00:00:00.000000Z", "\\udfff"]',
        "[" * 3000 + "]" * 3000,  # nested deeper than json.loads recurses
        '["2026-01-01", "' + "ab" * 16 + '"]',  # not a timestamp this server writes
        '["2026-01-01T00:00:00.000000Z", "not-a-workflow-id"]',
        '["2026-01-01T00:00:00.000000Z", "' + "ab" * 16 + '", "extra"]',
        '{"created_at": "2026-01-01T00:00:00.000000Z"}',
    ],
    ids=["surrogate", "surrogate id", "deep", "bad time", "bad id", "three", "object"],
)
async def test_a_crafted_cursor_is_a_400_naming_it_on_every_store(
    store_url: str, tmp_path: Path, text: str
) -> None:
    async with running_gateway(tmp_path, storage__url=store_url) as gw:
        await gw.upload(gw.token())
        cursor = crafted_cursor(text)
        response = await gw.fetch("GET", f"{LIST}?cursor={cursor}", token=gw.token())
        assert_error(response, 400, "invalid_input", "cursor")
        assert (await gw.fetch("GET", f"{LIST}?limit=1", token=gw.token())).status == 200


async def test_an_overlong_cursor_is_a_400(gw: RunningGateway) -> None:
    response = await gw.fetch("GET", f"{LIST}?cursor={'A' * 5000}", token=gw.token())
    assert_error(response, 400, "invalid_input", "cursor")


# -- bad input -----------------------------------------------------------------------------


async def test_invalid_json_is_400(gw: RunningGateway) -> None:
    token = gw.token()
    for raw in (b"{", b"not json", b'{"name": "x",}', b"\xff\xfe{", b""):
        response = await gw.fetch("POST", UPLOAD, raw=raw, token=token)
        assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize("body", [[], [{"name": "x"}], "name", 5, None])
async def test_a_body_that_is_not_an_object_is_400(gw: RunningGateway, body: Any) -> None:
    raw = json.dumps(body).encode()
    response = await gw.fetch("POST", UPLOAD, raw=raw, token=gw.token())
    assert_error(response, 400, "invalid_json")


UPLOAD_FIELD_ERRORS = [
    ({}, "name"),
    ({"description": "no name"}, "name"),
    ({"name": ""}, "name"),
    ({"name": "x" * 201}, "name"),
    ({"name": 5}, "name"),
    ({"name": None}, "name"),
    ({"name": "x", "colour": "red"}, "colour"),
    ({"name": "x", "price": -1}, "price"),
    ({"name": "x", "price": "cheap"}, "price"),
    ({"name": "x", "price": True}, "price"),
    ({"name": "x", "price": 1e13}, "price"),
    ({"name": "x", "images": ["a"] * 51}, "images"),
    ({"name": "x", "images": "a.png"}, "images"),
    ({"name": "x", "images": [1]}, "images"),
    ({"name": "x", "images": [""]}, "images"),
    ({"name": "x", "description": ["a"]}, "description"),
    ({"name": "x", "category": {}}, "category"),
    ({"name": "x", "metadata": []}, "metadata"),
    ({"name": "x", "metadata": "tags"}, "metadata"),
    ({"name": "x", "metadata": {"blob": "x" * 17_000}}, "metadata"),
]


@pytest.mark.parametrize(("body", "field"), UPLOAD_FIELD_ERRORS)
async def test_upload_field_errors_name_the_field(
    gw: RunningGateway, body: dict[str, Any], field: str
) -> None:
    response = await gw.fetch("POST", UPLOAD, body, token=gw.token())
    assert_error(response, 400, "invalid_input", field)
    listed = await gw.fetch("GET", LIST, token=gw.token())
    assert listed.body["workflows"] == []  # nothing was stored


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"name":"x","price":NaN}', "price"),
        (b'{"name":"x","price":Infinity}', "price"),
        (b'{"name":"x","metadata":{"score":NaN}}', "metadata"),
        (b'{"name":"x","metadata":{"deep":[-Infinity]}}', "metadata"),
        (b'{"name":"\\ud800"}', "name"),
        (b'{"name":"x","images":["\\udfff"]}', "images"),
        (b'{"name":"x","metadata":{"a\\u0000b":1}}', "metadata"),
        (b'{"name":"x","metadata":{"big":9223372036854775808}}', "metadata"),
        (b'{"name":"x","metadata":{"a":' + b"[" * 40 + b"]" * 40 + b"}}", "metadata"),
        (b'{"name":"x","metadata":{"a":' + b"[" * 600 + b"]" * 600 + b"}}", "metadata"),
    ],
)
async def test_values_that_cannot_be_stored_are_400_naming_the_field(
    gw: RunningGateway, raw: bytes, field: str
) -> None:
    response = await gw.fetch("POST", UPLOAD, raw=raw, token=gw.token())
    assert_error(response, 400, "invalid_input", field)


async def test_a_body_nested_beyond_the_parser_is_400(gw: RunningGateway) -> None:
    for depth in (5_000, 200_000):
        raw = b'{"name":"x","metadata":{"a":' + b"[" * depth + b"]" * depth + b"}}"
        response = await gw.fetch("POST", UPLOAD, raw=raw, token=gw.token())
        assert_error(response, 400, "invalid_json")


async def test_the_nesting_refused_unparsed_is_the_same_on_every_python(gw: RunningGateway) -> None:
    """json.loads stops at a depth that depends on the Python version; the gateway refuses
    a body nested past MAX_JSON_DEPTH before parsing it, counting no bracket in a string."""
    token = gw.token()

    def body(levels: int) -> bytes:  # the body's object and metadata are two levels
        arrays = levels - 2
        return b'{"name":"x","metadata":{"a":' + b"[" * arrays + b"]" * arrays + b"}}"

    deepest = await gw.fetch("POST", UPLOAD, raw=body(MAX_JSON_DEPTH), token=token)
    assert_error(deepest, 400, "invalid_input", "metadata")  # parsed, then too deep to store
    beyond = await gw.fetch("POST", UPLOAD, raw=body(MAX_JSON_DEPTH + 1), token=token)
    assert_error(beyond, 400, "invalid_json")
    brackets = "[{" * MAX_JSON_DEPTH
    await gw.upload(token, metadata={"text": brackets}, description=f'\\"{brackets}')


async def test_moderately_nested_metadata_is_kept(gw: RunningGateway) -> None:
    nested: Any = {"leaf": [1, 2.5, "x", None, True]}
    for _ in range(20):
        nested = {"n": nested}
    token = gw.token()
    workflow_id = await gw.upload(token, metadata=nested)
    assert (await status_of(gw, workflow_id, token))["product"]["metadata"] == nested


COMPLETION_FIELD_ERRORS = [
    ({"step_id": "a" * 32, "success": True}, "workflow_id"),
    ({"workflow_id": "not-hex", "step_id": "a" * 32, "success": True}, "workflow_id"),
    ({"workflow_id": "a" * 31, "step_id": "a" * 32, "success": True}, "workflow_id"),
    ({"workflow_id": "a" * 32 + "\n", "step_id": "a" * 32, "success": True}, "workflow_id"),
    ({"workflow_id": 7, "step_id": "a" * 32, "success": True}, "workflow_id"),
    ({"workflow_id": "a" * 32, "success": True}, "step_id"),
    ({"workflow_id": "a" * 32, "step_id": "zz", "success": True}, "step_id"),
    ({"workflow_id": "a" * 32, "step_id": "a" * 32}, "success"),
    ({"workflow_id": "a" * 32, "step_id": "a" * 32, "success": "yes"}, "success"),
    ({"workflow_id": "a" * 32, "step_id": "a" * 32, "success": "true"}, "success"),
    ({"workflow_id": "a" * 32, "step_id": "a" * 32, "success": None}, "success"),
    ({"workflow_id": "a" * 32, "step_id": "a" * 32, "success": True, "result": "ok"}, "result"),
    ({"workflow_id": "a" * 32, "step_id": "a" * 32, "success": True, "result": [1]}, "result"),
    ({"workflow_id": "a" * 32, "step_id": "a" * 32, "success": False, "error": 5}, "error"),
    ({"workflow_id": "a" * 32, "step_id": "a" * 32, "success": True, "step_type": 1}, "step_type"),
    ({"workflow_id": "a" * 32, "step_id": "a" * 32, "success": True, "extra": 1}, "extra"),
]


@pytest.mark.parametrize(("body", "field"), COMPLETION_FIELD_ERRORS)
async def test_completion_field_errors_name_the_field(
    gw: RunningGateway, body: dict[str, Any], field: str
) -> None:
    response = await gw.fetch("POST", COMPLETED, body, token=gw.service_token())
    assert_error(response, 400, "invalid_input", field)


async def test_a_completion_result_that_cannot_be_stored_is_400(gw: RunningGateway) -> None:
    token = gw.token()
    workflow_id = await gw.upload(token)
    step = (await status_of(gw, workflow_id, token))["steps"][0]
    before = await stored(gw, workflow_id)
    head = f'{{"workflow_id":"{workflow_id}","step_id":"{step["step_id"]}","success":true,'
    for tail in (
        b'"result":{"score":NaN}}',
        b'"result":{"deep":' + b"[" * 600 + b"]" * 600 + b"}}",
        b'"result":{"text":"\\ud83d"}}',
    ):
        response = await gw.fetch(
            "POST", COMPLETED, raw=head.encode() + tail, token=gw.service_token()
        )
        assert_error(response, 400, "invalid_input", "result")
    assert durable(await stored(gw, workflow_id)) == durable(before)


@pytest.mark.parametrize("path", [CANCEL, RETRY])
@pytest.mark.parametrize(
    "body", [{}, {"workflow_id": "xyz"}, {"workflow_id": None}, {"workflow_id": ["a" * 32]}]
)
async def test_cancel_and_retry_need_a_hex_workflow_id(
    gw: RunningGateway, path: str, body: dict[str, Any]
) -> None:
    response = await gw.fetch("POST", path, body, token=gw.token())
    assert_error(response, 400, "invalid_input", "workflow_id")


async def test_cancel_rejects_unknown_fields(gw: RunningGateway) -> None:
    token = gw.token()
    workflow_id = await gw.upload(token)
    response = await gw.fetch(
        "POST", CANCEL, {"workflow_id": workflow_id, "force": True}, token=token
    )
    assert_error(response, 400, "invalid_input", "force")
    assert (await status_of(gw, workflow_id, token))["status"] == "running"


# -- routing, health -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", UPLOAD),
        ("PUT", UPLOAD),
        ("POST", STATUS),
        ("GET", COMPLETED),
        ("DELETE", LIST),
        ("GET", CANCEL),
        ("PATCH", RETRY),
        ("POST", "/healthz"),
        ("DELETE", "/readyz"),
    ],
)
async def test_a_wrong_method_is_405_json(gw: RunningGateway, method: str, path: str) -> None:
    body = {"workflow_id": "a" * 32} if method in ("POST", "PUT", "PATCH") else None
    response = await gw.fetch(method, path, body, token=gw.token())
    assert_error(response, 405, "method_not_allowed")
    allowed = "GET" if path in (STATUS, LIST, "/healthz", "/readyz") else "POST"
    assert response.headers["Allow"] == allowed


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/nope"), ("POST", "/api/v1/workflow/nope"), ("GET", "/api/v2/workflow/status")],
)
async def test_an_unknown_path_is_404_json(gw: RunningGateway, method: str, path: str) -> None:
    response = await gw.fetch(method, path, {} if method == "POST" else None)
    assert_error(response, 404, "not_found")


async def test_healthz(gw: RunningGateway) -> None:
    response = await gw.fetch("GET", "/healthz")
    assert response.status == 200
    assert response.body["status"] == "ok"
    assert HEX32.match(response.headers["X-Request-Id"])


async def test_readyz_reports_store_and_bus(gw: RunningGateway) -> None:
    response = await gw.fetch("GET", "/readyz")
    assert response.status == 200
    assert response.body["status"] == "ready"
    assert response.body["store"] == "ok"
    assert response.body["bus"] == "ok"


async def test_readyz_is_503_when_the_store_is_gone(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw:
        await gw.gateway.store.close()
        response = await gw.fetch("GET", "/readyz")
        assert response.status == 503
        assert response.body["status"] == "unready"
        assert response.body["store"] != "ok"
        await gw.gateway.store.open()  # so the harness can shut down as usual


async def test_a_client_request_id_is_echoed(gw: RunningGateway) -> None:
    response = await gw.fetch("GET", "/nope", headers={"X-Request-Id": "trace-123"})
    assert response.status == 404
    assert response.headers["X-Request-Id"] == "trace-123"
