"""The collector's tuning: start-up's objects frozen, the thresholds raised (stox/gc_tuning.py)."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stox import gc_tuning


@pytest.fixture
def restored() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tuning_freezes_what_start_up_made_and_raises_the_thresholds(restored: None) -> None:
    made_at_start_up = [{"kept": n} for n in range(1000)]
    young, middle, _ = gc.get_threshold()
    gc_tuning.tune()
    assert gc.get_threshold() == (young, middle, gc_tuning.FULL_EVERY)
    assert gc.get_freeze_count() >= len(made_at_start_up)
    assert gc_tuning.FULL_EVERY >= 100


def test_a_started_gateway_runs_tuned(tmp_path: Path) -> None:
    """server.py tunes the collector once it has started (checked in its own process)."""
    root = Path(__file__).resolve().parent.parent
    script = (
        "import asyncio, gc, sys\n"
        "import server\n"
        "from stox import gc_tuning\n"
        "async def check(settings):\n"
        "    task = asyncio.ensure_future(server.serve(settings))\n"
        "    for _ in range(200):\n"
        "        await asyncio.sleep(0.05)\n"
        "        if gc.get_threshold()[2] == gc_tuning.FULL_EVERY and gc.get_freeze_count():\n"
        "            print('tuned', gc.get_threshold()); break\n"
        "    task.cancel()\n"
        "import settings as s\n"
        "cfg = s.load(['--port', '0'])\n"
        "asyncio.run(check(cfg))\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "STOX_STORAGE_URL": f"sqlite:///{tmp_path}/stox.db",
        "STOX_JWT_SECRET": "x" * 32,
    }
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "tuned" in out.stdout, out.stderr[-2000:]
