"""OpenTelemetry traces: one trace per workflow, recorded by an observer of its transitions.

Imported only when the OTEL_* variables ask for traces (`stox.app.make_tracing`); with them
unset nothing imports OpenTelemetry. The trace's root is the upload's span: its context is
made before the workflow (`new_root`) and kept in the workflow's document (`trace`), so every
later span, on whichever instance records it, is in the same trace:

- `upload` (the root), then for each later transition `report <step>`, `timeout <step>`,
  `backoff <step>` (a retry's backoff over), `cancel` or `retry`: a child of the root, or of
  the span a service's report names in its `traceparent` (the worker's span);
- inside a transition, `dispatch <step>` for each dispatch (its span id is the one the
  dispatch's own `traceparent` names, stox/tracecontext.py) and `workflow <status>` when it
  reaches a terminal state;
- `report <step>` with `stox.report.refused` for a duplicate or stale report that names a
  context.

Every span is recorded after its write has committed (observers are told then), from when
the transition was decided (the workflow's `updated_at`) to now. Spans go to their exporter
from the SDK's batch processor, on a thread of its own: the loop only queues them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from datetime import datetime

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import (
    SERVICE_INSTANCE_ID,
    SERVICE_NAME,
    OTELResourceDetector,
    Resource,
)
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import Link, SpanKind, StatusCode, TraceFlags
from opentelemetry.util.types import AnyValue, Attributes

from settings import SettingsError
from stox import observe, tracecontext
from stox.tracecontext import SpanContext
from stox.workflow import FAILED, Change, Report, Step, Workflow

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "stox-gateway"
OTLP_PROTOCOL = "http/protobuf"  # the OTLP exporter installed (no gRPC one)
SCOPE = "stox"


class Tracing:
    """The observer that records each traced workflow's spans (see the module docstring)."""

    def __init__(self, provider: TracerProvider, ids: ChosenIds) -> None:
        self.provider = provider
        self._ids = ids
        self._tracer = provider.get_tracer(SCOPE)

    @classmethod
    def to(cls, *processors: SpanProcessor, resource: Resource | None = None) -> Tracing:
        """Spans go to `processors`; the sampler is the one OTEL_TRACES_SAMPLER names."""
        ids = ChosenIds()
        provider = TracerProvider(
            resource=resource or Resource.create({SERVICE_NAME: DEFAULT_SERVICE_NAME}),
            id_generator=ids,
            shutdown_on_exit=False,  # the gateway shuts it down, flushing what is queued
        )
        for processor in processors:
            provider.add_span_processor(processor)
        return cls(provider, ids)

    @classmethod
    def from_env(cls, instance_id: str) -> Tracing:
        """As the standard OTEL_* variables say: the exporters of OTEL_TRACES_EXPORTER
        (`otlp`, the default, and `console`), OTEL_SERVICE_NAME (`stox-gateway`), and what
        the SDK reads itself (OTEL_EXPORTER_OTLP_*, OTEL_TRACES_SAMPLER, OTEL_BSP_*,
        OTEL_RESOURCE_ATTRIBUTES). SettingsError for what this gateway cannot export to."""
        names = tracecontext.exporter_names(os.environ.get("OTEL_TRACES_EXPORTER", "otlp"))
        if unknown := tracecontext.unsupported(names):
            raise SettingsError(
                f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} not available (otlp, console, none)"
            )
        exporters = [_exporter(name) for name in names]
        detected = OTELResourceDetector().detect().attributes.get(SERVICE_NAME)
        service = str(detected or DEFAULT_SERVICE_NAME)
        resource = Resource.create({SERVICE_NAME: service, SERVICE_INSTANCE_ID: instance_id})
        log.info("traces: %s, as service %s", " and ".join(names), service)
        return cls.to(*(BatchSpanProcessor(exporter) for exporter in exporters), resource=resource)

    async def close(self) -> None:
        """Export what is queued (on a thread: the exporter may wait for its collector)."""
        await asyncio.to_thread(self.provider.shutdown)

    # -- the orchestrator's calls --------------------------------------------------------

    def new_root(self) -> str:
        """The traceparent of a new workflow's upload span, sampled as the sampler says."""
        trace_id, span_id = self._ids.random_trace_id(), self._ids.random_span_id()
        decision = self.provider.sampler.should_sample(None, trace_id, "upload").decision
        sampled = decision == Decision.RECORD_AND_SAMPLE
        flags = TraceFlags.RANDOM_TRACE_ID | (TraceFlags.SAMPLED if sampled else 0)
        return SpanContext(f"{trace_id:032x}", f"{span_id:016x}", f"{flags:02x}").traceparent()

    def transitioned(self, workflow: Workflow, changes: Sequence[Change], cause: str) -> None:
        root = tracecontext.parse(workflow.trace)
        if root is None:  # uploaded while traces were off
            return
        now = time.time_ns()
        start = min(_ns(workflow.updated_at), now)
        attributes: dict[str, AnyValue] = {
            "stox.workflow.id": workflow.id,
            "stox.workflow.version": workflow.version,
            "stox.workflow.status": workflow.status,
            "stox.cause": cause,
            "stox.changes": [change.type for change in changes],
        }
        if cause == observe.UPLOAD:
            ids = (root.trace_id, root.span_id)
            span = self._start("upload", None, start, attributes, ids=ids)
        else:
            parent, links = _parent(root, tracecontext.parse(tracecontext.continued()))
            name = _name(changes, cause)
            span = self._start(name, parent, start, attributes, links=links)
        inside = trace.set_span_in_context(span)
        for change in changes:
            if change.type == "step_dispatched":
                self._dispatched(inside, _step(workflow, change.step), start, now)
            elif change.type.startswith("workflow_"):
                self._finished(inside, workflow, start, now)
            if change.type in ("step_failed", "workflow_failed"):
                span.set_status(StatusCode.ERROR)
        span.end(now)

    def report_refused(self, report: Report, reason: str) -> None:
        named = tracecontext.parse(tracecontext.continued())
        if named is None:  # without the workflow's document its trace is not known
            return
        now = time.time_ns()
        attributes: dict[str, AnyValue] = {
            "stox.workflow.id": report.workflow_id,
            "stox.step.id": report.step_id,
            "stox.report.refused": reason,
        }
        span = self._start(f"report {report.step_type or 'step'}", named, now, attributes)
        span.end(now)

    # -- spans ---------------------------------------------------------------------------

    def _dispatched(self, inside: Context, step: Step, start: int, end: int) -> None:
        assert step.step_id is not None  # a dispatched step has its attempt's id
        attributes: dict[str, AnyValue] = {
            "stox.step": step.name,
            "stox.step.id": step.step_id,
            "stox.step.attempt": step.attempt,
            "stox.step.deadline": step.deadline or "",
        }
        span = self._start(
            f"dispatch {step.name}",
            inside,
            start,
            attributes,
            ids=(None, tracecontext.dispatch_span_id(step.step_id)),
            kind=SpanKind.PRODUCER,
        )
        span.end(end)

    def _finished(self, inside: Context, workflow: Workflow, start: int, end: int) -> None:
        attributes: dict[str, str] = {"stox.workflow.status": workflow.status}
        if workflow.status == FAILED:
            attributes["stox.error"] = workflow.step.error or ""
        span = self._start(f"workflow {workflow.status}", inside, start, attributes)
        if workflow.status == FAILED:
            span.set_status(StatusCode.ERROR, workflow.step.error)
        span.end(end)

    def _start(
        self,
        name: str,
        parent: Context | SpanContext | None,
        start: int,
        attributes: Attributes,
        *,
        ids: tuple[str | None, str] | None = None,
        links: Sequence[Link] = (),
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> trace.Span:
        """A span started at `start` (ns) under `parent` (a context, a SpanContext named by
        a traceparent, or None for a root, whatever span is current); `ids`: the trace id
        (of a root) and span id it must have, in hex."""
        if parent is None:
            context = Context()  # a root, even inside another span (an instrumented request)
        else:
            context = _remote(parent) if isinstance(parent, SpanContext) else parent
        if ids is not None:
            self._ids.choose(*ids)
        try:
            return self._tracer.start_span(name, context, kind, attributes, links, start)
        finally:
            self._ids.clear()


class ChosenIds(IdGenerator):
    """Random ids, but for the span started right after `choose`: the ids that a workflow's
    document already names (its upload span's, a dispatch's), so that the span recorded has
    the context that was propagated before it was recorded."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self._trace_id: int | None = None
        self._span_id: int | None = None

    def choose(self, trace_id: str | None, span_id: str) -> None:
        self._trace_id = int(trace_id, 16) if trace_id is not None else None
        self._span_id = int(span_id, 16)

    def clear(self) -> None:
        self._trace_id = self._span_id = None

    def generate_trace_id(self) -> int:
        return self._trace_id if self._trace_id is not None else self.random_trace_id()

    def generate_span_id(self) -> int:
        return self._span_id if self._span_id is not None else self.random_span_id()

    def random_trace_id(self) -> int:
        return self._random.generate_trace_id()

    def random_span_id(self) -> int:
        return self._random.generate_span_id()

    def is_trace_id_random(self) -> bool:
        return True


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = os.environ.get(variable)
        if protocol:
            if protocol != OTLP_PROTOCOL:
                raise SettingsError(f"{variable}: {protocol!r} not available ({OTLP_PROTOCOL})")
            break
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _remote(context: SpanContext) -> Context:
    """The OpenTelemetry context whose current span is the one `context` names."""
    span_context = trace.SpanContext(
        int(context.trace_id, 16),
        int(context.span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(context.flags, 16)),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context))


def _parent(root: SpanContext, named: SpanContext | None) -> tuple[SpanContext, list[Link]]:
    """A transition's parent: the span a report names when it is of the workflow's trace
    (a worker's), else the root, linked to the span named in another trace."""
    if named is None:
        return root, []
    if named.trace_id == root.trace_id:
        return named, []
    linked = trace.get_current_span(_remote(named)).get_span_context()
    return root, [Link(linked)]


def _name(changes: Sequence[Change], cause: str) -> str:
    first = changes[0]
    if cause == observe.REPORT:
        return f"report {first.step}"
    if cause == observe.WAKE:  # a deadline passed, or a retry's backoff is over
        return f"{'backoff' if first.type == 'step_dispatched' else 'timeout'} {first.step}"
    return cause  # cancel, retry


def _step(workflow: Workflow, name: str | None) -> Step:
    return next(step for step in workflow.steps if step.name == name)


def _ns(timestamp: str) -> int:
    """Nanoseconds since the epoch of one of the domain's timestamps."""
    return round(datetime.fromisoformat(timestamp).timestamp() * 1e6) * 1000
