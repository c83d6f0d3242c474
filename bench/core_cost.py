"""What the gateway's core costs per workflow, in instructions: steady on a busy host.

The core is what every transition runs whatever the transport: the domain's rules, the
orchestrator, the SQLite store (its worker thread included), the in-process bus and the hub
fanning each change out to one subscriber. Each workflow is an upload and three reports of
the default pipeline, one workflow after another, in one process (no HTTP, no sockets).

It runs that workload under `valgrind --tool=callgrind` twice, for 0 and for N workflows,
and prints the difference per workflow: instructions count the same whatever else the
machine is doing, where CPU time does not (the interpreter's start-up and imports cancel
out). `--repo PATH` measures another checkout's code with this script (before and after a
change, in one run); `--compare PATH` measures both and prints the ratio.

    .venv/bin/python bench/core_cost.py                      # 200 workflows, about a minute
    .venv/bin/python bench/core_cost.py --compare ../before  # this tree against another

Needs valgrind. Exit status 0 when every run completed.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PRODUCT = {
    "name": "Desk lamp",
    "description": "A brass desk lamp with a linen shade",
    "images": ["https://example.com/lamp.jpg"],
    "category": "home",
    "price": 49.5,
    "metadata": {"sku": "LAMP-1"},
}


class _Subscriber:
    """A WebSocket as the hub sees it: every message taken at once."""

    def __init__(self) -> None:
        self.messages = 0

    def send(self, message: bytes) -> asyncio.Future[None]:
        self.messages += 1
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        pass


async def workload(workflows: int, folder: str) -> None:
    """`workflows` three-step workflows through the core (imports from the checkout run)."""
    # the same ids from run to run (they are hashed, so their bytes move the counts a little)
    os.urandom = random.Random(0).randbytes
    from stox import gc_tuning
    from stox.bus.local import LocalBus
    from stox.changes import CHANGES_ROUTING_KEY
    from stox.hub import Hub
    from stox.orchestrator import Orchestrator
    from stox.store.sqlite import SQLiteStore
    from stox.workflow import CHANGE_ROUTING_KEY, Pipeline, Report

    gc_tuning.tune()  # as server.py does: a full collection in one run and not the next moved
    # the counts by 1.5%
    store = SQLiteStore(os.path.join(folder, "core.db"))
    await store.open()
    bus = LocalBus()
    await bus.start()
    pipeline = Pipeline(completion_url="http://127.0.0.1/api/v1/workflow/step-completed")
    orchestrator = Orchestrator(store, bus, pipeline)
    hub = Hub(
        orchestrator,
        max_backlog=1 << 24,
        send_timeout=10,
        max_sockets_per_user=1,
        snapshot_cache=1 << 24,
        max_sockets=1,
    )
    await bus.declare("core.hub", [CHANGES_ROUTING_KEY, CHANGE_ROUTING_KEY], exclusive=True)
    await bus.consume("core.hub", hub.on_change)
    subscriber = _Subscriber()
    await hub.send_snapshot(
        hub.subscribe(subscriber, user="alice", owner="alice", workflow_id=None)
    )
    completed = 0
    for _ in range(workflows):
        wf: Any = await orchestrator.upload("alice", copy.deepcopy(PRODUCT))
        while wf.status == "running":
            step = wf.step
            report = Report(wf.id, step.step_id, True, result={"ok": step.name})
            wf = (await orchestrator.report(report)).workflow
        completed += wf.status == "completed"
        await orchestrator.drain()
    await bus.close()
    await store.close()
    if completed != workflows:
        raise SystemExit(f"{completed} of {workflows} workflows completed")


def instructions(repo: Path, workflows: int) -> int:
    """Instructions callgrind counts for the workload of `workflows` on `repo`'s code."""
    with tempfile.TemporaryDirectory(prefix="stox-core-cost-") as folder:
        out = os.path.join(folder, "callgrind.out")
        # one hash seed: set and dict layouts, and so the counts, the same from run to run
        env = {
            **os.environ,
            "PYTHONPATH": str(repo),
            "PYTHONMALLOC": "malloc",
            "PYTHONHASHSEED": "0",
        }
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        command += [sys.executable, __file__, "--inner", str(workflows), "--folder", folder]
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
        text = Path(out).read_text(errors="replace")
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if found is None:
        raise RuntimeError("callgrind wrote no totals")
    return int(found[1])


def per_workflow(repo: Path, workflows: int) -> float:
    return (instructions(repo, workflows) - instructions(repo, 0)) / workflows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/core_cost.py", description=__doc__)
    parser.add_argument("--workflows", type=int, default=200, help="per measured run (200)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to measure")
    parser.add_argument("--compare", type=Path, help="also measure this checkout: the before")
    parser.add_argument("--inner", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner is not None:
        asyncio.run(workload(args.inner, args.folder))
        return 0
    if args.workflows < 1:
        parser.error("--workflows must be at least 1")
    print(f"core cost: {args.workflows} three-step workflows in one process, callgrind")
    after = per_workflow(args.repo.resolve(), args.workflows)
    print(f"  {args.repo}: {after / 1e6:.3f} M instructions per workflow")
    if args.compare is not None:
        before = per_workflow(args.compare.resolve(), args.workflows)
        print(f"  {args.compare}: {before / 1e6:.3f} M instructions per workflow")
        print(f"  {args.repo} / {args.compare}: {after / before:.3f} ({after / before - 1:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
