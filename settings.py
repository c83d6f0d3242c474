"""One typed Settings object: defaults < config.yaml < STOX_* environment < command-line flags.

An unknown key or a value of the wrong kind refuses start-up with a message that names the
key and what was expected (`SettingsError`).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from stox import store as stores
from stox import version
from stox.store.sqlite_db import SYNCHRONOUS as SQLITE_SYNCHRONOUS
from stox.workflow import (
    DEFAULT_PIPELINE,
    DEFAULT_STEPS,
    DEFAULT_TIMEOUT,
    ESCALATE,
    FAIL,
    REVIEW,
    SERVICE,
    InvalidPipeline,
    Pipeline,
    StepSpec,
)


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS: dict[str | None, float] = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kib|mib|gib|kb|mb|gb)?\s*$", re.IGNORECASE)
_SIZE_UNITS: dict[str | None, int] = {"b": 1, "kib": 1024, "kb": 1000, "mib": 1024**2}
_SIZE_UNITS |= {"mb": 1000**2}
_SIZE_UNITS |= {"gib": 1024**3, "gb": 1000**3, None: 1}
_MAX_DURATION = 3650 * 86400.0  # ten years


class Duration(float):
    """Seconds; written in config as `5s`, `250ms`, `1h` or a plain number of seconds."""


class Size(int):
    """Bytes; written in config as `1MiB`, `64KiB` or a plain number of bytes."""


# A rule a value must keep: it raises SettingsError naming `key` when the value breaks it.
Check = Callable[[str, Any], None]


def _help(text: str, *, check: Check | None = None, **kwargs: Any) -> Any:
    """A setting: its help, its default, and the rule its value must keep (checked by load())."""
    return field(metadata={"help": text, "check": check}, **kwargs)


def one_of(*choices: str, fold_case: bool = False) -> Check:
    def check(key: str, value: Any) -> None:
        if (value.lower() if fold_case else value) not in choices:
            listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
            raise SettingsError(f"{key}: expected {listed}, got {value!r}")

    return check


def between(low: float, high: float, expected: str = "") -> Check:
    def check(key: str, value: Any) -> None:
        if not low <= value <= high:
            raise SettingsError(f"{key}: expected {expected or f'{low}-{high}'}, got {value}")

    return check


def at_least(low: float, expected: str) -> Check:
    def check(key: str, value: Any) -> None:
        if value < low:
            raise SettingsError(f"{key}: expected {expected}, got {value!r}")

    return check


def positive(key: str, value: Any) -> None:
    if value <= 0:
        kind = "size" if isinstance(value, Size) else "duration"
        raise SettingsError(f"{key}: expected a positive {kind}")


def pattern(regex: str, expected: str) -> Check:
    compiled = re.compile(regex)

    def check(key: str, value: Any) -> None:
        if not compiled.fullmatch(value):
            raise SettingsError(f"{key}: expected {expected}, got {value!r}")

    return check


def each(check: Check) -> Check:
    def check_each(key: str, values: Any) -> None:
        for i, value in enumerate(values):
            check(f"{key}[{i}]", value)

    return check_each


def _ip_network(key: str, value: Any) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise SettingsError(
            f"{key}: expected an IP address or a network such as 10.0.0.0/8, got {value!r}"
        ) from None


def _store_url(key: str, value: Any) -> None:
    try:
        stores.check_url(value)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _amqp_url(key: str, value: Any) -> None:
    if value and not value.startswith(("amqp://", "amqps://")):
        raise SettingsError(f"{key}: expected amqp://…, got {value!r}")


_NON_NEGATIVE = at_least(0, "0 or more")
# `--demo`'s settings (the apparel pipeline), installed inside the stox package
DEMO_CONFIG = Path(__file__).resolve().parent / "stox" / "demo.yaml"


@dataclass
class ServerSettings:
    host: str = _help("address to listen on", default="127.0.0.1")
    port: int = _help("port to listen on", default=8080, check=between(0, 65535))
    environment: str = _help(
        "development or production",
        default="development",
        check=one_of("development", "production"),
    )
    public_url: str = _help(
        "the URL services use to reach this gateway (default http://host:port)", default=""
    )
    max_body_size: Size = _help(
        "largest request body accepted", default=Size(1024 * 1024), check=positive
    )
    max_drain_size: Size = _help(
        "a larger body is read and discarded up to this size before its 413; past it, the 413"
        " comes at once and the connection is closed",
        default=Size(64 * 1024 * 1024),
    )  # at least max_body_size: see check()
    idle_timeout: Duration = _help(
        "how long a connection may take to send a request's headers, counted from when it"
        " opens or its previous request ends (a WebSocket handshake's too); then it is closed",
        default=Duration(60),
        check=at_least(0.1, "at least 100ms"),
    )
    body_timeout: Duration = _help(
        "how long a request's whole body may take to arrive; then the connection is closed",
        default=Duration(60),
        check=at_least(0.1, "at least 100ms"),
    )
    trusted_proxies: list[str] = _help(
        "addresses or networks (CIDR) of proxies whose X-Forwarded-For and X-Forwarded-Proto"
        " are believed; empty: nobody's",
        default_factory=list,
        check=each(_ip_network),
    )
    idempotency_retention: Duration = _help(
        "how long an upload's Idempotency-Key answers with the workflow it made; after it, "
        "the key may make a new one",
        default=Duration(24 * 3600),
        check=at_least(1, "at least 1s"),
    )
    max_uploads_per_user: int = _help(
        "uploads one user may start within upload_window before 429 (0: no limit)",
        default=300,
        check=_NON_NEGATIVE,
    )
    upload_window: Duration = _help(
        "how long an upload counts against max_uploads_per_user",
        default=Duration(10),
        check=positive,
    )
    instance_id: str = _help(
        "name of this instance in logs and queues (default random)", default=""
    )
    sweep_interval: Duration = _help(
        "how often deadlines and retries are checked",
        default=Duration(0.5),
        check=at_least(0.01, "at least 10ms"),
    )
    relay_interval: Duration = _help(
        "how often unconfirmed outbox events are re-published",
        default=Duration(5),
        check=at_least(0.01, "at least 10ms"),
    )
    event_loop: str = _help(
        "uvloop (its event loop, when it is installed) or asyncio (the standard library's)",
        default="uvloop",
        check=one_of("uvloop", "asyncio"),
    )

    def check(self, key: str) -> None:
        if self.max_drain_size < self.max_body_size:
            raise SettingsError(f"{key}.max_drain_size: expected at least {key}.max_body_size")


@dataclass
class Endpoint:
    host: str = _help("host name", default="")
    port: int = _help("port", default=0)


@dataclass
class ServicesSettings:
    auth: Endpoint = _help(
        "the gRPC AuthService; empty: the built-in one", default_factory=Endpoint
    )
    # Accepted and ignored: the step services are reached through the bus (step.<name>) and
    # report back to the gateway; these addresses are never dialled. They stay so a settings
    # file written for the original layout loads.
    image: Endpoint = _help("accepted and ignored (image service)", default_factory=Endpoint)
    llm: Endpoint = _help("accepted and ignored (AI enhancement service)", default_factory=Endpoint)
    queue: Endpoint = _help("accepted and ignored (queue service)", default_factory=Endpoint)
    agent: Endpoint = _help("accepted and ignored (SEO agent service)", default_factory=Endpoint)

    def check(self, key: str) -> None:
        if self.auth.host and not 0 < self.auth.port <= 65535:
            raise SettingsError(f"{key}.auth.port: expected 1-65535, got {self.auth.port}")


@dataclass
class StoreFaultSettings:
    """Seeded faults in the workflow store's calls: a testing aid for fault runs, off by
    default (both shares 0) and refused in production."""

    seed: int = _help(
        "the seed of the faults' random draws (the same seed, the same faults)", default=0
    )
    fail_share: float = _help(
        "share of store calls that fail (a timeout or a lost connection; a third of the failing "
        "writes land first, so their outcome is unknown)",
        default=0.0,
        check=between(0, 1, "a share from 0 to 1"),
    )
    slow_share: float = _help(
        "share of store calls that are slow",
        default=0.0,
        check=between(0, 1, "a share from 0 to 1"),
    )
    slow: Duration = _help(
        "how long a slow call (or a timeout) waits", default=Duration(0.5), check=positive
    )

    @property
    def enabled(self) -> bool:
        return self.fail_share > 0 or self.slow_share > 0

    def check(self, key: str) -> None:
        if self.fail_share + self.slow_share > 1:
            raise SettingsError(
                f"{key}: fail_share and slow_share together must be at most 1, got "
                f"{self.fail_share + self.slow_share:g}"
            )


@dataclass
class StorageSettings:
    url: str = _help("sqlite:///PATH or mongodb://…", default="sqlite:///stox.db", check=_store_url)
    cache_max_documents: int = _help(
        "documents kept after writing them, to save a read on the next change",
        default=10_000,
        check=_NON_NEGATIVE,
    )
    cache_max_bytes: Size = _help(
        "the most those cached documents may hold, by stored size", default=Size(64 * 1024**2)
    )
    history_limit: int = _help(
        "history entries kept per workflow, the newest (older ones are counted as dropped)",
        default=100,
        check=at_least(1, "at least 1"),
    )
    sqlite_synchronous: str = _help(
        "SQLite's synchronous level in WAL mode: normal (a process crash loses nothing "
        "acknowledged; a power loss may lose the last commits) or full (a power loss neither)",
        default="normal",
        check=one_of(*SQLITE_SYNCHRONOUS),
    )
    faults: StoreFaultSettings = _help(
        "seeded store faults for fault runs (testing only)", default_factory=StoreFaultSettings
    )


@dataclass
class RabbitMQSettings:
    url: str = _help("amqp://… ; empty: the in-process bus", default="", check=_amqp_url)
    exchange: str = _help(
        "the durable topic exchange", default="workflow_exchange", check=pattern(".+", "a name")
    )
    routing_key: str = _help("routing key of service completion reports", default="step.completed")
    max_retries: int = _help(
        "publish retries before an event waits for the relay", default=3, check=_NON_NEGATIVE
    )
    retry_delay: Duration = _help("pause between publish attempts", default=Duration(5))
    prefix: str = _help(
        "prefix of the queue names this gateway declares",
        default="stox",
        check=pattern(r"[A-Za-z0-9_.:-]{1,200}", "letters, digits, _ . : -"),
    )
    confirm_timeout: Duration = _help(
        "how long a publish waits for the broker's confirm", default=Duration(10), check=positive
    )
    prefetch: int = _help(
        "unacknowledged messages per consumer", default=100, check=between(1, 65535)
    )
    heartbeat: Duration = _help(
        "AMQP heartbeat (a dead peer is noticed within 2x)",
        default=Duration(30),
        check=between(1, 3600, "1s to 1h"),
    )
    blocked_timeout: Duration = _help(
        "reconnect when the broker blocks publishing longer than this",
        default=Duration(60),
        check=positive,
    )
    queue_type: str = _help(
        "type of the durable queues (steps, completions, dead letters): classic, or quorum "
        "(replicated by Raft over a cluster of 3 or more, at a cost per message); this "
        "instance's own queue stays classic",
        default="classic",
        check=one_of("classic", "quorum"),
    )


@dataclass
class JWTSettings:
    secret: str = _help("HS256 signing secret; empty: generated once beside the data", default="")
    expiry: Duration = _help("lifetime of issued tokens", default=Duration(3600))
    issuer: str = _help("the iss claim", default="stox")
    audience: str = _help("the aud claim", default="stox")
    algorithm: str = _help(
        "HS256 (the shared secret), or EdDSA or RS256 (a key pair)",
        default="HS256",
        check=one_of("HS256", "EdDSA", "RS256"),
    )
    private_key_file: str = _help(
        "PEM private key that signs tokens (EdDSA/RS256; where the AuthService runs)", default=""
    )
    public_key_file: str = _help(
        "PEM public key that verifies tokens (EdDSA/RS256; default: the private key's)",
        default="",
    )

    def check(self, key: str) -> None:
        if self.algorithm != "HS256" and not (self.private_key_file or self.public_key_file):
            raise SettingsError(
                f"{key}.public_key_file: {self.algorithm} needs a key file "
                f"({key}.private_key_file to issue tokens, {key}.public_key_file to verify them)"
            )


@dataclass
class AuthSettings:
    timeout: Duration = _help(
        "deadline of each call to the AuthService, retries included",
        default=Duration(5),
        check=positive,
    )
    retries: int = _help(
        "retries of a call the AuthService was unavailable for", default=3, check=_NON_NEGATIVE
    )
    retry_backoff: Duration = _help(
        "pause before the first retry, doubling after", default=Duration(0.1)
    )
    max_login_failures: int = _help(
        "failed logins per user name from one client address before 429 (0: no limit)",
        default=10,
        check=_NON_NEGATIVE,
    )
    max_login_failures_per_name: int = _help(
        "failed logins per user name from all addresses before 429, except from an address "
        "it signed in from recently (0: no limit)",
        default=100,
        check=_NON_NEGATIVE,
    )
    max_login_failures_per_address: int = _help(
        "failed logins from one client address for all names before 429 (0: no limit)",
        default=100,
        check=_NON_NEGATIVE,
    )
    login_failure_window: Duration = _help(
        "how long a failed login counts against those limits", default=Duration(300), check=positive
    )
    max_registrations: int = _help(
        "registrations from one client address before 429 (0: no limit)",
        default=10,
        check=_NON_NEGATIVE,
    )
    registration_window: Duration = _help(
        "how long a registration counts against that limit", default=Duration(3600), check=positive
    )
    # argon2id's recommended parameters (RFC 9106, second choice): 64 MiB, 3 passes, 4 lanes
    hash_time_cost: int = _help(
        "argon2id passes over the memory", default=3, check=at_least(1, "at least 1")
    )
    hash_memory_cost: int = _help("argon2id memory, in KiB", default=65536)  # see check()
    hash_parallelism: int = _help("argon2id lanes", default=4, check=at_least(1, "at least 1"))

    tls_ca_file: str = _help(
        "PEM CA certificates a gateway trusts for a remote AuthService (services.auth); "
        "set: the channel uses TLS; empty: plaintext",
        default="",
    )
    tls_server_name: str = _help(
        "the name the AuthService's certificate must carry, when not the host of services.auth",
        default="",
    )
    tls_cert_file: str = _help(
        "PEM certificate (chain) `stox auth-service` serves TLS with; empty: plaintext",
        default="",
    )
    tls_key_file: str = _help("PEM private key of tls_cert_file", default="")

    def check(self, key: str) -> None:
        if self.hash_memory_cost < 8 * self.hash_parallelism:
            raise SettingsError(f"{key}.hash_memory_cost: expected at least 8 KiB per lane")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            missing = "tls_key_file" if self.tls_cert_file else "tls_cert_file"
            raise SettingsError(f"{key}.{missing}: tls_cert_file and tls_key_file go together")


@dataclass
class LoggingSettings:
    level: str = _help(
        "debug, info, warning or error",
        default="info",
        check=one_of("debug", "info", "warning", "error", fold_case=True),
    )
    format: str = _help("json or text", default="json", check=one_of("json", "text"))


@dataclass
class CorsSettings:
    allowed_origins: list[str] = _help(
        "origins allowed to open the WebSocket; empty: the server's own", default_factory=list
    )


@dataclass
class WebSocketSettings:
    max_backlog: Size = _help(
        "bytes one /ws socket may have queued (not yet flushed, or waiting behind its "
        "snapshot) before it is closed with 4008",
        default=Size(2 * 1024 * 1024),
        check=at_least(64 * 1024, "at least 64KiB"),
    )
    send_timeout: Duration = _help(
        "how long a snapshot waits for a socket to drain before closing it with 4008",
        default=Duration(30),
        check=at_least(0.1, "at least 100ms"),
    )
    max_sockets_per_user: int = _help(
        "open /ws sockets per user on this instance; one more is closed with 4029",
        default=10,
        check=at_least(1, "at least 1"),
    )
    snapshot_cache: Size = _help(
        "encoded workflow documents kept for snapshots, shared by every socket (0: none)",
        default=Size(16 * 1024 * 1024),
    )
    kernel_send_buffer: Size = _help(
        "the kernel's send buffer of each /ws socket (SO_SNDBUF; Linux doubles it), which "
        "bounds what it queues for a client that does not read (0: the system's own)",
        default=Size(256 * 1024),
    )
    max_sockets: int = _help(
        "open /ws sockets on this instance, all users together; one more is closed with 1013",
        default=1000,
        check=at_least(1, "at least 1"),
    )
    ping_interval: Duration = _help(
        "how often each /ws socket is pinged",
        default=Duration(20),
        check=at_least(0.1, "at least 100ms"),
    )
    ping_timeout: Duration = _help(
        "a socket that has not answered a ping within this is closed (at most ping_interval)",
        default=Duration(20),
        check=at_least(0.1, "at least 100ms"),
    )

    def check(self, key: str) -> None:
        if self.ping_timeout > self.ping_interval:
            raise SettingsError(f"{key}.ping_timeout: expected at most {key}.ping_interval")


def _listen(key: str, value: Any) -> None:
    """Empty, a port, or host:port (a port of 1-65535)."""
    if not value:
        return
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) <= 65535 or (":" in value and not host):
        raise SettingsError(f"{key}: expected empty, a port or host:port, got {value!r}")


@dataclass
class WebhookEndpointSettings:
    url: str = _help(
        "where to POST (http or https; its host in webhooks.allowed_hosts)", default=""
    )
    events: list[str] = _help(
        "the event routing keys to send (workflow.completed, workflow.failed, step.…)",
        default_factory=list,
    )
    secret: str = _help("the HMAC-SHA256 key of its Stox-Signature header", default="")

    def check(self, key: str) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise SettingsError(f"{key}.url: expected an http:// or https:// URL, got {self.url!r}")
        if not self.events:
            raise SettingsError(f"{key}.events: expected at least one event")
        if not self.secret:
            raise SettingsError(f"{key}.secret: expected a secret to sign deliveries with")


@dataclass
class WebhookSettings:
    allowed_hosts: list[str] = _help(
        "the hosts (names or addresses) deliveries may go to; a name that resolves to a "
        "loopback, link-local or private address is refused unless that address is listed",
        default_factory=list,
    )
    endpoints: list[WebhookEndpointSettings] = _help(
        "configured endpoints: url, events, secret", default_factory=list
    )
    callback_secret: str = _help(
        "the key that signs deliveries to an upload's callback_url (empty: uploads may not "
        "name one)",
        default="",
    )
    timeout: Duration = _help("one delivery's time limit", default=Duration(10.0), check=positive)
    retry_for: Duration = _help(
        "how long a failing delivery is retried, with backoff, before it is given up",
        default=Duration(24 * 3600.0),
        check=positive,
    )

    def check(self, key: str) -> None:
        for i, endpoint in enumerate(self.endpoints):
            host = urllib.parse.urlsplit(endpoint.url).hostname or ""
            if host.lower() not in {h.lower() for h in self.allowed_hosts}:
                raise SettingsError(
                    f"{key}.endpoints[{i}].url: its host {host!r} is not in {key}.allowed_hosts"
                )


@dataclass
class MetricsSettings:
    enabled: bool = _help("serve Prometheus metrics at /metrics", default=True)
    listen: str = _help(
        "empty: /metrics on the API's port; a port or host:port (a port alone: on server.host):"
        " a server of its own there, and the API's port answers 404 for /metrics",
        default="",
        check=_listen,
    )
    token: str = _help(
        "empty: no credentials asked; else scrapes send Authorization: Bearer <token>",
        default="",
    )

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) of the metrics' own server, or None when they are on the API's port;
        host "" is server.host."""
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host, int(port)


_STEP = StepSpec("any")  # the domain's defaults of a step
_NAME = pattern(r"[a-z][a-z0-9_]{0,63}", "lowercase letters, digits and _")


@dataclass
class StepSettings:
    name: str = _help("step name", default="", check=_NAME)
    kind: str = _help(
        "service (sent to its queue) or review (a person approves or rejects)",
        default=SERVICE,
        check=one_of(SERVICE, REVIEW),
    )
    after: list[str] | None = _help(
        "the steps it waits for (none given anywhere in a pipeline: each follows the one before)",
        default=None,
    )
    routing_key: str = _help("routing key of its dispatch event (default step.NAME)", default="")
    timeout: Duration | None = _help(
        f"how long an attempt may take (default {DEFAULT_TIMEOUT:g}s; a review: no deadline)",
        default=None,
    )
    max_attempts: int = _help(
        "attempts before the workflow fails",
        default=_STEP.max_attempts,
        check=at_least(1, "at least 1"),
    )
    backoff: Duration = _help(
        "pause before the first retry, doubling after", default=Duration(_STEP.backoff)
    )
    on_reject: str = _help(
        "a review's rejection: fail (the workflow), or the name of an upstream step to run again",
        default=FAIL,
    )
    on_deadline: str = _help(
        "a review's passed deadline: fail, or escalate (it keeps waiting, marked escalated)",
        default=FAIL,
        check=one_of(FAIL, ESCALATE),
    )

    def check(self, key: str) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise SettingsError(f"{key}.timeout: expected a positive duration")

    def spec(self) -> StepSpec:
        return StepSpec(
            self.name,
            self.routing_key,
            None if self.timeout is None else float(self.timeout),
            self.max_attempts,
            float(self.backoff),
            kind=self.kind,
            after=None if self.after is None else tuple(self.after),
            on_reject=self.on_reject,
            on_deadline=self.on_deadline,
        )


def _default_steps() -> list[StepSettings]:
    return [StepSettings(spec.name) for spec in DEFAULT_STEPS]


@dataclass
class PipelineSettings:
    steps: list[StepSettings] = _help("the steps", default_factory=_default_steps)

    def check(self, key: str) -> None:
        if not self.steps:
            raise SettingsError(f"{key}.steps: expected at least one step")
        names = [step.name for step in self.steps]
        for i, name in enumerate(names):
            if names.count(name) > 1:
                raise SettingsError(f"{key}.steps[{i}].name: {name!r} appears twice")
        try:
            self.pipeline(DEFAULT_PIPELINE)  # the rules of steps and their dependencies
        except InvalidPipeline as exc:
            raise SettingsError(f"{key}: {exc}") from None

    def pipeline(self, name: str) -> Pipeline:
        """The domain's pipeline (without reply addresses: see `Settings.pipeline_set`)."""
        return Pipeline(tuple(step.spec() for step in self.steps), name=name)


@dataclass
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    services: ServicesSettings = field(default_factory=ServicesSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    rabbitmq: RabbitMQSettings = field(default_factory=RabbitMQSettings)
    jwt: JWTSettings = field(default_factory=JWTSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    cors: CorsSettings = field(default_factory=CorsSettings)
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    pipelines: dict[str, PipelineSettings] = _help(
        "named pipelines (pipelines.NAME.steps); `default` is pipeline.steps unless given here",
        default_factory=dict,
    )
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    demo_workers: bool = False

    def check(self, key: str) -> None:
        if self.storage.faults.enabled and self.server.environment == "production":
            raise SettingsError(
                "storage.faults: fault injection is a testing aid, refused in production"
            )
        for name in self.pipelines:
            _NAME(f"pipelines.{name}", name)
        if DEFAULT_PIPELINE in self.pipelines and self.pipeline != PipelineSettings():
            raise SettingsError(
                "pipelines.default: the default pipeline is given twice (pipeline.steps too); "
                "give one of them"
            )

    def named_pipelines(self) -> dict[str, Pipeline]:
        """Every configured pipeline by name, `default` first (pipeline.steps unless
        pipelines.default is given), without reply addresses."""
        found = {DEFAULT_PIPELINE: self.pipeline.pipeline(DEFAULT_PIPELINE)}
        for name, section in self.pipelines.items():
            found[name] = section.pipeline(name)
        return found

    @property
    def public_url(self) -> str:
        return self.server.public_url or f"http://{self.server.host}:{self.server.port}"

    @property
    def allowed_origins(self) -> list[str]:
        return self.cors.allowed_origins or [self.public_url]


# (dotted key, environment variable, command-line flag)
_ENV_AND_FLAGS: list[tuple[str, str | None, str | None]] = [
    ("server.host", "STOX_HOST", "--host"),
    ("server.port", "STOX_PORT", "--port"),
    ("server.environment", "STOX_ENV", None),
    ("server.public_url", "STOX_PUBLIC_URL", "--public-url"),
    ("server.trusted_proxies", "STOX_TRUSTED_PROXIES", None),
    ("server.event_loop", "STOX_EVENT_LOOP", None),
    ("server.max_uploads_per_user", "STOX_MAX_UPLOADS_PER_USER", None),
    ("storage.url", "STOX_STORAGE_URL", "--storage-url"),
    ("rabbitmq.url", "STOX_RABBITMQ_URL", "--rabbitmq-url"),
    ("rabbitmq.queue_type", "STOX_RABBITMQ_QUEUE_TYPE", None),
    ("services.auth", "STOX_AUTH_ADDR", "--auth-addr"),
    ("auth.tls_ca_file", "STOX_AUTH_TLS_CA_FILE", None),
    ("auth.tls_server_name", "STOX_AUTH_TLS_SERVER_NAME", None),
    ("auth.tls_cert_file", "STOX_AUTH_TLS_CERT_FILE", None),
    ("auth.tls_key_file", "STOX_AUTH_TLS_KEY_FILE", None),
    ("jwt.secret", "STOX_JWT_SECRET", None),
    ("jwt.algorithm", "STOX_JWT_ALGORITHM", None),
    ("jwt.private_key_file", "STOX_JWT_PRIVATE_KEY_FILE", None),
    ("jwt.public_key_file", "STOX_JWT_PUBLIC_KEY_FILE", None),
    ("cors.allowed_origins", "STOX_ALLOWED_ORIGINS", None),
    ("logging.level", "STOX_LOG_LEVEL", "--log-level"),
    ("metrics.enabled", "STOX_METRICS_ENABLED", None),
    ("metrics.listen", "STOX_METRICS_LISTEN", None),
    ("metrics.token", "STOX_METRICS_TOKEN", None),
]


def _coerce(key: str, kind: Any, value: Any) -> Any:
    """Turn a YAML, environment or flag value into `kind`, or raise naming the key."""
    origin = typing.get_origin(kind)
    if origin is types.UnionType:  # X | None
        (inner,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return None if value is None else _coerce(key, inner, value)
    if origin is dict:
        _, item = typing.get_args(kind)
        if not isinstance(value, Mapping):
            raise SettingsError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", item, v) for k, v in value.items()}
    if dataclasses.is_dataclass(kind):
        if isinstance(value, str) and kind is Endpoint:
            host, sep, port = value.rpartition(":")
            if not sep or not host:
                raise SettingsError(f"{key}: expected host:port, got {value!r}")
            return Endpoint(host, _coerce(f"{key}.port", int, port))
        if not isinstance(value, Mapping):
            raise SettingsError(f"{key}: expected a mapping, got {value!r}")
        return _build(cast(type, kind), value, key)
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise SettingsError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if kind is Duration:
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            seconds = float(value)
        else:
            match = _DURATION.match(str(value))
            if not match:
                raise SettingsError(
                    f"{key}: expected a duration such as 5s, 250ms or 1h, got {value!r}"
                )
            seconds = float(match[1]) * _UNITS[match[2]]
        # deadlines are timestamps: an infinite or enormous duration cannot become one
        if not seconds <= _MAX_DURATION:
            raise SettingsError(f"{key}: expected a duration of at most 3650d, got {value!r}")
        return Duration(seconds)
    if kind is Size:
        match = _SIZE.match(str(value))
        if isinstance(value, bool) or not match:
            raise SettingsError(f"{key}: expected a size such as 1MiB or 65536, got {value!r}")
        return Size(int(match[1]) * _SIZE_UNITS[(match[2] or "").lower() or None])
    if kind is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(str(value).strip())
        except ValueError:
            raise SettingsError(f"{key}: expected a number, got {value!r}") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
        lowered = str(value).strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{key}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise SettingsError(f"{key}: expected a whole number, got {value!r}")
        try:
            return int(str(value).strip())
        except ValueError:
            raise SettingsError(f"{key}: expected a whole number, got {value!r}") from None
    if kind is str:
        if isinstance(value, Mapping | list) or value is None:
            raise SettingsError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise SettingsError(f"{key}: unsupported setting type {kind!r}")  # pragma: no cover


def _build(cls: type, values: Mapping[str, Any], prefix: str = "", base: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known, key=str)  # YAML keys may be numbers or null
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise SettingsError(
            f"{where}{unknown[0]}: unknown setting (expected one of: {', '.join(sorted(known))})"
        )
    base = cls() if base is None else base
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        current = getattr(base, name)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            _build(type(current), value, key, base=current)
        else:
            setattr(base, name, _coerce(key, hints[name], value))
    return base


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _validate(settings: Settings) -> Settings:
    _check(settings, "")
    return settings


def _check(section: Any, prefix: str) -> None:
    """Each field's rule (its `check` metadata), the sections within, then the section's own
    rules across its fields (its `check` method), in the order the fields are declared."""
    for f in dataclasses.fields(section):
        key = f"{prefix}{f.name}"
        value = getattr(section, f.name)
        if f.metadata.get("check") is not None:
            f.metadata["check"](key, value)
        if dataclasses.is_dataclass(value):
            _check(value, f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check(item, f"{key}[{i}].")
        elif isinstance(value, dict):
            for name, item in value.items():
                if dataclasses.is_dataclass(item):
                    _check(item, f"{key}.{name}.")
    if hasattr(section, "check"):
        section.check(prefix.removesuffix("."))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="server.py", description="Run the Stox gateway.")
    p.add_argument("--version", action="version", version=version.describe())
    p.add_argument("--config", help="a YAML settings file (see config.example.yaml)")
    p.add_argument("--host", help="address to listen on (server.host)")
    p.add_argument("--port", help="port to listen on (server.port)")
    p.add_argument("--public-url", help="URL services use to reach this gateway")
    p.add_argument("--storage-url", help="sqlite:///PATH or mongodb://… (storage.url)")
    p.add_argument("--rabbitmq-url", help="amqp://… ; empty: in-process bus (rabbitmq.url)")
    p.add_argument("--auth-addr", help="host:port of a remote AuthService (services.auth)")
    p.add_argument("--log-level", help="debug, info, warning or error (logging.level)")
    p.add_argument(
        "--demo-workers",
        action="store_true",
        default=None,
        help="run simulated image/AI/SEO services in this process",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        default=None,
        help="the demo: --demo-workers, and a second pipeline (apparel: parallel steps and a "
        "review) from the demo settings shipped with stox (stox/demo.yaml), under any --config",
    )
    return p


def load(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from defaults, then the YAML file, then STOX_* variables, then flags."""
    args = parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    if args.demo:
        tree = _read_yaml(DEMO_CONFIG)
    config_path = args.config or environ.get("STOX_CONFIG")
    if config_path:
        tree = _merge(tree, _read_yaml(Path(config_path)))
    overrides: dict[str, Any] = {}
    for dotted, env, _flag in _ENV_AND_FLAGS:
        if env and environ.get(env) not in (None, ""):
            _set_dotted(overrides, dotted, environ[env])
    for dotted, _env, flag in _ENV_AND_FLAGS:
        if flag:
            value = getattr(args, flag.lstrip("-").replace("-", "_"))
            if value is not None:
                _set_dotted(overrides, dotted, value)
    if args.demo_workers or args.demo:
        overrides["demo_workers"] = True
    tree = _merge(tree, overrides)
    return _validate(_build(Settings, tree))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"--config: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"--config: {path} is not UTF-8 text: {exc.reason}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"--config: {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"--config: {path} must hold a mapping of sections")
    return data
