"""The gateway's Prometheus metrics: every family, in a registry of the gateway's own.

The families are those of README's *Metrics* (their names are fixed: a dashboard reads them).
Counters and histograms are the lean families of stox/metrics/families.py, their series
looked up once (`.labels(...)` kept) by whoever counts; the hub's counts are plain integers
(its `Tally`) and gauges that something else already knows (open sockets, the bus) are read
when scraped, not kept up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import disable_created_metrics as _disable_created_metrics
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from stox.bus.base import EventBus
from stox.hub import Hub
from stox.metrics.families import CounterFamily, HistogramFamily
from stox.version import version
from stox.workflow import epoch

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format Prometheus scrapes by default

# a `_created` sample beside each counter and histogram doubles the series for nothing a
# dashboard reads (process-wide: prometheus-client has no per-registry switch)
_disable_created_metrics()  # type: ignore[no-untyped-call]

HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STEP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
WORKFLOW_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class Metrics:
    """Every family of the gateway, in `registry`; `watch` adds what is read when scraped."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.registry = CollectorRegistry()
        r = self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterFamily:
            return CounterFamily(r, name, doc, labels)

        self.workflows_started = counter(
            "stox_workflows_started_total", "Workflows uploaded", ("pipeline",)
        )
        self.workflows_completed = counter(
            "stox_workflows_completed_total", "Workflows completed", ("pipeline",)
        )
        self.workflows_failed = counter(
            "stox_workflows_failed_total", "Workflows failed", ("pipeline",)
        )
        self.workflows_cancelled = counter(
            "stox_workflows_cancelled_total", "Workflows cancelled", ("pipeline",)
        )
        self.workflows_retried = counter(
            "stox_workflows_retried_total", "Failed workflows restarted by a user", ("pipeline",)
        )
        self.workflow_duration = HistogramFamily(
            r,
            "stox_workflow_duration_seconds",
            "Upload to the terminal state, by that state",
            ("pipeline", "status"),
            WORKFLOW_BUCKETS,
        )
        self.step_dispatches = counter(
            "stox_step_dispatches_total", "Step attempts sent (first and retries)", ("step",)
        )
        self.step_completions = counter(
            "stox_step_completions_total", "Step attempts reported successful", ("step",)
        )
        self.step_failures = counter(
            "stox_step_failures_total", "Step attempts reported failed", ("step",)
        )
        self.step_timeouts = counter(
            "stox_step_timeouts_total", "Step attempts whose deadline passed", ("step",)
        )
        self.step_retries = counter(
            "stox_step_retries_total", "Failed or timed-out attempts that get another", ("step",)
        )
        self.step_duration = HistogramFamily(
            r,
            "stox_step_duration_seconds",
            "A step attempt's dispatch to its report, by outcome (completed, failed)",
            ("step", "outcome"),
            STEP_BUCKETS,
        )
        self.reports_duplicate = counter(
            "stox_reports_duplicate_total", "Reports of an attempt already applied", ("step",)
        )
        self.reports_stale = counter(
            "stox_reports_stale_total",
            "Reports refused as stale (409); step empty when the report names none",
            ("step",),
        )
        self.http_request_duration = HistogramFamily(
            r,
            "stox_http_request_duration_seconds",
            "HTTP requests by route (its name or pattern), method and status class",
            ("route", "method", "status_class"),
            HTTP_BUCKETS,
        )
        self.store_operation_duration = HistogramFamily(
            r,
            "stox_store_operation_duration_seconds",
            "Workflow store calls by operation (the store's method)",
            ("operation",),
            STORE_BUCKETS,
        )
        self.outbox_backlog = Gauge(
            "stox_outbox_backlog",
            "Workflows with unpublished events (as of the relay's last run)",
            registry=r,
        )
        self.outbox_oldest_age = Gauge(
            "stox_outbox_oldest_age_seconds",
            "Age of the oldest unpublished event (0 when none; as of the relay's last run)",
            registry=r,
        )
        self._oldest: float | None = None  # when the oldest unpublished event was written
        self.outbox_oldest_age.set_function(self._oldest_age)
        self.sweeper_runs = counter("stox_sweeper_runs_total", "Runs of the timer sweeper").labels()
        self.sweeper_timers_fired = counter(
            "stox_sweeper_timers_fired_total", "Deadlines and retries the sweeper fired"
        ).labels()
        self.relay_runs = counter("stox_relay_runs_total", "Runs of the outbox relay").labels()
        self.relay_republished = counter(
            "stox_relay_republished_total", "Workflows whose outbox the relay published again"
        ).labels()
        build = Gauge("stox_build_info", "The gateway's version", ("version",), registry=r)
        build.labels(version()).set(1)

    def watch(self, hub: Hub, bus: EventBus) -> None:
        """The families read when scraped: the hub's sockets and messages, the bus."""
        r = self.registry
        sockets = Gauge("stox_websocket_connections", "Open WebSocket sockets", registry=r)
        sockets.set_function(lambda: hub.socket_count)
        connected = Gauge("stox_bus_connected", "1 when the bus is connected", registry=r)
        connected.set_function(lambda: 1 if bus.connected else 0)
        r.register(_HubMessages(hub))

    def swept(self, fired: int) -> None:
        self.sweeper_runs.inc()
        self.sweeper_timers_fired.inc(fired)

    def relayed(self, republished: int) -> None:
        self.relay_runs.inc()
        self.relay_republished.inc(republished)

    def outbox(self, backlog: int, oldest: str | None) -> None:
        """What the store says of the outbox (`WorkflowStore.outbox_backlog`)."""
        self.outbox_backlog.set(backlog)
        self._oldest = None if oldest is None else epoch(oldest)

    def _oldest_age(self) -> float:
        return 0.0 if self._oldest is None else max(0.0, self.clock() - self._oldest)

    def render(self) -> bytes:
        """The text exposition (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _HubMessages(Collector):
    """The hub's counts of messages, read when scraped."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        tally = self.hub.tally
        yield CounterMetricFamily(
            "stox_websocket_messages_sent", "Messages handed to WebSocket sockets", tally.sent
        )
        yield CounterMetricFamily(
            "stox_websocket_messages_dropped",
            "Messages not delivered to a slow client (closed with 4008)",
            tally.dropped,
        )
