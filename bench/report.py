"""What one run of bench/e2e.py records (`Run`, one per mode) and the page it prints: each
mode's closed and open loops, the Celery peer, the ceiling, then the comparisons.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

from broker import CELERY_CONCURRENCY, BrokerNames, CeleryRun
from figures import counts, ms, ms_at, ms_max, verdict, within
from processes import CpuMeter, Target
from roles import Ceiling, OpenLoop, Phase, Shared

GOAL_WORKFLOWS_PER_S = 750


@dataclass
class Run:
    args: argparse.Namespace
    target: Target | None = None
    run: Phase | None = None
    warmup: Phase | None = None
    shared: Shared | None = None
    ceiling: Ceiling | None = None
    gateway_cpu: CpuMeter | None = None
    rss_before: float | None = None
    rss_after: float | None = None
    gateway_exit: int | None = None
    gateway_log_lines: list[str] = field(default_factory=list)
    gateway_log_count: int = 0
    problems: list[str] = field(default_factory=list)
    timed_out: bool = False
    mode: str = "embedded"  # or "rabbitmq": the same load on a gateway using RabbitMQ
    rabbitmq: Run | None = None  # with --rabbitmq-url: that second run
    celery: CeleryRun | None = None  # with --peers: the Celery peer's run
    open_loop: OpenLoop | None = None  # after the closed loop, unless --no-open-loop
    broker: BrokerNames | None = None

    @property
    def amqp(self) -> bool:
        return self.mode == "rabbitmq"


def report(run: Run) -> None:
    args = run.args
    p = print
    target = run.target
    p("Stox end-to-end benchmark")
    if target is not None:
        how = "started here, SQLite in a temp dir" if target.process else "already running"
        p(f"  gateway                 {target.base_url} ({how})")
    p(
        f"  load                    {args.workflows} workflows, {args.uploaders} uploaders, "
        f"{args.services} services, warm-up {args.warmup}, ramp {args.ramp:g}s"
    )
    report_gateway(run, "gateway")
    if run.rabbitmq is not None:
        report_gateway(run.rabbitmq, "gateway on RabbitMQ (AMQP dispatch and replies)")
        report_comparison(run, run.rabbitmq)
    if run.celery is not None:
        report_celery(run.celery, args)
    report_ceiling(run)
    if args.peers:
        report_peers(run)
    report_notes(run)


def report_stalled(phases: tuple[Phase | None, ...], idle: float) -> None:
    for stalled in phases:
        if stalled is not None and stalled.stalled:
            missing = stalled.uploaded - len(stalled.finished)
            print(
                f"STALLED in the {stalled.name}: {missing} workflows never finished and nothing "
                f"moved for {idle:g}s"
            )


def report_gateway(run: Run, title: str) -> None:
    args, p, target = run.args, print, run.target
    phase = run.run
    if phase is not None:
        # over AMQP only the uploads are HTTP requests; the steps are messages
        served = phase.upload_requests + (0 if run.amqp else phase.step_requests)
        p(title)
        p(
            f"  workflows completed     {phase.completed} / {phase.total}"
            f"  (failed {phase.failed}, uploads accepted {phase.uploaded})"
        )
        p(f"  wall time               {phase.wall:.2f} s")
        p(f"  completed workflows/s   {phase.completed / phase.wall:.1f}")
        if run.amqp:
            p(
                f"  HTTP requests/s         {served / phase.wall:.1f}  ({phase.upload_requests} "
                f"uploads; {phase.step_requests} steps dispatched and reported over AMQP)"
            )
        else:
            p(
                f"  HTTP requests/s         {served / phase.wall:.1f}"
                f"  ({phase.upload_requests} uploads + {phase.step_requests} step-completed)"
            )
        p(f"  upload latency          {ms(phase.upload_latency)}")
        if run.amqp:
            p(f"  dispatch latency        {ms(phase.step_latency)}  (gateway publish -> service)")
        else:
            p(f"  step-completed latency  {ms(phase.step_latency)}")
        p(f"  workflow latency        {ms(phase.workflow_latency)}  (upload sent -> completed)")
        p(f"  errors                  {counts(phase.errors)}")
        if run.shared is not None:
            closed = run.shared.ws_closed or "open to the end"
            p(f"  websocket               {run.shared.ws_messages} messages, {closed}")
        gw_cpu = run.gateway_cpu
        if gw_cpu is not None:
            p(f"  cpu (% of one core)     {gw_cpu.describe('gateway')}")
            if gw_cpu.server is not None and phase.completed and served:
                per_request = f", {1e6 * gw_cpu.server / served:.0f} us per HTTP request"
                if run.amqp:  # the uploads are its only HTTP requests: no figure of its own
                    per_request = ""
                p(
                    f"  gateway cpu per unit    {1000 * gw_cpu.server / phase.completed:.2f} ms "
                    f"per workflow{per_request}"
                    f"  (one free core: ~{phase.completed / gw_cpu.server:.0f} workflows/s)"
                )
            if run.amqp:
                p("  (the broker's CPU counts among the other processes)")
        if run.rss_before is not None and run.rss_after is not None:
            p(f"  gateway RSS             {run.rss_before:.0f} MiB -> {run.rss_after:.0f} MiB")
    if run.open_loop is not None:
        report_open_loop(run, run.open_loop)
    if target is not None and target.process is not None:
        p(
            f"  gateway exit status     {run.gateway_exit}; "
            f"{run.gateway_log_count} log lines at level warning and above"
        )
        for line in run.gateway_log_lines if run.gateway_log_count else []:
            p(f"    | {line[:200]}")
    open_phase = run.open_loop.phase if run.open_loop is not None else None
    report_stalled((run.warmup, run.run, open_phase), args.idle_timeout)
    if run.amqp:
        for problem in run.problems:
            p(f"PROBLEM (RabbitMQ run): {problem}")


UPLOAD_P99_MS = 10  # issue 9's targets for the open loop
STEP_P99_MS = 10
DISPATCH_P99_MS = 5


def report_open_loop(run: Run, loop: OpenLoop) -> None:
    p, phase = print, loop.phase
    p(
        f"  open loop               {loop.rate:.1f} uploads/s for {loop.seconds:.1f} s "
        f"({loop.basis}), {phase.total} uploads"
    )
    p("                          at fixed times; latency from each one's scheduled time")
    p(
        f"    achieved              {phase.completed / phase.wall:.1f} workflows/s"
        "  (first scheduled upload -> last completion)"
    )
    p(
        f"    workflows completed   {phase.completed} / {phase.total}"
        f"  (failed {phase.failed}, uploads accepted {phase.uploaded})"
    )
    valve = f"{loop.waited} uploads waited for one" if loop.waited else "never all busy"
    p(f"    connections           at most {loop.peak} busy of {loop.connections} ({valve})")
    p(f"    send lag              {ms_max(loop.send_lag)}  (scheduled -> request written)")
    p(
        f"    upload latency        {ms_max(phase.upload_latency)}  "
        f"{verdict(phase.upload_latency, UPLOAD_P99_MS)}"
    )
    if run.amqp:
        p(
            f"    dispatch latency      {ms_max(phase.step_latency)}  "
            f"{verdict(phase.step_latency, DISPATCH_P99_MS)}"
        )
        p("                          (the gateway's publish stamp, after the commit -> receipt)")
        p(
            f"    from the decision     {ms_max(phase.decision_latency)}  "
            f"{verdict(phase.decision_latency, DISPATCH_P99_MS)}"
        )
        p("                          (the event's occurred_at, before the write -> receipt)")
    else:
        p(
            f"    step-completed        {ms_max(phase.step_latency)}  "
            f"{verdict(phase.step_latency, STEP_P99_MS)}"
        )
        p(f"    service wait          {ms_max(phase.service_wait)}  (seen on /ws -> taken)")
    p(f"    workflow latency      {ms_max(phase.workflow_latency)}  (scheduled -> completed)")
    p(f"    errors                {counts(phase.errors)}")
    if loop.cpu is not None:
        p(f"    cpu (% of one core)   {loop.cpu.describe('gateway')}")


def open_loop_targets(run: Run, loop: OpenLoop) -> str:
    """'met', or which targets were not (the dispatch's: from the publish stamp)."""
    phase = loop.phase
    checks = [("upload", phase.upload_latency, UPLOAD_P99_MS)]
    if run.amqp:
        checks.append(("dispatch", phase.step_latency, DISPATCH_P99_MS))
    else:
        checks.append(("step-completed", phase.step_latency, STEP_P99_MS))
    missed = [name for name, values, limit in checks if not within(values, limit)]
    return "met" if not missed else "not met: " + ", ".join(missed)


def report_comparison(embedded: Run, amqp: Run) -> None:
    """The figures that matter, side by side; both runs had the same load."""
    p = print
    rows: list[tuple[str, Callable[[Run], str]]] = [
        ("completed workflows/s", _rate),
        ("workflow latency p50", lambda r: ms_at(r.run.workflow_latency if r.run else [], 50)),
        ("workflow latency p99", lambda r: ms_at(r.run.workflow_latency if r.run else [], 99)),
        ("upload latency p50", lambda r: ms_at(r.run.upload_latency if r.run else [], 50)),
        ("gateway cpu / workflow", _cpu_per_workflow),
    ]
    p("embedded vs RabbitMQ (same load, same machine)")
    p(f"  {'':24}{'embedded':>14}{'RabbitMQ':>14}")
    for name, figure in rows:
        p(f"  {name:24}{figure(embedded):>14}{figure(amqp):>14}")


def _rate(run: Run) -> str:
    return "-" if run.run is None else f"{run.run.completed / run.run.wall:.1f}"


def _cpu_per_workflow(run: Run) -> str:
    cpu = run.gateway_cpu
    if cpu is None or cpu.server is None or run.run is None or not run.run.completed:
        return "-"
    return f"{1000 * cpu.server / run.run.completed:.2f} ms"


def report_ceiling(run: Run) -> None:
    args, p, phase = run.args, print, run.run
    ceiling = run.ceiling
    if ceiling is not None:
        p(f"ceiling (bare Tornado, {ceiling.concurrency} connections)")
        p(f"  requests                {ceiling.requests} in {ceiling.wall:.2f} s")
        p(f"  requests/s              {ceiling.rate:.1f}")
        p(f"  latency                 {ms(ceiling.latency)}")
        p(f"  errors                  {counts(ceiling.errors)}")
        if ceiling.cpu is not None:
            p(f"  cpu (% of one core)     {ceiling.cpu.describe('bare Tornado')}")
            used = ceiling.cpu.server
            if used and ceiling.requests:
                p(
                    f"  cpu per request         {1e6 * used / ceiling.requests:.0f} us"
                    f"  (one free core: ~{ceiling.requests / used:.0f} requests/s)"
                )
        if phase is not None and ceiling.requests:
            served = phase.upload_requests + phase.step_requests
            wf_rate = phase.completed / phase.wall
            p("comparison")
            http_ratio = served / phase.wall / ceiling.rate
            p(f"  gateway HTTP req/s / ceiling req/s         {http_ratio:.3f}")
            p(f"  completed workflows/s / ceiling req/s      {wf_rate / ceiling.rate:.3f}")
            per_workflow = 1 + (run.shared.steps_per_workflow if run.shared else 3)
            goal_http = GOAL_WORKFLOWS_PER_S * per_workflow
            p(
                f"  goal {GOAL_WORKFLOWS_PER_S} workflows/s = {goal_http} HTTP req/s    "
                f"{goal_http / ceiling.rate:.3f} of the ceiling; "
                f"now at {wf_rate / GOAL_WORKFLOWS_PER_S:.1%} of the goal"
            )
    report_stalled((run.warmup, run.run), args.idle_timeout)


def report_celery(record: CeleryRun, args: argparse.Namespace) -> None:
    p, phase = print, record.run
    p(f"Celery peer (chains of 3 no-op tasks, {CELERY_CONCURRENCY} prefork workers, same broker)")
    if phase is not None:
        p(
            f"  workflows completed     {phase.completed} / {phase.total}"
            f"  (chains published {phase.uploaded})"
        )
        p(f"  wall time               {phase.wall:.2f} s")
        p(f"  completed workflows/s   {phase.completed / phase.wall:.1f}")
        window = f"at most {record.window}" if record.window else "no limit (--celery-window)"
        p(f"  chains in flight        {window}")
        p(f"  workflow latency        {ms(phase.workflow_latency)}  (published -> done message)")
        p(f"  errors                  {counts(phase.errors)}")
    cpu = record.cpu
    if phase is not None and cpu is not None:
        p(f"  cpu (% of one core)     {cpu.describe('celery worker')}")
        if cpu.server and phase.completed:
            p(
                f"  worker cpu per unit     {1000 * cpu.server / phase.completed:.2f} ms "
                f"per workflow  (one free core: ~{phase.completed / cpu.server:.0f} workflows/s)"
            )
        p("  (the worker's CPU: its main process and its pool; the broker's: other processes)")
    if record.rss is not None:
        p(f"  worker RSS              {record.rss:.0f} MiB in {record.processes} processes")
    if record.process is not None:
        p(f"  worker exit status      {record.exit}; {record.log_count} log lines")
        for line in [] if record.complete else record.log_lines:
            p(f"    | {line[:200]}")
    report_stalled((record.warmup, record.run), args.idle_timeout)
    for problem in record.problems:
        p(f"PROBLEM (Celery run): {problem}")


@dataclass
class PeerRow:
    """One line of the peers table: `count` units (workflows or requests) and their CPU."""

    name: str
    unit: str
    count: int | None = None
    wall: float = 0.0
    cpu: CpuMeter | None = None

    @property
    def rate(self) -> float | None:
        return self.count / self.wall if self.count and self.wall else None

    def per_unit(self, seconds: float | None) -> str:
        if seconds is None or not self.count:
            return "-"
        if self.unit == "req":
            return f"{1e6 * seconds / self.count:.0f} us"
        return f"{1000 * seconds / self.count:.2f} ms"

    def cells(self, celery: float | None) -> list[str]:
        cpu = self.cpu
        server, bench, others = (cpu.server, cpu.bench, cpu.others) if cpu else (None,) * 3
        host = None
        if server is not None and bench is not None and others is not None:
            host = server + bench + others
        ratio = "-"
        if self.rate is not None and celery and self.unit == "wf":
            ratio = f"{self.rate / celery:.2f}"
        rate = "-" if self.rate is None else f"{self.rate:.1f} {self.unit}/s"
        return [rate, *(self.per_unit(x) for x in (server, bench, others, host)), ratio]


def peer_rows(run: Run) -> list[PeerRow]:
    def of(name: str, phase: Phase | None, cpu: CpuMeter | None) -> PeerRow:
        if phase is None:
            return PeerRow(name, "wf")
        return PeerRow(name, "wf", phase.completed, phase.wall, cpu)

    amqp, celery, ceiling = run.rabbitmq, run.celery, run.ceiling
    rows = [
        of("Stox embedded", run.run, run.gateway_cpu),
        of("Stox on RabbitMQ", amqp.run if amqp else None, amqp.gateway_cpu if amqp else None),
        of("Celery chains", celery.run if celery else None, celery.cpu if celery else None),
        PeerRow("bare Tornado ceiling", "req"),
    ]
    if ceiling is not None:
        rows[-1] = PeerRow(
            "bare Tornado ceiling", "req", ceiling.requests, ceiling.wall, ceiling.cpu
        )
    return rows


def report_peers(run: Run) -> None:
    """The page: Stox in both modes, the Celery peer and the ceiling, per unit of work."""
    p = print
    rows = peer_rows(run)
    celery = rows[2].rate
    p(
        f"peers: one run, one machine, one broker; {run.args.workflows} workflows each after "
        f"{run.args.warmup} of warm-up, the ceiling as many requests as the gateway served"
    )
    heads = ["throughput", "server cpu", "load gen cpu", "others cpu", "host cpu", "rate/Celery"]
    p(f"  {'':22}" + "".join(f"{h:>14}" for h in heads))
    for row in rows:
        p(f"  {row.name:22}" + "".join(f"{c:>14}" for c in row.cells(celery)))
    p("  cpu per workflow (per request for the ceiling). server: the gateway; the Celery worker")
    p(f"  and its {CELERY_CONCURRENCY} pool processes (they run the no-op tasks); bare_tornado.py.")
    p("  load gen: this process (Stox's step services, Celery's producer). others: the broker")
    p("  and the rest of the host. host: the three added up.")
    for row in rows[:2]:
        if row.rate is not None and celery:
            line = f"  {row.name} / Celery: {row.rate / celery:.2f}x the workflows/s"
            mine, theirs = row.cpu, rows[2].cpu
            if mine and theirs and mine.server and theirs.server and row.count and rows[2].count:
                cpu_ratio = (mine.server / row.count) / (theirs.server / rows[2].count)
                line += f", {cpu_ratio:.2f}x the server cpu per workflow"
            p(line)
    report_open_peers(run)


def report_open_peers(run: Run) -> None:
    """The open loop of both modes, with issue 9's targets."""
    runs = [(name, r) for name, r in (("Stox embedded", run), ("Stox on RabbitMQ", run.rabbitmq))]
    rows = [(name, r, r.open_loop) for name, r in runs if r is not None and r.open_loop]
    if not rows:
        return
    p = print
    p(
        f"open loop: {run.args.open_loop_share:g} x the closed-loop maximum (or --open-loop-rate), "
        "uploads at fixed times, latency from the scheduled time"
    )
    heads = ["offered", "achieved", "upload p99", "step p99", "dispatch p99", "workflow p99"]
    p(f"  {'':22}" + "".join(f"{h:>14}" for h in heads) + "  targets")
    for name, each, loop in rows:
        phase = loop.phase
        step, dispatch = "-", "-"
        if each.amqp:
            dispatch = ms_at(phase.step_latency, 99)
        else:
            step = ms_at(phase.step_latency, 99)
        cells = [
            f"{loop.rate:.1f} wf/s",
            f"{phase.completed / phase.wall:.1f} wf/s",
            ms_at(phase.upload_latency, 99),
            step,
            dispatch,
            ms_at(phase.workflow_latency, 99),
        ]
        p(
            f"  {name:22}"
            + "".join(f"{c:>14}" for c in cells)
            + f"  {open_loop_targets(each, loop)}"
        )
    p(
        f"  targets: upload p99 <= {UPLOAD_P99_MS} ms, step-completed p99 <= {STEP_P99_MS} ms "
        f"(embedded), dispatch p99 <= {DISPATCH_P99_MS} ms"
    )
    p("  (RabbitMQ; from the gateway's publish stamp, set after the commit, to the receipt)")


def report_notes(run: Run) -> None:
    args, p, ceiling = run.args, print, run.ceiling
    busy = [  # not the runs on the broker: its CPU is among their others
        meter.others / meter.wall
        for meter in (run.gateway_cpu, ceiling.cpu if ceiling else None)
        if meter is not None and meter.others is not None and meter.pid
    ]
    if busy and max(busy) > 0.25:
        p(
            f"NOTE: other processes used up to {max(busy):.0%} of a core meanwhile; the rates "
            "are skewed, the CPU-per-unit figures less so"
        )
    if run.timed_out:
        p(f"TIMED OUT after {args.timeout:g}s: the figures above are partial")
    for problem in run.problems:
        p(f"PROBLEM: {problem}")
