"""What the gateway's metrics cost: bench/e2e.py's closed loop, with metrics on and off.

Each round runs the same load twice on a fresh gateway, once with `metrics.enabled` true (the
default: every family counted, the store timed) and once with it false, in alternating
order, so that a host that gets busier or quieter during the run shifts both alike. Printed:
each run's gateway CPU per workflow and workflows/s, then the medians and what metrics add,
as the median of the rounds' paired differences (CPU per workflow is the steady figure; the
rates follow the host).

    .venv/bin/python bench/metrics_cost.py                  # 5 rounds of 2000 workflows, embedded
    .venv/bin/python bench/metrics_cost.py --rounds 3 --rabbitmq-url amqp://guest:guest@127.0.0.1/

Exit status 0 when every run completed all its workflows, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import e2e
from report import Run


@dataclass
class Figures:
    metrics: bool
    ms_per_workflow: float
    workflows_per_s: float


def one_run(argv: list[str], metrics: bool) -> Figures | None:
    setting = "true" if metrics else "false"
    args = e2e.parse_args([*argv, "--gateway-env", f"STOX_METRICS_ENABLED={setting}"])
    run = Run(args, mode="rabbitmq" if args.rabbitmq_url else "embedded")
    try:
        asyncio.run(asyncio.wait_for(measured(run), run.args.timeout))
    except TimeoutError:
        return None
    phase, cpu = run.run, run.gateway_cpu
    if run.problems or phase is None or cpu is None or cpu.server is None:
        print(f"  a run failed: {run.problems}", file=sys.stderr)
        return None
    if phase.completed != phase.total:
        print(f"  {phase.completed} of {phase.total} workflows completed", file=sys.stderr)
        return None
    return Figures(metrics, 1000 * cpu.server / phase.completed, phase.completed / phase.wall)


async def measured(run: Run) -> None:
    """One gateway's closed loop (embedded, or on RabbitMQ when the run's mode says so)."""
    tmpdir = Path(tempfile.mkdtemp(prefix="stox-metrics-cost-"))
    try:
        await e2e.gateway_run(run, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/metrics_cost.py", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="pairs of runs (5)")
    parser.add_argument("--workflows", type=int, default=2000, help="per run (2000)")
    parser.add_argument("--rabbitmq-url", help="measure the gateway on this RabbitMQ instead")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    e2e_argv = ["--workflows", str(args.workflows), "--no-ceiling", "--no-open-loop"]
    if args.rabbitmq_url:
        e2e_argv += ["--rabbitmq-url", args.rabbitmq_url]
    mode = "on RabbitMQ" if args.rabbitmq_url else "embedded"
    print(f"metrics cost, {mode}: {args.rounds} rounds of {args.workflows} workflows, on and off")
    print(f"  {'round':>5}  {'metrics':>7}  {'cpu/workflow':>12}  {'workflows/s':>11}")
    pairs: list[tuple[Figures, Figures]] = []
    for index in range(args.rounds):
        order = (True, False) if index % 2 == 0 else (False, True)
        results: dict[bool, Figures] = {}
        for metrics in order:
            figures = one_run(e2e_argv, metrics)
            if figures is None:
                return 1
            results[metrics] = figures
            print(
                f"  {index + 1:>5}  {'on' if metrics else 'off':>7}  "
                f"{figures.ms_per_workflow:>9.3f} ms  {figures.workflows_per_s:>11.1f}",
                flush=True,
            )
        pairs.append((results[True], results[False]))
    on = statistics.median(p[0].ms_per_workflow for p in pairs)
    off = statistics.median(p[1].ms_per_workflow for p in pairs)
    added = statistics.median(p[0].ms_per_workflow - p[1].ms_per_workflow for p in pairs)
    rate_on = statistics.median(p[0].workflows_per_s for p in pairs)
    rate_off = statistics.median(p[1].workflows_per_s for p in pairs)
    print(f"  median cpu per workflow: on {on:.3f} ms, off {off:.3f} ms")
    print(f"  median workflows/s:      on {rate_on:.1f}, off {rate_off:.1f}")
    print(
        f"  metrics add {1000 * added:+.0f} us per workflow (median of paired differences), "
        f"{100 * added / off:+.1f}% of the gateway's cpu without them"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
