"""GET /metrics against a real gateway: Prometheus's own parser reads it, every family is
there, and each moves when the thing it counts happens; where it is served, and its token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
from prometheus_client.parser import text_string_to_metric_families
from support import (
    CANCEL,
    RETRY,
    RecordingBus,
    RunningGateway,
    eventually,
    free_port,
    report,
    running_gateway,
)

import settings as settings_module
from stox.hub import CLOSE_TOO_SLOW, Subscription, Tally
from stox.metrics.timed_store import TimedStore
from stox.metrics.workflows import WorkflowMetrics
from stox.version import VERSION

# README "Metrics": the fixed families (a dashboard reads these names)
FAMILIES = {
    "stox_workflows_started_total": "counter",
    "stox_workflows_completed_total": "counter",
    "stox_workflows_failed_total": "counter",
    "stox_workflows_cancelled_total": "counter",
    "stox_workflows_retried_total": "counter",
    "stox_workflow_duration_seconds": "histogram",
    "stox_step_dispatches_total": "counter",
    "stox_step_completions_total": "counter",
    "stox_step_failures_total": "counter",
    "stox_step_timeouts_total": "counter",
    "stox_step_retries_total": "counter",
    "stox_step_duration_seconds": "histogram",
    "stox_reports_duplicate_total": "counter",
    "stox_reports_stale_total": "counter",
    "stox_http_request_duration_seconds": "histogram",
    "stox_websocket_connections": "gauge",
    "stox_websocket_messages_sent_total": "counter",
    "stox_websocket_messages_dropped_total": "counter",
    "stox_outbox_backlog": "gauge",
    "stox_outbox_oldest_age_seconds": "gauge",
    "stox_bus_connected": "gauge",
    "stox_store_operation_duration_seconds": "histogram",
    "stox_sweeper_runs_total": "counter",
    "stox_sweeper_timers_fired_total": "counter",
    "stox_relay_runs_total": "counter",
    "stox_relay_republished_total": "counter",
    "stox_build_info": "gauge",
}
STEP = "only"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One scrape, parsed by prometheus-client's parser: families and samples."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: Samples = {}
        for family in text_string_to_metric_families(text):
            # the parser names a counter's family without its _total
            name = family.name + ("_total" if family.type == "counter" else "")
            self.types[name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for one not (yet) exposed."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(gw: RunningGateway, port: int | None = None, token: str | None = None) -> Scrape:
    response = await get_metrics(port or gw.port, token)
    assert response.code == 200, response.body
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Scrape(response.body.decode())


async def get_metrics(port: int, token: str | None = None) -> tornado.httpclient.HTTPResponse:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = tornado.httpclient.AsyncHTTPClient()
    return await client.fetch(
        f"http://127.0.0.1:{port}/metrics", headers=headers, raise_error=False
    )


def one_step(
    timeout: float = 60, max_attempts: int = 2, backoff: float = 0
) -> Callable[[settings_module.Settings], None]:
    """A `configure` hook: a pipeline of the one step STEP."""

    def configure(settings: settings_module.Settings) -> None:
        settings.pipeline.steps = [
            settings_module.StepSettings(
                STEP,
                timeout=settings_module.Duration(timeout),
                max_attempts=max_attempts,
                backoff=settings_module.Duration(backoff),
            )
        ]

    return configure


async def step_of(gw: RunningGateway, workflow_id: str) -> dict[str, Any]:
    return dict((await gw.status(workflow_id))["steps"][0])


async def moved(
    gw: RunningGateway, before: Scrape, name: str, by: float = 1, **labels: str
) -> None:
    """`name{labels}` is `by` more than `before` (eventually: some counts follow a publish)."""
    want = before(name, **labels) + by
    await eventually(lambda: scrape(gw), lambda now: now(name, **labels) == want, within=5)


async def test_every_family_is_exposed_with_its_type(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw:
        metrics = await scrape(gw)
    assert {name: metrics.types.get(name) for name in FAMILIES} == FAMILIES
    assert [v for (name, _), v in metrics.samples.items() if name == "stox_build_info"] == [1]
    assert metrics("stox_bus_connected") == 1


async def test_workflow_step_report_and_http_families_move(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, one_step()) as gw:
        token, pipeline = gw.token(), {"pipeline": "default"}
        before = await scrape(gw)

        done = await gw.upload(token)
        step = await step_of(gw, done)
        assert (await report(gw, done, step)).status == 200
        assert (await report(gw, done, step)).status == 200  # a duplicate
        stale = await report(gw, done, {**step, "step_id": "0" * 32})
        assert stale.status == 409
        unknown = await report(gw, done, step, step_type="no_such_step")
        assert unknown.status == 409
        after = await scrape(gw)
        assert after("stox_workflows_started_total", **pipeline) == 1
        assert after("stox_workflows_completed_total", **pipeline) == 1
        completed = {"pipeline": "default", "status": "completed"}
        assert after("stox_workflow_duration_seconds_count", **completed) == 1
        assert after("stox_step_dispatches_total", step=STEP) == 1
        assert after("stox_step_completions_total", step=STEP) == 1
        assert after("stox_step_duration_seconds_count", step=STEP, outcome="completed") == 1
        assert after("stox_reports_duplicate_total", step=STEP) == 1
        assert after("stox_reports_stale_total", step=STEP) == 1
        # a step this gateway does not know makes no series of its own
        assert after("stox_reports_stale_total", step="") == 1
        assert after("stox_reports_stale_total", step="no_such_step") == 0
        http = {"route": "step_completed", "method": "POST"}
        assert after("stox_http_request_duration_seconds_count", **http, status_class="2xx") == 2
        assert after("stox_http_request_duration_seconds_count", **http, status_class="4xx") == 2
        assert after("stox_store_operation_duration_seconds_count", operation="insert") >= 1
        assert after("stox_store_operation_duration_seconds_count", operation="replace") >= 1

        failing = await gw.upload(token)
        assert (await report(gw, failing, await step_of(gw, failing), success=False)).status == 200
        assert (await report(gw, failing, await step_of(gw, failing), success=False)).status == 200
        assert (await gw.status(failing))["status"] == "failed"
        failed = await scrape(gw)
        assert failed("stox_step_failures_total", step=STEP) == 2
        assert failed("stox_step_retries_total", step=STEP) == 1  # the second had no attempt left
        assert failed("stox_step_dispatches_total", step=STEP) == 3
        assert failed("stox_step_duration_seconds_count", step=STEP, outcome="failed") == 2
        assert failed("stox_workflows_failed_total", **pipeline) == 1

        body = {"workflow_id": failing}
        assert (await gw.fetch("POST", RETRY, body, token=token)).status == 200
        assert (await gw.fetch("POST", CANCEL, body, token=token)).status == 200
        ended = await scrape(gw)
        assert ended("stox_workflows_retried_total", **pipeline) == 1
        assert ended("stox_workflows_cancelled_total", **pipeline) == 1
        assert ended("stox_step_dispatches_total", step=STEP) == 4

        assert (await gw.fetch("GET", "/no/such/path")).status == 404
        unmatched = {"route": "unmatched", "method": "GET", "status_class": "4xx"}
        assert (await scrape(gw))("stox_http_request_duration_seconds_count", **unmatched) == 1
        assert before("stox_workflows_started_total", **pipeline) == 0


async def test_timeouts_fired_by_the_sweeper_are_counted(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, one_step(timeout=0.05)) as gw:
        workflow_id = await gw.upload(gw.token())
        await gw.wait_finished([workflow_id])
        metrics = await scrape(gw)
    assert metrics("stox_step_timeouts_total", step=STEP) == 2
    assert metrics("stox_step_retries_total", step=STEP) == 1
    assert metrics("stox_step_failures_total", step=STEP) == 0  # none was reported
    assert metrics("stox_workflows_failed_total", pipeline="default") == 1
    # the two deadlines (backoff 0: the second attempt went out with the first's timeout)
    assert metrics("stox_sweeper_timers_fired_total") == 2
    assert metrics("stox_sweeper_runs_total") >= 1


async def test_websocket_connections_messages_and_drops(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw:
        before = await scrape(gw)
        socket = await gw.ws_connect(gw.token())
        try:
            await moved(gw, before, "stox_websocket_connections")
            await gw.upload(gw.token())
            message = await asyncio.wait_for(socket.read_message(), 5)
            assert isinstance(message, str) and json.loads(message)["type"] == "step_dispatched"
            assert (await scrape(gw))("stox_websocket_messages_sent_total") >= 1

            (subscription,) = gw.gateway.hub._by_owner["alice"]
            subscription.too_slow("too slow (a test)")  # what the hub does to a client that lags
            assert await asyncio.wait_for(socket.read_message(), 5) is None
            assert socket.close_code == CLOSE_TOO_SLOW
            await moved(gw, before, "stox_websocket_messages_dropped_total")
            await moved(gw, before, "stox_websocket_connections", by=0)
        finally:
            socket.close()


class Unflushed:
    """A socket that never flushes what it is handed."""

    def __init__(self) -> None:
        self.closed: int | None = None

    def send(self, message: bytes) -> asyncio.Future[None] | None:
        return asyncio.get_running_loop().create_future()

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.closed = code


async def test_a_slow_client_counts_the_messages_it_is_not_sent() -> None:
    tally = Tally()
    sub = Subscription(Unflushed(), user="a", owner="a", workflow_id=None, max_backlog=10)
    sub.tally = tally
    assert sub.offer("w", 1, [b"x" * 8])  # behind the snapshot
    assert not sub.offer("w", 2, [b"y" * 8, b"z"])  # over the bound: closed
    assert tally.dropped == 3  # the two refused and the one waiting
    ready = Subscription(Unflushed(), user="b", owner="b", workflow_id=None, max_backlog=10)
    ready.tally, ready.ready = tally, True
    assert ready.send(b"x" * 8) and not ready.send(b"x" * 8)
    assert (tally.sent, tally.dropped) == (1, 4)


async def test_relay_runs_and_the_outbox_gauges(tmp_path: Path) -> None:
    bus = RecordingBus()
    bus.fail = True  # nothing is confirmed: the events stay in the outbox
    async with running_gateway(
        tmp_path,
        gateway_options={"bus": bus},
        server__relay_interval=settings_module.Duration(0.05),
    ) as gw:
        await gw.upload(gw.token())
        waiting = await eventually(
            lambda: scrape(gw), lambda m: m("stox_relay_republished_total") >= 1
        )
        assert waiting("stox_outbox_backlog") == 1
        assert waiting("stox_outbox_oldest_age_seconds") > 0
        assert waiting("stox_relay_runs_total") >= 1
        assert waiting("stox_store_operation_duration_seconds_count", operation="outbox_backlog")

        bus.fail = False
        emptied = await eventually(lambda: scrape(gw), lambda m: m("stox_outbox_backlog") == 0)
        assert emptied("stox_outbox_oldest_age_seconds") == 0
        bus.connected = False
        assert (await scrape(gw))("stox_bus_connected") == 0


async def test_metrics_on_a_port_of_their_own(tmp_path: Path) -> None:
    port = free_port()
    async with running_gateway(tmp_path, metrics__listen=str(port)) as gw:
        assert (await get_metrics(gw.port)).code == 404
        await gw.upload(gw.token())
        own = await scrape(gw, port=port)
        assert own("stox_workflows_started_total", pipeline="default") == 1
        assert (await get_metrics(port)).code == 200
        document = (await gw.fetch("GET", "/api/v1/openapi.json")).body
        assert "/metrics" not in document["paths"]


async def test_the_api_port_documents_metrics_where_it_serves_them(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw:
        document = (await gw.fetch("GET", "/api/v1/openapi.json")).body
    answer = document["paths"]["/metrics"]["get"]["responses"]["200"]
    assert list(answer["content"]) == ["text/plain; version=0.0.4; charset=utf-8"]


async def test_a_token_is_required_when_set(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, metrics__token="scrape-secret") as gw:
        assert (await get_metrics(gw.port)).code == 401
        assert (await get_metrics(gw.port, "scrape-secre")).code == 401
        assert (await get_metrics(gw.port, gw.token())).code == 401  # a user's JWT is not it
        assert (await scrape(gw, token="scrape-secret"))("stox_build_info", version=VERSION) == 1


@pytest.mark.parametrize("listen", ["", "own port"])
async def test_metrics_disabled_answer_404_and_time_nothing(tmp_path: Path, listen: str) -> None:
    port = free_port()
    async with running_gateway(
        tmp_path,
        metrics__enabled=False,
        metrics__listen=str(port) if listen else "",
    ) as gw:
        assert (await get_metrics(gw.port)).code == 404
        if listen:
            with pytest.raises(ConnectionRefusedError):
                await tornado.httpclient.AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/")
        assert gw.gateway.metrics is None and not isinstance(gw.gateway.store, TimedStore)
        assert not any(isinstance(o, WorkflowMetrics) for o in gw.gateway.observers.observers)
