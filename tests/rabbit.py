"""Helpers for tests against a real RabbitMQ: a namespace of names per test, and admin calls.

The admin calls use a blocking pika connection; from async tests run them in a thread
(`await asyncio.to_thread(ns.dead_letters)`) so the gateway under test keeps running.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pika
import pika.exceptions

if TYPE_CHECKING:
    from stox.bus.rabbitmq import RabbitMQBus

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
STEPS = ("image_processing", "ai_enhancement", "seo_generation")


def unreachable(url: str) -> str | None:
    """Why the broker at `url` cannot be used, or None when it can."""
    params = pika.URLParameters(url)
    params.socket_timeout = params.stack_timeout = 3
    params.connection_attempts = 1
    try:
        pika.BlockingConnection(params).close()
    except pika.exceptions.AMQPError as exc:
        return repr(exc)
    except OSError as exc:
        return str(exc)
    return None


def where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5672}"


@dataclass
class Message:
    routing_key: str
    properties: pika.BasicProperties
    body: bytes

    @property
    def payload(self) -> Any:
        return json.loads(self.body)


@dataclass
class Namespace:
    """The exchange and queue-name prefix of one test; `delete()` removes what it made."""

    url: str
    prefix: str = field(default_factory=lambda: f"stoxtest.{uuid.uuid4().hex[:10]}")
    extra_queues: list[str] = field(default_factory=list)

    @property
    def exchange(self) -> str:
        return f"{self.prefix}.events"

    @property
    def dead(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def completions(self) -> str:
        return f"{self.prefix}.step.completed"

    def step_queue(self, step: str) -> str:
        return f"{self.prefix}.step.{step}"

    def settings(self) -> dict[str, Any]:
        """`running_gateway` overrides: this namespace, fast publish retries."""
        from settings import Duration

        return {
            "rabbitmq__url": self.url,
            "rabbitmq__exchange": self.exchange,
            "rabbitmq__prefix": self.prefix,
            "rabbitmq__retry_delay": Duration(0.05),
            "rabbitmq__max_retries": 3,
        }

    def bus(
        self, *, connection_name: str | None = None, url: str | None = None, **options: Any
    ) -> RabbitMQBus:
        """A RabbitMQBus (not started) in this namespace, with fast publish retries."""
        from settings import Duration, RabbitMQSettings
        from stox.bus.rabbitmq import RabbitMQBus

        settings = RabbitMQSettings(
            url=url or self.url,
            exchange=self.exchange,
            prefix=self.prefix,
            max_retries=2,
            retry_delay=Duration(0.05),
            confirm_timeout=Duration(2),
        )
        name = connection_name or f"stox test {self.prefix}"
        return RabbitMQBus.from_settings(settings, connection_name=name, **options)

    def config_yaml(self) -> str:
        """The same for a `server.py --config` file."""
        return (
            f"rabbitmq:\n  url: {self.url}\n  exchange: {self.exchange}\n"
            f"  prefix: {self.prefix}\n  retry_delay: 50ms\n"
        )

    def _channel_do(self, work: Any) -> Any:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            return work(connection.channel())
        finally:
            connection.close()

    def delete(self) -> None:
        queues = [self.dead, self.completions, *map(self.step_queue, STEPS), *self.extra_queues]
        exchanges = [self.exchange, self.dead]

        def work(channel: Any) -> None:
            for queue in queues:
                channel.queue_delete(queue)
            for exchange in exchanges:
                channel.exchange_delete(exchange)

        self._channel_do(work)

    def publish(
        self, routing_key: str, body: bytes, headers: dict[str, Any] | None = None, **props: Any
    ) -> None:
        """Publish raw bytes to the test exchange, as an outside service would."""
        properties = pika.BasicProperties(
            delivery_mode=2, headers=headers, message_id=uuid.uuid4().hex, **props
        )
        self._channel_do(lambda ch: ch.basic_publish(self.exchange, routing_key, body, properties))

    def drain(self, queue: str) -> list[Message]:
        """Every message in `queue` now, acknowledged (removed)."""

        def work(channel: Any) -> list[Message]:
            got: list[Message] = []
            while True:
                method, properties, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    return got
                got.append(Message(method.routing_key, properties, body))

        return list(self._channel_do(work))

    async def drained(self, queue: str, at_least: int = 1, within: float = 10.0) -> list[Message]:
        """Drain `queue` until `at_least` messages have come out (TimeoutError after `within`
        seconds); every one drained, in order."""
        got: list[Message] = []
        async with asyncio.timeout(within):
            while len(got) < at_least:
                got += await asyncio.to_thread(self.drain, queue)
                if len(got) < at_least:
                    await asyncio.sleep(0.02)
        return got

    def count(self, queue: str) -> int:
        return int(
            self._channel_do(lambda ch: ch.queue_declare(queue, passive=True).method.message_count)
        )

    def bind_probe(self, *bindings: str) -> str:
        """A durable queue of this namespace bound to `bindings`; read it with drain()."""
        name = f"{self.prefix}.probe.{uuid.uuid4().hex[:6]}"
        self.extra_queues.append(name)

        def work(channel: Any) -> None:
            channel.exchange_declare(self.exchange, "topic", durable=True)
            channel.queue_declare(name, durable=True)
            for binding in bindings:
                channel.queue_bind(name, self.exchange, binding)

        self._channel_do(work)
        return name


def queue_types(prefix: str) -> dict[str, str]:
    """The type (classic, quorum) of each queue whose name starts with `prefix`, as the
    broker reports it."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "type"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    rows = (line.split("\t") for line in out.splitlines()[1:])  # after the header row
    return {row[0]: row[1] for row in rows if len(row) == 2 and row[0].startswith(prefix)}


def declare_queue(url: str, name: str, queue_type: str, dead_letters: str = "") -> None:
    """A durable queue of `queue_type` declared as a gateway of another setting would
    (dead-lettered to `dead_letters`, if given)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        arguments: dict[str, Any] = {"x-dead-letter-exchange": dead_letters} if dead_letters else {}
        if queue_type != "classic":
            arguments["x-queue-type"] = queue_type
        connection.channel().queue_declare(name, durable=True, arguments=arguments)
    finally:
        connection.close()


def connections_named(name: str) -> list[str]:
    """The Erlang pids of the connections whose client-provided name is `name`."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    # rows are `<pid>\t[{"product","Pika…"},…,{"connection_name","NAME"}]` (Erlang terms; the
    # JSON formatter prints pids in a form close_connection does not take)
    wanted = '{"connection_name",' + json.dumps(name) + "}"
    return [line.split("\t", 1)[0] for line in out.splitlines()[1:] if wanted in line]


def close_connections(name: str, reason: str = "closed by a test") -> int:
    """Have the broker close every connection named `name`; how many it closed."""
    pids = connections_named(name)
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, reason],
            capture_output=True,
            check=True,
            timeout=30,
        )
    return len(pids)


class BrokerProxy:
    """A TCP proxy in front of the broker, on the test's loop: `stop()` looks to a client like
    the broker going away (connections cut, then refused), `start()` like it coming back."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    def url(self, url: str) -> str:
        """`url` pointed at the proxy instead."""
        parts = urlsplit(url)
        return parts._replace(
            netloc=f"{parts.username}:{parts.password}@127.0.0.1:{self.port}"
        ).geturl()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()
        # cut the connections before waiting: since Python 3.12.1 wait_closed() waits for them
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()
        if server is not None:
            await server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if self.server is None:  # stopped meanwhile: its wait_closed() waits for this one too
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
