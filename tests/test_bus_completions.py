"""`step.completed` over the bus: the HTTP endpoint's rules, a service token, dead letters.

Run on the in-process bus and on RabbitMQ. A report without a valid service token, or one
that can never be applied, goes to the dead letters once and is logged; the gateway keeps
serving. A stale report is acknowledged, not dead-lettered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import rabbit
from support import RunningGateway, completion, eventually, running_gateway

from stox import workflow as w
from stox.auth.tokens import ADMIN, SERVICE
from stox.bus.base import Event
from stox.bus.local import LocalBus

TIMEOUT = 10.0


@dataclass
class Harness:
    """A running gateway and how to reach its `step.completed` queue from outside."""

    gw: RunningGateway
    send_raw: Callable[[bytes, dict[str, Any]], Awaitable[None]]
    dead: Callable[[], Awaitable[list[bytes]]]  # bodies of the dead letters so far

    async def send(self, payload: dict[str, Any], headers: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(payload).encode(), headers)

    def service_headers(self, name: str = "image-service") -> dict[str, Any]:
        return {"authorization": f"Bearer {self.gw.service_token(name)}"}

    async def current_step(self, workflow_id: str) -> dict[str, Any]:
        doc = await self.gw.status(workflow_id)
        return dict(doc["steps"][doc["current_step"]])

    async def started(self) -> tuple[str, dict[str, Any]]:
        """A new workflow of alice's, and its first step (dispatched)."""
        workflow_id = await self.gw.upload(self.gw.token())
        return workflow_id, await self.current_step(workflow_id)


@pytest.fixture(params=["local", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    if request.param == "local":
        bus = LocalBus()

        async def send_local(body: bytes, headers: dict[str, Any]) -> None:
            await bus.publish(
                Event("step.completed", json.loads(body), uuid.uuid4().hex, None, 0, headers)
            )

        async def dead_local() -> list[bytes]:
            return [json.dumps(event.payload).encode() for _, event, _ in bus.dead_letters]

        async with running_gateway(tmp_path, gateway_options={"bus": bus}) as gw:
            yield Harness(gw, send_local, dead_local)
        return

    ns: rabbit.Namespace = request.getfixturevalue("rabbit_ns")

    async def send_amqp(body: bytes, headers: dict[str, Any]) -> None:
        await asyncio.to_thread(
            ns.publish, "step.completed", body, headers, content_type="application/json"
        )

    async def dead_amqp() -> list[bytes]:
        dead.extend(m.body for m in await asyncio.to_thread(ns.drain, ns.dead))
        return list(dead)

    dead: list[bytes] = []
    async with running_gateway(tmp_path, **ns.settings()) as gw:
        yield Harness(gw, send_amqp, dead_amqp)


def completed_event(step: dict[str, Any], workflow_id: str, /, **changes: Any) -> dict[str, Any]:
    """The `step.completed` message a service publishes on `step`, changed as given (None
    removes a field)."""
    body = {
        "event": "step.completed",
        "occurred_at": w.isoformat(0),
        **completion(workflow_id, step["step_id"], step["name"], result={"ok": True}),
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


async def test_a_service_report_applies_like_the_http_endpoint(harness: Harness) -> None:
    workflow_id, first = await harness.started()

    # the header name is matched in any case, as HTTP's is
    headers = {"Authorization": f"Bearer {harness.gw.service_token()}"}
    await harness.send(completed_event(first, workflow_id), headers)

    async def moved_on() -> bool:
        step = await harness.current_step(workflow_id)
        return bool(step["name"] == "ai_enhancement")

    await eventually(moved_on)
    doc = await harness.gw.status(workflow_id)
    assert doc["steps"][0]["status"] == w.COMPLETED
    assert doc["steps"][0]["result"] == {"ok": True}
    assert await harness.dead() == []


async def test_reports_without_a_service_token_are_dead_lettered_once(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    gw = harness.gw
    workflow_id, step = await harness.started()
    expired = gw.gateway.tokens.issue("service:old", "old", SERVICE, expires_in=-60)
    refused: dict[str, dict[str, Any]] = {
        "no header": {},
        "not bearer": {"authorization": f"Basic {gw.service_token()}"},
        "empty bearer": {"authorization": "Bearer "},
        "not a string": {"authorization": 42},
        "garbage": {"authorization": "Bearer not-a-jwt"},
        "expired": {"authorization": f"Bearer {expired}"},
        "user token": {"authorization": f"Bearer {gw.token('mallory')}"},
        "admin token": {"authorization": f"Bearer {gw.token('root', ADMIN)}"},
    }
    with caplog.at_level(logging.INFO):
        for n, headers in enumerate(refused.values()):
            await harness.send(completed_event(step, workflow_id, result={"n": n}), headers)

        async def all_dead() -> bool:
            return len(await harness.dead()) >= len(refused)

        await eventually(all_dead)
        await asyncio.sleep(0.2)  # time for a (wrong) redelivery
        dead = await harness.dead()

    assert sorted(json.loads(body)["result"]["n"] for body in dead) == list(range(len(refused)))
    unchanged = await harness.gw.status(workflow_id)
    assert unchanged["version"] == 1 and unchanged["steps"][0]["status"] == w.DISPATCHED
    messages = [r.getMessage() for r in caplog.records]
    assert sum("dead-lettered step.completed" in m for m in messages) == len(refused)
    assert not any("redelivering" in m for m in messages)
    assert not any(gw.service_token() in m or expired in m for m in messages)  # no token logged

    # the gateway keeps serving: a good report still applies
    await harness.send(completed_event(step, workflow_id), harness.service_headers())

    async def applied() -> bool:
        doc = await harness.gw.status(workflow_id)
        return bool(doc["steps"][0]["status"] == w.COMPLETED)

    await eventually(applied)


@pytest.mark.parametrize(
    "change",
    [
        {"step_id": None},
        {"workflow_id": "not-hex"},
        {"success": "yes"},
        {"result": ["not", "an", "object"]},
        {"error": "x" * 5000},
    ],
    ids=["no step_id", "bad workflow_id", "success not a boolean", "result a list", "long error"],
)
async def test_malformed_reports_are_dead_lettered_once(
    harness: Harness, change: dict[str, Any]
) -> None:
    workflow_id, step = await harness.started()
    await harness.send(completed_event(step, workflow_id, **change), harness.service_headers())

    async def dead() -> bool:
        return len(await harness.dead()) == 1

    await eventually(dead)
    await asyncio.sleep(0.1)
    assert len(await harness.dead()) == 1
    assert (await harness.gw.status(workflow_id))["version"] == 1  # the upload alone


async def test_stale_and_unknown_reports_are_acknowledged_not_dead_lettered(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    workflow_id, step = await harness.started()
    with caplog.at_level(logging.INFO, logger="stox.completions"):
        await harness.send(
            completed_event(step, workflow_id, step_id="ab" * 16), harness.service_headers()
        )
        await harness.send(completed_event(step, "cd" * 16), harness.service_headers())

        async def both_logged() -> bool:
            return sum("ignored" in r.getMessage() for r in caplog.records) == 2

        await eventually(both_logged)
    assert await harness.dead() == []
    assert (await harness.gw.status(workflow_id))["version"] == 1  # the upload alone


@pytest.mark.rabbitmq
async def test_a_body_that_is_not_json_is_dead_lettered_and_the_gateway_serves_on(
    tmp_path: Path, rabbit_ns: rabbit.Namespace
) -> None:
    ns = rabbit_ns
    async with running_gateway(tmp_path, **ns.settings()) as gw:
        workflow_id = await gw.upload(gw.token())
        for body in (b"\xff\xfe not json", b"[1, 2, 3]", b""):
            await asyncio.to_thread(ns.publish, "step.completed", body, {})

        dead = [m.body for m in await ns.drained(ns.dead, 3)]
        assert sorted(dead) == sorted([b"\xff\xfe not json", b"[1, 2, 3]", b""])
        ready = await gw.fetch("GET", "/readyz")
        assert ready.status == 200, ready.body
        assert (
            await gw.fetch(
                "GET", f"/api/v1/workflow/status?workflow_id={workflow_id}", token=gw.token()
            )
        ).status == 200


@pytest.mark.rabbitmq
@pytest.mark.parametrize(
    "poison",
    [
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError in json.loads
        b'{"result": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["deep array", "deep inside an object"],
)
async def test_a_poison_body_is_dead_lettered_and_the_connection_stays(
    tmp_path: Path, rabbit_ns: rabbit.Namespace, caplog: pytest.LogCaptureFixture, poison: bytes
) -> None:
    ns = rabbit_ns
    async with running_gateway(tmp_path, **ns.settings()) as gw:
        workflow_id = await gw.upload(gw.token())
        step = (await gw.status(workflow_id))["steps"][0]
        headers = {"authorization": f"Bearer {gw.service_token()}"}
        with caplog.at_level(logging.INFO, logger="stox.bus.rabbitmq"):
            await asyncio.to_thread(ns.publish, "step.completed", poison, headers)

            assert [m.body for m in await ns.drained(ns.dead)] == [poison]
            # the next report still flows, over the same connection
            body = json.dumps(completed_event(step, workflow_id)).encode()
            await asyncio.to_thread(ns.publish, "step.completed", body, headers)

            async def moved_on() -> bool:
                doc = await gw.status(workflow_id)
                return bool(doc["steps"][0]["status"] == "completed")

            await eventually(moved_on)
        assert [r for r in caplog.records if "connection lost" in r.getMessage()] == []
        assert (await gw.fetch("GET", "/readyz")).status == 200
        assert await asyncio.to_thread(ns.count, ns.completions) == 0
