"""The dashboard's figures (stox/stats.py): GET /api/v1/stats, owner-scoped, counted right over
a test clock, and their pushes on /ws?stats=1 (beside the workflows' messages): at most one a
second, only when they move."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket
from support import Clock, RunningGateway, eventually, report, running_gateway

import handlers
import settings as settings_module
from handlers import openapi
from handlers.responses import StatsSchema, WebSocketMessageSchema
from stox.auth.tokens import ADMIN, REVIEWER
from stox.bus.local import LocalBus
from stox.stats import StatsBoard, StatsFeed

STATS = "/api/v1/stats"
TIMEOUT = 5.0


def one_attempt(settings: settings_module.Settings) -> None:
    for step in settings.pipeline.steps:
        step.max_attempts = 1


async def stats(gw: RunningGateway, token: str) -> dict[str, Any]:
    response = await gw.fetch("GET", STATS, token=token)
    assert response.status == 200, response.body
    assert StatsSchema().validate(response.body) == {}, response.body
    return dict(response.body)


async def finish(gw: RunningGateway, clock: Clock, workflow_id: str, seconds: list[float]) -> None:
    """Report on each step in turn after `seconds[i]` on the clock; a negative one fails it."""
    for index, took in enumerate(seconds):
        clock.advance(abs(took))
        step = (await gw.status(workflow_id))["steps"][index]
        answer = await report(gw, workflow_id, step, success=took >= 0)
        assert answer.status == 200, answer.body


def step_figures(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["step"]: {k: v for k, v in s.items() if k != "step"} for s in body["steps"]}


async def test_the_figures_count_completions_failures_and_durations_per_owner(
    tmp_path: Path,
) -> None:
    clock = Clock()
    async with running_gateway(tmp_path, one_attempt, {"clock": clock}) as gw:
        alice, bob = gw.token("alice"), gw.token("bob")
        assert (await gw.fetch("GET", STATS)).status == 401
        empty = await stats(gw, alice)
        assert len(empty["minutes"]) == 60 and empty["steps"] == []
        assert (empty["completed"], empty["failed"], empty["running"]) == (0, 0, 0)

        done, broken = await gw.upload(alice), await gw.upload(alice)
        await gw.upload(bob)
        await finish(gw, clock, done, [1, 2, 3])
        await finish(gw, clock, broken, [-4])

        mine = await eventually(lambda: stats(gw, alice), lambda b: b["failed"] == 1)
        assert (mine["completed"], mine["failed"], mine["running"], mine["waiting"]) == (1, 1, 0, 0)
        last = mine["minutes"][-1]
        assert (last["completed"], last["failed"]) == (1, 1)
        assert last["start"] == "2026-01-01T00:00:00.000000Z"
        assert sum(m["completed"] + m["failed"] for m in mine["minutes"][:-1]) == 0
        assert step_figures(mine) == {
            # 1 s (completed) and 10 s (failed: dispatched at the upload, before the other's
            # 6 s and its own 4): nearest-rank p50 1, p95 10
            "image_processing": {
                "attempts": 2,
                "failures": 1,
                "failure_rate": 0.5,
                "p50": 1.0,
                "p95": 10.0,
            },
            "ai_enhancement": {
                "attempts": 1,
                "failures": 0,
                "failure_rate": 0.0,
                "p50": 2.0,
                "p95": 2.0,
            },
            "seo_generation": {
                "attempts": 1,
                "failures": 0,
                "failure_rate": 0.0,
                "p50": 3.0,
                "p95": 3.0,
            },
        }
        theirs = await stats(gw, bob)
        assert (theirs["completed"], theirs["failed"], theirs["running"]) == (0, 0, 1)
        assert theirs["steps"] == []
        for role in (ADMIN, REVIEWER):  # everyone's
            every = await stats(gw, gw.token("carol", role))
            assert (every["completed"], every["failed"], every["running"]) == (1, 1, 1)
            assert step_figures(every) == step_figures(mine)

        clock.advance(60 * 60)  # an hour later: out of the window
        later = await stats(gw, alice)
        assert (later["completed"], later["failed"], later["steps"]) == (0, 0, [])
        assert later["minutes"][0]["start"] == "2026-01-01T00:01:00.000000Z"


def test_the_board_skips_duplicates_and_counts_reviews_waiting() -> None:
    clock = Clock()
    board = StatsBoard(clock)

    def doc(status: str, step_status: str, version: int) -> dict[str, Any]:
        return {
            "status": status,
            "version": version,
            "updated_at": "2026-01-01T00:00:05.000000Z",
            "steps": [{"name": "copy_review", "status": step_status, "attempts": []}],
        }

    assert board.record(
        "w1", "alice", 1, [("step_waiting_review", "copy_review")], doc("running", "waiting", 1)
    )
    assert board.record("w2", "alice", 1, [], doc("running", "pending", 1))
    assert not board.record("w1", "alice", 1, [], doc("running", "waiting", 1))  # twice
    view = board.view("alice")
    assert (view["running"], view["waiting"]) == (2, 1)
    assert board.record(
        "w1", "alice", 2, [("workflow_completed", None)], doc("completed", "completed", 2)
    )
    assert not board.record(
        "w1", "alice", 2, [("workflow_completed", None)], doc("completed", "completed", 2)
    )
    view = board.view("alice")
    assert (view["running"], view["waiting"], view["completed"]) == (1, 0, 1)
    assert board.view("bob")["running"] == 0 and board.view(None)["completed"] == 1
    clock.advance(2 * 3600)  # out of the window; alice's running one stays
    assert board.view(None)["completed"] == 0 and board.view(None)["running"] == 1
    later = {**doc("completed", "completed", 1), "updated_at": "2026-01-01T02:00:00.000000Z"}
    assert board.record("w3", "bob", 1, [("workflow_completed", None)], later)
    assert list(board._owners) == ["bob"]  # a new minute: alice, with nothing left, forgotten
    assert board.view(None)["completed"] == 1 and board.view("alice")["running"] == 1


class FakeSocket:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    def send(self, message: bytes) -> asyncio.Future[None]:
        self.messages.append(json.loads(message))
        self.arrived.set()
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        pass


async def test_the_feed_pushes_at_most_once_a_second_and_only_what_moved() -> None:
    from stox.hub import Subscription

    clock = Clock()
    board = StatsBoard(clock)
    feed = StatsFeed(board, lambda sub: None, interval=0.3)
    socket = FakeSocket()
    sub = Subscription(socket, user="alice", owner="alice", workflow_id=None, max_backlog=1 << 20)
    assert feed.add(sub)
    assert [m["type"] for m in socket.messages] == ["stats"]  # the figures on opening

    finished = {"status": "completed", "updated_at": "2026-01-01T00:00:01.000000Z", "steps": []}
    arrivals: list[float] = []
    for version in range(1, 6):  # five changes in quick succession: one push
        board.record(f"w{version}", "alice", 1, [("workflow_completed", None)], finished)
        feed.changed("alice")
    start = time.monotonic()
    socket.arrived.clear()
    await asyncio.wait_for(socket.arrived.wait(), TIMEOUT)
    arrivals.append(time.monotonic() - start)
    assert len(socket.messages) == 2 and socket.messages[1]["data"]["completed"] == 5
    assert arrivals[0] >= 0.25  # not before `interval` since the last push
    feed.changed("alice")  # a change that moves nothing: no push
    feed.changed("bob")  # another owner's: not this view
    await asyncio.sleep(0.5)
    assert len(socket.messages) == 2
    versions = [m["version"] for m in socket.messages]
    assert versions == sorted(versions)
    for message in socket.messages:
        assert WebSocketMessageSchema().validate(message) == {}
    feed.remove(sub)
    assert feed.subscribers == 0


async def stats_socket(
    gw: RunningGateway, token: str
) -> tornado.websocket.WebSocketClientConnection:
    request = tornado.httpclient.HTTPRequest(
        gw.ws_url + "?stats=1", headers={"Origin": gw.base_url}, request_timeout=10
    )
    return await tornado.websocket.websocket_connect(request, subprotocols=["bearer", token])


async def receive(
    conn: tornado.websocket.WebSocketClientConnection, wait: float = TIMEOUT
) -> dict[str, Any]:
    """The next `stats` message; the workflows' messages before it are skipped."""
    async with asyncio.timeout(wait):
        while True:
            raw = await conn.read_message()
            assert isinstance(raw, str), f"closed: {conn.close_code}"
            message: dict[str, Any] = json.loads(raw)
            assert WebSocketMessageSchema().validate(message) == {}, message
            if message["type"] == "stats":
                assert message["workflow_id"] == ""
                assert StatsSchema().validate(message["data"]) == {}
                return message


async def test_the_socket_pushes_the_figures_at_most_once_a_second(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, one_attempt) as gw:
        alice = gw.token("alice")
        earlier = await gw.upload(alice)
        await gw.gateway.orchestrator.drain()
        conn = await stats_socket(gw, alice)
        other = await stats_socket(gw, gw.token("bob"))
        try:
            raw = await asyncio.wait_for(conn.read_message(), TIMEOUT)
            assert isinstance(raw, str)
            snapshot = json.loads(raw)
            assert (snapshot["type"], snapshot["workflow_id"]) == ("snapshot", earlier)
            first = await receive(conn)  # the figures once the snapshot is out
            loop = asyncio.get_running_loop()
            arrived = [loop.time()]
            assert first["data"]["running"] == 1
            await receive(other)
            ids = [await gw.upload(alice) for _ in range(3)]
            for workflow_id in ids:  # three failures in a burst
                step = (await gw.status(workflow_id))["steps"][0]
                assert (await report(gw, workflow_id, step, success=False)).status == 200
            figures = first["data"]
            while figures["failed"] < 3:
                message = await receive(conn)
                arrived.append(loop.time())
                figures = message["data"]
            gaps = [b - a for a, b in itertools.pairwise(arrived)]
            assert all(gap >= 0.9 for gap in gaps), gaps
            assert figures["running"] == 1 and figures["steps"][0]["failures"] == 3
            with pytest.raises(TimeoutError):  # nothing moves: nothing is sent
                await receive(conn, 1.5)
            with pytest.raises(TimeoutError):  # bob's figures did not move, nor did he see
                await asyncio.wait_for(other.read_message(), 0.1)
            for query in ("stats=2", f"stats=1&workflow_id={'0' * 32}"):
                request = tornado.httpclient.HTTPRequest(
                    f"{gw.ws_url}?{query}", headers={"Origin": gw.base_url}
                )
                with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
                    await tornado.websocket.websocket_connect(
                        request, subprotocols=["bearer", alice]
                    )
                assert refused.value.code == 400
        finally:
            conn.close()
            other.close()
            await eventually(lambda: gw.gateway.hub.subscriber_count == 0, within=TIMEOUT)


async def test_a_restarted_instance_reads_the_running_workflows_from_the_store(
    tmp_path: Path,
) -> None:
    async with running_gateway(tmp_path) as gw:
        alice = gw.token("alice")
        ids = [await gw.upload(alice) for _ in range(3)]
        step = (await gw.status(ids[0]))["steps"][0]
        assert (await report(gw, ids[0], step, success=False)).status == 200  # a retry pending
        await gw.gateway.orchestrator.drain()
    async with running_gateway(tmp_path) as gw:  # the same store, a new instance
        mine = await eventually(lambda: stats(gw, gw.token("alice")), lambda b: b["running"] == 3)
        assert (mine["completed"], mine["steps"]) == (0, [])  # before it started: not heard
        assert (await stats(gw, gw.token("bob")))["running"] == 0


async def test_instances_sharing_a_store_and_a_bus_count_the_same(tmp_path: Path) -> None:
    bus = LocalBus()
    async with (
        running_gateway(tmp_path, one_attempt, {"bus": bus}) as a,
        running_gateway(tmp_path, one_attempt, {"bus": bus}) as b,
    ):
        assert a.gateway.instance_id != b.gateway.instance_id
        alice = a.token("alice")
        done, broken = await a.upload(alice), await b.upload(alice)
        for index in range(3):  # one through instance a, the other's failure through b
            step = (await a.status(done))["steps"][index]
            assert (await report(a, done, step)).status == 200
        step = (await b.status(broken))["steps"][0]
        assert (await report(b, broken, step, success=False)).status == 200

        def finished(body: dict[str, Any]) -> bool:
            return (body["completed"], body["failed"]) == (1, 1)

        seen = [await eventually(functools.partial(stats, gw, alice), finished) for gw in (a, b)]
        keys = ("completed", "failed", "steps", "running", "waiting")  # `since`: each its own
        on_a, on_b = ({k: body[k] for k in keys} for body in seen)
        assert on_a == on_b and step_figures(on_a)["image_processing"]["attempts"] == 2


async def test_the_answer_conforms_to_the_openapi_document(tmp_path: Path) -> None:
    from test_openapi import conforms

    document = openapi.build(handlers.routes)
    async with running_gateway(tmp_path, one_attempt) as gw:
        alice = gw.token("alice")
        conforms(document, STATS, "get", await gw.fetch("GET", STATS, token=alice))
        workflow_id = await gw.upload(alice)
        step = (await gw.status(workflow_id))["steps"][0]
        assert (await report(gw, workflow_id, step, success=False)).status == 200
        body = await eventually(lambda: stats(gw, alice), lambda b: b["failed"] == 1)
        assert body["steps"][0]["p50"] is not None
        conforms(document, STATS, "get", await gw.fetch("GET", STATS, token=alice))
        conforms(document, STATS, "get", await gw.fetch("GET", STATS))  # 401


def test_durations_cross_minute_and_hour_boundaries_and_odd_timestamps_count_now() -> None:
    clock = Clock()
    clock.advance(3630)  # 01:00:30: all of them in the last hour
    board = StatsBoard(clock)

    def ended(name: str, began: str, ended: Any) -> dict[str, Any]:
        attempt = {"outcome": "completed", "dispatched_at": began}
        step = {"name": name, "status": "completed", "attempts": [attempt]}
        return {"status": "running", "updated_at": ended, "steps": [step]}

    cases = [
        ("same_minute", "2026-01-01T00:01:01.250000Z", "2026-01-01T00:01:03.750000Z", 2.5),
        ("next_minute", "2026-01-01T00:01:59.500000Z", "2026-01-01T00:02:00.250000Z", 0.75),
        ("next_hour", "2026-01-01T00:59:59.000000Z", "2026-01-01T01:00:01.000000Z", 2.0),
        ("clock_skew", "2026-01-01T00:03:05.000000Z", "2026-01-01T00:03:04.000000Z", 0.0),
    ]
    for version, (name, began, at, _) in enumerate(cases, 1):
        changes = [("step_completed", name)]
        assert board.record("w1", "alice", version, changes, ended(name, began, at))
    steps = step_figures(board.view("alice"))
    assert {name: steps[name]["p50"] for name, *_ in cases} == {
        name: seconds for name, _, _, seconds in cases
    }
    # an updated_at that is not one `isoformat` wrote: counted in the clock's minute, no duration
    clock.advance(30)
    odd = ended("odd", "2026-01-01T00:00:00.000000Z", "yesterday")
    assert board.record("w2", "alice", 1, [("step_completed", "odd")], odd)
    assert step_figures(board.view("alice"))["odd"]["attempts"] == 1
