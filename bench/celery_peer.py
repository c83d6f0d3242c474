"""The Celery peer of bench/e2e.py: the same three-step pipeline as a Celery chain of no-ops.

Each workflow is `chain(image_processing, ai_enhancement, seo_generation, done)`: the three
tasks do nothing but return a small result, which the chain hands to the next; `done` is
never run, it is the chain's last message, routed to a queue of its own that the driver
consumes to learn that the workflow finished. There is no result backend and results are
ignored (no state kept), there are no events, no remote control and no live updates.

Every name on the broker starts with the run's prefix (`BENCH_CELERY_PREFIX`, as
`bench.<random>`): the task queue and exchange, the done queue and exchange, and the
control and event exchanges Celery would otherwise share with every app on the broker;
`delete` drops them all. bench/e2e.py --peers sets both variables and starts the worker:

    BENCH_CELERY_BROKER_URL=amqp://guest:guest@127.0.0.1:5672/ BENCH_CELERY_PREFIX=bench.x \\
    PYTHONPATH=bench python -m celery -A celery_peer worker --pool prefork --concurrency 2

Celery's own defaults stand otherwise (prefetch multiplier 4, early acknowledgement, JSON).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from celery import Celery, chain, signature
from celery.canvas import Signature
from kombu import Exchange, Queue
from roles import step_result

BROKER_ENV = "BENCH_CELERY_BROKER_URL"
PREFIX_ENV = "BENCH_CELERY_PREFIX"
DONE_TASK = "bench.done"
NO_ID = "0" * 32  # a chain has no workflow id of the gateway's


@dataclass(frozen=True)
class Names:
    """The broker objects of one run, all under `prefix`."""

    prefix: str

    @property
    def tasks(self) -> str:
        return f"{self.prefix}.celery"  # the task queue, its exchange and routing key

    @property
    def done(self) -> str:
        return f"{self.prefix}.done"  # where each chain's last message lands

    @property
    def queues(self) -> list[str]:
        return [self.tasks, self.done]

    @property
    def exchanges(self) -> list[str]:
        return [self.tasks, self.done, f"{self.prefix}.control", f"{self.prefix}.celeryev"]


def settings(broker_url: str, names: Names) -> dict[str, Any]:
    return {
        "broker_url": broker_url,
        "broker_connection_timeout": 5.0,
        "broker_connection_retry_on_startup": False,  # a broker that is not there: fail fast
        "broker_transport_options": {"write_timeout": 5.0},  # a publish never blocks for long
        "task_default_queue": names.tasks,
        "task_default_exchange": names.tasks,
        "task_default_routing_key": names.tasks,
        "task_routes": {DONE_TASK: {"queue": names.done}},
        "control_exchange": f"{names.prefix}.control",
        "event_exchange": f"{names.prefix}.celeryev",
        "worker_enable_remote_control": False,
        "worker_send_task_events": False,
        "task_ignore_result": True,
        "result_backend": None,
        "worker_hijack_root_logger": False,
    }


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: bench/e2e.py --peers sets it")
    return value


NAMES = Names(_env(PREFIX_ENV))
app = Celery("stox-bench-peer")
app.conf.update(settings(_env(BROKER_ENV), NAMES))


# the services' results of bench/e2e.py, each task's input ignored (no work is done)
@app.task(name="bench.image_processing")
def image_processing(product: dict[str, Any]) -> dict[str, Any]:
    return step_result("image_processing", NO_ID)


@app.task(name="bench.ai_enhancement")
def ai_enhancement(previous: dict[str, Any]) -> dict[str, Any]:
    return step_result("ai_enhancement", NO_ID)


@app.task(name="bench.seo_generation")
def seo_generation(previous: dict[str, Any]) -> dict[str, Any]:
    return step_result("seo_generation", NO_ID)


def workflow(product: dict[str, Any], tag: str, n: int) -> Signature:
    """One workflow: the three steps, then the `done` message that carries (tag, n)."""
    return chain(
        image_processing.s(product),
        ai_enhancement.s(),
        seo_generation.s(),
        signature(DONE_TASK, args=(tag, n), immutable=True, app=app),
    )


def done_of(body: bytes) -> tuple[str, int]:
    """(tag, n) of a `done` message (task protocol 2, JSON: [args, kwargs, embed])."""
    args = json.loads(body)[0]
    return str(args[0]), int(args[1])


def declare() -> None:
    """Declare both queues, so nothing published before the worker is up is lost."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for name in NAMES.queues:
            Queue(name, Exchange(name, "direct"), name, channel=channel).declare()


def delete() -> None:
    """Delete every queue and exchange of this run (those never declared are no error)."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for queue in NAMES.queues:
            channel.queue_delete(queue)
        for exchange in NAMES.exchanges:
            channel.exchange_delete(exchange)


def worker_command(python: str, concurrency: int) -> list[str]:
    """The `celery worker` command line: prefork; no banner, gossip, mingle or heartbeat."""
    return [
        python,
        *("-m", "celery", "--quiet", "-A", "celery_peer", "worker", "--pool", "prefork"),
        *("--concurrency", str(concurrency), "--loglevel", "warning"),
        *("--without-gossip", "--without-mingle", "--without-heartbeat"),
        *("--hostname", f"{NAMES.prefix}@%h"),
    ]
