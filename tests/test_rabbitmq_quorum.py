"""`rabbitmq.queue_type: quorum` on the real broker: the durable queues are quorum queues (the
broker says so), the instance's own queue stays classic, messages are redelivered and
dead-lettered as on classic queues, a workflow completes over them, and a queue that exists
with the other type refuses start-up with a message naming the queue and the setting.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import rabbit
from procs import REPO, start_worker
from support import RunningGateway, running_gateway, stox_environ

from stox.bus.base import Event, Rejected

pytestmark = pytest.mark.rabbitmq

TIMEOUT = 10.0


def event(routing_key: str, **payload: object) -> Event:
    return Event(routing_key, dict(payload), message_id=uuid.uuid4().hex, timestamp=1.0)


async def test_durable_queues_are_quorum_and_the_private_one_classic(
    rabbit_ns: rabbit.Namespace,
) -> None:
    ns = rabbit_ns
    private = f"{ns.prefix}.hub.test"
    ns.extra_queues.append(private)
    bus = ns.bus(queue_type="quorum")
    await bus.start()
    try:
        await bus.declare(ns.completions, ["step.completed"])
        await bus.declare(private, ["workflow.changed"], exclusive=True)
        types = await asyncio.to_thread(rabbit.queue_types, ns.prefix)
        assert types == {ns.dead: "quorum", ns.completions: "quorum", private: "classic"}

        # the bus's own redelivery (a copy with its count) and dead-lettering work on them
        seen: list[str] = []
        settled = asyncio.Event()

        async def handle(delivered: Event) -> None:
            kind = str(delivered.payload["kind"])
            seen.append(kind)
            if kind == "poison":
                raise Rejected("malformed")
            if kind == "flaky" and seen.count("flaky") == 1:
                raise RuntimeError("try again")
            if kind == "flaky":
                settled.set()

        await bus.consume(ns.completions, handle)
        await bus.publish(event("step.completed", kind="poison"))
        await bus.publish(event("step.completed", kind="flaky"))
        await asyncio.wait_for(settled.wait(), TIMEOUT)
        dead = await ns.drained(ns.dead)
        assert [message.payload["kind"] for message in dead] == ["poison"]
        assert seen.count("poison") == 1 and seen.count("flaky") == 2
    finally:
        await bus.close()


@pytest.mark.parametrize(("existing", "wanted"), [("classic", "quorum"), ("quorum", "classic")])
async def test_a_queue_of_the_other_type_is_refused_by_name(
    rabbit_ns: rabbit.Namespace, existing: str, wanted: str
) -> None:
    ns = rabbit_ns
    await asyncio.to_thread(rabbit.declare_queue, ns.url, ns.completions, existing, ns.dead)
    bus = ns.bus(queue_type=wanted)
    await bus.start()
    try:
        with pytest.raises(ConnectionError) as refused:
            await bus.declare(ns.completions, ["step.completed"])
    finally:
        await bus.close()
    message = str(refused.value)
    assert f"queue {ns.completions!r} exists in RabbitMQ as a {existing} queue" in message
    assert f"rabbitmq.queue_type is {wanted}" in message
    assert f"set rabbitmq.queue_type: {existing}" in message


async def test_the_dead_letter_queue_of_the_other_type_refuses_start(
    rabbit_ns: rabbit.Namespace,
) -> None:
    ns = rabbit_ns
    await asyncio.to_thread(rabbit.declare_queue, ns.url, ns.dead, "quorum")
    bus = ns.bus()  # classic, the default
    with pytest.raises(ConnectionError, match=r"rabbitmq\.queue_type is classic"):
        await bus.start()
    await bus.close()


def test_the_gateway_refuses_to_start_on_a_queue_of_the_other_type(
    tmp_path: Path, rabbit_ns: rabbit.Namespace
) -> None:
    ns = rabbit_ns
    rabbit.declare_queue(ns.url, ns.completions, "classic", ns.dead)
    config = tmp_path / "stox.yaml"
    config.write_text(ns.config_yaml() + "  queue_type: quorum\n")
    result = subprocess.run(
        [sys.executable, "server.py", "--config", str(config), "--port", "0"],
        cwd=REPO,
        env=stox_environ(STOX_STORAGE_URL=f"sqlite:///{tmp_path}/stox.db"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stox: cannot start:"), result.stderr
    assert ns.completions in last and "rabbitmq.queue_type is quorum" in last
    assert "Traceback" not in result.stderr


async def test_a_workflow_completes_over_quorum_queues(
    tmp_path: Path, rabbit_ns: rabbit.Namespace
) -> None:
    ns = rabbit_ns
    async with running_gateway(tmp_path, **ns.settings(), rabbitmq__queue_type="quorum") as gw:
        types = await asyncio.to_thread(rabbit.queue_types, ns.prefix)
        durable = [ns.dead, ns.completions, *map(ns.step_queue, rabbit.STEPS)]
        assert {name: types.get(name) for name in durable} == dict.fromkeys(durable, "quorum")
        assert types[gw.gateway.topology.hub] == "classic"
        await complete_workflows(gw, ns, tmp_path)


async def complete_workflows(gw: RunningGateway, ns: rabbit.Namespace, log_dir: Path) -> None:
    """The reference workers (over AMQP) take three workflows through every step."""
    token = gw.service_token("reference-worker")
    procs = [
        start_worker(log_dir, ns.url, ns.exchange, ns.prefix, step, token) for step in rabbit.STEPS
    ]
    try:
        ids = [await gw.upload(gw.token(), name=f"Mug {i}") for i in range(3)]
        docs = await gw.wait_finished(ids, 30.0)
        assert [doc["status"] for doc in docs.values()] == ["completed"] * 3, docs
    finally:
        for proc in procs:
            proc.kill()
