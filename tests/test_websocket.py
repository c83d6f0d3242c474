"""GET /ws end to end (docs/architecture.md#the-hub-and-the-websocket): a real gateway, real
WebSocket clients, HTTP to drive it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket
from support import Clock, RunningGateway, eventually, report, running_gateway

import settings as settings_module

Connection = tornado.websocket.WebSocketClientConnection

MESSAGE_KEYS = {"type", "workflow_id", "version", "data", "ts"}
STEPS = ["image_processing", "ai_enhancement", "seo_generation"]
TIMEOUT = 5.0


# -- helpers -------------------------------------------------------------------------------


async def receive_raw(conn: Connection) -> str:
    raw = await asyncio.wait_for(conn.read_message(), TIMEOUT)
    assert raw is not None, f"socket closed (code {conn.close_code}, {conn.close_reason!r})"
    assert isinstance(raw, str), "messages are JSON text frames"
    return raw


async def receive(conn: Connection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await receive_raw(conn))
    assert set(message) == MESSAGE_KEYS, message
    return message


async def receive_until(conn: Connection, kind: str, limit: int = 20) -> list[dict[str, Any]]:
    """Messages up to and including the first of type `kind`."""
    messages: list[dict[str, Any]] = []
    while len(messages) < limit:
        messages.append(await receive(conn))
        if messages[-1]["type"] == kind:
            return messages
    raise AssertionError(f"no {kind} within {limit} messages: {[m['type'] for m in messages]}")


async def assert_silent(conn: Connection, wait: float = 0.2) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(conn.read_message(), wait)


async def closed_with(conn: Connection) -> int | None:
    """Read until the server closes the socket; the close code."""
    while True:
        message = await asyncio.wait_for(conn.read_message(), TIMEOUT)
        if message is None:
            return conn.close_code


def assert_change(message: dict[str, Any], kind: str, workflow_id: str, step: str | None) -> None:
    assert message["type"] == kind, message["type"]
    assert message["workflow_id"] == workflow_id
    assert set(message["data"]) == {"step", "workflow"}
    assert message["data"]["step"] == step
    workflow = message["data"]["workflow"]
    assert workflow["id"] == workflow_id
    assert workflow["version"] == message["version"]
    assert "outbox" not in workflow
    assert isinstance(message["ts"], str) and message["ts"].endswith("Z")


def assert_ordered(messages: list[dict[str, Any]]) -> None:
    versions = [m["version"] for m in messages]
    assert versions == sorted(versions), f"versions out of order: {versions}"


class Client:
    """Open sockets for one test; every one is closed at the end."""

    def __init__(self, gw: RunningGateway) -> None:
        self.gw = gw
        self.sockets: list[Connection] = []

    async def connect(self, token: str | None, workflow_id: str | None = None, **kw: Any) -> Any:
        conn = await self.gw.ws_connect(token, workflow_id, **kw)
        self.sockets.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.sockets:
            conn.close()


@asynccontextmanager
async def gateway(
    tmp_path: Path, configure: Callable[[settings_module.Settings], None] | None = None
) -> AsyncIterator[tuple[RunningGateway, Client]]:
    async with running_gateway(tmp_path, configure) as gw:
        client = Client(gw)
        try:
            yield gw, client
        finally:
            client.close()
            # let the close handshakes finish before the server goes away
            await eventually(lambda: gw.gateway.hub.subscriber_count == 0, within=TIMEOUT)


async def settled_upload(gw: RunningGateway, token: str, **product: Any) -> dict[str, Any]:
    """Upload, wait for its events to be confirmed, return the stored (public) document."""
    workflow_id = await gw.upload(token, **product)
    await gw.gateway.orchestrator.drain()
    return await status(gw, token, workflow_id)


async def status(gw: RunningGateway, token: str, workflow_id: str) -> dict[str, Any]:
    response = await gw.fetch(
        "GET", f"/api/v1/workflow/status?workflow_id={workflow_id}", token=token
    )
    assert response.status == 200, response.body
    return dict(response.body)


async def report_current(
    gw: RunningGateway, workflow: dict[str, Any], *, success: bool = True
) -> None:
    """Report on the current attempt of `workflow` (as a message or a status shows it)."""
    step = workflow["steps"][workflow["current_step"]]
    response = await report(gw, workflow["id"], step, success=success)
    assert response.status == 200, response.body


def fast_retries(settings: settings_module.Settings) -> None:
    for step in settings.pipeline.steps:
        step.max_attempts = 2
        step.backoff = settings_module.Duration(0.05)


# -- the handshake: who may subscribe ------------------------------------------------------


@pytest.mark.parametrize("via", ["protocol", "query"])
async def test_a_user_token_opens_the_socket(tmp_path: Path, via: str) -> None:
    async with gateway(tmp_path) as (gw, client):
        token = gw.token("alice")
        wf = await settled_upload(gw, token)
        conn = await client.connect(token, wf["id"], via=via)
        if via == "protocol":
            assert conn.selected_subprotocol == "bearer"
        snapshot = await receive(conn)
        assert (snapshot["type"], snapshot["workflow_id"]) == ("snapshot", wf["id"])


async def test_an_authorization_header_opens_the_socket(tmp_path: Path) -> None:
    """The document's bearer scheme is the Authorization header: the fuzzer's right token
    was refused with 401 when /ws read only the subprotocols and ?token=."""
    async with gateway(tmp_path) as (gw, client):
        token = gw.token("alice")
        wf = await settled_upload(gw, token)
        request = tornado.httpclient.HTTPRequest(
            f"{gw.ws_url}?workflow_id={wf['id']}",
            headers={"Origin": gw.base_url, "Authorization": f"Bearer {token}"},
        )
        conn = await tornado.websocket.websocket_connect(request)
        client.sockets.append(conn)
        assert conn.selected_subprotocol is None
        snapshot = await receive(conn)
        assert (snapshot["type"], snapshot["workflow_id"]) == ("snapshot", wf["id"])


async def test_the_bearer_subprotocol_is_matched_case_insensitively(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, client):
        token = gw.token("alice")
        wf = await settled_upload(gw, token)
        request = tornado.httpclient.HTTPRequest(
            f"{gw.ws_url}?workflow_id={wf['id']}", headers={"Origin": gw.base_url}
        )
        conn = await tornado.websocket.websocket_connect(request, subprotocols=["Bearer", token])
        client.sockets.append(conn)
        assert conn.selected_subprotocol == "Bearer"  # one the client offered, as RFC 6455 asks
        assert (await receive(conn))["type"] == "snapshot"


def refusal(status: int, headers: Any, body: bytes | None) -> dict[str, Any]:
    """The `error` of a refused handshake, in the shape every endpoint answers errors in."""
    assert headers.get("Content-Type", "").startswith("application/json"), (status, body)
    assert len(headers.get("X-Request-Id", "")) == 32, headers
    answer = json.loads(body or b"null")
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    error = answer["error"]
    assert set(error) <= {"code", "message", "fields"} and error["code"] and error["message"]
    return dict(error)


async def handshake_refusal(
    gw: RunningGateway, token: str | None, **kw: Any
) -> tuple[int, dict[str, Any]]:
    """A WebSocket client's refused handshake: the status and the JSON error."""
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        conn = await gw.ws_connect(token, **kw)
        conn.close()
    response = refused.value.response
    assert response is not None
    return refused.value.code, refusal(response.code, response.headers, response.body)


async def handshake_error(gw: RunningGateway, token: str | None, **kw: Any) -> int:
    return (await handshake_refusal(gw, token, **kw))[0]


@pytest.mark.parametrize("via", ["protocol", "query"])
async def test_missing_bad_or_expired_tokens_are_refused_with_401(tmp_path: Path, via: str) -> None:
    async with gateway(tmp_path) as (gw, _):
        assert await handshake_error(gw, None) == 401
        assert await handshake_error(gw, "not-a-jwt", via=via) == 401
        expired = gw.token("alice", expires_in=-60)
        assert await handshake_error(gw, expired, via=via) == 401
        forged = gw.token("alice")[:-4] + "AAAA"
        assert await handshake_error(gw, forged, via=via) == 401
        assert gw.gateway.hub.subscriber_count == 0


async def test_a_service_token_is_refused_with_403(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, _):
        assert await handshake_error(gw, gw.service_token()) == 403
        assert await handshake_error(gw, gw.service_token(), via="query") == 403


async def test_a_foreign_origin_is_refused_with_403(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, client):
        token = gw.token("alice")
        assert await handshake_error(gw, token, origin="http://evil.example") == 403
        other_port = f"http://127.0.0.1:{gw.port + 1}"
        assert await handshake_error(gw, token, origin=other_port) == 403
        # the server's own origin is allowed
        conn = await client.connect(token, origin=gw.base_url)
        await assert_silent(conn, 0.05)  # no workflows: no snapshot


async def test_each_refusal_names_its_reason_in_the_json_error_shape(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, _):
        status, error = await handshake_refusal(gw, None)
        assert (status, error["code"]) == (401, "unauthorized")
        status, error = await handshake_refusal(gw, "not-a-jwt", via="query")
        assert (status, error["code"]) == (401, "invalid_token")
        status, error = await handshake_refusal(gw, gw.service_token())
        assert (status, error["code"]) == (403, "forbidden")
        status, error = await handshake_refusal(gw, gw.token(), origin="http://evil.example")
        assert (status, error["code"]) == (403, "forbidden")
        status, error = await handshake_refusal(gw, gw.token(), workflow_id="not-hex")
        assert (status, error["code"]) == (400, "invalid_input")
        assert error["fields"] == {"workflow_id": "expected a 32-character hex id"}


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        pytest.param({}, 400, "bad_request", id="no-upgrade"),
        pytest.param(
            {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"},
            400,
            "bad_request",
            id="no-key",
        ),
        pytest.param(
            {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Version": "8",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
            426,
            "upgrade_required",
            id="old-version",
        ),
    ],
)
async def test_what_tornado_refuses_is_answered_in_the_json_error_shape(
    tmp_path: Path, headers: dict[str, str], status: int, code: str
) -> None:
    async with gateway(tmp_path) as (gw, _):
        token = gw.token()
        headers = {"Sec-WebSocket-Protocol": f"bearer, {token}", "Origin": gw.base_url, **headers}
        request = tornado.httpclient.HTTPRequest(gw.ws_url.replace("ws:", "http:"), headers=headers)
        response = await tornado.httpclient.AsyncHTTPClient().fetch(request, raise_error=False)
        assert response.code == status
        assert refusal(response.code, response.headers, response.body)["code"] == code
        if status == 426:
            assert response.headers["Sec-WebSocket-Version"] == "13"


@pytest.mark.parametrize("workflow_id", ["not-hex", "ABCDEF" + "0" * 26, "a" * 31, "a" * 33])
async def test_a_malformed_workflow_id_is_refused_with_400(
    tmp_path: Path, workflow_id: str
) -> None:
    async with gateway(tmp_path) as (gw, _):
        assert await handshake_error(gw, gw.token("alice"), workflow_id=workflow_id) == 400


async def test_another_users_workflow_is_closed_with_4404(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, client):
        bobs = await settled_upload(gw, gw.token("bob"))
        conn = await client.connect(gw.token("alice"), bobs["id"])
        # closed before anything, in particular before any snapshot, is sent
        assert await asyncio.wait_for(conn.read_message(), TIMEOUT) is None
        assert conn.close_code == 4404

        missing = await client.connect(gw.token("alice"), "0" * 32)
        assert await closed_with(missing) == 4404

        # bob's workflow keeps changing; alice's closed socket saw none of it
        await report_current(gw, bobs)
        await eventually(lambda: gw.gateway.hub.subscriber_count == 0, within=TIMEOUT)


async def test_an_admin_may_subscribe_to_anyones_workflow(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, client):
        bobs = await settled_upload(gw, gw.token("bob"))
        conn = await client.connect(gw.token("root", role="admin"), bobs["id"])
        snapshot = await receive(conn)
        assert snapshot["type"] == "snapshot"
        assert snapshot["data"] == bobs


async def test_an_admins_socket_of_all_workflows_carries_everyones_with_their_names(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path) as (gw, client):
        bobs = await settled_upload(gw, gw.token("bob"))
        roots = await settled_upload(gw, gw.token("root", role="admin"))
        assert bobs["owner_name"] == "bob" and roots["owner_name"] == "root"
        admin = await client.connect(gw.token("root", role="admin"))
        alice = await client.connect(gw.token("alice"))
        snapshots = [await receive(admin), await receive(admin)]
        assert {m["workflow_id"] for m in snapshots} == {bobs["id"], roots["id"]}
        await report_current(gw, bobs)  # a change of bob's reaches the admin, not alice
        change = await receive(admin)
        assert change["workflow_id"] == bobs["id"] and change["data"]["workflow"]["owner"] == "bob"
        alices = await settled_upload(gw, gw.token("alice"))
        first = await receive(alice)  # her own snapshot of nothing, then her upload
        assert first["workflow_id"] == alices["id"]
        # a reviewer sees everyone's too (to find what waits for review)
        reviewer = await client.connect(gw.token("rita", role="reviewer"))
        seen = {(await receive(reviewer))["workflow_id"] for _ in range(3)}
        assert seen == {bobs["id"], roots["id"], alices["id"]}


# -- one workflow --------------------------------------------------------------------------


async def test_one_workflow_snapshot_then_every_change_to_completion(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, client):
        token = gw.token("alice")
        stored = await settled_upload(gw, token, description="a blue mug")
        conn = await client.connect(token, stored["id"])

        snapshot = await receive(conn)
        assert snapshot["type"] == "snapshot"
        assert snapshot["workflow_id"] == stored["id"]
        assert snapshot["version"] == stored["version"]
        assert snapshot["data"] == stored
        assert "outbox" not in snapshot["data"]

        changes: list[dict[str, Any]] = []
        current = snapshot["data"]
        for index in range(len(STEPS)):
            await report_current(gw, current)
            last = "workflow_completed" if index == len(STEPS) - 1 else "step_dispatched"
            batch = await receive_until(conn, last)
            changes += batch
            current = batch[-1]["data"]["workflow"]

        assert [(m["type"], m["data"]["step"]) for m in changes] == [
            ("step_completed", "image_processing"),
            ("step_dispatched", "ai_enhancement"),
            ("step_completed", "ai_enhancement"),
            ("step_dispatched", "seo_generation"),
            ("step_completed", "seo_generation"),
            ("workflow_completed", None),
        ]
        for message in changes:
            assert_change(message, message["type"], stored["id"], message["data"]["step"])
            assert message["version"] > snapshot["version"]
        assert_ordered([snapshot, *changes])
        # the changes of one transition share its version; transitions are strictly newer
        versions = [m["version"] for m in changes]
        assert versions[0] == versions[1] < versions[2] == versions[3] < versions[4] == versions[5]

        final = changes[-1]["data"]["workflow"]
        assert final["status"] == "completed"
        assert [s["status"] for s in final["steps"]] == ["completed"] * 3
        assert final["steps"][0]["result"] == {"done": "image_processing"}
        await assert_silent(conn)  # confirming the outbox is no change a client sees


async def test_two_sockets_on_one_workflow_receive_identical_bytes(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, client):
        token = gw.token("alice")
        wf = await settled_upload(gw, token)
        one = await client.connect(token, wf["id"])
        two = await client.connect(token, wf["id"], via="query")
        assert (await receive(one))["type"] == (await receive(two))["type"] == "snapshot"

        await report_current(gw, wf)
        first = [await receive_raw(one), await receive_raw(one)]
        second = [await receive_raw(two), await receive_raw(two)]
        assert first == second
        assert [json.loads(m)["type"] for m in first] == ["step_completed", "step_dispatched"]


async def test_a_failure_is_retried_and_then_fails_the_workflow(tmp_path: Path) -> None:
    async with gateway(tmp_path, fast_retries) as (gw, client):
        token = gw.token("alice")
        wf = await settled_upload(gw, token)
        conn = await client.connect(token, wf["id"])
        snapshot = await receive(conn)

        await report_current(gw, snapshot["data"], success=False)
        retrying, dispatched = await receive(conn), await receive(conn)
        assert_change(retrying, "step_retrying", wf["id"], "image_processing")
        assert retrying["data"]["workflow"]["steps"][0]["error"] == "boom"  # support.report's
        assert_change(dispatched, "step_dispatched", wf["id"], "image_processing")
        second_attempt = dispatched["data"]["workflow"]["steps"][0]
        assert second_attempt["attempt"] == 2
        assert second_attempt["step_id"] != wf["steps"][0]["step_id"]

        await report_current(gw, dispatched["data"]["workflow"], success=False)
        step_failed, workflow_failed = await receive(conn), await receive(conn)
        assert_change(step_failed, "step_failed", wf["id"], "image_processing")
        assert_change(workflow_failed, "workflow_failed", wf["id"], None)
        assert step_failed["version"] == workflow_failed["version"]
        assert workflow_failed["data"]["workflow"]["status"] == "failed"
        assert_ordered([snapshot, retrying, dispatched, step_failed, workflow_failed])
        assert snapshot["version"] < retrying["version"] < dispatched["version"]

        # a retry restarts the failed step
        response = await gw.fetch(
            "POST", "/api/v1/workflow/retry", {"workflow_id": wf["id"]}, token=token
        )
        assert response.status == 200, response.body
        restarted = await receive(conn)
        assert_change(restarted, "step_dispatched", wf["id"], "image_processing")
        assert restarted["data"]["workflow"]["status"] == "running"
        assert restarted["version"] > workflow_failed["version"]


async def test_cancel_is_pushed(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, client):
        token = gw.token("alice")
        wf = await settled_upload(gw, token)
        conn = await client.connect(token, wf["id"])
        snapshot = await receive(conn)
        response = await gw.fetch(
            "POST", "/api/v1/workflow/cancel", {"workflow_id": wf["id"]}, token=token
        )
        assert response.status == 200, response.body
        cancelled = await receive(conn)
        assert_change(cancelled, "workflow_cancelled", wf["id"], None)
        assert cancelled["version"] > snapshot["version"]
        workflow = cancelled["data"]["workflow"]
        assert workflow["status"] == "cancelled"
        assert [s["status"] for s in workflow["steps"]] == ["cancelled"] * 3


# -- all of a user's workflows -------------------------------------------------------------


async def test_all_my_workflows_snapshots_then_only_my_changes(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, client):
        alice, bob = gw.token("alice"), gw.token("bob")
        first = await settled_upload(gw, alice, name="first")
        bobs = await settled_upload(gw, bob, name="bob's")
        second = await settled_upload(gw, alice, name="second")
        conn = await client.connect(alice)

        snapshots = [await receive(conn), await receive(conn)]
        assert {m["type"] for m in snapshots} == {"snapshot"}
        assert {m["workflow_id"]: m["data"] for m in snapshots} == {
            first["id"]: first,
            second["id"]: second,
        }
        for message in snapshots:
            assert message["version"] == message["data"]["version"]

        # bob's changes never arrive: the next message is alice's new upload
        await report_current(gw, bobs)
        await settled_upload(gw, bob, name="bob's second")
        third_id = await gw.upload(alice, name="third")
        new = await receive(conn)
        assert_change(new, "step_dispatched", third_id, "image_processing")
        assert new["data"]["workflow"]["product"]["name"] == "third"
        assert new["data"]["workflow"]["owner"] == "alice"

        await report_current(gw, first)
        completed, dispatched = await receive(conn), await receive(conn)
        assert_change(completed, "step_completed", first["id"], "image_processing")
        assert_change(dispatched, "step_dispatched", first["id"], "ai_enhancement")
        await assert_silent(conn)


async def test_all_my_workflows_with_none_yet_starts_empty(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, client):
        token = gw.token("carol")
        conn = await client.connect(token, via="query")
        await assert_silent(conn, 0.1)
        workflow_id = await gw.upload(token)
        assert_change(await receive(conn), "step_dispatched", workflow_id, "image_processing")


# -- unsubscribing -------------------------------------------------------------------------


async def test_closing_the_client_unsubscribes(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, client):
        hub = gw.gateway.hub
        token = gw.token("alice")
        wf = await settled_upload(gw, token)
        one = await client.connect(token, wf["id"])
        two = await client.connect(token)
        await receive(one)
        await receive(two)
        assert hub.subscriber_count == 2

        one.close()
        await eventually(lambda: hub.subscriber_count == 1, within=2)
        two.close(1000, "bye")
        await eventually(lambda: hub.subscriber_count == 0, within=2)

        # changes after that go nowhere and break nothing
        await report_current(gw, wf)
        assert (await status(gw, token, wf["id"]))["steps"][0]["status"] == "completed"


async def test_a_client_gone_while_its_snapshot_loads_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with gateway(tmp_path) as (gw, client):
        orchestrator = gw.gateway.orchestrator
        loading, release = asyncio.Event(), asyncio.Event()
        real_list = orchestrator.list_workflows

        async def slow_list(*args: Any, **kwargs: Any) -> Any:
            loading.set()
            await release.wait()
            return await real_list(*args, **kwargs)

        monkeypatch.setattr(orchestrator, "list_workflows", slow_list)
        conn = await client.connect(gw.token("alice"))
        await asyncio.wait_for(loading.wait(), TIMEOUT)
        assert conn.protocol is not None
        conn.protocol._abort()  # the client vanishes without a close handshake
        await asyncio.sleep(0.05)
        release.set()
        await eventually(lambda: gw.gateway.hub.subscriber_count == 0, within=2)


async def test_server_shutdown_closes_sockets(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw:
        token = gw.token("alice")
        wf = await settled_upload(gw, token)
        one = await gw.ws_connect(token, wf["id"])
        two = await gw.ws_connect(token)
        try:
            await receive(one)
            await receive(two)
            hub = gw.gateway.hub
            assert hub.subscriber_count == 2
        except BaseException:
            one.close()
            two.close()
            raise
    try:
        assert await closed_with(one) == 1001
        assert await closed_with(two) == 1001
        assert hub.subscriber_count == 0
    finally:
        one.close()
        two.close()


# -- limits --------------------------------------------------------------------------------


async def test_a_socket_is_closed_with_4401_when_its_token_expires(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, client):
        token = gw.token("alice", expires_in=2)
        wf = await settled_upload(gw, token)
        conn = await client.connect(token)
        assert (await receive(conn))["type"] == "snapshot"
        # open until exp (whole seconds, 1-2 s from now), then closed; nothing more is sent
        assert await closed_with(conn) == 4401
        assert conn.close_reason == "token expired"
        await eventually(lambda: gw.gateway.hub.subscriber_count == 0, within=TIMEOUT)
        await report_current(gw, wf)
        # a fresh token opens a fresh socket
        again = await client.connect(gw.token("alice"))
        assert (await receive(again))["type"] == "snapshot"


def two_sockets_per_user(settings: settings_module.Settings) -> None:
    settings.websocket.max_sockets_per_user = 2


async def test_sockets_over_the_per_user_limit_are_closed_with_4029(tmp_path: Path) -> None:
    async with gateway(tmp_path, two_sockets_per_user) as (gw, client):
        alice = gw.token("alice")
        wf = await settled_upload(gw, alice)
        first = await client.connect(alice)
        second = await client.connect(alice, wf["id"], via="query")
        third = await client.connect(alice)
        # closed before anything is sent, with the limit named
        assert await asyncio.wait_for(third.read_message(), TIMEOUT) is None
        assert third.close_code == 4029
        assert third.close_reason == "too many open sockets: at most 2 per user"
        assert (await receive(first))["type"] == (await receive(second))["type"] == "snapshot"

        # other users have their own; admins are limited too
        await assert_silent(await client.connect(gw.token("bob")), 0.05)  # open, no workflows
        root = gw.token("root", role="admin")
        for _ in range(2):
            await receive(await client.connect(root, wf["id"]))
        assert await closed_with(await client.connect(root, wf["id"])) == 4029

        # a socket that closes frees its place
        first.close()
        await eventually(lambda: gw.gateway.hub.subscriber_count == 4, within=TIMEOUT)
        replacement = await client.connect(alice)
        assert (await receive(replacement))["type"] == "snapshot"


async def test_a_client_message_over_64_kib_closes_the_socket_with_1009(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, client):
        token = gw.token("alice")
        conn = await client.connect(token)
        await conn.write_message("x" * 1024)  # ignored: clients only listen
        workflow_id = await gw.upload(token)
        assert_change(await receive(conn), "step_dispatched", workflow_id, "image_processing")

        await conn.write_message("x" * (64 * 1024 + 1))
        assert await closed_with(conn) == 1009
        await eventually(lambda: gw.gateway.hub.subscriber_count == 0, within=TIMEOUT)


# -- review steps (issue 14) ---------------------------------------------------------------

REVIEW = "/api/v1/workflow/review"


def apparel(on_deadline: str = "fail") -> Callable[[settings_module.Settings], None]:
    """A pipeline `apparel`: image work and AI copy at once, a day's review, then SEO."""

    def configure(settings: settings_module.Settings) -> None:
        step = settings_module.StepSettings
        settings.pipelines = {
            "apparel": settings_module.PipelineSettings(
                steps=[
                    step(name="image_processing"),
                    step(name="ai_enhancement"),
                    step(
                        name="copy_review",
                        kind="review",
                        after=["image_processing", "ai_enhancement"],
                        timeout=settings_module.Duration(24 * 3600),
                        on_deadline=on_deadline,
                    ),
                    step(name="seo_generation", after=["copy_review"]),
                ]
            )
        }

    return configure


def assert_documented(messages: list[dict[str, Any]]) -> None:
    """Each message is one the OpenAPI document describes (`WebSocketMessage`)."""
    from handlers.responses import WebSocketMessageSchema

    for message in messages:
        assert WebSocketMessageSchema().validate(message) == {}, message["type"]


def named(workflow: dict[str, Any], name: str) -> dict[str, Any]:
    [step] = [s for s in workflow["steps"] if s["name"] == name]
    return dict(step)


async def until_waiting(
    gw: RunningGateway, conn: Connection, workflow: dict[str, Any]
) -> list[dict[str, Any]]:
    """Report both parallel steps of an apparel `workflow`; the messages up to and including
    its step_waiting_review."""
    for name in ("image_processing", "ai_enhancement"):
        response = await report(gw, workflow["id"], named(workflow, name))
        assert response.status == 200, response.body
    return await receive_until(conn, "step_waiting_review")


async def test_a_subscriber_sees_the_review_wait_then_its_decision_in_version_order(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path, apparel()) as (gw, client):
        token = gw.token("alice")
        wf = await settled_upload(gw, token, pipeline="apparel")
        conn = await client.connect(token, wf["id"])
        snapshot = await receive(conn)
        assert [s["status"] for s in snapshot["data"]["steps"][:2]] == ["dispatched"] * 2

        before = await until_waiting(gw, conn, snapshot["data"])
        waiting = before[-1]
        assert_change(waiting, "step_waiting_review", wf["id"], "copy_review")
        # the join's wait begins in the transition of the second report
        assert [(m["type"], m["data"]["step"]) for m in before[-2:]] == [
            ("step_completed", "ai_enhancement"),
            ("step_waiting_review", "copy_review"),
        ]
        assert before[-2]["version"] == waiting["version"]
        review = named(waiting["data"]["workflow"], "copy_review")
        assert review["status"] == "waiting" and review["step_id"]

        edits = {"title": "Washed linen"}
        body = {
            "workflow_id": wf["id"],
            "step_id": review["step_id"],
            "decision": "approve",
            "result": edits,
        }
        response = await gw.fetch("POST", REVIEW, body, token=token)
        assert response.status == 200, response.body
        after = await receive_until(conn, "step_dispatched")

        assert [(m["type"], m["data"]["step"]) for m in after] == [
            ("step_reviewed", "copy_review"),
            ("step_dispatched", "seo_generation"),
        ]
        reviewed = after[0]
        assert_change(reviewed, "step_reviewed", wf["id"], "copy_review")
        assert reviewed["version"] == after[1]["version"] > waiting["version"]
        assert reviewed["version"] == response.body["version"]
        step = named(reviewed["data"]["workflow"], "copy_review")
        assert step["status"] == "completed" and step["result"] == edits
        assert step["review"]["decision"] == "approved" and step["review"]["by"] == "alice"
        assert_ordered([snapshot, *before, *after])
        assert_documented([snapshot, *before, *after])
        # the same decision again is a duplicate: no change, no message
        again = await gw.fetch("POST", REVIEW, body, token=token)
        assert again.body["result"] == "duplicate"
        await assert_silent(conn)


async def test_a_rejection_is_pushed_as_reviewed_then_failed(tmp_path: Path) -> None:
    async with gateway(tmp_path, apparel()) as (gw, client):
        token = gw.token("alice")
        wf = await settled_upload(gw, token, pipeline="apparel")
        conn = await client.connect(token, wf["id"])
        snapshot = await receive(conn)
        waiting = (await until_waiting(gw, conn, snapshot["data"]))[-1]
        review = named(waiting["data"]["workflow"], "copy_review")

        body = {
            "workflow_id": wf["id"],
            "step_id": review["step_id"],
            "decision": "reject",
            "reason": "too salesy",
        }
        assert (await gw.fetch("POST", REVIEW, body, token=token)).status == 200
        after = await receive_until(conn, "workflow_failed")

        assert [(m["type"], m["data"]["step"]) for m in after] == [
            ("step_reviewed", "copy_review"),
            ("step_failed", "copy_review"),
            ("workflow_failed", None),
        ]
        assert len({m["version"] for m in after}) == 1
        assert_documented(after)
        assert named(after[-1]["data"]["workflow"], "copy_review")["review"]["reason"] == (
            "too salesy"
        )


async def test_an_escalated_review_is_pushed(tmp_path: Path) -> None:
    clock = Clock()
    async with running_gateway(tmp_path, apparel("escalate"), {"clock": clock}) as gw:
        client = Client(gw)
        try:
            token = gw.token("alice")
            wf = await settled_upload(gw, token, pipeline="apparel")
            conn = await client.connect(token, wf["id"])
            snapshot = await receive(conn)
            waiting = (await until_waiting(gw, conn, snapshot["data"]))[-1]

            clock.advance(24 * 3600 + 1)
            [escalated] = await receive_until(conn, "step_review_escalated")

            assert_change(escalated, "step_review_escalated", wf["id"], "copy_review")
            assert escalated["version"] > waiting["version"]
            step = named(escalated["data"]["workflow"], "copy_review")
            assert step["status"] == "waiting" and "escalated_at" in step["review"]
            assert_documented([escalated])
        finally:
            client.close()
            await eventually(lambda: gw.gateway.hub.subscriber_count == 0, within=TIMEOUT)


async def test_a_reviewer_may_subscribe_to_anyones_workflow(tmp_path: Path) -> None:
    async with gateway(tmp_path, apparel()) as (gw, client):
        bobs = await settled_upload(gw, gw.token("bob"), pipeline="apparel")
        conn = await client.connect(gw.token("rita", role="reviewer"), bobs["id"])
        snapshot = await receive(conn)
        assert snapshot["type"] == "snapshot" and snapshot["data"] == bobs
        waiting = (await until_waiting(gw, conn, snapshot["data"]))[-1]
        assert_change(waiting, "step_waiting_review", bobs["id"], "copy_review")
        # a rival's decision reaches the reviewer's socket too
        body = {
            "workflow_id": bobs["id"],
            "step_id": named(waiting["data"]["workflow"], "copy_review")["step_id"],
            "decision": "approve",
        }
        assert (await gw.fetch("POST", REVIEW, body, token=gw.token("bob"))).status == 200
        reviewed = await receive_until(conn, "step_reviewed")
        assert named(reviewed[-1]["data"]["workflow"], "copy_review")["review"]["by"] == "bob"
