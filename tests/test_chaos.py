"""bench/chaos.py, CI-sized: 150 workflows through the hostile fleet, 2 SIGKILLs (and, on
RabbitMQ + MongoDB, 2 broker drops and two gateways); every must-be-0 row of its table is 0.

The run is a subprocess (real gateways, as the fault run always starts them); its table is
parsed. "duplicates created by upload retries" waits for `Idempotency-Key` support on upload
(issue 11 item 6): until it lands that row is checked by its own test, marked xfail.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import stox_environ

REPO = Path(__file__).resolve().parent.parent
CHAOS = REPO / "bench" / "chaos.py"
CI_SIZED = ["--workflows", "150", "--kills", "2", "--drops", "2", "--rate", "50"]
DUPLICATES = "duplicates created by upload retries"
ROW = re.compile(r"^  (.+?) +(\d+)  \(must be 0\) (ok|FAIL)$", re.MULTILINE)

Table = dict[str, int]
_runs: dict[str, tuple[Table, str]] = {}


def chaos(mode: str, *extra: str) -> tuple[Table, str]:
    """The must-be-0 rows of one CI-sized run of `mode` (run once per session), and its
    output."""
    if mode not in _runs:
        result = subprocess.run(
            [sys.executable, str(CHAOS), "--mode", mode, *CI_SIZED, "--timeout", "45", *extra],
            cwd=REPO,
            env=stox_environ(),
            capture_output=True,
            text=True,
            timeout=58,
        )
        output = result.stdout + result.stderr
        rows = {name: int(figure) for name, figure, _ in ROW.findall(result.stdout)}
        assert rows, output
        _runs[mode] = rows, output
    return _runs[mode]


def check_all_but_duplicates(rows: Table, output: str) -> None:
    assert "completed" in output and "fault: gateway SIGKILLed" in output, output
    wrong = {name: figure for name, figure in rows.items() if figure and name != DUPLICATES}
    assert wrong == {}, output


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_embedded_fault_run_keeps_every_guarantee() -> None:
    check_all_but_duplicates(*chaos("embedded"))


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.xfail(reason="Idempotency-Key on upload (issue 11 item 6) is not merged yet")
def test_embedded_fault_run_creates_no_duplicate_on_upload_retries() -> None:
    rows, output = chaos("embedded")
    assert rows[DUPLICATES] == 0, output


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.mongo
@pytest.mark.timeout(60)
def test_rabbitmq_mongo_fault_run_keeps_every_guarantee(rabbitmq_url: str) -> None:
    check_all_but_duplicates(*chaos("rabbitmq-mongo", "--rabbitmq-url", rabbitmq_url))
