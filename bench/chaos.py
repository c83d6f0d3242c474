"""The fault run: a hostile fleet, crashes and broker outages at once, then an audit (issue 11).

It starts `server.py` as subprocesses (never in-process objects) on one store, drives
`--workflows` uploads through a fleet of step services that misbehave on purpose, kills and
restarts the gateway, has the broker close the gateway's connections, keeps WebSocket
watchers reconnecting, and when every workflow has ended (or `--timeout` passed) audits the
store and what the fleet and the watchers recorded. It prints one table and exits 1 when a
must-be-0 row is not 0 (0 otherwise, 2 for bad arguments).

    .venv/bin/python bench/chaos.py --workflows 300 --kills 2          # embedded, quick
    .venv/bin/python bench/chaos.py                                   # 1000, 5 kills
    .venv/bin/python bench/chaos.py --mode rabbitmq-mongo             # 2 gateways, 5 drops

Every choice the fleet makes (which report is doubled, delayed, stale, failed, never sent;
when the kills and drops strike) comes from `--seed`; what the gateway's timing makes of
them does not, so two runs inject the same faults, not the same interleavings.

Modes: `embedded` (SQLite, the in-process bus; the services learn of dispatches from `/ws`
`step_dispatched` messages) and `rabbitmq-mongo` (two gateways on RabbitMQ and nx-27017, a
MongoDB wire-protocol server started here; the services consume the step queues). In both
the services report over HTTP (`POST /api/v1/workflow/step-completed`, a service token).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import BrokerNames, close_connection, open_channel
from e2e import DEFAULT_STEPS, LOCAL_BROKER, tokens_for
from httpclient import (
    STEP_PATH,
    TRANSPORT_ERRORS,
    UPLOAD_PATH,
    HttpClient,
    auth_headers,
    error_name,
)
from processes import REPO, Target, free_port, spawn, start_gateway, stop, wait_ready
from roles import open_ws, product_fields, report_body

from stox.workflow import isoformat

sys.path.insert(0, str(REPO / "tests"))
from rabbit import close_connections  # tests/rabbit.py: rabbitmqctl by connection name

STEP_TIMEOUT = 2.0  # seconds an attempt may take: the silent reports' deadline fires soon
MAX_ATTEMPTS = 4
RELAY_INTERVAL = 1.0
GIVE_UP = 60.0  # a request retried this long (transport errors, 5xx) is abandoned
HEALTH_TIMEOUT = 10.0  # a /healthz probe of a live gateway must be answered within this
REQUEST_TIMEOUT = 30.0  # an answer not back by then counts as lost: the request is sent again

# the share of workflows given each fate (the rest complete without a planned failure)
FATES = (("doomed", 0.01), ("silent", 0.01), ("retry", 0.05), ("stale", 0.05))
TWICE, DELAYED = 0.20, 0.10  # of reports: sent twice; held back so they arrive out of order


@dataclass
class Gateway:
    name: str
    target: Target
    alive: bool = True
    incarnation: int = 0


@dataclass
class Watch:
    """What one WebSocket watcher saw: per session, each workflow's last version."""

    session: dict[str, int] = field(default_factory=dict)
    out_of_order: int = 0
    missed: int = 0
    sessions: int = 0
    messages: int = 0
    examples: list[str] = field(default_factory=list)  # the first few, printed


@dataclass
class Record:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    accepted: dict[int, set[str]] = field(default_factory=dict)  # n -> workflow ids answered
    uploads_abandoned: int = 0
    # (workflow id, step, attempt) -> the step_ids dispatched for it
    dispatches: dict[tuple[str, str, int], set[str]] = field(default_factory=dict)
    first_step_id: dict[tuple[str, str], str] = field(default_factory=dict)
    handled: set[str] = field(default_factory=set)
    applied: Counter[str] = field(default_factory=Counter)  # step_id -> answers "applied"
    stale_applied: int = 0
    reports_abandoned: int = 0
    restarts_failed: int = 0  # a gateway that would not start again on the same data
    health_answered: int = 0  # /healthz probes answered 200
    health_failed: int = 0  # /healthz probes of a gateway alive throughout, not answered 200
    server_errors: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    watches: list[Watch] = field(default_factory=list)
    busy: int = 0  # fleet tasks running


def fate(seed: int, n: int) -> tuple[str, int]:
    """The planned fate of workflow `n` and the index of the step it strikes."""
    rng = random.Random(f"{seed}:fate:{n}")
    roll, step = rng.random(), rng.randrange(len(DEFAULT_STEPS))
    for name, share in FATES:
        if roll < share:
            return name, step
        roll -= share
    return "ok", step


class Chaos:
    def __init__(self, args: argparse.Namespace, tmpdir: Path) -> None:
        self.args = args
        self.tmpdir = tmpdir
        self.rec = Record()
        self.gateways: list[Gateway] = []
        self.secret = "chaos-" + uuid.uuid4().hex + uuid.uuid4().hex
        self.user_token, service_token = tokens_for(
            argparse.Namespace(user_token=None, service_token=None), self.secret
        )
        self.user_headers = auth_headers(self.user_token)
        self.service_headers = auth_headers(service_token)
        self.broker = BrokerNames(prefix=f"chaos.{self.rec.tag[:8]}")
        self.storage_url = ""
        self.mongo: Any = None  # the nx-27017 process
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Future[Any]] = set()

    # -- processes ----------------------------------------------------------------------

    @property
    def amqp(self) -> bool:
        return bool(self.args.mode == "rabbitmq-mongo")

    def config(self, instance: str) -> Path:
        steps = "".join(
            f"    - {{name: {s}, timeout: {STEP_TIMEOUT:g}s, max_attempts: {MAX_ATTEMPTS},"
            " backoff: 200ms}\n"
            for s in DEFAULT_STEPS
        )
        text = (
            f"server:\n  instance_id: {instance}\n  sweep_interval: 200ms\n"
            f"  relay_interval: {RELAY_INTERVAL:g}s\n"
            f"pipeline:\n  steps:\n{steps}"
        )
        if self.amqp:
            text += self.broker.config() + "  retry_delay: 500ms\n  heartbeat: 5s\n"
        if self.args.store_faults:
            share = self.args.store_faults
            text += (
                f"storage:\n  faults: {{seed: {self.args.seed}, fail_share: {share:g},"
                f" slow_share: {share / 2:g}, slow: 50ms}}\n"
            )
        path = self.tmpdir / f"{instance}.yaml"
        path.write_text(text)
        return path

    def instance_id(self, name: str) -> str:
        return f"chaos-{self.rec.tag[:8]}-{name}"

    def server_args(self, name: str) -> list[str]:
        args = ["--config", str(self.config(self.instance_id(name)))]
        if self.amqp:
            args += ["--rabbitmq-url", self.args.rabbitmq_url, "--storage-url", self.storage_url]
        return args

    async def start(self, name: str, port: int = 0) -> Gateway:
        """A new gateway, in `self.gateways` from its spawn on (so that a run stopped while
        it starts stops it too)."""
        target = start_gateway(self.tmpdir, name, self.secret, self.server_args(name), port=port)
        gw = Gateway(name, target)
        self.gateways.append(gw)
        await wait_ready(target, "/readyz", 30.0)
        return gw

    async def restart(self, gw: Gateway) -> None:
        """Start `gw` again on its port and data; a start that fails is counted and tried
        again (up to 5 times), its log kept beside the others."""
        for _ in range(5):
            gw.incarnation += 1
            log = gw.target.log_path
            if log is not None and log.exists():  # start_gateway writes the log afresh
                log.rename(log.with_name(f"{log.stem}.{gw.incarnation}.log"))
            gw.target = start_gateway(
                self.tmpdir, gw.name, self.secret, self.server_args(gw.name), port=gw.target.port
            )
            try:
                await wait_ready(gw.target, "/readyz", 30.0)
            except RuntimeError:
                self.rec.restarts_failed += 1
                stop(gw.target.process)
                await asyncio.sleep(1.0)
                continue
            gw.alive = True
            return
        raise RuntimeError(f"gateway {gw.name} would not start again")

    async def start_mongo(self) -> None:
        nx = Path(sys.executable).with_name("nx-27017")
        command = shutil.which("nx-27017") if not nx.exists() else str(nx)
        if command is None:
            raise RuntimeError("nx-27017 is not installed (pip install nx-27017)")
        port = free_port()
        cmd = [command, "--host", "127.0.0.1", "--port", str(port), "--db", "memory"]
        # a pid file of its own: by default nx-27017 refuses to start while another runs
        cmd += ["--log-file", str(self.tmpdir / "nx-27017.log")]
        cmd += ["--pid-file", str(self.tmpdir / "nx-27017.pid")]  # not the one default of all
        self.mongo = spawn(cmd, {}, self.tmpdir / "nx-27017.out")
        for _ in range(150):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                self.storage_url = f"mongodb://127.0.0.1:{port}/chaos_{self.rec.tag}"
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("nx-27017 did not accept connections within 15 s")

    def alive(self) -> Gateway:
        live = [g for g in self.gateways if g.alive] or self.gateways
        return random.choice(live)

    # -- HTTP with retries ----------------------------------------------------------------

    async def send(self, endpoint: str, path: str, body: bytes, headers: bytes) -> Any:
        """(status, JSON) of the first answer that is not a 503 or a broken connection, or
        None after GIVE_UP seconds. Each 5xx is counted."""
        deadline = time.monotonic() + GIVE_UP
        pause = 0.2  # doubling to 2 s: a fleet that backs off, as services should
        while time.monotonic() < deadline:
            gw = self.alive()
            client = HttpClient(gw.target.host, gw.target.port, REQUEST_TIMEOUT)
            try:
                status, data = await client.request("POST", path, body, headers)
            except TRANSPORT_ERRORS as exc:
                self.rec.faults[f"{endpoint} answer lost ({error_name(exc)}), sent again"] += 1
                status, data = 0, b""
            finally:
                client.close()
            if status == 503 and self.args.store_faults:  # expected: the store is failing
                self.rec.faults[f"{endpoint} answered 503 (store faults), sent again"] += 1
            elif status >= 500:
                self.rec.server_errors[f"{endpoint} {status}"] += 1
            elif status:
                try:
                    return status, json.loads(data or b"{}")
                except ValueError:
                    return status, {}
            await asyncio.sleep(pause)
            pause = min(2.0, 2 * pause)
        return None

    # -- uploads ------------------------------------------------------------------------

    async def upload(self, n: int) -> None:
        fields = product_fields(self.rec.tag, n)
        fields["metadata"] = {"chaos": self.rec.tag, "n": n}
        body = json.dumps(fields).encode()
        headers = self.user_headers + f"Idempotency-Key: {self.rec.tag}-{n}\r\n".encode()
        answer = await self.send("upload", UPLOAD_PATH, body, headers)
        if answer is None or answer[0] != 202:
            self.rec.uploads_abandoned += 1
            return
        workflow_id = answer[1]["workflow_id"]
        self.rec.accepted.setdefault(n, set()).add(workflow_id)

    async def uploads(self) -> None:
        start = time.monotonic()
        pending = []
        for n in range(self.args.workflows):
            delay = start + n / self.args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.ensure_future(self.upload(n)))
        await asyncio.gather(*pending)

    # -- the fleet ----------------------------------------------------------------------

    def dispatched(self, workflow_id: str, n: int, name: str, step_id: str, attempt: int) -> None:
        """A dispatch seen (on /ws or a step queue): serve it once per step_id."""
        self.rec.dispatches.setdefault((workflow_id, name, attempt), set()).add(step_id)
        if attempt == 1:
            self.rec.first_step_id.setdefault((workflow_id, name), step_id)
        if step_id in self.rec.handled:
            return
        self.rec.handled.add(step_id)
        self.spawn(self.serve(workflow_id, n, name, step_id, attempt))

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self, workflow_id: str, n: int, name: str, step_id: str, attempt: int) -> None:
        rec, seed = self.rec, self.args.seed
        kind, strikes = fate(seed, n)
        rng = random.Random(f"{seed}:report:{n}:{name}:{attempt}")
        error = None
        if DEFAULT_STEPS.index(name) == strikes:
            if kind == "doomed" or (kind in ("retry", "stale") and attempt == 1):
                error = "chaos: the service failed on purpose"
                rec.faults["failure reported"] += 1
            elif kind == "silent" and attempt == 1:
                rec.faults["never answered (deadline)"] += 1
                return
        body = report_body(workflow_id, step_id, name, error)
        rec.busy += 1
        try:
            old = rec.first_step_id.get((workflow_id, name))
            if kind == "stale" and attempt > 1 and old and old != step_id:
                rec.faults["stale step_id"] += 1
                answer = await self.send(
                    "stale",
                    STEP_PATH,
                    report_body(workflow_id, old, name),
                    self.service_headers,
                )
                if answer is not None and answer[0] == 200:
                    rec.stale_applied += 1
            if rng.random() < DELAYED:
                rec.faults["delayed (out of order)"] += 1
                await asyncio.sleep(rng.uniform(0.3, 2.0))
            copies = [self.report(step_id, body)]
            if rng.random() < TWICE:
                together = rng.random() < 0.5
                rec.faults["sent twice, concurrently" if together else "sent twice, later"] += 1
                copies.append(self.report(step_id, body, 0.0 if together else rng.uniform(1, 3)))
            await asyncio.gather(*copies)
        finally:
            rec.busy -= 1

    async def report(self, step_id: str, body: bytes, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        answer = await self.send("step-completed", STEP_PATH, body, self.service_headers)
        if answer is None:
            self.rec.reports_abandoned += 1
        elif answer[0] == 200 and answer[1].get("result") == "applied":
            self.rec.applied[step_id] += 1

    # -- where dispatches come from ---------------------------------------------------------

    def seen(self, message: dict[str, Any]) -> None:
        """A /ws message of the services' feed: a dispatched current step is a job."""
        data = message.get("data") or {}
        doc = data.get("workflow", data)
        meta = (doc.get("product") or {}).get("metadata") or {}
        if meta.get("chaos") != self.rec.tag or doc.get("status") != "running":
            return
        step = doc["steps"][doc["current_step"]]
        if step["status"] == "dispatched":
            self.dispatched(
                doc["id"], int(meta["n"]), step["name"], step["step_id"], step["attempt"]
            )

    async def ws_feed(self) -> None:
        """The embedded services' feed: one /ws subscription, reconnected whenever it drops."""
        while not self.stopping.is_set():
            with contextlib.suppress(Exception):
                conn = await open_ws(self.alive().target, self.user_token)
                try:
                    while (message := await conn.read_message()) is not None:
                        msg = json.loads(message)
                        if msg.get("type") in ("snapshot", "step_dispatched"):
                            self.seen(msg)
                finally:
                    conn.close()
            await asyncio.sleep(0.2)

    async def amqp_feed(self) -> None:
        """The RabbitMQ services: consumers of the step queues (acknowledged on receipt)."""
        connection, channel = await open_channel(self.args.rabbitmq_url)

        def on_dispatch(ch: Any, method: Any, _props: Any, body: bytes) -> None:
            job = json.loads(body)
            meta = (job.get("product") or {}).get("metadata") or {}
            ch.basic_ack(method.delivery_tag)
            if meta.get("chaos") == self.rec.tag:
                wf = job["workflow_id"]
                self.dispatched(
                    wf, int(meta["n"]), job["step_type"], job["step_id"], job["attempt"]
                )

        for step in DEFAULT_STEPS:
            channel.basic_consume(f"{self.broker.prefix}.step.{step}", on_dispatch)
        try:
            await self.stopping.wait()
        finally:
            await close_connection(connection)

    # -- watchers -----------------------------------------------------------------------

    async def health_prober(self) -> None:
        """Ask each gateway's /healthz every 0.25 s; a probe that is not answered 200 by a
        gateway alive (the same incarnation) from before it was sent until after counts."""
        while not self.stopping.is_set():
            for gw in self.gateways:
                before = (gw.alive, gw.incarnation)
                client = HttpClient(gw.target.host, gw.target.port, HEALTH_TIMEOUT)
                try:
                    status, _ = await client.request("GET", "/healthz")
                except TRANSPORT_ERRORS:
                    status = 0
                finally:
                    client.close()
                if status == 200:
                    self.rec.health_answered += 1
                elif before == (True, gw.incarnation) and gw.alive:
                    self.rec.health_failed += 1
            await asyncio.sleep(0.25)

    async def watcher(self, i: int) -> None:
        watch = Watch()
        self.rec.watches.append(watch)
        rng = random.Random(f"{self.args.seed}:watcher:{i}")
        while not self.stopping.is_set():
            watch.session = {}
            watch.sessions += 1
            with contextlib.suppress(Exception):
                conn = await open_ws(self.alive().target, self.user_token)
                try:
                    async with asyncio.timeout(rng.uniform(0.5, 4.0)):
                        while (message := await conn.read_message()) is not None:
                            self.watched(watch, json.loads(message))
                except TimeoutError:
                    self.rec.faults["watcher disconnects"] += 1
                finally:
                    conn.close()
            await asyncio.sleep(rng.uniform(0.0, 0.3))

    def watched(self, watch: Watch, msg: dict[str, Any]) -> None:
        workflow_id, version = msg.get("workflow_id"), msg.get("version")
        if not isinstance(workflow_id, str) or not isinstance(version, int):
            return
        watch.messages += 1
        last = watch.session.get(workflow_id)
        watch.session[workflow_id] = max(version, last or 0)
        if last is None or last <= version <= last + 1:
            return
        if version < last:
            watch.out_of_order += 1
        else:
            watch.missed += version - last - 1
        if len(watch.examples) < 5:
            watch.examples.append(f"{msg.get('type')} {workflow_id} v{version} after v{last}")

    # -- kills and drops ----------------------------------------------------------------

    def moments(self, kind: str, count: int) -> list[float]:
        rng = random.Random(f"{self.args.seed}:{kind}")
        horizon = self.args.workflows / self.args.rate + 3.0
        return sorted(rng.uniform(0.5, horizon) for _ in range(count))

    async def killer(self) -> None:
        start = time.monotonic()
        rng = random.Random(f"{self.args.seed}:victims")
        for at in self.moments("kills", self.args.kills):
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            gw = rng.choice(self.gateways)
            gw.alive = False
            if gw.target.process is not None:
                gw.target.process.kill()  # SIGKILL
                await asyncio.to_thread(gw.target.process.wait)
            self.rec.faults["gateway SIGKILLed"] += 1
            await self.restart(gw)

    async def dropper(self) -> None:
        start = time.monotonic()
        for at in self.moments("drops", self.args.drops):
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            closed = 0
            for gw in self.gateways:
                name = f"stox gateway {self.instance_id(gw.name)}"
                closed += await asyncio.to_thread(close_connections, name, "chaos: broker drop")
            if closed:
                self.rec.faults["broker closed gateway connections"] += 1

    # -- the run ------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        if self.amqp:
            await self.start_mongo()
        names = ["a", "b"] if self.amqp else ["a"]
        for name in names:
            await self.start(name)
        roles = [self.ws_feed() if not self.amqp else self.amqp_feed()]
        roles += [self.watcher(i) for i in range(self.args.watchers)]
        roles.append(self.health_prober())
        background = [asyncio.ensure_future(r) for r in roles]
        faults = [asyncio.ensure_future(self.killer())]
        if self.amqp:
            faults.append(asyncio.ensure_future(self.dropper()))
        deadline = time.monotonic() + self.args.timeout
        try:
            await self.uploads()
            await asyncio.gather(*faults)
            while time.monotonic() < deadline:
                if await self.settled():
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(2 * RELAY_INTERVAL + 0.5)  # the relay's turn, twice
        finally:
            self.stopping.set()
            for task in [*faults, *background, *self.tasks]:
                task.cancel()
            await asyncio.gather(*faults, *background, *self.tasks, return_exceptions=True)
        return await asyncio.to_thread(self.read_store)

    async def settled(self) -> bool:
        if self.rec.busy:
            return False
        docs = await asyncio.to_thread(self.read_store)
        ids = {w for ids in self.rec.accepted.values() for w in ids}
        ended = {d["id"] for d in docs["workflows"] if d["status"] != "running"}
        return ids <= ended

    def read_store(self) -> dict[str, Any]:
        """Our workflows (documents with `steps`) and their unpublished outbox entries."""
        if self.amqp:
            import pymongo

            client: Any = pymongo.MongoClient(self.storage_url, serverSelectionTimeoutMS=5000)
            try:
                docs = list(
                    client.get_default_database().workflows.find(
                        {"product.metadata.chaos": self.rec.tag}
                    )
                )
            finally:
                client.close()
            outbox = [e["created_at"] for d in docs for e in d.get("outbox") or []]
            return {"workflows": docs, "outbox": outbox}
        conn = sqlite3.connect(f"file:{self.tmpdir}/a.db?mode=ro", uri=True, timeout=10)
        try:
            rows = conn.execute("SELECT id, doc, product FROM workflows").fetchall()
            outbox_rows = conn.execute("SELECT workflow_id, created_at FROM outbox").fetchall()
        finally:
            conn.close()
        docs = []
        for workflow_id, doc, product in rows:
            if (json.loads(product).get("metadata") or {}).get("chaos") == self.rec.tag:
                docs.append({**json.loads(doc), "id": workflow_id, "product": json.loads(product)})
        ours = {d["id"] for d in docs}
        return {"workflows": docs, "outbox": [c for w, c in outbox_rows if w in ours]}


# -- the audit ------------------------------------------------------------------------------


def audit(chaos: Chaos, store: dict[str, Any]) -> list[tuple[str, int, bool]]:
    """(row, figure, must be 0) of the table."""
    rec, seed = chaos.rec, chaos.args.seed
    docs = store["workflows"]
    expected_failed = {
        d["id"] for d in docs if fate(seed, d["product"]["metadata"]["n"])[0] == "doomed"
    }
    completed = [d for d in docs if d["status"] == "completed"]
    failed = [d for d in docs if d["status"] == "failed"]
    wrong = [d for d in completed if d["id"] in expected_failed]
    wrong += [d for d in failed if d["id"] not in expected_failed]
    stuck = [d for d in docs if d["status"] == "running"]
    twice: set[str] = {step_id for step_id, count in rec.applied.items() if count > 1}
    overlapping = sum(1 for ids in rec.dispatches.values() if len(ids) > 1)
    known: set[str] = set()
    for d in docs:
        for step in d["steps"]:
            ids = [a["step_id"] for a in step["attempts"]]
            twice.update(i for i in ids if ids.count(i) > 1)
            numbers = [a["attempt"] for a in step["attempts"]]
            overlapping += sum(1 for a, b in itertools.pairwise(numbers) if b <= a)
            known.update(ids)
            if step.get("step_id"):
                known.add(step["step_id"])
    # a dispatch of a step_id the store does not know: an attempt the store lost, yet sent
    overlapping += sum(1 for ids in rec.dispatches.values() for i in ids if i not in known)
    old = isoformat(time.time() - RELAY_INTERVAL)
    unpublished = sum(1 for created in store["outbox"] if created <= old)
    by_number = Counter(d["product"]["metadata"]["n"] for d in docs)
    duplicates = sum(count - 1 for count in by_number.values())
    out_of_order = sum(w.out_of_order + w.missed for w in rec.watches)
    rows: list[tuple[str, int, bool]] = [
        ("workflows uploaded", chaos.args.workflows, False),
        ("workflows accepted (202)", len(rec.accepted), False),
        ("workflows in the store", len(docs), False),
        ("uploads abandoned (no 202 within 60 s)", rec.uploads_abandoned, True),
        ("completed", len(completed), False),
        (f"failed (the injected failures say {len(expected_failed)})", len(failed), False),
        ("ended otherwise than the injected failures say", len(wrong), True),
        ("stuck (still running at the end)", len(stuck), True),
        ("completions applied twice for one attempt", len(twice), True),
        ("stale reports applied", rec.stale_applied, True),
        ("attempts dispatched while another of the step was live", overlapping, True),
        (f"outbox entries unpublished after {RELAY_INTERVAL:g} s", unpublished, True),
        ("versions a watcher saw out of order or missed", out_of_order, True),
        ("HTTP 5xx answered", sum(rec.server_errors.values()), True),
        ("gateway restarts that failed (started again)", rec.restarts_failed, True),
        (f"/healthz of a live gateway not 200 in {HEALTH_TIMEOUT:g} s", rec.health_failed, True),
        ("reports abandoned (no answer within 60 s)", rec.reports_abandoned, True),
        ("duplicates created by upload retries", duplicates, True),
    ]
    rows += [(f"fault: {kind}", count, False) for kind, count in sorted(rec.faults.items())]
    rows.append(("/healthz probes answered 200", rec.health_answered, False))
    rows.append(("watcher sessions", sum(w.sessions for w in rec.watches), False))
    rows.append(("watcher messages checked", sum(w.messages for w in rec.watches), False))
    return rows


def print_table(chaos: Chaos, rows: list[tuple[str, int, bool]], wall: float) -> None:
    args = chaos.args
    print(
        f"chaos: --mode {args.mode} --workflows {args.workflows} --kills {args.kills} "
        f"--drops {args.drops if chaos.amqp else 0} --seed {args.seed}  ({wall:.1f} s)"
    )
    for name, figure, must_be_0 in rows:
        flag = ("ok" if figure == 0 else "FAIL") if must_be_0 else ""
        print(f"  {name:<58} {figure:>7}  {'(must be 0) ' + flag if must_be_0 else ''}")
    for watch in chaos.rec.watches:
        for example in watch.examples:
            print(f"  watcher saw {example}")
    if chaos.rec.server_errors:
        print(
            "  5xx by endpoint: "
            + ", ".join(f"{k} x{v}" for k, v in chaos.rec.server_errors.items())
        )


def failures(rows: list[tuple[str, int, bool]], allow: tuple[str, ...] = ()) -> list[str]:
    """The must-be-0 rows that are not 0, except those named in `allow`."""
    return [name for name, figure, must in rows if must and figure and name not in allow]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/chaos.py", description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("embedded", "rabbitmq-mongo"), default="embedded")
    parser.add_argument("--workflows", type=int, default=1000, help="uploads (1000)")
    parser.add_argument("--kills", type=int, default=5, help="gateway SIGKILLs (5)")
    parser.add_argument("--drops", type=int, default=5, help="broker drops, RabbitMQ mode (5)")
    parser.add_argument("--seed", type=int, default=1, help="seeds every choice (1)")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="uploads per second (100; 25 on nx-27017)"
    )
    parser.add_argument("--watchers", type=int, default=3, help="WebSocket watchers (3)")
    parser.add_argument("--timeout", type=float, default=240.0, help="overall bound (240 s)")
    parser.add_argument("--rabbitmq-url", default=LOCAL_BROKER, help="RabbitMQ mode's broker")
    parser.add_argument(
        "--store-faults",
        type=float,
        default=0.0,
        help="share of store calls that fail (storage.faults; half as many are slow): 0",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    args.rate = args.rate or (25.0 if args.mode == "rabbitmq-mongo" else 100.0)
    if args.workflows < 1 or args.rate <= 0 or args.kills < 0 or args.drops < 0:
        parser.error("--workflows and --rate must be positive, --kills and --drops not negative")
    if not 0 <= args.store_faults < 1:
        parser.error("--store-faults must be a share, 0 to under 1")
    if not 0 <= args.watchers <= 8:
        parser.error("--watchers must be 0 to 8 (10 sockets per user per instance)")
    return args


def run(argv: list[str] | None = None) -> tuple[int, list[tuple[str, int, bool]]]:
    """Run and print; (exit status, the table's rows)."""
    args = parse_args(argv)
    # stopped by SIGTERM (a test's timeout), still stop the gateways and nx-27017 it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    tmpdir = Path(tempfile.mkdtemp(prefix="stox-chaos-"))
    chaos = Chaos(args, tmpdir)
    t0 = time.monotonic()
    rows: list[tuple[str, int, bool]] = []
    try:
        store = asyncio.run(chaos.run())
        rows = audit(chaos, store)
    finally:
        for gw in chaos.gateways:
            stop(gw.target.process)
        stop(chaos.mongo)
        errors = sum(
            line.count('"level": "error"')
            for log in tmpdir.glob("gateway-*.log")
            for line in log.read_text(errors="replace").splitlines()
        )
        rows.append(("gateway log lines at level error (all incarnations)", errors, False))
        if chaos.amqp:
            with contextlib.suppress(Exception):
                chaos.broker.delete(args.rabbitmq_url, DEFAULT_STEPS)
        if args.keep:
            print(f"  kept {tmpdir}")
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)
    print_table(chaos, rows, time.monotonic() - t0)
    return (1 if failures(rows) else 0), rows


def main(argv: list[str] | None = None) -> int:
    return run(argv)[0]


if __name__ == "__main__":
    sys.exit(main())
