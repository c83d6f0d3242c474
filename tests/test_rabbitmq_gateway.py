"""Whole gateways on RabbitMQ: reference workers, several instances, a broker that drops the
connection, and a gateway killed mid-flow. Real broker, real processes; every test has its
own exchange and queue names (`rabbit_ns`), deleted afterwards.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections import defaultdict
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import rabbit
from procs import Proc, gateway_config, remote, start_gateway, start_worker, wait_ready
from support import (
    COMPLETED,
    RunningGateway,
    completion,
    eventually,
    free_port,
    running_gateway,
)

from stox import workflow as w

pytestmark = pytest.mark.rabbitmq

STEPS = rabbit.STEPS
TIMEOUT = 30.0


def assert_completed_once(docs: dict[str, Any]) -> None:
    """Every workflow completed, every step in one attempt: nothing retried or lost."""
    for doc in docs.values():
        assert doc["status"] == w.COMPLETED, doc
        for step in doc["steps"]:
            assert step["status"] == w.COMPLETED, doc
            assert [a["outcome"] for a in step["attempts"]] == [w.COMPLETED], doc


def assert_dispatched_once(probe: list[rabbit.Message], ids: list[str]) -> None:
    """Each step of each workflow went out with one step_id (at-least-once may repeat the
    same message); each workflow.completed once (by message id)."""
    step_ids: dict[tuple[str, str], set[str]] = defaultdict(set)
    completed: dict[str, set[str]] = defaultdict(set)
    for message in probe:
        payload = message.payload
        if message.routing_key == "workflow.completed":
            completed[payload["workflow_id"]].add(message.properties.message_id)
        elif message.routing_key != "step.completed":
            step_ids[payload["workflow_id"], payload["step_type"]].add(payload["step_id"])
    for workflow_id in ids:
        for step in STEPS:
            assert len(step_ids[workflow_id, step]) == 1, (workflow_id, step)
        assert len(completed[workflow_id]) == 1, workflow_id


@contextmanager
def stopped_at_exit(*procs: Proc) -> Iterator[list[Proc]]:
    running = list(procs)
    try:
        yield running
    finally:
        for proc in running:
            proc.kill()


def workers(
    ns: rabbit.Namespace, log_dir: Path, token: str, http: Collection[str] = ()
) -> list[Proc]:
    """One reference worker per step; those in `http` report over HTTP."""
    return [
        start_worker(
            log_dir,
            ns.url,
            ns.exchange,
            ns.prefix,
            step,
            token,
            *(["--http"] if step in http else []),
        )
        for step in STEPS
    ]


# -- the reference worker ------------------------------------------------------------------


async def test_reference_workers_run_the_whole_flow(
    tmp_path: Path, rabbit_ns: rabbit.Namespace
) -> None:
    ns = rabbit_ns
    async with running_gateway(tmp_path, **ns.settings()) as gw:
        token = gw.service_token("reference-worker")
        with stopped_at_exit(*workers(ns, tmp_path, token, http={"ai_enhancement"})) as procs:
            image, ai, _ = procs
            socket = await gw.ws_connect(gw.token())
            ids = [await gw.upload(gw.token(), name=f"Blue Mug {i}") for i in range(8)]
            docs = await gw.wait_finished(ids, TIMEOUT)
            assert_completed_once(docs)
            first = docs[ids[0]]
            assert first["steps"][0]["result"] == {
                "images": [f"processed/{ids[0][:8]}/Blue Mug 0_1200.webp"]
            }
            assert first["steps"][2]["result"]["slug"] == "blue-mug-0"

            seen: dict[str, int] = defaultdict(int)
            while sum(seen.values()) < len(ids):
                message = json.loads(await asyncio.wait_for(socket.read_message(), 10))  # type: ignore[arg-type]
                if message["type"] == "workflow_completed":
                    seen[message["workflow_id"]] += 1
            assert set(seen) == set(ids)
            socket.close()

            # a dispatch delivered again is reported again; the gateway's duplicate / 409 is
            # acknowledged and the worker moves on
            done = first["steps"][1]
            again = dispatch(gw, first, 1, step_id=done["step_id"])
            stale = dispatch(gw, first, 1, step_id=uuid.uuid4().hex)
            await asyncio.to_thread(ns.publish, "step.ai_enhancement", again)
            await asyncio.to_thread(ns.publish, "step.ai_enhancement", stale)
            await eventually(lambda: "same report" in ai.log())
            await eventually(lambda: "report not needed (HTTP 409)" in ai.log())
            await eventually(lambda: "over HTTP: duplicate" in ai.log())
            await asyncio.to_thread(
                ns.publish,
                "step.image_processing",
                dispatch(gw, first, 0, step_id=first["steps"][0]["step_id"]),
            )
            await eventually(lambda: "same report" in image.log())
            assert (await gw.status(ids[0]))["version"] == first["version"]
            assert await asyncio.to_thread(ns.count, ns.step_queue("ai_enhancement")) == 0

            # SIGTERM: each finishes cleanly
            assert [proc.stop() for proc in procs] == [0, 0, 0]
            assert all("stopped" in proc.log() for proc in procs)
            assert "Traceback" not in "".join(proc.log() for proc in procs)


def dispatch(gw: RunningGateway, doc: dict[str, Any], index: int, step_id: str) -> bytes:
    step = doc["steps"][index]
    return json.dumps(
        {
            "event": f"step.{step['name']}",
            "workflow_id": doc["id"],
            "occurred_at": w.isoformat(0),
            "step_id": step_id,
            "step_type": step["name"],
            "attempt": 1,
            "deadline": w.isoformat(0),
            "product": doc["product"],
            "results": {},
            "reply_to": {
                "http": f"{gw.base_url}/api/v1/workflow/step-completed",
                "routing_key": "step.completed",
            },
        }
    ).encode()


# -- several instances ---------------------------------------------------------------------


@pytest.mark.mongo
async def test_two_gateways_share_the_broker_and_the_store(
    tmp_path: Path, rabbit_ns: rabbit.Namespace, mongo_url: str
) -> None:
    ns = rabbit_ns
    probe = await asyncio.to_thread(ns.bind_probe, "step.#", "workflow.completed")
    ports = free_port(), free_port()
    procs = [
        start_gateway(
            tmp_path,
            name,
            gateway_config(port, f"{name}-{ns.prefix[-6:]}", mongo_url, ns.config_yaml()),
        )
        for name, port in zip(("gw-a", "gw-b"), ports, strict=True)
    ]
    with stopped_at_exit(*procs):
        await asyncio.gather(
            *(wait_ready(proc, port) for proc, port in zip(procs, ports, strict=True))
        )
        a, b = (remote(port) for port in ports)
        service = a.service_token("shared")
        socket = await a.ws_connect(a.token())  # a browser on instance A
        ids = [await a.upload(a.token(), name=f"Shared mug {i}") for i in range(6)]

        for index, step in enumerate(STEPS):
            current = {i: (await a.status(i))["steps"][index] for i in ids}
            for workflow_id in ids:
                assert current[workflow_id]["status"] == w.DISPATCHED
            if step == "ai_enhancement":  # two copies over AMQP: the gateways compete for them
                for workflow_id in ids:
                    step_now = current[workflow_id]
                    body = completion(workflow_id, step_now["step_id"], step)
                    for _ in range(2):
                        await asyncio.to_thread(
                            ns.publish,
                            "step.completed",
                            json.dumps(body).encode(),
                            {"authorization": f"Bearer {service}"},
                        )
            else:  # the same report to both instances at once
                answers = await asyncio.gather(
                    *(
                        gw.fetch(
                            "POST",
                            "/api/v1/workflow/step-completed",
                            completion(i, current[i]["step_id"], step),
                            token=service,
                        )
                        for i in ids
                        for gw in (a, b)
                    )
                )
                for first, second in zip(answers[::2], answers[1::2], strict=True):
                    assert (first.status, second.status) == (200, 200)
                    assert sorted([first.body["result"], second.body["result"]]) == [
                        "applied",
                        "duplicate",
                    ]
            await eventually(partial(step_completed, a, ids, index))

        docs = await a.wait_finished(ids, TIMEOUT)
        assert_completed_once(docs)
        # the browser on A saw every change, including those applied by B
        kinds: dict[str, list[str]] = defaultdict(list)
        while sum(k.count("workflow_completed") for k in kinds.values()) < len(ids):
            message = json.loads(await asyncio.wait_for(socket.read_message(), 10))  # type: ignore[arg-type]
            kinds[message["workflow_id"]].append(message["type"])
        for workflow_id in ids:
            assert kinds[workflow_id].count("step_completed") == 3
            assert kinds[workflow_id][-1] == "workflow_completed"
        socket.close()
        assert_dispatched_once(await asyncio.to_thread(ns.drain, probe), ids)
        assert [proc.stop() for proc in procs] == [0, 0]


async def step_completed(gw: RunningGateway, ids: list[str], index: int) -> bool:
    """Whether step `index` of every workflow in `ids` has completed."""
    return all([(await gw.status(i))["steps"][index]["status"] == w.COMPLETED for i in ids])


# -- outages ---------------------------------------------------------------------------------


async def test_the_gateway_reconnects_when_the_broker_closes_its_connection(
    tmp_path: Path, rabbit_ns: rabbit.Namespace
) -> None:
    ns = rabbit_ns
    instance = f"reconnect-{uuid.uuid4().hex[:8]}"
    options = {"demo_worker_options": {"min_delay": 0.0, "max_delay": 0.02, "failure_rate": 0.0}}

    def configure(settings: Any) -> None:
        settings.demo_workers = True
        settings.server.instance_id = instance

    async with running_gateway(tmp_path, configure, options, **ns.settings()) as gw:
        bus = gw.gateway.bus
        token = gw.token()
        ids: list[str] = []
        went_down = asyncio.Event()

        async def watch() -> None:
            while True:
                if not bus.connected:
                    went_down.set()
                    return
                await asyncio.sleep(0.001)

        async def upload_steadily() -> None:
            """Upload until 15 more went in after the connection came back."""
            after = 0
            while after < 15:
                ids.append(await gw.upload(token, name=f"Steady mug {len(ids)}"))
                after += went_down.is_set() and bus.connected
                await asyncio.sleep(0.01)

        watching = asyncio.ensure_future(watch())
        uploading = asyncio.ensure_future(upload_steadily())
        await asyncio.sleep(0.2)
        closed = await asyncio.to_thread(
            rabbit.close_connections, f"stox gateway {instance}", "test: broker closes"
        )
        assert closed == 1
        await asyncio.wait_for(watching, 5)
        await asyncio.wait_for(uploading, 20)
        docs = await gw.wait_finished(ids, TIMEOUT)
        assert_completed_once(docs)
        assert bus.connected
        ready = await gw.fetch("GET", "/readyz")
        assert ready.status == 200


async def test_readyz_follows_the_broker(tmp_path: Path, rabbit_ns: rabbit.Namespace) -> None:
    ns = rabbit_ns
    proxy = rabbit.BrokerProxy(ns.url)
    await proxy.start()
    overrides = {**ns.settings(), "rabbitmq__url": proxy.url(ns.url)}
    try:
        async with running_gateway(tmp_path, **overrides) as gw:

            async def readyz_says(status: int, bus: str) -> bool:
                response = await gw.fetch("GET", "/readyz")
                return (response.status, response.body.get("bus")) == (status, bus)

            assert await readyz_says(200, "ok")
            await proxy.stop()  # the broker goes away
            await eventually(partial(readyz_says, 503, "disconnected"))
            workflow_id = await gw.upload(gw.token())  # still taken; its events wait
            await proxy.start()
            await eventually(partial(readyz_says, 200, "ok"))
            await eventually(partial(outbox_empty, gw, workflow_id))  # the relay sent them
    finally:
        await proxy.stop()


async def outbox_empty(gw: RunningGateway, workflow_id: str) -> bool:
    doc = await gw.gateway.store.get(workflow_id)
    return doc is not None and doc["outbox"] == []


async def test_a_gateway_killed_mid_flow_finishes_every_workflow_after_restart(
    tmp_path: Path, rabbit_ns: rabbit.Namespace
) -> None:
    ns = rabbit_ns
    probe = await asyncio.to_thread(ns.bind_probe, "step.#", "workflow.completed")
    port = free_port()
    config = gateway_config(port, "crashy", f"sqlite:///{tmp_path}/stox.db", ns.config_yaml())
    gateway = start_gateway(tmp_path, "gw", config)
    client = remote(port)
    with stopped_at_exit(gateway, *workers(ns, tmp_path, client.service_token("worker"))) as procs:
        await wait_ready(gateway, port)
        token = client.token()
        ids = [await client.upload(token, name=f"Crash mug {i}") for i in range(25)]
        await eventually(partial(step_completed, client, ids[:3], 0))
        running = await client.fetch(
            "GET", "/api/v1/workflow/list?status=running&limit=100", token=token
        )
        gateway.popen.send_signal(signal.SIGKILL)
        gateway.popen.wait(10)
        assert running.status == 200 and running.body["workflows"], "killed mid-flow"
        await asyncio.sleep(0.3)  # the workers go on reporting into the durable queue

        restarted = start_gateway(tmp_path, "gw-restarted", config)
        procs.append(restarted)
        await wait_ready(restarted, port)
        docs = await client.wait_finished(ids, TIMEOUT)
        assert_completed_once(docs)
        assert_dispatched_once(await asyncio.to_thread(ns.drain, probe), ids)
        assert restarted.stop() == 0


# -- a step renamed in the settings while workflows still need it --------------------------


async def test_a_renamed_step_keeps_the_queue_running_workflows_still_need(
    tmp_path: Path, rabbit_ns: rabbit.Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    ns = rabbit_ns
    ns.extra_queues.append(ns.step_queue("seo"))
    async with running_gateway(tmp_path, **ns.settings()) as gw:
        ids = [await gw.upload(gw.token()) for _ in range(3)]
    # the broker lost the old queue meanwhile (a new broker, or someone tidying up)
    await asyncio.to_thread(
        ns._channel_do, lambda ch: ch.queue_delete(ns.step_queue("seo_generation"))
    )

    def renamed(settings: Any) -> None:
        settings.pipeline.steps[2].name = "seo"

    with caplog.at_level("WARNING", logger="stox.app"):
        async with running_gateway(tmp_path, renamed, **ns.settings()) as gw:
            [warning] = [r.getMessage() for r in caplog.records if "no longer" in r.getMessage()]
            assert "'seo_generation'" in warning and ns.step_queue("seo_generation") in warning
            assert all(workflow_id in warning for workflow_id in ids)
            assert "3 running workflows" in warning
            # declared and bound again: the workflows' dispatches reach it
            service = gw.service_token()
            for step in ("image_processing", "ai_enhancement"):
                for workflow_id in ids:
                    doc = await gw.status(workflow_id)
                    current = doc["steps"][doc["current_step"]]
                    assert current["name"] == step
                    body = completion(workflow_id, current["step_id"], step)
                    reply = await gw.fetch("POST", COMPLETED, body, token=service)
                    assert reply.status == 200, reply.body

            messages = await ns.drained(ns.step_queue("seo_generation"), len(ids), TIMEOUT)
            assert sorted(m.payload["workflow_id"] for m in messages) == sorted(ids)
            for message in messages:
                body = completion(
                    message.payload["workflow_id"], message.payload["step_id"], "seo_generation"
                )
                reply = await gw.fetch("POST", COMPLETED, body, token=service)
                assert reply.status == 200, reply.body
            docs = await gw.wait_finished(ids)
            assert {doc["status"] for doc in docs.values()} == {w.COMPLETED}


# -- named pipelines (issue 14) ------------------------------------------------------------


def pipelines(**steps: list[dict[str, Any]]) -> Any:
    """A `configure` hook: `pipelines:` of these names and steps (dicts as YAML gives them)."""
    from settings import PipelineSettings, StepSettings

    def configure(settings: Any) -> None:
        settings.pipelines = {
            name: PipelineSettings(steps=[StepSettings(**step) for step in specs])
            for name, specs in steps.items()
        }

    return configure


PARALLEL: list[dict[str, Any]] = [
    {"name": "image_processing"},
    {"name": "ai_enhancement"},
    {"name": "seo_generation", "after": ["image_processing", "ai_enhancement"]},
]


async def upload_on(gw: RunningGateway, pipeline: str, n: int) -> list[str]:
    body = {"name": "Linen shirt", "pipeline": pipeline}
    ids = []
    for _ in range(n):
        response = await gw.fetch("POST", "/api/v1/workflow/upload", body, token=gw.token())
        assert response.status == 202, response.body
        ids.append(response.body["workflow_id"])
    return ids


async def test_a_parallel_pipelines_steps_are_queued_at_once_and_the_join_completes(
    tmp_path: Path, rabbit_ns: rabbit.Namespace
) -> None:
    ns = rabbit_ns
    async with running_gateway(tmp_path, pipelines(parallel=PARALLEL), **ns.settings()) as gw:
        service = gw.service_token()
        ids = await upload_on(gw, "parallel", 3)
        # both branches are in their queues before any report: consumed side by side
        image, ai = await asyncio.gather(
            ns.drained(ns.step_queue("image_processing"), len(ids), TIMEOUT),
            ns.drained(ns.step_queue("ai_enhancement"), len(ids), TIMEOUT),
        )
        assert await asyncio.to_thread(ns.count, ns.step_queue("seo_generation")) == 0
        for messages, step in ((image, "image_processing"), (ai, "ai_enhancement")):
            assert sorted(m.payload["workflow_id"] for m in messages) == sorted(ids)
            for message in messages:
                report = completion(
                    message.payload["workflow_id"],
                    message.payload["step_id"],
                    step,
                    result={"from": step},
                )
                # over AMQP, as a worker replies
                await asyncio.to_thread(
                    ns.publish,
                    "step.completed",
                    json.dumps(report).encode(),
                    {"authorization": f"Bearer {service}"},
                )

        joins = await ns.drained(ns.step_queue("seo_generation"), len(ids), TIMEOUT)
        assert sorted(m.payload["workflow_id"] for m in joins) == sorted(ids)
        for message in joins:
            assert message.payload["results"] == {
                "image_processing": {"from": "image_processing"},
                "ai_enhancement": {"from": "ai_enhancement"},
            }
            body = completion(
                message.payload["workflow_id"], message.payload["step_id"], "seo_generation"
            )
            reply = await gw.fetch("POST", COMPLETED, body, token=service)
            assert reply.status == 200, reply.body
        docs = await gw.wait_finished(ids, TIMEOUT)
        assert_completed_once(docs)


async def test_a_removed_pipelines_step_keeps_its_queue_and_routing_key_while_needed(
    tmp_path: Path, rabbit_ns: rabbit.Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    ns = rabbit_ns
    ns.extra_queues += [ns.step_queue("tagging"), ns.step_queue("copy_review")]
    apparel: list[dict[str, Any]] = [
        {"name": "image_processing"},
        {"name": "tagging", "routing_key": "apparel.tagging"},
        {"name": "copy_review", "kind": "review", "after": ["image_processing", "tagging"]},
    ]
    async with running_gateway(tmp_path, pipelines(apparel=apparel), **ns.settings()) as gw:
        ids = await upload_on(gw, "apparel", 2)
        await gw.gateway.orchestrator.drain()
    # the broker lost the queue meanwhile; the settings no longer have the pipeline
    await asyncio.to_thread(ns.drain, ns.step_queue("image_processing"))
    await asyncio.to_thread(ns._channel_do, lambda ch: ch.queue_delete(ns.step_queue("tagging")))

    with caplog.at_level("WARNING", logger="stox.app"):
        async with running_gateway(tmp_path, **ns.settings()) as gw:
            warnings = [r.getMessage() for r in caplog.records if "no longer" in r.getMessage()]
            [warning] = warnings  # the review step has no queue: nothing to keep for it
            assert "'tagging'" in warning and ns.step_queue("tagging") in warning
            assert all(workflow_id in warning for workflow_id in ids)
            # declared and bound again, to the routing key the stored definition dispatches
            # with: a failed attempt's retry (after backoff) reaches the kept queue
            service = gw.service_token()
            for workflow_id in ids:
                tagging = (await gw.status(workflow_id))["steps"][1]
                assert tagging["status"] == w.DISPATCHED
                body = completion(workflow_id, tagging["step_id"], "tagging", False)
                reply = await gw.fetch("POST", COMPLETED, body, token=service)
                assert reply.status == 200, reply.body
            messages = await ns.drained(ns.step_queue("tagging"), len(ids), TIMEOUT)
            assert {m.routing_key for m in messages} == {"apparel.tagging"}
            for message in messages:
                body = completion(
                    message.payload["workflow_id"], message.payload["step_id"], "tagging"
                )
                reply = await gw.fetch("POST", COMPLETED, body, token=service)
                assert reply.status == 200, reply.body
            for workflow_id in ids:
                image = (await gw.status(workflow_id))["steps"][0]
                body = completion(workflow_id, image["step_id"], image["name"])
                reply = await gw.fetch("POST", COMPLETED, body, token=service)
                assert reply.status == 200, reply.body
                assert (await gw.status(workflow_id))["steps"][2]["status"] == "waiting"
        assert not await asyncio.to_thread(queue_exists, ns, ns.step_queue("copy_review"))


def queue_exists(ns: rabbit.Namespace, queue: str) -> bool:
    import pika.exceptions

    try:
        ns.count(queue)
    except pika.exceptions.ChannelClosedByBroker:
        return False
    return True
