"""Wiring: open the store, bus and token authority on the running loop.

`Gateway.start()` must run inside the loop that will serve (PyMongo's async client and
pika's TornadoConnection bind to it). It declares the queue topology, consumes completion
reports and change notifications, and runs the timer sweeper and the outbox relay. The web
layer (`handlers.make_app`) is built on a started Gateway; this package never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from settings import Settings, SettingsError, StorageSettings
from stox import tracecontext
from stox.auth import secret
from stox.auth.client import AuthClient
from stox.auth.limits import UploadLimiter
from stox.auth.service import AuthServer
from stox.auth.tokens import HS256, BadKey, TokenAuthority
from stox.bus.base import EventBus
from stox.bus.journal import SQLiteJournal
from stox.changes import CHANGES_ROUTING_KEY
from stox.completions import completion_handler
from stox.hub import Hub
from stox.metrics import Metrics
from stox.metrics.timed_store import TimedStore
from stox.metrics.workflows import WorkflowMetrics
from stox.observe import Observers
from stox.orchestrator import Orchestrator
from stox.stats import StatsBoard
from stox.store import StoreError, WorkflowStore, make_store
from stox.store.faulty import FaultyStore
from stox.transition_log import TransitionLog
from stox.webhooks import Webhooks
from stox.workflow import (
    CHANGE_ROUTING_KEY,
    DEFAULT_PIPELINE,
    SERVICE,
    Pipeline,
    StepSpec,
    Workflow,
)

if TYPE_CHECKING:
    from stox.tracing import Tracing

log = logging.getLogger(__name__)

JOURNAL_FILE = "stox-bus.db"  # the in-process bus's journal, where the store is not SQLite
RETIRED_IDS_LOGGED = 20  # workflow ids named in the warning about a step no longer configured


def new_instance_id() -> str:
    """An id for a gateway instance that was given none (`server.instance_id`)."""
    return uuid.uuid4().hex[:12]


def make_pipelines(settings: Settings, completion_path: str) -> dict[str, Pipeline]:
    """The configured pipelines by name, `default` first; services reply at
    `completion_path` under the public URL."""
    url = f"{settings.public_url}{completion_path}"
    return {
        name: pipeline.with_replies(url, settings.rabbitmq.routing_key)
        for name, pipeline in settings.named_pipelines().items()
    }


def make_pipeline(settings: Settings, completion_path: str) -> Pipeline:
    """The default pipeline (uploads that name none)."""
    return make_pipelines(settings, completion_path)[DEFAULT_PIPELINE]


def make_workflow_store(storage: StorageSettings) -> WorkflowStore:
    """The configured store, within a FaultyStore when `storage.faults` asks for faults (not
    armed: the gateway arms it once started)."""
    store = make_store(storage.url, sqlite_synchronous=storage.sqlite_synchronous)
    faults = storage.faults
    if not faults.enabled:
        return store
    log.warning(
        "storage.faults: injecting store faults (seed %d, %g failing, %g slow): testing only",
        faults.seed,
        faults.fail_share,
        faults.slow_share,
    )
    return FaultyStore(
        store,
        seed=faults.seed,
        fail_share=faults.fail_share,
        slow_share=faults.slow_share,
        slow_seconds=faults.slow,
        armed=False,
    )


def make_bus(
    settings: Settings, connection_name: str = "stox", store: WorkflowStore | None = None
) -> EventBus:
    """RabbitMQ (`connection_name` shows in the broker's tools), or the in-process bus with
    its journal beside `store` (see `make_journal`)."""
    if settings.rabbitmq.url:
        from stox.bus.rabbitmq import RabbitMQBus

        return RabbitMQBus.from_settings(settings.rabbitmq, connection_name=connection_name)
    from stox.bus.local import LocalBus

    return LocalBus(journal=make_journal(settings, store))


def make_journal(settings: Settings, store: WorkflowStore | None) -> SQLiteJournal:
    """Where the in-process bus keeps unacknowledged messages: in the SQLite store's own file,
    on its connection; otherwise (MongoDB without RabbitMQ) in `stox-bus.db` beside the data."""
    from stox.store.sqlite_db import SQLiteDatabase

    store = None if store is None else underlying(store)  # not what faults, timings are for
    if isinstance(store, SQLiteDatabase):
        return SQLiteJournal.beside(store)
    return SQLiteJournal.at(str(secret.data_dir(settings.storage.url) / JOURNAL_FILE))


def underlying(store: WorkflowStore) -> WorkflowStore:
    """The store itself, without the FaultyStore or TimedStore around it."""
    while isinstance(store, FaultyStore | TimedStore):
        store = store.inner
    return store


def make_tracing(instance_id: str) -> Tracing | None:
    """Traces when the standard OTEL_* variables ask for them (README "Traces"); otherwise
    None, and OpenTelemetry is not even imported."""
    if not tracecontext.wanted(os.environ):
        return None
    from stox.tracing import Tracing

    return Tracing.from_env(instance_id)


def make_tokens(settings: Settings, *, issuing: bool = False) -> TokenAuthority:
    """The token authority; `issuing`: it must sign tokens, not only verify them."""
    jwt = settings.jwt
    if jwt.algorithm != HS256:
        try:
            keys = secret.key_pair(jwt, issuing=issuing)
            return TokenAuthority(
                algorithm=jwt.algorithm,
                private_key=keys.get("private_key"),
                public_key=keys.get("public_key"),
                issuer=jwt.issuer,
                audience=jwt.audience,
                expiry=jwt.expiry,
            )
        except BadKey as exc:  # a private and a public key that do not belong together
            raise SettingsError(f"jwt.public_key_file: {exc}") from None
    key = settings.jwt.secret
    if not key:
        if settings.server.environment == "production":
            raise SettingsError("jwt.secret: required in production (set STOX_JWT_SECRET)")
        key = secret.load_or_create(secret.data_dir(settings.storage.url))
    return TokenAuthority(key, issuer=jwt.issuer, audience=jwt.audience, expiry=jwt.expiry)


class Topology:
    """Queue names this gateway declares, under a configurable prefix
    (docs/architecture.md#events-and-the-queue-topology)."""

    def __init__(self, prefix: str, instance_id: str) -> None:
        self.prefix = prefix
        self.completions = f"{prefix}.step.completed"
        self.hub = f"{prefix}.hub.{instance_id}"

    def step_queue(self, step: str) -> str:
        return f"{self.prefix}.step.{step}"


class Gateway:
    """Everything one gateway process runs, started and stopped in order.

    `completion_path`: where the web layer takes step completions (`handlers.completion_path`),
    named in every dispatch as the HTTP reply address.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        completion_path: str,
        store: WorkflowStore | None = None,
        bus: EventBus | None = None,
        clock: Callable[[], float] = time.time,
        demo_worker_options: Mapping[str, Any] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        # keyword arguments for DemoWorkers (min_delay, max_delay, failure_rate, rng)
        self.demo_worker_options = dict(demo_worker_options or {})
        self.instance_id = settings.server.instance_id or new_instance_id()
        # metrics.enabled: the families (README "Metrics"), in a registry of this gateway's
        self.metrics = Metrics(clock) if settings.metrics.enabled else None
        store = store or make_workflow_store(settings.storage)
        self._faults = store if isinstance(store, FaultyStore) else None
        if self.metrics is not None:
            store = TimedStore(store, self.metrics.store_operation_duration)
        self.store: WorkflowStore = store
        self.bus = bus or make_bus(settings, f"stox gateway {self.instance_id}", self.store)
        remote = settings.services.auth
        # the built-in AuthService signs tokens; with a remote one this gateway only verifies
        self.tokens = make_tokens(settings, issuing=not remote.host)
        self.auth_server = None if remote.host else AuthServer.from_settings(settings, self.tokens)
        self.auth = AuthClient.from_settings(
            settings.auth, f"{remote.host}:{remote.port}" if remote.host else ""
        )
        hooks = settings.webhooks
        # deliveries only where some are configured (endpoints, or callbacks with a secret)
        self.webhooks = Webhooks(hooks, clock) if hooks.endpoints or hooks.callback_secret else None
        self.pipelines = make_pipelines(settings, completion_path)
        self.pipeline = self.pipelines[DEFAULT_PIPELINE]
        self.observers = Observers()  # metrics and traces add themselves
        self.observers.add(TransitionLog())  # a log line for each change of a workflow
        # `tracing`: a test's; else as the OTEL_* variables say
        self.tracing = tracing or make_tracing(self.instance_id)
        if self.tracing is not None:
            self.observers.add(self.tracing)
        self.orchestrator = Orchestrator(
            self.store,
            self.bus,
            self.pipeline,
            clock=clock,
            cache_size=settings.storage.cache_max_documents,
            cache_bytes=settings.storage.cache_max_bytes,
            idempotency_retention=settings.server.idempotency_retention,
            observers=self.observers,
            new_trace=self.tracing.new_root if self.tracing is not None else None,
            pipelines=self.pipelines,
            history_limit=settings.storage.history_limit,
            webhooks=self.webhooks,
        )
        self.uploads = UploadLimiter.from_settings(settings.server)
        # the dashboard's charts, from the change notifications the hub hears (stox/stats.py)
        self.stats = StatsBoard(clock)
        self.hub = Hub.from_settings(self.orchestrator, settings.websocket, self.stats)
        if self.metrics is not None:
            self.observers.add(WorkflowMetrics(self.metrics, self.pipelines.values()))
            self.metrics.watch(self.hub, self.bus)
        self.topology = Topology(settings.rabbitmq.prefix, self.instance_id)
        self._tasks: list[asyncio.Task[None]] = []  # the background loops, running until stop
        self._seeding: asyncio.Task[None] | None = None  # the stats' one read of the store
        # the routing keys of steps no pipeline has any more, as running workflows' stored
        # definitions dispatch them (found at start-up by _steps_to_serve)
        self._retired_keys: dict[str, set[str]] = {}

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            # a start that fails half-way (an unreachable broker) leaves nothing running
            with contextlib.suppress(Exception):
                await self.stop()
            raise

    async def _start(self) -> None:
        await self.store.open()
        if self.auth_server is not None:  # on a free port of 127.0.0.1
            port = await self.auth_server.start("127.0.0.1", 0)
            self.auth.target = f"127.0.0.1:{port}"
        await self.auth.connect()
        await self.bus.start()
        steps = await self._steps_to_serve()
        await self._declare_and_consume(steps)
        self._seeding = asyncio.ensure_future(self._seed_stats())
        if self.settings.demo_workers:
            from stox.demo_workers import DemoWorkers, ServiceToken

            workers = DemoWorkers(
                self.bus,
                [self.topology.step_queue(name) for name in steps],
                service_token=ServiceToken(self.tokens, "demo-workers"),
                **self.demo_worker_options,
            )
            await workers.start()
        await self.relay(min_age=0)
        server = self.settings.server
        self._every(server.sweep_interval, self.sweep)
        self._every(server.relay_interval, lambda: self.relay(server.relay_interval))
        if self._faults is not None:
            self._faults.armed = True
        self._every(server.relay_interval, self.orchestrator.expire_keys)

    async def _seed_stats(self) -> None:
        """The running and waiting counts start from the store (once, in the background)."""
        try:
            await self.stats.seed(self.orchestrator)
        except StoreError as exc:
            log.warning("stats: the running workflows could not be read: %s", exc)

    async def sweep(self) -> None:
        """One run of the timer sweeper."""
        fired = await self.orchestrator.sweep()
        if self.metrics is not None:
            self.metrics.swept(fired)

    async def relay(self, min_age: float) -> None:
        """One run of the outbox relay; with metrics, then the outbox's backlog (one cheap
        query a run, never on the hot path)."""
        republished = await self.orchestrator.relay(min_age)
        if self.metrics is not None:
            self.metrics.relayed(republished)
            self.metrics.outbox(*await self.store.outbox_backlog())

    def _routing_keys(self, step: str) -> list[str]:
        """The routing keys a service step's queue is bound to: what each configured
        pipeline gives it, and, for a step none of them has any more, what the stored
        definitions of the workflows that still need it give it (`step.NAME` by default)."""
        keys = {
            spec.routing_key
            for pipeline in self.pipelines.values()
            for spec in pipeline.steps
            if spec.name == step
        }
        keys |= self._retired_keys.get(step, set())
        return sorted(keys) or [StepSpec(step).routing_key]

    async def _retired(self, in_use: dict[str, list[str]]) -> dict[str, list[str]]:
        """Of the steps `in_use` (by running workflows) that no pipeline configures, the
        service steps, each with its workflows; their routing keys, as those workflows'
        stored definitions give them, go to `_retired_keys`. A review step needs no queue.
        Each such workflow is read once (a start-up cost only while they run)."""
        docs: dict[str, dict[str, Any] | None] = {}
        retired: dict[str, list[str]] = {}
        self._retired_keys = {}
        for name, ids in in_use.items():
            for workflow_id in ids:
                if workflow_id not in docs:
                    docs[workflow_id] = await self.store.get(workflow_id)
                doc = docs[workflow_id]
                if doc is None:
                    continue
                spec = self.orchestrator.pipeline_of(Workflow.from_doc(doc)).spec(name)
                if spec.kind == SERVICE:
                    retired.setdefault(name, []).append(workflow_id)
                    self._retired_keys.setdefault(name, set()).add(spec.routing_key)
        return retired

    async def _steps_to_serve(self) -> list[str]:
        """The service steps of every pipeline, then any step that running workflows still
        need although it is no longer configured (renamed or removed): its queue stays
        declared, so a service still consuming it can finish them, and each such step is
        logged with its workflows. Review steps have no queue."""
        specs = [spec for pipeline in self.pipelines.values() for spec in pipeline.steps]
        known = {spec.name for spec in specs}
        configured = list(dict.fromkeys(spec.name for spec in specs if spec.kind == SERVICE))
        in_use = await self.store.steps_in_use()
        retired = await self._retired({n: ids for n, ids in in_use.items() if n not in known})
        for name, ids in sorted(retired.items()):
            shown = ", ".join(sorted(ids)[:RETIRED_IDS_LOGGED])
            more = len(ids) - RETIRED_IDS_LOGGED
            log.warning(
                "%d running workflows still need step %r, which is no longer configured; its "
                "queue %s stays declared so that a service can finish them: %s%s",
                len(ids),
                name,
                self.topology.step_queue(name),
                shown,
                f" and {more} more" if more > 0 else "",
            )
        return [*configured, *sorted(retired)]

    async def _declare_and_consume(self, steps: list[str]) -> None:
        topo = self.topology
        if self.bus.remote_consumers or self.settings.demo_workers:
            # only declared where a service will consume them: an in-process queue that
            # nobody reads would grow without bound
            for name in steps:
                await self.bus.declare(topo.step_queue(name), self._routing_keys(name))
        await self.bus.declare(topo.completions, [self.pipeline.completion_routing_key])
        # the hub reads only the change notifications, so only those are routed to its
        # queue, not every workflow.# and step.# event (less traffic on every instance)
        await self.bus.declare(topo.hub, [CHANGES_ROUTING_KEY, CHANGE_ROUTING_KEY], exclusive=True)
        await self.bus.consume(topo.completions, completion_handler(self.orchestrator, self.tokens))
        await self.bus.consume(topo.hub, self.hub.on_change)

    def _every(self, interval: float, job: Callable[[], Awaitable[Any]]) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await job()
                except StoreError as exc:  # an outage: no traceback every round
                    log.warning("background job %s: store unavailable: %s", _name(job), exc)
                except Exception:  # a failed round is logged; the next one tries again
                    log.exception("background job %s failed", _name(job))

        self._tasks.append(asyncio.ensure_future(loop()))

    async def stop(self) -> None:
        if self._seeding is not None:
            self._tasks.append(self._seeding)  # cancelled with the loops if still reading
            self._seeding = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.hub.close()
        await self.orchestrator.stop_deliveries()
        await self.orchestrator.drain()
        if self.webhooks is not None:
            self.webhooks.close()
        await self.auth.close()
        if self.auth_server is not None:
            await self.auth_server.stop()
        await self.bus.close()
        await self.store.close()
        if self.tracing is not None:
            await self.tracing.close()


def _name(job: Callable[[], Awaitable[Any]]) -> str:
    return getattr(job, "__name__", repr(job))
