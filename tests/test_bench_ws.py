"""bench/ws.py end to end on a small scale, so the benchmark does not rot: it starts its own
gateway, runs its three phases and prints them. It asserts nothing about speed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_websocket_benchmark_runs_its_three_phases() -> None:
    small = ["--sockets", "300", "--fanout", "50", "--fanout-rounds", "1"]
    small += ["--subscribers", "100", "--rate", "100", "--duration", "1", "--timeout", "45"]

    result = subprocess.run(
        [sys.executable, "bench/ws.py", *small],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=55,
        stdin=subprocess.DEVNULL,
    )

    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for heading in ("== 1. idle sockets: 300 ", "== 2. fan-out: ", "== 3. streams: 100 "):
        assert heading in out, out
    assert "opened 300 of 300" in out, out
    assert "changes 3, deliveries 150 of 150; missing 0" in out, out
    assert re.search(r"changes received ([\d,]+) of \1 made", out), out
    assert "phases completed: 1, 2, 3 of 1, 2, 3" in out, out
