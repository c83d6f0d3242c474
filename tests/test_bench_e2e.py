"""bench/e2e.py in a small form: the closed loop, then the open loop, printed; exit status 0.

The figures are not checked (they depend on the machine); the sections and the targets'
verdicts are. The open loop's schedule is also checked in-process against a tiny HTTP server
that holds one answer back: the uploads after it must still leave on time.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support import stox_environ

REPO = Path(__file__).resolve().parent.parent
E2E = REPO / "bench" / "e2e.py"
SMALL = ["--workflows", "60", "--warmup", "10", "--no-ceiling", "--open-loop-seconds", "1.5"]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(E2E), *SMALL, "--timeout", "50", *args],
        cwd=REPO,
        env=stox_environ(),
        capture_output=True,
        text=True,
        timeout=55,
    )


def open_loop_section(stdout: str, title: str) -> str:
    """The open-loop lines of the gateway section called `title`."""
    section = stdout.split(f"\n{title}\n", 1)[1]
    return section.split("\n  open loop ", 1)[1].split("\n  gateway exit status", 1)[0]


def check_common(section: str) -> None:
    total = re.search(r"workflows completed   (\d+) / (\d+)", section)
    assert total is not None and total[1] == total[2], section
    assert re.search(r"upload latency +p50 [\d.]+ ms +p99 [\d.]+ ms +max [\d.]+ ms", section)
    assert re.search(r"p99 <= 10 ms: (met|not met)", section)
    assert "send lag" in section and "connections           at most" in section
    assert "errors                none" in section


def test_the_open_loop_runs_after_the_closed_loop() -> None:
    result = bench()

    assert result.returncode == 0, result.stdout + result.stderr
    assert "completed workflows/s" in result.stdout  # the closed loop's figures stay
    section = open_loop_section(result.stdout, "gateway")
    assert "(0.5 x the closed loop's" in section
    check_common(section)
    assert re.search(r"step-completed +p50 .* p99 <= 10 ms: (met|not met)", section)


def test_no_open_loop_skips_it() -> None:
    result = bench("--no-open-loop", "--workflows", "20", "--warmup", "0")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "open loop" not in result.stdout


@pytest.mark.rabbitmq
def test_the_open_loop_on_rabbitmq(rabbitmq_url: str) -> None:
    result = bench("--rabbitmq-url", rabbitmq_url, "--open-loop-rate", "40")

    assert result.returncode == 0, result.stdout + result.stderr
    section = open_loop_section(result.stdout, "gateway on RabbitMQ (AMQP dispatch and replies)")
    assert "40.0 uploads/s for 1.5 s (--open-loop-rate), 60 uploads" in section
    check_common(section)
    assert re.search(r"dispatch latency +p50 .* p99 <= 5 ms: (met|not met)", section)
    assert re.search(r"from the decision +p50 .* p99 <= 5 ms: (met|not met)", section)


# -- the schedule, in-process -----------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> Iterator[SimpleNamespace]:
    """bench/e2e.py's modules, imported with bench/ on sys.path as when it runs."""
    sys.path.insert(0, str(E2E.parent))
    try:
        names = ("e2e", "processes", "roles")
        yield SimpleNamespace(**{name: importlib.import_module(name) for name in names})
    finally:
        sys.path.remove(str(E2E.parent))


class UploadServer:
    """202 to every request; the first answer only after `hold_first` seconds."""

    def __init__(self, hold_first: float) -> None:
        self.hold_first = hold_first
        self.answered = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in self.writers), return_exceptions=True)
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            length = re.search(rb"Content-Length: (\d+)", head)
            await reader.readexactly(int(length[1]) if length else 0)
            self.answered += 1
            if self.answered == 1:
                await asyncio.sleep(self.hold_first)
            writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}")


async def drive(modules: SimpleNamespace, connections: int) -> Any:
    server = UploadServer(hold_first=0.3)
    port = await server.start()
    args = modules.e2e.parse_args(["--open-loop-workflows", "10", "--uploaders", "1"])
    args.request_timeout = 5.0
    target = modules.processes.Target(f"http://127.0.0.1:{port}", "127.0.0.1", port, "")
    shared = modules.roles.Shared()
    shared.ws_closed = "no WebSocket here"  # nothing to wait for once the uploads are answered
    loop = modules.roles.OpenLoop(50.0, "test", modules.roles.Phase("open loop", 10), connections)
    try:
        await modules.roles.run_open_loop(loop, target, shared, args, "token")
    finally:
        await server.close()
    return loop


async def test_an_answer_held_back_does_not_delay_the_next_uploads(
    modules: SimpleNamespace,
) -> None:
    loop = await drive(modules, connections=64)

    phase = loop.phase
    assert phase.uploaded == 10 and not phase.errors
    assert loop.waited == 0 and loop.peak >= 2
    assert max(loop.send_lag) < 0.1  # each left at its time, the held one outstanding
    assert max(phase.upload_latency) >= 0.3  # the held one, from its scheduled time


async def test_the_safety_valve_is_counted_and_its_wait_is_latency(
    modules: SimpleNamespace,
) -> None:
    loop = await drive(modules, connections=1)

    phase = loop.phase
    assert phase.uploaded == 10
    assert loop.waited > 0 and loop.peak == 1
    # the uploads scheduled while the first was held waited for the one connection, and
    # that wait counts: latency runs from the scheduled time, not from the send
    assert sorted(phase.upload_latency)[-2] >= 0.1


def test_gateway_env_reaches_the_started_gateway() -> None:
    # a bad setting in the environment stops the gateway at start-up: so it was read
    result = bench("--no-open-loop", "--gateway-env", "STOX_METRICS_LISTEN=not-a-port")

    assert result.returncode == 1
    assert "not ready: exited with status" in result.stdout + result.stderr
    refused = bench("--gateway-env", "METRICS_ENABLED=false")
    assert refused.returncode == 2 and "expected STOX_NAME=VALUE" in refused.stderr


def bench_script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Another script of bench/, run as by hand."""
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / name), *args],
        cwd=REPO,
        env=stox_environ(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_metrics_cost_runs_each_round_with_metrics_on_and_off() -> None:
    result = bench_script("metrics_cost.py", "--rounds", "2", "--workflows", "20", timeout=100)

    assert result.returncode == 0, result.stdout + result.stderr
    rows = re.findall(r"^ +(\d) +(on|off) +[\d.]+ ms +[\d.]+$", result.stdout, re.MULTILINE)
    assert rows == [("1", "on"), ("1", "off"), ("2", "off"), ("2", "on")]
    assert re.search(r"metrics add [+-]\d+ us per workflow", result.stdout)


def test_core_cost_counts_instructions_per_workflow_of_two_checkouts() -> None:
    result = bench_script("core_cost.py", "--workflows", "3", "--compare", str(REPO), timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    counts = re.findall(r": ([\d.]+) M instructions per workflow", result.stdout)
    assert len(counts) == 2 and all(float(count) > 0 for count in counts)
    assert re.search(r"/ .*: [\d.]+ \([+-][\d.]+%\)", result.stdout)
