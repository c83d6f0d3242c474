"""Webhooks against a real local HTTP receiver: the signature verifies, a 500 is retried
with backoff, a delivery pending across a gateway restart is sent by the next one, an
endpoint that hangs is timed out and retried, a failing one is given up after
webhooks.retry_for (and the history says so); an upload's callback_url goes only to hosts
the settings allow, and a listed name that resolves to a loopback address is refused."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
from support import STATUS, Clock, RunningGateway, eventually, report, running_gateway

import settings as settings_module
from stox.webhooks import AddressPolicy, PolicyResolver, signature

SECRET, CALLBACK_SECRET = "endpoint-secret", "callback-secret"
DELIVERIES, HISTORY = "/api/v1/workflow/deliveries", "/api/v1/workflow/history"


@dataclass
class Receiver:
    """A local HTTP endpoint: records each POST, answers with the next of `answers` (a
    status, or "hang"), then 200."""

    port: int = 0
    answers: list[int | str] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    receiver = Receiver()

    class Hook(tornado.web.RequestHandler):
        async def post(self) -> None:
            receiver.received.append((dict(self.request.headers), self.request.body))
            answer = receiver.answers.pop(0) if receiver.answers else 200
            if answer == "hang":
                await asyncio.sleep(5)
                answer = 200
            self.set_status(int(answer))
            self.finish("{}")

    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    receiver.port = sockets[0].getsockname()[1]
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/hook", Hook)]))
    server.add_sockets(sockets)
    try:
        yield receiver
    finally:
        server.stop()


def hooks(receiver: Receiver, **changes: Any) -> Callable[[settings_module.Settings], None]:
    def configure(settings: settings_module.Settings) -> None:
        webhooks = settings.webhooks
        webhooks.allowed_hosts = ["127.0.0.1"]
        webhooks.endpoints = [
            settings_module.WebhookEndpointSettings(
                receiver.url, ["workflow.completed", "workflow.failed"], SECRET
            )
        ]
        webhooks.callback_secret = CALLBACK_SECRET
        webhooks.timeout = settings_module.Duration(0.5)
        for name, value in changes.items():
            setattr(webhooks, name, value)
        for step in settings.pipeline.steps:
            step.max_attempts = 1

    return configure


def verified(headers: dict[str, str], body: bytes, secret: str) -> bool:
    """As a receiver checks it (the README's snippet)."""
    parts = dict(part.split("=", 1) for part in headers["Stox-Signature"].split(","))
    expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(parts["v1"], expected.hexdigest())


async def complete(gw: RunningGateway, **upload: Any) -> str:
    workflow_id = await gw.upload(gw.token(), **upload)
    for index in range(3):
        doc = (await gw.fetch("GET", f"{STATUS}?workflow_id={workflow_id}", token=gw.token())).body
        await report(gw, workflow_id, doc["steps"][index])
    return workflow_id


async def deliveries(gw: RunningGateway, workflow_id: str) -> list[dict[str, Any]]:
    answer = await gw.fetch("GET", f"{DELIVERIES}?workflow_id={workflow_id}", token=gw.token())
    assert answer.status == 200, answer.body
    found: list[dict[str, Any]] = answer.body["deliveries"]
    return found


async def test_a_completed_workflow_is_posted_signed_once(tmp_path: Path) -> None:
    async with receiving() as receiver, running_gateway(tmp_path, hooks(receiver)) as gw:
        workflow_id = await complete(gw)
        await eventually(lambda: len(receiver.received) == 1)
        headers, body = receiver.received[0]
        assert verified(headers, body, SECRET)
        assert not verified(headers, body, "another secret")
        event = json.loads(body)
        assert (event["event"], event["workflow_id"]) == ("workflow.completed", workflow_id)
        assert set(event["results"]) == {"image_processing", "ai_enhancement", "seo_generation"}
        [delivery] = await deliveries(gw, workflow_id)
        assert headers["Stox-Delivery"] == delivery["id"]
        assert (delivery["status"], delivery["attempts"], delivery["signer"]) == (
            "delivered",
            1,
            "endpoint",
        )
        history = (
            await gw.fetch("GET", f"{HISTORY}?workflow_id={workflow_id}", token=gw.token())
        ).body
        assert history["entries"][-1]["event"] == "webhook_delivered"
        assert history["entries"][-1]["url"] == receiver.url
        assert len(receiver.received) == 1


@pytest.mark.parametrize("store", ["sqlite", "mongodb"])
async def test_500s_are_retried_with_backoff_until_taken(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    clock = Clock()
    on = {"storage__url": request.getfixturevalue("mongo_url")} if store == "mongodb" else {}
    async with (
        receiving() as receiver,
        running_gateway(tmp_path, hooks(receiver), {"clock": clock}, **on) as gw,
    ):
        receiver.answers = [500, 503]
        workflow_id = await complete(gw)
        await eventually(lambda: len(receiver.received) == 1)
        [delivery] = await eventually_pending(gw, workflow_id, attempts=1)
        assert delivery["last_error"] == "answered 500"
        clock.advance(9)  # the first pause is 10 s
        await gw.gateway.orchestrator.sweep()
        assert len(receiver.received) == 1
        clock.advance(2)
        await gw.gateway.orchestrator.sweep()
        await eventually_pending(gw, workflow_id, attempts=2)
        clock.advance(21)  # then 20 s
        await gw.gateway.orchestrator.sweep()
        await eventually(lambda: len(receiver.received) == 3)
        await eventually_status(gw, workflow_id, "delivered")
        ids = {headers["Stox-Delivery"] for headers, _ in receiver.received}
        assert len(ids) == 1  # the same delivery each time: the receiver deduplicates on it


async def eventually_pending(
    gw: RunningGateway, workflow_id: str, attempts: int
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    async def check() -> bool:
        found[:] = await deliveries(gw, workflow_id)
        return bool(found) and found[0]["attempts"] == attempts and found[0]["status"] == "pending"

    for _ in range(100):
        if await check():
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"not pending after {attempts} attempts: {found}")


async def eventually_status(gw: RunningGateway, workflow_id: str, status: str) -> None:
    for _ in range(100):
        if (await deliveries(gw, workflow_id))[0]["status"] == status:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not {status}: {await deliveries(gw, workflow_id)}")


async def test_a_delivery_pending_at_a_restart_is_sent_by_the_next_gateway(
    tmp_path: Path,
) -> None:
    clock = Clock()
    async with receiving() as receiver:
        receiver.answers = [500]
        async with running_gateway(tmp_path, hooks(receiver), {"clock": clock}) as gw:
            workflow_id = await complete(gw)
            await eventually_pending(gw, workflow_id, attempts=1)
        clock.advance(11)
        async with running_gateway(tmp_path, hooks(receiver), {"clock": clock}) as again:
            await again.gateway.orchestrator.sweep()
            await eventually_status(again, workflow_id, "delivered")
        assert len(receiver.received) == 2
        assert receiver.received[0][0]["Stox-Delivery"] == receiver.received[1][0]["Stox-Delivery"]


async def test_an_endpoint_that_hangs_is_timed_out_and_tried_again(tmp_path: Path) -> None:
    clock = Clock()
    async with (
        receiving() as receiver,
        running_gateway(tmp_path, hooks(receiver), {"clock": clock}) as gw,
    ):
        receiver.answers = ["hang"]
        workflow_id = await complete(gw)
        [delivery] = await eventually_pending(gw, workflow_id, attempts=1)
        assert delivery["last_error"].startswith("no answer")
        clock.advance(11)
        await gw.gateway.orchestrator.sweep()
        await eventually_status(gw, workflow_id, "delivered")


async def test_a_delivery_that_keeps_failing_is_given_up_and_recorded(tmp_path: Path) -> None:
    clock = Clock()
    configure = hooks(receiver := Receiver(), retry_for=settings_module.Duration(35))
    async with receiving() as live:
        receiver.port = live.port
        live.answers = [500] * 10
        async with running_gateway(tmp_path, configure, {"clock": clock}) as gw:
            workflow_id = await complete(gw)
            await eventually_pending(gw, workflow_id, attempts=1)
            clock.advance(11)  # 10 s later: the second attempt
            await gw.gateway.orchestrator.sweep()
            await eventually_pending(gw, workflow_id, attempts=2)
            clock.advance(21)  # the third fails too, and a pause of 40 s would end past 35 s
            await gw.gateway.orchestrator.sweep()
            await eventually_status(gw, workflow_id, "given_up")
            history = (
                await gw.fetch("GET", f"{HISTORY}?workflow_id={workflow_id}", token=gw.token())
            ).body["entries"]
            assert history[-1]["event"] == "webhook_given_up"
            assert history[-1]["error"] == "answered 500" and history[-1]["by"] == "webhooks"
            status = await gw.fetch("GET", f"{STATUS}?workflow_id={workflow_id}", token=gw.token())
            assert status.body["status"] == "completed"  # the workflow's state is its own
            assert status.body["wake_at"] is None


async def test_an_uploads_callback_url_goes_only_to_an_allowed_host(tmp_path: Path) -> None:
    async with (
        receiving() as receiver,
        running_gateway(tmp_path, hooks(receiver, endpoints=[])) as gw,
    ):
        workflow_id = await complete(gw, callback_url=receiver.url)
        await eventually(lambda: len(receiver.received) == 1)
        headers, body = receiver.received[0]
        assert verified(headers, body, CALLBACK_SECRET)
        for refused in (
            f"http://localhost:{receiver.port}/hook",  # a name not listed
            "http://169.254.169.254/latest/meta-data",  # link-local, not listed
            "http://10.0.0.5/hook",
            "ftp://127.0.0.1/hook",
            "http://user:pw@127.0.0.1/hook",
            "not a url",
        ):
            answer = await gw.fetch(
                "POST",
                "/api/v1/workflow/upload",
                {"name": "Mug", "callback_url": refused},
                token=gw.token(),
            )
            assert answer.status == 400, refused
            assert "callback_url" in answer.body["error"]["fields"], answer.body
        assert (await deliveries(gw, workflow_id))[0]["signer"] == "callback"


async def test_a_gateway_without_webhooks_refuses_a_callback_url(gw: RunningGateway) -> None:
    answer = await gw.fetch(
        "POST",
        "/api/v1/workflow/upload",
        {"name": "Mug", "callback_url": "http://x/y"},
        token=gw.token(),
    )
    assert answer.status == 400 and "callback_url" in answer.body["error"]["fields"]


async def test_a_listed_name_that_resolves_to_loopback_is_refused_as_it_connects() -> None:
    resolver = PolicyResolver(policy=AddressPolicy(["localhost"]))
    with pytest.raises(OSError, match="refused addresses"):
        await resolver.resolve("localhost", 80)
    listed = PolicyResolver(policy=AddressPolicy(["localhost", "127.0.0.0/8", "::1"]))
    assert await listed.resolve("localhost", 80)


def test_the_policy_allows_global_addresses_and_listed_ones_only() -> None:
    policy = AddressPolicy(["hooks.shop.example", "10.1.2.3", "192.168.0.0/16"])
    assert policy.host_allowed("HOOKS.shop.example.") and not policy.host_allowed("evil.example")
    assert policy.host_allowed("10.1.2.3") and not policy.host_allowed("10.1.2.4")
    assert policy.address_allowed("93.184.216.34")  # global
    for refused in ("127.0.0.1", "169.254.169.254", "10.9.9.9", "::1", "fe80::1", "0.0.0.0"):
        assert not policy.address_allowed(refused), refused
    assert policy.address_allowed("192.168.4.4") and policy.address_allowed("10.1.2.3")


def test_the_signature_is_stripes_scheme() -> None:
    body = b'{"event":"workflow.completed"}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature("k", body, 1_700_000_000) == f"t=1700000000,v1={expected}"


def test_the_readmes_verification_snippet_accepts_a_delivery_and_refuses_a_forgery() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    snippet = readme.split("Verifying a delivery (Python):\n\n```python\n", 1)[1].split("```")[0]
    scope: dict[str, Any] = {}
    exec(snippet, scope)  # the README's own code, as a receiver would paste it
    body = b'{"event":"workflow.completed"}'
    header = signature(SECRET, body, int(time.time()))
    assert scope["verify"](SECRET, header, body)
    assert not scope["verify"](SECRET, header, body + b" ")
    assert not scope["verify"]("wrong", header, body)
    stale = signature(SECRET, body, int(time.time()) - 3600)
    assert not scope["verify"](SECRET, stale, body)


async def test_an_endpoint_of_every_change_is_not_sent_the_records_of_its_own_deliveries(
    tmp_path: Path,
) -> None:
    async with receiving() as receiver:
        every_change = [
            settings_module.WebhookEndpointSettings(receiver.url, ["workflow.changed"], SECRET)
        ]
        async with running_gateway(tmp_path, hooks(receiver, endpoints=every_change)) as gw:
            workflow_id = await complete(gw)  # four transitions: four workflow.changed events
            await eventually(lambda: len(receiver.received) == 4)
            await asyncio.sleep(0.3)  # a delivery's record would make a fifth, and so on
            assert len(receiver.received) == 4
            assert {d["status"] for d in await deliveries(gw, workflow_id)} == {"delivered"}
