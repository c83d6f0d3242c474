"""A reference step worker for Stox: copy it, replace `do_the_work`, and run one per step.

    export STOX_SERVICE_TOKEN=$(python -m stox token --service image-service --expires-in 31536000)
    python examples/worker.py --step image_processing --rabbitmq-url amqp://guest:guest@localhost/
    python examples/worker.py --step ai_enhancement --http     # report over HTTP instead

What a worker owes the gateway (the README's "Writing a worker" says the same for any language):

1. Consume the step's queue, `stox.step.<step>` (the gateway declares it; durable, with a
   dead-letter queue), one message at a time, acknowledging by hand.
2. A message is a dispatch: JSON with `workflow_id`, `step_id`, `step_type`, `attempt`,
   `deadline`, `product`, `results` (of earlier steps) and `reply_to` {`http`, `routing_key`}.
3. Do the work, then report: publish `step.completed` to the exchange (persistent JSON,
   the header `authorization: Bearer <service token>`), or POST the same body to
   `reply_to.http` with that token. Acknowledge the dispatch only once the report is
   confirmed (AMQP) or answered (HTTP): a crash in between means the dispatch comes again.
4. Delivery is at least once: the same `step_id` may arrive twice. Doing it twice is safe —
   the gateway answers a repeated report "duplicate" and one for an old attempt 409, and
   the worker acknowledges either and moves on. This worker also remembers its recent reports
   and sends the same one again instead of redoing the work.
5. Stop cleanly on SIGTERM: finish the job in hand, let the rest go back to the queue.
6. Traces (optional): a dispatch of a traced workflow carries a W3C `traceparent` (the AMQP
   header and the payload's field). With OpenTelemetry installed this worker records its
   span as a child of it and reports with its own span's `traceparent` (the AMQP header, or
   the HTTP header); without it, it sends the dispatch's on as it is. Either way the
   gateway's span for the report joins the workflow's trace.

Only pika and the standard library are needed (OpenTelemetry is used when installed).
BlockingConnection is enough for a worker that does one job at a time; `connection.sleep`
keeps heartbeats going while it works.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions

try:  # optional: see 6. above
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # it still works: it sends the dispatch's traceparent on
    trace = None  # type: ignore[assignment]

log = logging.getLogger("worker")

REMEMBERED = 10_000  # recent reports kept, by step_id, to answer a redelivery alike
SENT, RETRY, DEAD = "sent", "retry", "dead"  # what became of a report
# the body of POST step-completed (the AMQP message also carries event and occurred_at)
HTTP_FIELDS = ("workflow_id", "step_id", "step_type", "success", "result", "error")
TRACEPARENT = "traceparent"  # W3C Trace Context: the header, and the dispatch's field


def do_the_work(step: str, job: dict[str, Any]) -> dict[str, Any]:
    """The step's real work goes here; this one makes up a plausible result."""
    product = job["product"]
    name = product.get("name", "product")
    if step == "image_processing":
        images = product.get("images") or [f"{name}.jpg"]
        stems = [image.rsplit("/", 1)[-1].split("?")[0].rsplit(".", 1)[0] for image in images]
        return {"images": [f"processed/{job['workflow_id'][:8]}/{s}_1200.webp" for s in stems]}
    if step == "ai_enhancement":
        return {"description": f"{name}: {product.get('description') or 'made to last.'}"}
    if step == "seo_generation":
        return {"title": name[:60], "slug": "-".join(name.lower().split())}
    return {"done": True}


class Stop(Exception):
    """The worker cannot go on (its token is refused): it exits."""


class Worker:
    """`tracer`: an OpenTelemetry tracer for its spans (default: the global provider's, when
    OpenTelemetry is installed)."""

    def __init__(self, args: argparse.Namespace, token: str, tracer: Any = None) -> None:
        self.args = args
        self.token = token
        if tracer is None and trace is not None:
            tracer = trace.get_tracer("stox-worker")
        self.tracer = tracer
        self.queue = f"{args.prefix}.step.{args.step}"
        self.stopping = False
        self.reports: OrderedDict[str, dict[str, Any]] = OrderedDict()  # step_id -> report

    # -- the consume loop -----------------------------------------------------------------

    def run(self) -> None:
        """Consume until SIGTERM; reconnect (with backoff) when the broker goes away."""
        delay = 1.0
        while not self.stopping:
            try:
                self.consume()
                delay = 1.0
            except pika.exceptions.AMQPConnectionError as exc:
                log.warning("RabbitMQ unavailable (%r); retrying in %.0fs", exc, delay)
            except pika.exceptions.ChannelClosedByBroker as exc:
                log.warning("channel closed by the broker (%s); retrying in %.0fs", exc, delay)
            if not self.stopping:
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def consume(self) -> None:
        params = pika.URLParameters(self.args.rabbitmq_url)
        params.client_properties = {"connection_name": f"stox worker {self.args.step}"}
        connection = pika.BlockingConnection(params)
        try:
            channel = connection.channel()
            channel.confirm_delivery()  # basic_publish now waits for the broker's ack
            channel.basic_qos(prefetch_count=1)
            channel.queue_declare(self.queue, passive=True)  # the gateway declares it
            log.info("consuming %s", self.queue)
            # inactivity_timeout: come back every second to notice SIGTERM
            for method, properties, body in channel.consume(self.queue, inactivity_timeout=1):
                if self.stopping:
                    break
                if method is not None:
                    self.handle(connection, channel, method, properties, body)
            channel.cancel()  # prefetched, unacknowledged messages go back to the queue
        finally:
            if connection.is_open:
                connection.close()

    # -- one dispatch ---------------------------------------------------------------------

    def handle(self, connection: Any, channel: Any, method: Any, props: Any, body: bytes) -> None:
        tag = method.delivery_tag
        try:
            job = json.loads(body)
            workflow_id, step_id = job["workflow_id"], job["step_id"]
        except (ValueError, KeyError, TypeError):
            log.error("dead-lettering a message that is not a dispatch: %r", body[:200])
            channel.basic_nack(tag, requeue=False)
            return
        headers = getattr(props, "headers", None) or {}
        with self.traced(job, headers.get(TRACEPARENT) or job.get(TRACEPARENT)) as traceparent:
            report = self.reports.get(step_id)
            if report is not None:
                log.info("%s: step %s again (redelivered), same report", workflow_id, step_id)
            else:
                report = self.work(connection, job)
            try:
                if self.args.http:
                    outcome = self.reply_http(job, report, traceparent)
                else:
                    outcome = self.reply_amqp(channel, job, report, traceparent)
            except Stop:
                channel.basic_nack(tag, requeue=True)
                raise
        if outcome == SENT:
            self.remember(step_id, report)
            channel.basic_ack(tag)
        elif outcome == DEAD:  # the gateway will never take it: leave it for a person
            channel.basic_nack(tag, requeue=False)
        else:  # not delivered: let the dispatch come back, after a pause
            connection.sleep(1.0)
            channel.basic_nack(tag, requeue=True)

    @contextlib.contextmanager
    def traced(self, job: dict[str, Any], parent: Any) -> Iterator[str | None]:
        """This worker's span for `job`, a child of the dispatch's context `parent` (its
        traceparent); yields the traceparent the report carries: the span's, or without
        OpenTelemetry the dispatch's own."""
        parent = parent if isinstance(parent, str) else None
        if self.tracer is None:
            yield parent
            return
        propagator = TraceContextTextMapPropagator()
        context = propagator.extract({TRACEPARENT: parent}) if parent else None
        attributes = {
            "stox.workflow.id": job["workflow_id"],
            "stox.step": self.args.step,
            "stox.step.id": job["step_id"],
        }
        with self.tracer.start_as_current_span(
            f"step {self.args.step}",
            context=context,
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
        ):
            carrier: dict[str, str] = {}
            propagator.inject(carrier)
            yield carrier.get(TRACEPARENT, parent)

    def work(self, connection: Any, job: dict[str, Any]) -> dict[str, Any]:
        args = self.args
        connection.sleep(random.uniform(args.min_delay, args.max_delay))  # "working"
        report = {
            "event": "step.completed",
            "workflow_id": job["workflow_id"],
            "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "step_id": job["step_id"],
            "step_type": args.step,
        }
        if random.random() < args.fail_rate:
            report.update(success=False, error="simulated failure")
        else:
            report.update(success=True, result=do_the_work(args.step, job))
        return report

    def remember(self, step_id: str, report: dict[str, Any]) -> None:
        self.reports[step_id] = report
        self.reports.move_to_end(step_id)
        while len(self.reports) > REMEMBERED:
            self.reports.popitem(last=False)

    # -- reporting ------------------------------------------------------------------------

    def reply_amqp(
        self, channel: Any, job: dict[str, Any], report: dict[str, Any], traceparent: str | None
    ) -> str:
        """Publish step.completed; SENT once the broker has confirmed it."""
        routing_key = (job.get("reply_to") or {}).get("routing_key") or "step.completed"
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=uuid.uuid4().hex,
            correlation_id=job["workflow_id"],
            timestamp=int(time.time()),
            headers=with_trace({"authorization": f"Bearer {self.token}"}, traceparent),
        )
        try:
            channel.basic_publish(
                self.args.exchange, routing_key, json.dumps(report), properties, mandatory=True
            )
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            log.warning("%s: report not accepted by the broker (%r)", job["workflow_id"], exc)
            return RETRY
        log.info("%s: reported %s over AMQP", job["workflow_id"], self.outcome(report))
        return SENT

    def reply_http(
        self, job: dict[str, Any], report: dict[str, Any], traceparent: str | None
    ) -> str:
        """POST the report; SENT when the gateway has answered it for good."""
        workflow_id = job["workflow_id"]
        url = self.args.gateway_url or (job.get("reply_to") or {}).get("http")
        if not url:
            log.error("%s: no reply_to.http in the dispatch; pass --gateway-url", workflow_id)
            return RETRY
        body = {key: report[key] for key in HTTP_FIELDS if key in report}
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            method="POST",
            headers=with_trace(
                {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
                traceparent,
            ),
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = json.load(response).get("result")  # "applied" or "duplicate"
        except urllib.error.HTTPError as exc:
            return self.http_refused(workflow_id, exc.code)
        except (OSError, ValueError) as exc:  # unreachable, or an answer that is not JSON
            log.warning("%s: gateway unreachable (%r); will retry", workflow_id, exc)
            return RETRY
        log.info("%s: reported %s over HTTP: %s", workflow_id, self.outcome(report), answer)
        return SENT

    @staticmethod
    def http_refused(workflow_id: str, status: int) -> str:
        if status in (404, 409):  # a workflow the gateway does not know, or an old attempt
            log.info("%s: report not needed (HTTP %d); moving on", workflow_id, status)
            return SENT
        if status in (401, 403):
            raise Stop(f"the gateway refuses the service token (HTTP {status})")
        if status == 413:  # over the gateway's server.max_body_size: it will never be taken
            log.error("%s: the report is too large for the gateway (HTTP 413)", workflow_id)
            return DEAD
        if 400 <= status < 500:  # our report is wrong: sending it again will not help
            log.error("%s: gateway refused the report (HTTP %d)", workflow_id, status)
            return DEAD
        log.warning("%s: gateway answered HTTP %d; will retry", workflow_id, status)
        return RETRY

    @staticmethod
    def outcome(report: dict[str, Any]) -> str:
        return "success" if report["success"] else f"failure ({report['error']})"


def with_trace(headers: dict[str, str], traceparent: str | None) -> dict[str, str]:
    """A report's `headers`, with its traceparent when it has one."""
    return {**headers, TRACEPARENT: traceparent} if traceparent else headers


def setup_tracing(step: str) -> None:
    """Export this worker's spans when the OpenTelemetry SDK is installed and the standard
    variables ask for it (OTEL_TRACES_EXPORTER=otlp or console, or an OTLP endpoint), as
    the gateway does; OTEL_SERVICE_NAME names it (default `stox-worker-<step>`). A worker
    run under `opentelemetry-instrument` is set up by that instead."""
    env = os.environ
    exporters = env.get("OTEL_TRACES_EXPORTER")
    if exporters is None:
        on = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        exporters = "otlp" if on else "none"
    names = {name.strip() for name in exporters.split(",")} - {"", "none"}
    if not names or env.get("OTEL_SDK_DISABLED", "").lower() == "true" or trace is None:
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("OTEL_* asks for traces, but the opentelemetry-sdk is not installed")
        return
    name = env.get("OTEL_SERVICE_NAME") or f"stox-worker-{step}"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    for exporter in sorted(names):
        if exporter == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif exporter == "otlp":  # opentelemetry-exporter-otlp-proto-http
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            log.warning("OTEL_TRACES_EXPORTER: %s is not supported here (otlp, console)", exporter)
    trace.set_tracer_provider(provider)  # flushed at exit (shutdown_on_exit)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A Stox step worker (the reference service).")
    p.add_argument("--step", required=True, help="the step this worker does, e.g. image_processing")
    p.add_argument(
        "--rabbitmq-url",
        default=os.environ.get("STOX_RABBITMQ_URL", "amqp://guest:guest@localhost:5672/%2F"),
        help="the broker (default $STOX_RABBITMQ_URL or the local guest account)",
    )
    p.add_argument(
        "--exchange", default="workflow_exchange", help="the gateway's rabbitmq.exchange"
    )
    p.add_argument("--prefix", default="stox", help="the gateway's rabbitmq.prefix (queue names)")
    p.add_argument("--http", action="store_true", help="report over HTTP instead of AMQP")
    p.add_argument("--gateway-url", help="with --http: the completion URL (default: reply_to.http)")
    p.add_argument("--token", help="a service token (default $STOX_SERVICE_TOKEN)")
    p.add_argument("--min-delay", type=float, default=0.2, help="shortest simulated work (s)")
    p.add_argument("--max-delay", type=float, default=1.0, help="longest simulated work (s)")
    p.add_argument("--fail-rate", type=float, default=0.0, help="share of jobs that fail (0-1)")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    args = p.parse_args(argv)
    if not 0 <= args.min_delay <= args.max_delay:
        p.error("need 0 <= --min-delay <= --max-delay")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker[{args.step}] %(message)s",
    )
    logging.getLogger("pika").setLevel(logging.WARNING)
    setup_tracing(args.step)
    token = args.token or os.environ.get("STOX_SERVICE_TOKEN", "")
    if not token:
        print(
            "worker: a service token is required (--token or STOX_SERVICE_TOKEN)", file=sys.stderr
        )
        return 2
    worker = Worker(args, token)

    def stop(signum: int, _frame: Any) -> None:
        log.info("%s: finishing the job in hand, then stopping", signal.Signals(signum).name)
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        worker.run()
    except Stop as exc:
        log.error("stopping: %s", exc)
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
