"""Traces (stox/tracing.py): one trace per workflow, recorded with the SDK's in-memory exporter,
the reference worker's span inside it; and nothing of it at all when traces are off."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest
import rabbit
import tornado.httpserver
import tornado.netutil
import tornado.web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from procs import start_worker
from support import (
    COMPLETED,
    PRODUCT,
    ROOT,
    Clock,
    RecordingBus,
    eventually,
    load_worker,
    running_gateway,
    stox_environ,
)

from settings import SettingsError
from stox import tracecontext
from stox.bus.base import Event
from stox.observe import UPLOAD, Observers
from stox.orchestrator import Orchestrator
from stox.store import WorkflowStore, make_store
from stox.tracing import Tracing
from stox.workflow import Pipeline, Report, StepSpec, start

worker = load_worker()

# every retry at once, so a timeout dispatches the next attempt in the same transition
PIPELINE = Pipeline(
    steps=(
        StepSpec("image_processing", timeout=30, max_attempts=2, backoff=0),
        StepSpec("ai_enhancement", timeout=30, max_attempts=2, backoff=0),
    ),
    completion_url="http://gateway.test/api/v1/workflow/step-completed",
)


def recorded() -> tuple[Tracing, InMemorySpanExporter]:
    """A gateway's tracing whose spans land in the exporter returned with it."""
    exporter = InMemorySpanExporter()
    return Tracing.to(SimpleSpanProcessor(exporter)), exporter


def named(spans: Iterable[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def one(spans: Iterable[ReadableSpan], name: str) -> ReadableSpan:
    found = named(spans, name)
    assert len(found) == 1, (name, [span.name for span in spans])
    return found[0]


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def trace_ids(spans: Iterable[ReadableSpan]) -> set[int]:
    return {span.context.trace_id for span in spans if span.context is not None}


def assert_chain(spans: Sequence[ReadableSpan], names: Sequence[str]) -> None:
    """Each span named is the child of the one named before it."""
    chain = [one(spans, name) for name in names]
    for parent, child in itertools.pairwise(chain):
        assert parent_id(child) == span_id(parent), (child.name, parent.name)


class Channel:
    """What the worker does with a dispatch: acknowledgements, and the reports it publishes."""

    def __init__(self) -> None:
        self.acks: list[int] = []
        self.published: list[tuple[str, bytes, Any]] = []

    def basic_ack(self, tag: int) -> None:
        self.acks.append(tag)

    def basic_nack(self, tag: int, requeue: bool) -> None:
        raise AssertionError(f"dispatch {tag} not acknowledged (requeue={requeue})")

    def basic_publish(
        self, exchange: str, routing_key: str, body: bytes, properties: Any, mandatory: bool
    ) -> None:
        self.published.append((routing_key, body, properties))


class Connection:
    def sleep(self, seconds: float) -> None:
        pass


# -- one workflow, the reference worker's spans inside --------------------------------------


@pytest.mark.parametrize("reply", ["http", "amqp"])
async def test_one_workflow_is_one_trace_with_the_workers_spans_inside(
    tmp_path: Path, reply: str
) -> None:
    tracing, exporter = recorded()
    # the worker is another service: a provider of its own, its spans in the same exporter
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "image-service"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    headers_seen: list[dict[str, Any]] = []
    async with running_gateway(tmp_path, gateway_options={"tracing": tracing}) as gw:
        gateway, bus = gw.gateway, gw.gateway.bus
        flags = ["--min-delay", "0", "--max-delay", "0"]
        if reply == "http":
            flags += ["--http", "--gateway-url", gw.base_url + COMPLETED]

        def consumer(step: str) -> Any:
            args = worker.parse_args(["--step", step, *flags])
            reporter = worker.Worker(args, gw.service_token(), tracer=provider.get_tracer("w"))

            async def work(event: Event) -> None:  # the worker's own code, in-process
                headers_seen.append({**event.headers, "payload": event.payload})
                channel, props = Channel(), SimpleNamespace(headers=event.headers)
                method = SimpleNamespace(delivery_tag=1)
                body = json.dumps(event.payload).encode()
                await asyncio.to_thread(reporter.handle, Connection(), channel, method, props, body)
                assert channel.acks == [1]
                for routing_key, report, properties in channel.published:  # reply == "amqp"
                    await bus.publish(
                        Event(
                            routing_key,
                            json.loads(report),
                            properties.message_id,
                            headers=properties.headers,
                        )
                    )

            return work

        for spec in gateway.pipeline.steps:
            queue = gateway.topology.step_queue(spec.name)
            await bus.declare(queue, [spec.routing_key])
            await bus.consume(queue, consumer(spec.name))
        workflow_id = await gw.upload(gw.token())
        docs = await gw.wait_finished([workflow_id])
    assert docs[workflow_id]["status"] == "completed"
    assert "trace" not in docs[workflow_id]  # not part of what clients see

    spans = exporter.get_finished_spans()
    assert len(trace_ids(spans)) == 1  # one trace, the worker's spans in it
    root = one(spans, "upload")
    assert root.parent is None and root.attributes is not None
    assert root.attributes["stox.workflow.id"] == workflow_id
    assert_chain(
        spans,
        [
            "upload",
            "dispatch image_processing",
            "step image_processing",  # the worker's, a child of the dispatch's span
            "report image_processing",  # the gateway's, a child of the worker's
            "dispatch ai_enhancement",
            "step ai_enhancement",
            "report ai_enhancement",
            "dispatch seo_generation",
            "step seo_generation",
            "report seo_generation",
            "workflow completed",  # the terminal state ends it
        ],
    )
    worker_span = one(spans, "step image_processing")
    assert worker_span.resource.attributes[SERVICE_NAME] == "image-service"
    assert root.resource.attributes[SERVICE_NAME] == "stox-gateway"
    # the in-process bus carries the dispatch's traceparent as a header, and its payload too
    assert len(headers_seen) == 3
    for seen in headers_seen:
        assert seen[tracecontext.HEADER] == seen["payload"][tracecontext.HEADER]
        parsed = tracecontext.parse(seen[tracecontext.HEADER])
        assert parsed is not None and int(parsed.trace_id, 16) in trace_ids(spans)


def test_without_opentelemetry_the_worker_sends_the_dispatchs_traceparent_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if it were not installed
    bare = load_worker()
    assert bare.trace is None
    args = bare.parse_args(["--step", "image_processing", "--min-delay", "0", "--max-delay", "0"])
    reporter = bare.Worker(args, "a-service-token")
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03"
    job = {"workflow_id": "w" * 32, "step_id": "s" * 32, "product": {"name": "Mug"}}
    channel = Channel()
    props = SimpleNamespace(headers={tracecontext.HEADER: traceparent})
    body = json.dumps({**job, tracecontext.HEADER: traceparent}).encode()
    reporter.handle(Connection(), channel, SimpleNamespace(delivery_tag=3), props, body)
    [(_, _, properties)] = channel.published
    assert properties.headers[tracecontext.HEADER] == traceparent
    assert properties.headers["authorization"] == "Bearer a-service-token"


async def test_the_demo_workers_reports_join_the_trace(tmp_path: Path) -> None:
    tracing, exporter = recorded()

    def with_demo_workers(settings: Any) -> None:
        settings.demo_workers = True

    options = {
        "tracing": tracing,
        "demo_worker_options": {"min_delay": 0.0, "max_delay": 0.0, "failure_rate": 0.0},
    }
    async with running_gateway(tmp_path, with_demo_workers, options) as gw:
        workflow_id = await gw.upload(gw.token())
        docs = await gw.wait_finished([workflow_id])
    assert docs[workflow_id]["status"] == "completed"
    spans = exporter.get_finished_spans()
    assert len(trace_ids(spans)) == 1
    for step in ("image_processing", "ai_enhancement", "seo_generation"):
        assert_chain(spans, [f"dispatch {step}", f"report {step}"])
    one(spans, "workflow completed")


# -- across instances, timeouts, duplicates, cancel and retry -------------------------------


@pytest.fixture
async def two_stores(tmp_path: Path) -> AsyncIterator[tuple[WorkflowStore, WorkflowStore]]:
    """Two stores opened on one SQLite file, as two gateways share one database."""
    url = f"sqlite:///{tmp_path}/stox.db"
    first, second = make_store(url), make_store(url)
    await first.open()
    await second.open()
    try:
        yield first, second
    finally:
        await second.close()
        await first.close()


class Instance(NamedTuple):
    """One gateway instance's orchestrator, what its bus confirmed and the spans it recorded."""

    orchestrator: Orchestrator
    bus: RecordingBus
    exporter: InMemorySpanExporter

    @property
    def spans(self) -> Sequence[ReadableSpan]:
        return self.exporter.get_finished_spans()


def traced_instance(store: WorkflowStore, clock: Clock) -> Instance:
    bus = RecordingBus()
    tracing, exporter = recorded()
    orchestrator = Orchestrator(
        store,
        bus,
        PIPELINE,
        clock=clock,
        observers=Observers([tracing]),
        new_trace=tracing.new_root,
    )
    return Instance(orchestrator, bus, exporter)


def dispatch_of(bus: RecordingBus, step: str, attempt: int = 1) -> Event:
    [event] = {
        e.message_id: e
        for e in bus.events
        if e.routing_key == f"step.{step}" and e.payload["attempt"] == attempt
    }.values()
    return event


async def test_a_second_instance_continues_the_trace_the_first_began(
    two_stores: tuple[WorkflowStore, WorkflowStore],
) -> None:
    clock = Clock()
    a, b = traced_instance(two_stores[0], clock), traced_instance(two_stores[1], clock)
    first, second = a.orchestrator, b.orchestrator
    wf = await first.upload("alice", dict(PRODUCT))
    await first.drain()
    dispatch = dispatch_of(a.bus, "image_processing")
    traceparent = dispatch.payload[tracecontext.HEADER]
    assert dispatch.headers[tracecontext.HEADER] == traceparent
    report = Report(wf.id, dispatch.payload["step_id"], True, "image_processing", {"n": 1})

    # a worker without OpenTelemetry sends the dispatch's traceparent on as it is
    with tracecontext.continuing(traceparent):
        await second.report(report)
        await second.report(report)  # again: a duplicate
    clock.advance(31)  # ai_enhancement's deadline passes; the second instance's sweeper
    assert await second.sweep() == 1
    await second.cancel(wf.id, "alice")
    await second.drain()

    begun, continued = a.spans, b.spans
    root = one(begun, "upload")
    assert trace_ids(continued) == trace_ids(begun) == trace_ids([root])
    first_dispatch = one(begun, "dispatch image_processing")
    applied, duplicate = named(continued, "report image_processing")
    assert parent_id(applied) == span_id(first_dispatch)  # across the two instances
    assert duplicate.attributes is not None
    assert duplicate.attributes["stox.report.refused"] == "duplicate"
    assert parent_id(duplicate) == span_id(first_dispatch)
    # the next dispatch, the timeout with its new attempt, the cancel and the terminal state
    first_ai, second_ai = named(continued, "dispatch ai_enhancement")
    assert parent_id(first_ai) == span_id(applied)
    timeout = one(continued, "timeout ai_enhancement")
    assert parent_id(timeout) == span_id(root)  # no service named a context: the root's
    assert parent_id(second_ai) == span_id(timeout)
    assert second_ai.attributes is not None and second_ai.attributes["stox.step.attempt"] == 2
    cancel = one(continued, "cancel")
    assert parent_id(cancel) == span_id(root)
    assert parent_id(one(continued, "workflow cancelled")) == span_id(cancel)
    # each dispatch's traceparent names its span, whichever instance recorded it
    again = dispatch_of(b.bus, "ai_enhancement", attempt=2)
    named_span = tracecontext.parse(again.payload[tracecontext.HEADER])
    assert named_span is not None and int(named_span.span_id, 16) == span_id(second_ai)


async def test_a_failed_workflow_and_its_retry_are_spans_of_its_trace(
    two_stores: tuple[WorkflowStore, WorkflowStore],
) -> None:
    instance = traced_instance(two_stores[0], Clock())
    orchestrator, bus = instance.orchestrator, instance.bus
    wf = await orchestrator.upload("alice", dict(PRODUCT))
    for attempt in (1, 2):
        await orchestrator.drain()
        dispatch = dispatch_of(bus, "image_processing", attempt)
        step_id = dispatch.payload["step_id"]
        await orchestrator.report(Report(wf.id, step_id, False, "image_processing", error="x"))
    await orchestrator.retry(wf.id, "alice")
    await orchestrator.drain()

    spans = instance.spans
    root = one(spans, "upload")
    assert len(trace_ids(spans)) == 1
    retried, failed = named(spans, "report image_processing")
    assert retried.status.status_code is StatusCode.UNSET  # a new attempt follows
    assert failed.status.status_code is StatusCode.ERROR
    finished = one(spans, "workflow failed")
    assert parent_id(finished) == span_id(failed)
    assert finished.status.status_code is StatusCode.ERROR
    retry = one(spans, "retry")
    assert parent_id(retry) == span_id(root)
    third = [s for s in named(spans, "dispatch image_processing") if parent_id(s) == span_id(retry)]
    assert len(third) == 1


async def test_a_report_naming_another_trace_is_linked_not_adopted(
    two_stores: tuple[WorkflowStore, WorkflowStore],
) -> None:
    instance = traced_instance(two_stores[0], Clock())
    orchestrator = instance.orchestrator
    wf = await orchestrator.upload("alice", dict(PRODUCT))
    await orchestrator.drain()
    step_id = dispatch_of(instance.bus, "image_processing").payload["step_id"]
    foreign = "00-11111111111111111111111111111111-2222222222222222-01"
    with tracecontext.continuing(foreign):
        await orchestrator.report(Report(wf.id, step_id, True, "image_processing", {"n": 1}))
    spans = instance.spans
    report = one(spans, "report image_processing")
    assert parent_id(report) == span_id(one(spans, "upload"))
    assert [link.context.trace_id for link in report.links] == [0x11111111111111111111111111111111]


# -- on RabbitMQ: the AMQP header ------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_a_dispatch_on_rabbitmq_carries_its_traceparent_header(
    tmp_path: Path, rabbit_ns: rabbit.Namespace
) -> None:
    tracing, exporter = recorded()
    options = {"tracing": tracing}
    async with running_gateway(tmp_path, gateway_options=options, **rabbit_ns.settings()) as gw:
        await gw.upload(gw.token())
        [message] = await rabbit_ns.drained(rabbit_ns.step_queue("image_processing"))
    header = message.properties.headers[tracecontext.HEADER]
    assert header == message.payload[tracecontext.HEADER]
    named_span = tracecontext.parse(header)
    dispatch = one(exporter.get_finished_spans(), "dispatch image_processing")
    assert named_span is not None and dispatch.context is not None
    assert (int(named_span.trace_id, 16), int(named_span.span_id, 16)) == (
        dispatch.context.trace_id,
        dispatch.context.span_id,
    )


def console_spans(output: str) -> list[dict[str, Any]]:
    """The spans OpenTelemetry's console exporter printed among other lines of `output`."""
    spans, block = [], None
    for line in output.splitlines():
        if line == "{":
            block = [line]
        elif block is not None:
            block.append(line)
            if line == "}":
                spans.append(json.loads("\n".join(block)))
                block = None
    return spans


@pytest.mark.rabbitmq
async def test_the_reference_worker_process_continues_the_trace(
    tmp_path: Path, rabbit_ns: rabbit.Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the worker's own set-up, from the standard variables (the gateway here is given its own)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    tracing, exporter = recorded()
    options = {"tracing": tracing}
    async with running_gateway(tmp_path, gateway_options=options, **rabbit_ns.settings()) as gw:
        ns, step = rabbit_ns, "image_processing"
        proc = start_worker(tmp_path, ns.url, ns.exchange, ns.prefix, step, gw.service_token())
        try:
            workflow_id = await gw.upload(gw.token())
            await eventually(
                lambda: gw.status(workflow_id),
                lambda doc: doc["steps"][0]["status"] == "completed",
                within=30,
            )
        finally:
            assert proc.stop() == 0, proc.log()
    spans = exporter.get_finished_spans()
    dispatch, report = one(spans, f"dispatch {step}"), one(spans, f"report {step}")
    [worker_span] = [s for s in console_spans(proc.log()) if s["name"] == f"step {step}"]
    assert worker_span["parent_id"] == f"0x{span_id(dispatch):016x}"
    assert worker_span["context"]["trace_id"] == f"0x{trace_ids([dispatch]).pop():032x}"
    assert worker_span["resource"]["attributes"][SERVICE_NAME] == f"stox-worker-{step}"
    assert parent_id(report) == int(worker_span["context"]["span_id"], 16)


# -- off by default, on by the OTEL_* variables ---------------------------------------------

# a whole gateway (the web layer imported too) in a process of its own: one upload, and what
# its dispatch, its document and sys.modules show
GATEWAY_RUN = """
import asyncio, json, sys
import handlers, server, settings
from stox.app import Gateway

async def main():
    s = settings.load([], {})
    s.storage.url = f"sqlite:///{sys.argv[1]}/stox.db"
    s.jwt.secret = "test-secret-" + "x" * 32
    gateway = Gateway(s, completion_path=handlers.completion_path())
    await gateway.start()
    got = asyncio.Queue()
    queue = gateway.topology.step_queue("image_processing")
    await gateway.bus.declare(queue, ["step.image_processing"])
    await gateway.bus.consume(queue, got.put)
    wf = await gateway.orchestrator.upload("alice", {"name": "Mug"})
    event = await asyncio.wait_for(got.get(), 10)
    doc = await gateway.store.get(wf.id)
    await gateway.stop()
    print("RESULT " + json.dumps({
        "payload": "traceparent" in event.payload,
        "header": "traceparent" in event.headers,
        "document": "trace" in doc,
        "opentelemetry": any(name.startswith("opentelemetry") for name in sys.modules),
    }))

asyncio.run(main())
"""


def run_gateway(tmp_path: Path, **env: str) -> tuple[dict[str, bool], str]:
    environ = {k: v for k, v in stox_environ().items() if not k.startswith("OTEL_")}
    environ.update(env)
    done = subprocess.run(
        [sys.executable, "-c", GATEWAY_RUN, str(tmp_path)],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT ")), done.stdout


def test_with_traces_off_nothing_carries_a_traceparent_and_opentelemetry_is_not_imported(
    tmp_path: Path,
) -> None:
    shown, _ = run_gateway(tmp_path)
    assert shown == {"payload": False, "header": False, "document": False, "opentelemetry": False}


def test_otel_traces_exporter_turns_traces_on(tmp_path: Path) -> None:
    shown, stdout = run_gateway(
        tmp_path, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="stox-under-test"
    )
    assert shown == {"payload": True, "header": True, "document": True, "opentelemetry": True}
    assert '"name": "upload"' in stdout and '"name": "dispatch image_processing"' in stdout
    assert '"service.name": "stox-under-test"' in stdout


async def test_the_otlp_exporter_sends_the_spans_to_the_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OTLP over HTTP/protobuf (with the pinned protobuf) to a collector stand-in."""
    received: list[bytes] = []

    class Collector(tornado.web.RequestHandler):
        def post(self) -> None:
            received.append(self.request.body)

    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(tornado.web.Application([("/v1/traces", Collector)]))
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "stox-otlp-test")
    try:
        tracing = Tracing.from_env("instance-1")
        wf, changes = start(
            PIPELINE, "alice", {"name": "Mug"}, time.time(), trace=tracing.new_root()
        )
        tracing.transitioned(wf, changes, UPLOAD)
        await tracing.close()  # exports what is queued
    finally:
        server.stop()
    request = ExportTraceServiceRequest.FromString(b"".join(received))
    [resource_spans] = request.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert (
        service[SERVICE_NAME] == "stox-otlp-test" and service["service.instance.id"] == "instance-1"
    )
    names = {span.name for scope in resource_spans.scope_spans for span in scope.spans}
    assert names == {"upload", "dispatch image_processing"}


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, True),
        ({"OTEL_SERVICE_NAME": "stox"}, False),  # naming the service is not asking for traces
    ],
)
def test_traces_are_wanted_as_the_standard_variables_say(environ: dict[str, str], on: bool) -> None:
    assert tracecontext.wanted(environ) is on


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
    ],
)
def test_an_exporter_the_gateway_lacks_stops_it_with_a_message(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        Tracing.from_env("instance-1")


@pytest.mark.parametrize(
    "value",
    [
        None,
        7,
        "",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",  # no flags
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",  # upper case
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  # 00 has no more
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-" + "x" * 600,  # too long
    ],
)
def test_a_malformed_traceparent_names_no_context(value: object) -> None:
    assert tracecontext.parse(value) is None


def test_a_traceparent_of_a_later_version_is_read_by_its_first_fields() -> None:
    parsed = tracecontext.parse("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more")
    assert parsed == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "01")
