"""End-to-end throughput benchmark of the Stox gateway, run by hand; it prints figures.

It starts the gateway (`server.py`, embedded SQLite store and in-process bus) as a
subprocess, or targets a running one with `--url`, and drives it the way an embedded-mode
deployment is driven:

* `--uploaders U` coroutines upload `--workflows N` products over HTTP (a user token);
* one WebSocket subscription to all of that user's workflows (`/ws`) sees every
  `step_dispatched` change and puts (workflow, step_id, step) on a queue;
* `--services S` coroutines play the step services: they drain the queue and report each
  step over HTTP (`POST /api/v1/workflow/step-completed`, a service token, success);
* a workflow counts as completed when its `workflow_completed` message arrives.

Then, in the same run, it starts `bench/bare_tornado.py` (one JSON POST handler on a bare
Tornado app) and drives it with the same client and the same total concurrency (U+S) for
as many requests as the gateway served: the ceiling one Tornado process reaches here.

The HTTP client is a minimal asyncio HTTP/1.1 keep-alive client (one connection per worker,
Content-Length bodies), several times cheaper per request than tornado's AsyncHTTPClient,
so the load generator stays out of the way; the gateway and the bare app each run in their
own process. Everything has a bound: per-request timeouts and an overall `--timeout`, after
which it prints what it has and exits non-zero. Only loopback addresses are used.

This file is the command line and the run's sequence; the rest is in modules of bench/
that bench/ws.py shares: httpclient.py (the client), processes.py (starting and stopping
servers, their CPU and memory from /proc), roles.py (uploaders, the WebSocket subscriber,
the HTTP services, the open loop, the ceiling's clients), broker.py (the services over
AMQP, the Celery peer's driver), figures.py (percentiles and counts as printed) and
report.py (what a run records, and the page).

    .venv/bin/python bench/e2e.py --quick          # 300 workflows, a smoke run
    .venv/bin/python bench/e2e.py                  # 2000 workflows, about a minute
    .venv/bin/python bench/e2e.py --profile-server /tmp/gw.prof   # gateway under cProfile
    .venv/bin/python -m pstats /tmp/gw.prof      # then: sort cumulative, stats 15
    .venv/bin/python bench/e2e.py --url http://127.0.0.1:8080 --jwt-secret "$STOX_JWT_SECRET"
    .venv/bin/python bench/e2e.py --rabbitmq-url amqp://guest:guest@127.0.0.1/   # both modes
    .venv/bin/python bench/e2e.py --peers         # both modes, Celery and the ceiling: make bench

With `--rabbitmq-url` a second gateway runs on RabbitMQ after the embedded one (the same
load, its own exchange and queue names, deleted afterwards): the services then consume the
step queues over AMQP and reply with `step.completed` messages, as `examples/worker.py`
does, and the two are reported side by side.

After each mode's closed loop, an open loop (unless `--no-open-loop`) drives the same
gateway at a fixed rate, by default half the maximum just measured (`--open-loop-share`,
`--open-loop-rate`), for `--open-loop-seconds`: each upload leaves at its scheduled time
whether or not earlier ones have been answered, and every latency runs from that time, so
a slow answer cannot hide the requests it would have held back (coordinated omission).

With `--peers` (the broker defaulting to the local one) the Celery peer runs next: the same
three steps as Celery chains of no-op tasks (bench/celery_peer.py, its packages from
bench/requirements.txt) on a `celery worker` with 2 prefork processes, as many workflows,
the same warm-up; then one table puts the four side by side, per unit of work.

Exit status: 0 when every workflow completed (the open loop's too), 1 otherwise (timeout,
errors that lost workflows, a gateway that would not start), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from broker import CELERY_CONCURRENCY, AmqpServices, BrokerNames, CeleryDriver, CeleryRun
from httpclient import HttpClient, auth_headers
from processes import (
    CpuMeter,
    Target,
    check_loopback,
    clean_env,
    count_lines,
    free_port,
    loopback_target,
    process_tree,
    rss_mib,
    spawn,
    start_gateway,
    stop,
    tail,
    tree_rss_mib,
    wait_ready,
)
from report import Run, report
from roles import (
    Ceiling,
    OpenLoop,
    Phase,
    Shared,
    drive_ceiling,
    open_ws,
    run_open_loop,
    run_phase,
    service,
    ws_reader,
)

from stox import workflow
from stox.auth.tokens import SERVICE, USER, TokenAuthority

REPO = Path(__file__).resolve().parent.parent

DEFAULT_STEPS = [spec.name for spec in workflow.DEFAULT_STEPS]  # the AMQP services' steps
LOCAL_BROKER = "amqp://guest:guest@127.0.0.1:5672/"  # --peers' default (pika and kombu agree)

# `python -c THREAD_CPU_PROFILER OUT server.py ARGS…`: cProfile on the main thread's CPU clock
THREAD_CPU_PROFILER = """
import cProfile, runpy, sys, time
out = sys.argv[1]
sys.argv = sys.argv[2:]
profiler = cProfile.Profile(time.thread_time)
profiler.enable()
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
finally:
    profiler.disable()
    profiler.dump_stats(out)
"""


def open_loop_for(run: Run) -> OpenLoop | None:
    """The open loop of this mode: the rate given, or a share of the closed loop's maximum."""
    args, closed = run.args, run.run
    if args.open_loop_rate:
        rate, basis = args.open_loop_rate, "--open-loop-rate"
    elif closed is not None and closed.completed == closed.total and not closed.stalled:
        rate = args.open_loop_share * closed.completed / closed.wall
        basis = f"{args.open_loop_share:g} x the closed loop's {closed.completed / closed.wall:.1f}"
    else:
        run.problems.append("the closed loop did not finish: no maximum, no open loop")
        return None
    total = args.open_loop_workflows or max(1, round(rate * args.open_loop_seconds))
    return OpenLoop(rate, basis, Phase("open loop", total), args.open_loop_connections)


def tokens_for(args: argparse.Namespace, secret: str | None) -> tuple[str, str]:
    if args.user_token and args.service_token:
        return args.user_token, args.service_token
    if not secret:
        raise ValueError("no --jwt-secret to mint tokens with")
    authority = TokenAuthority(secret, issuer="stox", audience="stox", expiry=3600)
    user = f"bench-{uuid.uuid4().hex[:8]}"  # a fresh user: the subscription sees only ours
    return (
        args.user_token or authority.issue(user, user, USER),
        args.service_token or authority.issue("service:bench", "bench", SERVICE),
    )


async def gateway_part(run: Run, tmpdir: Path) -> None:
    args = run.args
    secret = args.jwt_secret
    if args.url:
        target = loopback_target(args.url, args.origin)
    else:
        secret = secret or "bench-" + uuid.uuid4().hex + uuid.uuid4().hex
        profile: list[str] = []
        if args.profile_server and args.profile_clock == "wall":
            profile = ["-m", "cProfile", "-o", args.profile_server]
        elif args.profile_server:
            profile = ["-c", THREAD_CPU_PROFILER, args.profile_server]
        server_args = list(args.gateway_arg)
        if run.amqp:
            run.broker = BrokerNames()
            (tmpdir / "rabbitmq.yaml").write_text(run.broker.config())
            server_args += ["--rabbitmq-url", args.rabbitmq_url]
            server_args += ["--config", f"{tmpdir}/rabbitmq.yaml"]
        target = start_gateway(
            tmpdir,
            run.mode,
            secret,
            server_args,
            port=args.port,
            origin=args.origin,
            python_args=profile,
            env=dict(args.gateway_env),
        )
    run.target = target
    user_token, service_token = tokens_for(args, secret)
    try:
        await wait_ready(target, "/readyz", args.startup_timeout)
    except RuntimeError as exc:
        run.problems.append(f"gateway at {target.base_url} not ready: {exc}")
        return

    shared = run.shared = Shared(http_services=not run.amqp)
    try:
        conn = await open_ws(target, user_token)
    except Exception as exc:  # any handshake failure ends the gateway part
        run.problems.append(f"WebSocket /ws refused: {exc!r}")
        return
    reader = asyncio.ensure_future(ws_reader(conn, shared))
    service_headers = auth_headers(service_token)
    service_clients = [
        HttpClient(target.host, target.port, args.request_timeout)
        for _ in range(0 if run.amqp else args.services)
    ]
    amqp_services = None
    if run.amqp and run.broker is not None:
        amqp_services = AmqpServices(shared, args.rabbitmq_url, run.broker, service_token)
        try:
            await amqp_services.start(DEFAULT_STEPS, prefetch=args.services)
        except Exception as exc:  # the broker refused us: nothing to measure
            run.problems.append(f"cannot consume the step queues: {exc!r}")
            reader.cancel()
            conn.close()
            return
    services = [asyncio.ensure_future(service(c, shared, service_headers)) for c in service_clients]
    pid = target.process.pid if target.process else None
    try:
        if args.warmup:
            run.warmup = Phase("warm-up", args.warmup)
            await run_phase(run.warmup, target, shared, args, user_token)
            if run.warmup.stalled or shared.ws_closed:
                run.problems.append("the warm-up did not finish; no measured run")
                return
        if pid:
            run.rss_before = rss_mib(pid)
        run.gateway_cpu = CpuMeter(pid)
        run.gateway_cpu.start()
        run.run = Phase("run", args.workflows)
        try:
            await run_phase(run.run, target, shared, args, user_token)
        finally:
            run.gateway_cpu.stop()
            if pid:
                run.rss_after = rss_mib(pid)
        if not args.no_open_loop and not shared.ws_closed:
            run.open_loop = open_loop_for(run)
        if run.open_loop is not None:
            run.open_loop.cpu = CpuMeter(pid)
            run.open_loop.cpu.start()
            try:
                await run_open_loop(run.open_loop, target, shared, args, user_token)
            finally:
                run.open_loop.cpu.stop()
    finally:
        reader.cancel()
        for task in services:
            task.cancel()
        await asyncio.gather(reader, *services, return_exceptions=True)
        for c in service_clients:
            c.close()
        conn.close()
        if amqp_services is not None:
            await amqp_services.close()


async def ceiling_part(run: Run, tmpdir: Path) -> None:
    args = run.args
    port = free_port()
    target = Target(f"http://127.0.0.1:{port}", "127.0.0.1", port, "")
    target.log_path = tmpdir / "bare_tornado.log"
    cmd = [sys.executable, "bench/bare_tornado.py", "--host", "127.0.0.1", "--port", str(port)]
    target.process = spawn(cmd, clean_env(), target.log_path)
    try:
        try:
            await wait_ready(target, "/readyz", args.startup_timeout)
        except RuntimeError as exc:
            run.problems.append(f"bare_tornado.py not ready: {exc}; {tail(target.log_path)}")
            return
        served = 0
        if run.run is not None:
            served = run.run.upload_requests + run.run.step_requests
        total = args.ceiling_requests or max(served, args.workflows * 4)
        run.ceiling = Ceiling(args.uploaders + args.services, total)
        run.ceiling.cpu = CpuMeter(target.process.pid)
        await drive_ceiling(target.host, target.port, run.ceiling, args.request_timeout)
    finally:
        stop(target.process)


async def main_async(run: Run) -> None:
    tmpdir = Path(tempfile.mkdtemp(prefix="stox-bench-"))
    try:
        await gateway_run(run, tmpdir)
        if run.args.rabbitmq_url:
            run.rabbitmq = Run(run.args, mode="rabbitmq")
            await gateway_run(run.rabbitmq, tmpdir)
        if run.args.peers:
            await celery_part(run, tmpdir)
        if not run.args.no_ceiling:
            await ceiling_part(run, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


async def gateway_run(run: Run, tmpdir: Path) -> None:
    """The gateway part, then stop the gateway (and drop what it made in the broker)."""
    try:
        await gateway_part(run, tmpdir)
    finally:
        if run.target is not None and run.target.process is not None:
            run.gateway_exit = await asyncio.to_thread(stop, run.target.process)
            run.gateway_log_count = count_lines(run.target.log_path)
            run.gateway_log_lines = tail(run.target.log_path)
        if run.broker is not None:
            try:
                await asyncio.to_thread(run.broker.delete, run.args.rabbitmq_url, DEFAULT_STEPS)
            except Exception as exc:  # reported; the figures stand
                run.problems.append(f"could not delete {run.broker.prefix}.*: {exc!r}")


def import_peer(record: CeleryRun, url: str) -> bool:
    """Import bench/celery_peer.py for this run's broker and names; False if Celery is absent."""
    record.prefix = f"bench.{uuid.uuid4().hex[:8]}"
    os.environ.update(BENCH_CELERY_BROKER_URL=url, BENCH_CELERY_PREFIX=record.prefix)
    try:
        record.peer = importlib.import_module("celery_peer")
    except ImportError as exc:
        record.problems.append(
            f"cannot import the Celery peer ({exc}): "
            "pip install -r bench/requirements.txt (make bench does)"
        )
        return False
    return True


def celery_cleanup(record: CeleryRun) -> None:
    """Delete the run's queues and exchanges (once), close the producer's connections."""
    if not record.cleanup_due:
        return
    record.cleanup_due = False
    try:
        record.peer.delete()
    except Exception as exc:  # reported; the figures stand
        record.problems.append(f"could not delete {record.prefix}.*: {exc!r}")
    finally:
        record.peer.app.close()


async def celery_part(run: Run, tmpdir: Path) -> None:
    """Start the worker, drive the warm-up and the run, stop it and clean the broker."""
    args = run.args
    record = run.celery = CeleryRun(args.celery_window)
    if not import_peer(record, args.rabbitmq_url):
        return
    env = clean_env()
    env["PYTHONPATH"] = str(REPO / "bench")
    driver = CeleryDriver(record, args.rabbitmq_url)
    record.cleanup_due = True
    try:
        try:
            await asyncio.to_thread(record.peer.declare)
            await driver.start()
        except Exception as exc:  # the broker refused us: nothing to measure
            record.problems.append(f"cannot declare or consume {record.prefix}.*: {exc!r}")
            return
        record.log_path = tmpdir / "celery-worker.log"
        command = record.peer.worker_command(sys.executable, CELERY_CONCURRENCY)
        record.process = spawn(command, env, record.log_path, group=True)
        problem = await driver.ready(record.process, args.startup_timeout)
        if problem:
            record.problems.append(problem)
            return
        if args.warmup:
            record.warmup = Phase("warm-up", args.warmup)
            await driver.run(record.warmup, args.idle_timeout)
            if record.warmup.stalled:
                record.problems.append("the warm-up did not finish; no measured run")
                return
        pid = record.process.pid
        record.cpu = CpuMeter(pid, tree=True)
        record.cpu.start()
        record.run = Phase("run", args.workflows)
        try:
            await driver.run(record.run, args.idle_timeout)
        finally:
            record.cpu.stop()
            record.rss = tree_rss_mib(pid)
            record.processes = len(process_tree(pid))
    finally:
        await driver.close()
        if record.process is not None:
            record.exit = await asyncio.to_thread(stop, record.process, 10.0, True)
            record.log_count = count_lines(record.log_path)
            record.log_lines = tail(record.log_path)
        await asyncio.to_thread(celery_cleanup, record)


def env_setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name.startswith("STOX_"):
        raise argparse.ArgumentTypeError(f"expected STOX_NAME=VALUE, got {text!r}")
    return name, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/e2e.py", description="End-to-end throughput benchmark of the Stox gateway."
    )
    parser.add_argument("--workflows", type=int, default=None, help="workflows (default 2000)")
    parser.add_argument("--uploaders", type=int, default=8, help="concurrent uploaders (8)")
    parser.add_argument("--services", type=int, default=24, help="concurrent services (24)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up workflows (100)")
    parser.add_argument("--ramp", type=float, default=0.0, help="seconds to start uploaders")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 300 workflows")
    parser.add_argument(
        "--timeout", type=float, default=None, help="overall limit (120 s; 300 s with --peers)"
    )
    parser.add_argument("--request-timeout", type=float, default=30.0, help="per request (30 s)")
    parser.add_argument(
        "--idle-timeout", type=float, default=10.0, help="give up when nothing moves (10 s)"
    )
    parser.add_argument("--startup-timeout", type=float, default=30.0, help="readiness (30 s)")
    parser.add_argument("--url", help="a running gateway (loopback only) instead of starting one")
    parser.add_argument("--origin", help="Origin header for /ws (default: the gateway's URL)")
    parser.add_argument("--jwt-secret", help="the gateway's STOX_JWT_SECRET, to mint tokens")
    parser.add_argument("--user-token", help="a user token (instead of --jwt-secret)")
    parser.add_argument("--service-token", help="a service token (instead of --jwt-secret)")
    parser.add_argument("--port", type=int, default=0, help="port of the started gateway")
    parser.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        help="extra server.py argument for the started gateway (repeatable)",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        type=env_setting,
        metavar="STOX_NAME=VALUE",
        help="a setting in the started gateway's environment (repeatable)",
    )
    parser.add_argument("--profile-server", metavar="PATH", help="run the gateway under cProfile")
    parser.add_argument(
        "--profile-clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: python -m cProfile; cpu: the IOLoop thread's CPU time only, which other "
        "processes on a busy host do not inflate (and the SQLite thread does not enter)",
    )
    parser.add_argument("--ceiling-requests", type=int, default=0, help="default: as many")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the bare-Tornado ceiling")
    parser.add_argument(
        "--rabbitmq-url",
        help="also run the load on a gateway using this RabbitMQ, services over AMQP",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="the whole page: embedded, RabbitMQ (--rabbitmq-url, default the local broker), "
        "the Celery peer (bench/celery_peer.py) and the ceiling, in one table",
    )
    parser.add_argument(
        "--celery-window",
        type=int,
        default=0,
        help="Celery chains in flight at most (default 0: published as fast as they go)",
    )
    parser.add_argument(
        "--no-open-loop", action="store_true", help="skip the open loop after each closed loop"
    )
    parser.add_argument(
        "--open-loop-share",
        type=float,
        default=0.5,
        help="the open loop's rate as a share of the closed loop's workflows/s (0.5)",
    )
    parser.add_argument(
        "--open-loop-rate", type=float, default=0.0, help="uploads/s of the open loop, instead"
    )
    parser.add_argument(
        "--open-loop-seconds",
        type=float,
        default=None,
        help="how long the open loop schedules uploads (10 s; 3 s with --quick)",
    )
    parser.add_argument(
        "--open-loop-workflows",
        type=int,
        default=0,
        help="a number of uploads for the open loop, instead of --open-loop-seconds",
    )
    parser.add_argument(
        "--open-loop-connections",
        type=int,
        default=64,
        help="uploads in flight at most in the open loop, a safety valve, reported if hit (64)",
    )
    args = parser.parse_args(argv)
    if args.peers and not args.rabbitmq_url:
        args.rabbitmq_url = LOCAL_BROKER
    if args.timeout is None:
        args.timeout = 300.0 if args.peers else 120.0
    if args.workflows is None:
        args.workflows = 300 if args.quick else 2000
    if args.warmup is None:
        args.warmup = 30 if args.quick else 100
    if args.open_loop_seconds is None:
        args.open_loop_seconds = 3.0 if args.quick else 10.0
    if args.profile_server:
        args.profile_server = str(Path(args.profile_server).resolve())
    for name in ("workflows", "uploaders", "services"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0 or args.ramp < 0 or args.timeout <= 0:
        parser.error("--warmup and --ramp must not be negative, --timeout must be positive")
    if args.rabbitmq_url and args.url:
        parser.error("--rabbitmq-url and --peers start their own gateway; not with --url")
    if args.celery_window < 0:
        parser.error("--celery-window must not be negative")
    if args.open_loop_share <= 0 or args.open_loop_rate < 0 or args.open_loop_seconds <= 0:
        parser.error("--open-loop-share and -seconds must be positive, -rate not negative")
    if args.open_loop_workflows < 0 or args.open_loop_connections < 1:
        parser.error("--open-loop-workflows must not be negative, --open-loop-connections >= 1")
    if args.rabbitmq_url and not args.rabbitmq_url.startswith(("amqp://", "amqps://")):
        parser.error("--rabbitmq-url must be amqp://… or amqps://…")
    if args.url:
        if args.profile_server:
            parser.error("--profile-server only applies to a gateway started here")
        if not args.jwt_secret and not (args.user_token and args.service_token):
            parser.error("with --url give --jwt-secret, or --user-token and --service-token")
        check_loopback(parser, args.url, args.origin)
    return args


def main(argv: list[str] | None = None) -> int:
    run = Run(parse_args(argv))

    async def bounded() -> None:
        try:
            async with asyncio.timeout(run.args.timeout):
                await main_async(run)
        except TimeoutError:
            run.timed_out = True

    interrupted = False
    try:
        asyncio.run(bounded())
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for each in (run, run.rabbitmq):
            if each is not None and each.target is not None and each.target.process is not None:
                stop(each.target.process)  # when the timeout struck in start-up or shutdown
        if run.celery is not None:
            if run.celery.exit is None:
                stop(run.celery.process, group=True)
            celery_cleanup(run.celery)  # unless done already
    report(run)
    runs = [run] if run.rabbitmq is None else [run, run.rabbitmq]
    complete = all(r.run is not None and r.run.completed == r.run.total for r in runs)
    for r in runs:
        loop = r.open_loop
        if loop is not None and loop.phase.completed != loop.phase.total:
            complete = False
    problems = any(r.problems for r in runs)
    if run.celery is not None:
        complete = complete and run.celery.complete
        problems = problems or bool(run.celery.problems)
    ok = complete and not run.timed_out and not problems and not interrupted
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
