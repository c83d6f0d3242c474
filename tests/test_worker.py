"""The reference worker's HTTP reports (examples/worker.py) against a real gateway."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support import COMPLETED, RunningGateway, load_worker, running_gateway

worker = load_worker()


class Channel:
    """Records what the worker does with a dispatch."""

    def __init__(self) -> None:
        self.acks: list[int] = []
        self.nacks: list[tuple[int, bool]] = []

    def basic_ack(self, tag: int) -> None:
        self.acks.append(tag)

    def basic_nack(self, tag: int, requeue: bool) -> None:
        self.nacks.append((tag, requeue))


class Connection:
    def __init__(self) -> None:
        self.slept = 0.0

    def sleep(self, seconds: float) -> None:
        self.slept += seconds


async def handle(gw: RunningGateway, result: dict[str, Any]) -> Channel:
    """Have the worker report `result` for the current step of a new workflow, over HTTP."""
    workflow_id = await gw.upload(gw.token())
    step = (await gw.status(workflow_id))["steps"][0]
    args = worker.parse_args(
        ["--step", step["name"], "--http", "--gateway-url", gw.base_url + COMPLETED]
    )
    reporter = worker.Worker(args, gw.service_token())
    job = {"workflow_id": workflow_id, "step_id": step["step_id"], "product": {"name": "Mug"}}
    # a report it made before (a redelivery), so it sends this one instead of working
    reporter.reports[step["step_id"]] = {
        "workflow_id": workflow_id,
        "step_id": step["step_id"],
        "step_type": step["name"],
        "success": True,
        "result": result,
    }
    channel = Channel()
    method = SimpleNamespace(delivery_tag=7)
    body = json.dumps(job).encode()
    await asyncio.to_thread(reporter.handle, Connection(), channel, method, None, body)
    return channel


async def test_a_report_the_gateway_takes_is_acknowledged(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw:
        channel = await handle(gw, {"images": ["processed/mug.webp"]})
    assert (channel.acks, channel.nacks) == ([7], [])


@pytest.mark.parametrize("size", [2 * 1024 * 1024, 10_000_000])
async def test_a_report_too_large_for_the_gateway_is_dead_lettered(
    tmp_path: Path, size: int
) -> None:
    async with running_gateway(tmp_path) as gw:
        channel = await handle(gw, {"blob": "x" * size})
    # 413: sending it again would not help, so it is not requeued
    assert (channel.acks, channel.nacks) == ([], [(7, False)])
