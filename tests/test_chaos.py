"""bench/chaos.py, CI-sized: 150 workflows through the hostile fleet, 2 SIGKILLs (and, on
RabbitMQ + MongoDB, 2 broker drops and two gateways); every must-be-0 row of its table is 0.

The audit's own checks are tested first, on made-up records: each must-be-0 row counts what
it names. The run is a subprocess (real gateways, as the fault run always starts them); its table is
parsed.
"""

from __future__ import annotations

import importlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import stox_environ

REPO = Path(__file__).resolve().parent.parent
CHAOS = REPO / "bench" / "chaos.py"
CI_SIZED = ["--workflows", "150", "--kills", "2", "--drops", "2", "--rate", "50"]
ROW = re.compile(r"^  (.+?) +(\d+)  \(must be 0\) (ok|FAIL)$", re.MULTILINE)

Table = dict[str, int]
_runs: dict[str, tuple[Table, str]] = {}


@pytest.fixture(scope="module")
def bench() -> Iterator[Any]:
    """bench/chaos.py, imported with bench/ on sys.path as when it runs."""
    sys.path.insert(0, str(CHAOS.parent))
    try:
        yield importlib.import_module("chaos")
    finally:
        sys.path.remove(str(CHAOS.parent))


def step(name: str, attempts: list[tuple[str, int, str]], current: str | None) -> dict[str, Any]:
    records = [{"step_id": i, "attempt": a, "outcome": o} for i, a, o in attempts]
    return {"name": name, "step_id": current, "attempts": records}


def made_up_run(bench: Any, tmp_path: Path) -> Any:
    run = bench.Chaos(bench.parse_args(["--workflows", "2"]), tmp_path)
    n_ok = next(n for n in range(100) if bench.fate(1, n)[0] == "ok")
    run.rec.accepted = {n_ok: {"w1"}}
    return run, n_ok


def doc(workflow_id: str, n: int, status: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    meta = {"chaos": "t", "n": n}
    return {"id": workflow_id, "status": status, "product": {"metadata": meta}, "steps": steps}


def must_be_0(rows: list[tuple[str, int, bool]]) -> dict[str, int]:
    return {name: figure for name, figure, must in rows if must and figure}


def test_the_audit_counts_each_violation_it_names(bench: Any, tmp_path: Path) -> None:
    run, n = made_up_run(bench, tmp_path)
    run.rec.applied["s1"] = 2  # answered "applied" twice
    run.rec.dispatches[("w1", "ai_enhancement", 1)] = {"s2", "s3"}  # two live attempts
    run.rec.server_errors["upload 500"] = 1
    run.rec.health_failed = 1
    steps = [
        step("image_processing", [("s1", 1, "completed")], "s1"),
        step("ai_enhancement", [("s2", 1, "completed")], "s2"),
        step("seo_generation", [], None),
    ]
    store = {
        "workflows": [doc("w1", n, "running", steps), doc("w2", n, "completed", steps)],
        "outbox": ["2000-01-01T00:00:00.000000Z"],
    }
    assert must_be_0(bench.audit(run, store)) == {
        "stuck (still running at the end)": 1,
        "completions applied twice for one attempt": 1,
        "attempts dispatched while another of the step was live": 2,  # and s3 is unknown
        "outbox entries unpublished after 1 s": 1,
        "HTTP 5xx answered": 1,
        "/healthz of a live gateway not 200 in 10 s": 1,
        "duplicates created by upload retries": 1,
    }


def test_a_clean_record_passes_the_audit(bench: Any, tmp_path: Path) -> None:
    run, n = made_up_run(bench, tmp_path)
    run.rec.applied["s1"] = 1
    run.rec.dispatches[("w1", "image_processing", 1)] = {"s0"}
    run.rec.dispatches[("w1", "image_processing", 2)] = {"s1"}
    steps = [step("image_processing", [("s0", 1, "failed"), ("s1", 2, "completed")], "s1")]
    store = {"workflows": [doc("w1", n, "completed", steps)], "outbox": []}
    assert must_be_0(bench.audit(run, store)) == {}


def test_a_watcher_counts_versions_out_of_order_and_missed(bench: Any, tmp_path: Path) -> None:
    run, _ = made_up_run(bench, tmp_path)
    watch = bench.Watch()
    for version in (3, 3, 4, 2, 7):  # 3 twice (two messages of one change) is in order
        run.watched(watch, {"workflow_id": "w1", "version": version})
    assert (watch.out_of_order, watch.missed) == (1, 2)


def chaos(mode: str, *extra: str) -> tuple[Table, str]:
    """The must-be-0 rows of one CI-sized run of `mode` (run once per session), and its
    output."""
    if mode not in _runs:
        run = subprocess.Popen(
            [sys.executable, str(CHAOS), "--mode", mode, *CI_SIZED, "--timeout", "45", *extra],
            cwd=REPO,
            env=stox_environ(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            stdout, stderr = run.communicate(timeout=50)
        except subprocess.TimeoutExpired:  # SIGTERM: the run stops what it started
            run.terminate()
            stdout, stderr = run.communicate(timeout=15)
        output = stdout + stderr
        rows = {name: int(figure) for name, figure, _ in ROW.findall(stdout)}
        assert rows, output
        _runs[mode] = rows, output
    return _runs[mode]


def check_every_row(rows: Table, output: str) -> None:
    assert "completed" in output and "fault: gateway SIGKILLed" in output, output
    wrong = {name: figure for name, figure in rows.items() if figure}
    assert wrong == {}, output


@pytest.mark.slow
@pytest.mark.timeout(80)
def test_embedded_fault_run_keeps_every_guarantee() -> None:
    check_every_row(*chaos("embedded"))


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.mongo
@pytest.mark.timeout(80)
def test_rabbitmq_mongo_fault_run_keeps_every_guarantee(rabbitmq_url: str) -> None:
    check_every_row(*chaos("rabbitmq-mongo", "--rabbitmq-url", rabbitmq_url))


def children_of(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def test_a_terminated_run_stops_the_processes_it_started() -> None:
    """A test's timeout sends SIGTERM: the gateways the run started do not outlive it."""
    run = subprocess.Popen(
        [sys.executable, str(CHAOS), "--mode", "embedded", *CI_SIZED],
        cwd=REPO,
        env=stox_environ(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (started := children_of(run.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started, "the run started no process"
        run.terminate()
        assert run.wait(30) == 128 + signal.SIGTERM
    finally:
        run.kill()
        run.wait()
    assert all(not Path(f"/proc/{pid}").exists() for pid in started), started
