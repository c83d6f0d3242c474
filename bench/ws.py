"""WebSocket-scale benchmark of the Stox gateway (issue 9, item 4), run by hand; it prints
figures and asserts nothing about speed.

It starts the gateway (`server.py`, SQLite in a temporary directory, the in-process bus), or
targets a running one with `--url`, and runs three phases on it, one after another, each
with sockets of its own (closed before the next):

1. idle: `--sockets` (20,000) authenticated sockets on `/ws` (each a dashboard's
   subscription to all of its user's workflows, empty for these fresh users), held for
   `--hold` seconds: the gateway's RSS before and after, and per socket;
2. fan-out: `--fanout` (1,000) sockets on `/ws?workflow_id=` of one workflow, then its
   steps reported one by one (`POST /api/v1/workflow/step-completed`, a service token, the
   step_id from the status endpoint); for each change, the time from the report being sent
   to each subscriber receiving it, p50/p99/max over all deliveries. `--fanout-rounds`
   (5) fresh workflows, each with its own sockets, give 3 changes each;
3. streams: `--subscribers` (10,000) sockets, each on a workflow of its own user's, and
   `--rate` (1,000) step-completed reports a second, open loop, for `--duration` (10) s,
   spread over those workflows in turn: per socket the changes received against those its
   reports made, the sockets closed (4008: dropped as too slow), latency, the rate reached,
   gateway CPU.

Sockets belong to users of `--per-user` (10, the gateway's default limit) sockets each;
phase 2's are admins' (who may watch any workflow), the owner's one socket not being
enough. The client side is bench/wsclient.py: raw asyncio sockets with a hand-written
WebSocket handshake and frame reader, in `--clients` (2) processes; phase 3's reports are
sent by the process holding the workflow's socket, so it knows each next step_id from
its own messages. Latency is measured client side: it includes the client's own delays.

The open-files limit is raised to the hard limit (for this process, its clients and the
gateway it starts); when that cannot hold `--sockets` on the gateway, phase 1 says so and
holds as many as it can.

    .venv/bin/python bench/ws.py --quick       # 2,000 / 200 / 1,000 sockets, ~3 s of load
    .venv/bin/python bench/ws.py               # the issue's figures
    .venv/bin/python bench/ws.py --url http://127.0.0.1:8080 --jwt-secret "$STOX_JWT_SECRET"

Exit status: 0 when every phase ran to completion (whatever its figures), 1 when one could
not (the gateway would not start, sockets or uploads were refused, a timeout), 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

from figures import counts, millis, ms_at
from httpclient import STEP_PATH, UPLOAD_PATH, HttpClient, auth_headers
from processes import (
    Target,
    check_loopback,
    count_lines,
    cpu_seconds,
    host_busy_seconds,
    loopback_target,
    open_fds,
    rss_mib,
    start_gateway,
    stop,
    tail,
    wait_ready,
)
from roles import product
from wsclient import raise_open_files, worker_main

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from stox.auth.tokens import ADMIN, SERVICE, USER, TokenAuthority  # noqa: E402

DEFAULT_PER_USER = 10  # websocket.max_sockets_per_user's default
FD_MARGIN = 128  # descriptors kept free on the gateway (HTTP connections, the store, …)
CLIENT_HTTP = 8  # uploading connections per client process in phase 3
RSS_TARGET_MIB = 1024
P99_TARGET_MS = 50

now = time.monotonic
T = TypeVar("T")


class PhaseFailed(Exception):
    """A phase could not run to completion."""


class WorkerError(Exception):
    """A client process failed a command (its traceback is the message)."""


def split(items: list[T], parts: int) -> list[list[T]]:
    return [items[i::parts] for i in range(parts)]


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"p50 {ms_at(values, 50)}, p99 {ms_at(values, 99)}, max {millis(max(values))}"


def merged(dicts: Iterable[dict[str, int]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for each in dicts:
        total.update(each)
    return total


class Clients:
    """The client processes (bench/wsclient.py) and commands to all of them at once."""

    def __init__(self, count: int, config: dict[str, Any]) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes: list[Any] = []
        for i in range(count):
            parent, child = context.Pipe()
            process = context.Process(
                target=worker_main, args=(child, config), name=f"ws-client-{i}", daemon=True
            )
            process.start()
            child.close()
            self.pipes.append(parent)
            self.processes.append(process)
        # not the loop's default executor: asyncio.run would wait for a thread stuck in recv
        self.executor = ThreadPoolExecutor(count, thread_name_prefix="ws-client")

    def __len__(self) -> int:
        return len(self.pipes)

    async def call(self, name: str, each: list[dict[str, Any]]) -> list[Any]:
        """Command `name` on every process, the i-th with keyword arguments each[i]."""

        def one(pipe: Connection, kwargs: dict[str, Any]) -> Any:
            pipe.send((name, kwargs))
            status, value = pipe.recv()
            if status != "ok":
                raise WorkerError(value)
            return value

        loop = asyncio.get_running_loop()
        return await asyncio.gather(
            *(
                loop.run_in_executor(self.executor, one, pipe, kwargs)
                for pipe, kwargs in zip(self.pipes, each, strict=True)
            )
        )

    async def all(self, name: str, **kwargs: Any) -> list[Any]:
        return await self.call(name, [kwargs] * len(self))

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) or 0.0 for p in self.processes)

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
        self.executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class Bench:
    args: argparse.Namespace
    target: Target
    authority: TokenAuthority
    clients: Clients
    limit: int  # open files per process
    gateway_fds: int | None = None
    completed: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.target.process.pid if self.target.process is not None else None

    def capacity(self) -> int:
        """Sockets the gateway (when started here) and the clients can hold at once."""
        clients = (self.limit - FD_MARGIN) * len(self.clients)
        if self.gateway_fds is None:
            return clients
        return min(clients, self.limit - self.gateway_fds - FD_MARGIN)

    def tokens(self, count: int, role: str) -> list[str]:
        """Tokens of `count` fresh users (or admins)."""
        names = [f"wsbench-{uuid.uuid4().hex[:12]}" for _ in range(count)]
        return [self.authority.issue(name, name, role) for name in names]

    def http(self) -> HttpClient:
        return HttpClient(self.target.host, self.target.port, self.args.request_timeout)

    def cpu(self) -> tuple[float | None, float, float | None]:
        """CPU seconds so far: the gateway, the clients (with this process), the host."""
        gateway = cpu_seconds(self.pid) if self.pid else None
        return gateway, self.clients.cpu() + time.process_time(), host_busy_seconds()


def cpu_line(bench: Bench, before: tuple[Any, ...], after: tuple[Any, ...], wall: float) -> str:
    gateway = None if before[0] is None or after[0] is None else after[0] - before[0]
    clients = after[1] - before[1]
    parts = []
    if gateway is not None:
        parts.append(f"gateway {100 * gateway / wall:.0f}%")
    parts.append(f"clients {100 * clients / wall:.0f}%")
    if before[2] is not None and after[2] is not None:
        others = max(0.0, after[2] - before[2] - clients - (gateway or 0.0))
        parts.append(f"other processes {100 * others / wall:.0f}%")
    return ", ".join(parts) + f" of one core (host has {os.cpu_count()})"


# -- 1. idle sockets ----------------------------------------------------------------------


async def idle_phase(bench: Bench) -> None:
    args = bench.args
    asked = args.sockets
    n = min(asked, bench.capacity())
    print(f"== 1. idle sockets: {n:,} authenticated sockets held by one gateway ==")
    if n < asked:
        fds = f", the gateway holds {bench.gateway_fds} at start" if bench.gateway_fds else ""
        print(
            f"  the open-files limit is {bench.limit} per process (the hard limit{fds}): "
            f"{asked:,} sockets asked, {n:,} is what fits"
        )
    tokens = bench.tokens(math.ceil(n / args.per_user), USER)
    specs = [("/ws", tokens[i // args.per_user]) for i in range(n)]
    rss_before = rss_mib(bench.pid) if bench.pid else None
    cpu_before, t0 = bench.cpu(), now()
    opened = await bench.clients.call(
        "open",
        [
            {"specs": part, "snapshot": False, "track": False, "within": args.request_timeout}
            for part in split(specs, len(bench.clients))
        ],
    )
    wall = now() - t0
    cpu_after = bench.cpu()
    await asyncio.sleep(args.hold)
    status = await bench.clients.all("status")
    rss_after = rss_mib(bench.pid) if bench.pid else None
    held = sum(s["open"] for s in status)
    count = sum(o["opened"] for o in opened)
    refused = counts(merged(o["refused"] for o in opened))
    closed = counts(merged(s["closes"] for s in status))
    print(
        f"  opened {count:,} of {n:,} in {wall:.1f} s ({count / wall:,.0f}/s), "
        f"{len(tokens):,} users of {args.per_user}; refused: {refused}"
    )
    print(f"  open after a {args.hold:g} s hold: {held:,}; closed: {closed}")
    print(f"  while opening: {cpu_line(bench, cpu_before, cpu_after, wall)}")
    if cpu_before[0] is not None and cpu_after[0] is not None and count:
        print(f"  gateway cpu per handshake: {1e6 * (cpu_after[0] - cpu_before[0]) / count:.0f} us")
    if rss_before is not None and rss_after is not None:
        per_socket = (rss_after - rss_before) * 1024 / max(1, held)
        projected = rss_before + per_socket * asked / 1024
        print(
            f"  gateway RSS {rss_before:.1f} MiB before, {rss_after:.1f} MiB after: "
            f"{per_socket:.1f} KiB per socket (target: {asked:,} sockets in <= {RSS_TARGET_MIB} MiB"
            + (f"; projected for {asked:,}: {projected:.0f} MiB)" if n < asked else ")")
        )
    else:
        print("  gateway RSS: not measured (a gateway not started here)")
    await bench.clients.all("close")
    if count < n or held < count:
        raise PhaseFailed(f"{n - held} of {n} idle sockets were refused or closed")


# -- 2. fan-out to the subscribers of one workflow ----------------------------------------


@dataclass
class Fanout:
    """What phase 2 measured over its rounds."""

    latency: list[float] = field(default_factory=list)  # every delivery
    extremes: list[tuple[float, float]] = field(default_factory=list)  # first, last per change
    answered: list[float] = field(default_factory=list)  # each report's answer
    opening: list[float] = field(default_factory=list)  # each round's subscribers opening
    changes: int = 0
    missing: int = 0
    used: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # CPU, as Bench.cpu
    busy: float = 0.0  # the wall time of `used`


async def report_next_step(
    http: HttpClient, workflow_id: str, owner: str, service: str
) -> tuple[int, float, float] | None:
    """Report the workflow's dispatched step done: (its new version, when the report was
    sent, how long its answer took); None once the workflow no longer runs."""
    status, body = await http.request(
        "GET", f"/api/v1/workflow/status?workflow_id={workflow_id}", b"", auth_headers(owner)
    )
    doc = json.loads(body) if status == 200 else {}
    if doc.get("status") != "running":
        return None
    step = doc["steps"][doc["current_step"]]
    report = {
        "workflow_id": workflow_id,
        "step_id": step["step_id"],
        "step_type": step["name"],
        "success": True,
        "result": {"ok": True},
    }
    t = now()
    status, body = await http.request(
        "POST", STEP_PATH, json.dumps(report).encode(), auth_headers(service)
    )
    answered = now() - t
    if status != 200:
        raise PhaseFailed(f"step-completed answered {status}: {body[:200]!r}")
    return int(json.loads(body)["version"]), t, answered


async def fanout_round(
    bench: Bench, tally: Fanout, n: int, owner: str, admins: list[str], service: str
) -> None:
    """A new workflow, `n` subscribers to it, its steps reported one by one."""
    http = bench.http()
    try:
        status, body = await http.request(
            "POST", UPLOAD_PATH, product(uuid.uuid4().hex, 0), auth_headers(owner)
        )
        if status != 202:
            raise PhaseFailed(f"upload answered {status}: {body[:200]!r}")
        workflow_id = json.loads(body)["workflow_id"]
        path = f"/ws?workflow_id={workflow_id}"
        specs = [(path, admins[i // bench.args.per_user]) for i in range(n)]
        t0 = now()
        opened = await bench.clients.call(
            "open",
            [
                {
                    "specs": part,
                    "snapshot": True,
                    "track": False,
                    "within": bench.args.request_timeout,
                }
                for part in split(specs, len(bench.clients))
            ],
        )
        tally.opening.append(now() - t0)
        if sum(o["opened"] for o in opened) < n:
            raise PhaseFailed(
                f"subscribers refused: {counts(merged(o['refused'] for o in opened))}"
            )
        sent: dict[int, float] = {}  # version -> its report sent
        cpu0, t0 = bench.cpu(), now()
        while (reported := await report_next_step(http, workflow_id, owner, service)) is not None:
            version, sent[version], answered = reported
            tally.answered.append(answered)
            lacking = await bench.clients.all("wait_version", version=version, within=10.0)
            tally.missing += sum(lacking)
        cpu1, tally.busy = bench.cpu(), tally.busy + now() - t0
    finally:
        http.close()
    for i, (a, b) in enumerate(zip(cpu0, cpu1, strict=True)):
        tally.used[i] += (b or 0.0) - (a or 0.0)
    by_version: dict[int, list[float]] = {v: [] for v in sent}
    for deliveries in await bench.clients.all("deliveries"):
        for version, t in deliveries:
            if version in by_version:
                by_version[version].append(t - sent[version])
    for values in by_version.values():
        tally.latency.extend(values)
        if values:
            tally.extremes.append((min(values), max(values)))
    tally.changes += len(sent)
    await bench.clients.all("close")


async def fanout_phase(bench: Bench) -> None:
    args = bench.args
    n = min(args.fanout, bench.capacity())
    print(
        f"== 2. fan-out: one change delivered to {n:,} subscribers of one workflow "
        f"({args.fanout_rounds} workflows, their steps reported one by one) =="
    )
    owner = bench.tokens(1, USER)[0]
    admins = bench.tokens(math.ceil(n / args.per_user), ADMIN)
    service = bench.tokens(1, SERVICE)[0]
    tally = Fanout()
    for _ in range(args.fanout_rounds):
        await fanout_round(bench, tally, n, owner, admins, service)
    changes = tally.changes
    print(
        f"  {n:,} subscribers opened in {ms_at(tally.opening, 50)} (median of "
        f"{len(tally.opening)}), as {len(admins)} admins of {args.per_user} sockets each"
    )
    print(
        f"  changes {changes}, deliveries {len(tally.latency):,} of {changes * n:,}; "
        f"missing {tally.missing}"
    )
    print(
        f"  report sent -> subscriber received: {spread(tally.latency)} "
        f"(target p99 <= {P99_TARGET_MS} ms)"
    )
    each = ", ".join(f"{first * 1000:.0f}/{last * 1000:.0f}" for first, last in tally.extremes)
    print(f"  first/last subscriber of each change: {each} ms")
    print(f"  the report's own answer: {spread(tally.answered)}")
    if changes:
        zero = (0.0 if bench.pid else None, 0.0, 0.0)
        used = cpu_line(bench, zero, tuple(tally.used), tally.busy)
        print(f"  while the changes went out: {used}")
    if bench.pid and changes:
        print(
            f"  gateway cpu per change (status read, report, fan-out): "
            f"{1000 * tally.used[0] / changes:.1f} ms"
        )
    if tally.missing:
        raise PhaseFailed(f"{tally.missing} deliveries did not arrive within 10 s")


# -- 3. subscribers of their own workflows at a rate ---------------------------------------


async def stream_phase(bench: Bench) -> None:
    args = bench.args
    n = min(args.subscribers, bench.capacity())
    print(
        f"== 3. streams: {n:,} subscribers of their own workflows, {args.rate:,.0f} changes/s "
        f"for {args.duration:g} s =="
    )
    tokens = bench.tokens(math.ceil(n / args.per_user), USER)
    users = [(token, min(args.per_user, n - i * args.per_user)) for i, token in enumerate(tokens)]
    tag = uuid.uuid4().hex
    prepared = await bench.clients.call(
        "prepare_own",
        [
            {"users": part, "tag": tag, "uploaders": CLIENT_HTTP, "within": args.request_timeout}
            for part in split(users, len(bench.clients))
        ],
    )
    uploaded = sum(p["uploaded"] for p in prepared)
    opened = sum(p["opened"] for p in prepared)
    print(
        f"  {uploaded:,} workflows uploaded in {max(p['upload_seconds'] for p in prepared):.1f} s, "
        f"{opened:,} subscribers opened in {max(p['seconds'] for p in prepared):.1f} s "
        f"({len(tokens):,} users of {args.per_user})"
    )
    if opened < n:
        errors = merged([*(p["errors"] for p in prepared), *(p["refused"] for p in prepared)])
        await bench.clients.all("close")
        raise PhaseFailed(f"only {opened} of {n} subscribers ready: {counts(errors)}")
    service = bench.tokens(1, SERVICE)[0]
    start_at = now() + 0.5
    drive = asyncio.ensure_future(
        bench.clients.call(
            "drive",
            [
                {
                    "start_at": start_at,
                    "rate": args.rate * p["opened"] / opened,
                    "duration": args.duration,
                    "service_token": service,
                    "connections": args.connections,
                    "grace": 5.0,
                }
                for p in prepared
            ],
        )
    )
    await asyncio.sleep(max(0.0, start_at - now()))
    cpu_before = bench.cpu()
    rss_before = rss_mib(bench.pid) if bench.pid else None
    await asyncio.sleep(args.duration)
    cpu_after = bench.cpu()
    rss_after = rss_mib(bench.pid) if bench.pid else None
    results = await drive
    await bench.clients.all("close")

    applied = sum(r["applied"] for r in results)
    scheduled = sum(r["scheduled"] for r in results)
    last = max(r["last_reply"] for r in results)
    window = max(last - start_at, 1e-9)
    latency = [x for r in results for x in r["latency"]]
    lag = [x for r in results for x in r["lag"]]
    expected = sum(r["expected"] for r in results)
    received = sum(r["received"] for r in results)
    closes = merged(r["closes"] for r in results)
    errors = merged(r["errors"] for r in results)
    starved = sum(r["starved"] for r in results)
    print(
        f"  reports scheduled {scheduled:,}, applied {applied:,} "
        f"(duplicates {sum(r['duplicate'] for r in results)}, no step left to report {starved}); "
        f"errors: {counts(errors)}"
    )
    print(
        f"  achieved {applied / window:,.0f} changes/s (offered {args.rate:,.0f}/s; "
        f"the last answer {window:.1f} s after the start)"
    )
    print(
        f"  changes received {received:,} of {expected:,} made; sockets behind after 5 s: "
        f"{sum(r['behind'] for r in results)}; messages {sum(r['messages'] for r in results):,}; "
        f"changes not ours {sum(r['others'] for r in results)}"
    )
    print(
        f"  drops: {closes.get('4008', 0)} closed with 4008 (too slow); "
        f"all closes: {counts(closes)}"
    )
    print(f"  report sent -> subscriber received: {spread(latency)}")
    print(f"  report scheduled -> sent (client queue): {spread(lag)}")
    print(
        f"  cpu over the {args.duration:g} s: "
        f"{cpu_line(bench, cpu_before, cpu_after, args.duration)}"
    )
    if rss_before is not None and rss_after is not None:
        print(f"  gateway RSS {rss_before:.1f} MiB -> {rss_after:.1f} MiB")


# -- the run -------------------------------------------------------------------------------


PHASES = {"1": idle_phase, "2": fanout_phase, "3": stream_phase}


def own_gateway(args: argparse.Namespace, tmpdir: Path) -> tuple[Target, str]:
    """A gateway started here for this run, and the secret its tokens are signed with."""
    secret = "wsbench-" + uuid.uuid4().hex + uuid.uuid4().hex
    server_args = []
    if args.per_user != DEFAULT_PER_USER:
        config = tmpdir / "ws.yaml"
        config.write_text(f"websocket:\n  max_sockets_per_user: {args.per_user}\n")
        server_args += ["--config", str(config)]
    server_args += args.gateway_arg
    target = start_gateway(tmpdir, "ws", secret, server_args, port=args.port, origin=args.origin)
    return target, secret


async def run(bench: Bench) -> None:
    args = bench.args
    await wait_ready(bench.target, "/readyz", args.startup_timeout)
    if bench.pid:
        bench.gateway_fds = open_fds(bench.pid)
    for key in args.phases:
        t0 = now()
        await PHASES[key](bench)
        print(f"  ({now() - t0:.1f} s)", flush=True)
        bench.completed.append(key)


def report_gateway(target: Target) -> None:
    if target.process is None:
        return
    lines = count_lines(target.log_path)
    print(
        f"gateway exit status {target.process.returncode}; "
        f"{lines} log lines at level warning and above"
    )
    for line in tail(target.log_path) if lines else []:
        print(f"  | {line[:200]}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/ws.py", description="WebSocket-scale benchmark of the Stox gateway."
    )
    parser.add_argument("--sockets", type=int, help="phase 1: idle sockets (20000)")
    parser.add_argument("--hold", type=float, default=2.0, help="phase 1: seconds held (2)")
    parser.add_argument("--fanout", type=int, help="phase 2: subscribers of one workflow (1000)")
    parser.add_argument("--fanout-rounds", type=int, help="phase 2: workflows, 3 changes each (5)")
    parser.add_argument(
        "--subscribers", type=int, help="phase 3: sockets, one workflow each (10000)"
    )
    parser.add_argument("--rate", type=float, help="phase 3: changes per second in all (1000)")
    parser.add_argument("--duration", type=float, help="phase 3: seconds of load (10)")
    parser.add_argument("--quick", action="store_true", help="2000 / 200 / 1000 sockets, ~3 s")
    parser.add_argument("--phases", default="123", help="which phases to run (default 123)")
    parser.add_argument(
        "--per-user", type=int, default=DEFAULT_PER_USER, help="sockets per user (10)"
    )
    parser.add_argument("--clients", type=int, default=2, help="client processes (2)")
    parser.add_argument(
        "--connections",
        type=int,
        default=32,
        help="phase 3: HTTP connections per client process (32)",
    )
    parser.add_argument("--sources", type=int, default=4, help="loopback source addresses (4)")
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=50,
        help="handshakes in flight per client process (50)",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=30.0, help="per request or handshake (30 s)"
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=30.0, help="gateway readiness (30 s)"
    )
    parser.add_argument("--timeout", type=float, help="overall limit (600 s; 120 s with --quick)")
    parser.add_argument("--url", help="a running gateway (loopback only) instead of starting one")
    parser.add_argument("--jwt-secret", help="with --url: its STOX_JWT_SECRET, to mint tokens")
    parser.add_argument("--origin", help="Origin header for /ws (default: the gateway's URL)")
    parser.add_argument("--port", type=int, default=0, help="port of the started gateway")
    parser.add_argument(
        "--gateway-arg", action="append", default=[], help="extra server.py argument (repeatable)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "sockets": 2000 if quick else 20000,
        "fanout": 200 if quick else 1000,
        "fanout_rounds": 2 if quick else 5,
        "subscribers": 1000 if quick else 10000,
        "rate": 1000.0,
        "duration": 3.0 if quick else 10.0,
        "timeout": 120.0 if quick else 600.0,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("sockets", "fanout", "fanout_rounds", "subscribers", "per_user", "clients"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate <= 0 or args.duration <= 0 or args.timeout <= 0 or args.connections < 1:
        parser.error("--rate, --duration, --timeout and --connections must be positive")
    if not args.phases or set(args.phases) - set(PHASES):
        parser.error("--phases takes the digits 1, 2 and 3")
    if args.rate * args.duration > 3 * args.subscribers:
        parser.error("--rate x --duration is more than the 3 steps of each subscriber's workflow")
    if args.url:
        if not args.jwt_secret:
            parser.error("with --url give --jwt-secret")
        check_loopback(parser, args.url, args.origin)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit = raise_open_files()[0]
    tmpdir = Path(tempfile.mkdtemp(prefix="stox-wsbench-"))
    if args.url:
        target, secret = loopback_target(args.url, args.origin), args.jwt_secret
    else:
        target, secret = own_gateway(args, tmpdir)
    ipv4 = target.host.count(".") == 3 and target.host.startswith("127.")
    config = {
        "host": target.host,
        "port": target.port,
        "origin": target.origin,
        "sources": [f"127.0.0.{i + 1}" for i in range(args.sources)] if ipv4 else [],
        "connect_concurrency": args.connect_concurrency,
        "request_timeout": args.request_timeout,
    }
    clients = Clients(args.clients, config)
    authority = TokenAuthority(secret, issuer="stox", audience="stox", expiry=3600)
    bench = Bench(args, target, authority, clients, limit)
    how = "started here, SQLite in a temp dir" if target.process else "already running"
    print(f"Stox WebSocket benchmark: gateway {target.base_url} ({how})")
    print(f"  {args.clients} client processes; open files: {limit} per process", flush=True)
    failure: str | None = None

    async def bounded() -> None:
        async with asyncio.timeout(args.timeout):
            await run(bench)

    try:
        asyncio.run(bounded())
    except TimeoutError:
        failure = f"the run took longer than --timeout {args.timeout:g} s"
    except (PhaseFailed, WorkerError, RuntimeError, OSError) as exc:
        failure = str(exc)
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        clients.stop()
        if target.process is not None:
            stop(target.process)
        report_gateway(target)
        shutil.rmtree(tmpdir, ignore_errors=True)
    if failure is not None:
        print(f"PHASE NOT COMPLETED: {failure}")
    done = ", ".join(bench.completed) or "none"
    print(f"phases completed: {done} of {', '.join(args.phases)}")
    return 0 if failure is None else 1


if __name__ == "__main__":
    sys.exit(main())
