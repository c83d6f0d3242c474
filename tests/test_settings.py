"""Settings (docs/architecture.md#settings-and-the-command-line): defaults < YAML < STOX_*
environment < flags, and refusals that name the offending key."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import settings as settings_module
from settings import Endpoint, Settings, SettingsError, load
from stox.app import make_tokens
from stox.auth import secret

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def refused(argv: list[str], environ: dict[str, str], key: str) -> str:
    """load() refuses with a message that starts with (names) `key`."""
    with pytest.raises(SettingsError) as info:
        load(argv, environ)
    message = str(info.value)
    assert message.startswith(key), message
    return message


# -- defaults ------------------------------------------------------------------------------


def test_defaults_match_the_design_table() -> None:
    s = load([], {})
    assert isinstance(s, Settings)
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8080)
    assert s.server.environment == "development"
    assert s.storage.url == "sqlite:///stox.db"
    assert s.rabbitmq.url == ""
    assert s.rabbitmq.exchange == "workflow_exchange"
    assert s.rabbitmq.max_retries == 3
    assert s.rabbitmq.retry_delay == 5.0
    assert s.services.auth == Endpoint("", 0)
    assert s.jwt.secret == ""
    assert s.jwt.expiry == 3600.0
    assert s.cors.allowed_origins == []
    assert s.allowed_origins == ["http://127.0.0.1:8080"]  # the server's own origin
    assert (s.logging.level, s.logging.format) == ("info", "json")
    assert [step.name for step in s.pipeline.steps] == [
        "image_processing",
        "ai_enhancement",
        "seo_generation",
    ]
    assert s.server.max_body_size == 1024 * 1024
    assert (s.metrics.enabled, s.metrics.listen, s.metrics.token) == (True, "", "")
    assert s.metrics.address is None  # on the API's port
    assert s.demo_workers is False


def test_an_empty_yaml_file_keeps_the_defaults(tmp_path: Path) -> None:
    assert load(["--config", write(tmp_path, "")], {}) == load([], {})


# -- precedence ----------------------------------------------------------------------------


def test_yaml_overrides_defaults(tmp_path: Path) -> None:
    config = write(tmp_path, "server:\n  host: 0.0.0.0\n  port: 9000\n")
    s = load(["--config", config], {})
    assert (s.server.host, s.server.port) == ("0.0.0.0", 9000)
    assert s.server.environment == "development"  # untouched keys keep their default


def test_env_overrides_yaml_and_flags_override_env(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "server:\n  port: 9000\n  host: yaml-host\nlogging:\n  level: warning\n"
        "storage:\n  url: sqlite:///yaml.db\n",
    )
    env = {"STOX_PORT": "9100", "STOX_HOST": "env-host", "STOX_LOG_LEVEL": "error"}

    from_env = load(["--config", config], env)
    assert (from_env.server.port, from_env.server.host) == (9100, "env-host")
    assert from_env.logging.level == "error"
    assert from_env.storage.url == "sqlite:///yaml.db"  # not in env: YAML wins over default

    from_flags = load(["--config", config, "--port", "9200", "--log-level", "debug"], env)
    assert from_flags.server.port == 9200
    assert from_flags.logging.level == "debug"
    assert from_flags.server.host == "env-host"  # no flag: the environment still wins


def test_the_config_file_can_come_from_stox_config(tmp_path: Path) -> None:
    config = write(tmp_path, "server:\n  port: 9001\n")
    assert load([], {"STOX_CONFIG": config}).server.port == 9001


def test_an_empty_environment_variable_is_ignored(tmp_path: Path) -> None:
    config = write(tmp_path, "server:\n  port: 9000\n")
    assert load(["--config", config], {"STOX_PORT": ""}).server.port == 9000


def test_env_and_flags_override_only_their_part_of_a_section(tmp_path: Path) -> None:
    config = write(tmp_path, "rabbitmq:\n  exchange: shop\n  max_retries: 7\n")
    s = load(["--config", config, "--rabbitmq-url", "amqp://flag"], {})
    assert s.rabbitmq.url == "amqp://flag"
    assert (s.rabbitmq.exchange, s.rabbitmq.max_retries) == ("shop", 7)


# -- every variable and flag of the table --------------------------------------------------

ENV_CASES: list[tuple[str, str, Any]] = [
    ("STOX_HOST", "0.0.0.0", lambda s: s.server.host == "0.0.0.0"),
    ("STOX_PORT", "9999", lambda s: s.server.port == 9999),
    ("STOX_ENV", "production", lambda s: s.server.environment == "production"),
    ("STOX_EVENT_LOOP", "asyncio", lambda s: s.server.event_loop == "asyncio"),
    ("STOX_STORAGE_URL", "mongodb://db:27017/stox", lambda s: s.storage.url.startswith("mongo")),
    ("STOX_RABBITMQ_URL", "amqp://mq:5672/", lambda s: s.rabbitmq.url == "amqp://mq:5672/"),
    (
        "STOX_AUTH_ADDR",
        "auth.internal:50051",
        lambda s: s.services.auth == Endpoint("auth.internal", 50051),
    ),
    ("STOX_JWT_SECRET", "s3cret", lambda s: s.jwt.secret == "s3cret"),
    (
        "STOX_ALLOWED_ORIGINS",
        "https://a.example, https://b.example,",
        lambda s: (
            s.cors.allowed_origins == ["https://a.example", "https://b.example"]
            and s.allowed_origins == ["https://a.example", "https://b.example"]
        ),
    ),
    ("STOX_LOG_LEVEL", "warning", lambda s: s.logging.level == "warning"),
    ("STOX_METRICS_ENABLED", "false", lambda s: s.metrics.enabled is False),
    ("STOX_METRICS_LISTEN", "9100", lambda s: s.metrics.address == ("", 9100)),
    ("STOX_METRICS_TOKEN", "scrape-me", lambda s: s.metrics.token == "scrape-me"),
]


@pytest.mark.parametrize(("name", "value", "check"), ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_every_environment_variable_is_honoured(name: str, value: str, check: Any) -> None:
    assert check(load([], {name: value}))
    assert not check(load([], {}))


FLAG_CASES: list[tuple[list[str], Any]] = [
    (["--host", "0.0.0.0"], lambda s: s.server.host == "0.0.0.0"),
    (["--port", "8181"], lambda s: s.server.port == 8181),
    (["--storage-url", "sqlite:///other.db"], lambda s: s.storage.url == "sqlite:///other.db"),
    (["--rabbitmq-url", "amqps://mq/"], lambda s: s.rabbitmq.url == "amqps://mq/"),
    (["--auth-addr", "10.0.0.5:6000"], lambda s: s.services.auth == Endpoint("10.0.0.5", 6000)),
    (["--log-level", "debug"], lambda s: s.logging.level == "debug"),
    (["--demo-workers"], lambda s: s.demo_workers is True),
    (["--demo"], lambda s: s.demo_workers is True and "apparel" in s.named_pipelines()),
]


@pytest.mark.parametrize(("argv", "check"), FLAG_CASES, ids=[c[0][0] for c in FLAG_CASES])
def test_every_flag_is_honoured(argv: list[str], check: Any) -> None:
    assert check(load(argv, {}))
    assert not check(load([], {}))


def test_every_table_entry_has_its_variable_and_flag() -> None:
    table = {dotted: (env, flag) for dotted, env, flag in settings_module._ENV_AND_FLAGS}
    assert table["server.host"] == ("STOX_HOST", "--host")
    assert table["server.port"] == ("STOX_PORT", "--port")
    assert table["server.environment"][0] == "STOX_ENV"
    assert table["server.event_loop"][0] == "STOX_EVENT_LOOP"
    assert table["storage.url"] == ("STOX_STORAGE_URL", "--storage-url")
    assert table["rabbitmq.url"] == ("STOX_RABBITMQ_URL", "--rabbitmq-url")
    assert table["services.auth"] == ("STOX_AUTH_ADDR", "--auth-addr")
    assert table["jwt.secret"][0] == "STOX_JWT_SECRET"
    assert table["cors.allowed_origins"][0] == "STOX_ALLOWED_ORIGINS"
    assert table["logging.level"] == ("STOX_LOG_LEVEL", "--log-level")


def test_the_auth_endpoint_can_be_a_mapping_in_yaml(tmp_path: Path) -> None:
    config = write(tmp_path, "services:\n  auth:\n    host: auth\n    port: 50051\n")
    assert load(["--config", config], {}).services.auth == Endpoint("auth", 50051)


# -- durations and sizes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5.0), ("250ms", 0.25), ("1h", 3600.0), ("2m", 120.0), ("1d", 86400.0), ("7", 7.0)],
)
def test_durations(tmp_path: Path, text: str, seconds: float) -> None:
    config = write(tmp_path, f"rabbitmq:\n  retry_delay: {text}\njwt:\n  expiry: '{text}'\n")
    s = load(["--config", config], {})
    assert s.rabbitmq.retry_delay == pytest.approx(seconds)
    assert s.jwt.expiry == pytest.approx(seconds)
    assert isinstance(s.rabbitmq.retry_delay, settings_module.Duration)


def test_a_step_takes_durations_too(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "pipeline:\n  steps:\n    - name: resize\n      timeout: 90s\n      backoff: 250ms\n"
        "      max_attempts: 5\n      routing_key: jobs.resize\n    - name: publish\n",
    )
    steps = load(["--config", config], {}).pipeline.steps
    assert [s.name for s in steps] == ["resize", "publish"]
    assert (steps[0].timeout, steps[0].backoff, steps[0].max_attempts) == (90.0, 0.25, 5)
    assert steps[0].routing_key == "jobs.resize"
    assert (steps[1].timeout, steps[1].max_attempts) == (None, 3)  # not given: the default
    assert steps[1].spec().timeout == 60.0  # a service step's


@pytest.mark.parametrize(
    ("text", "size"),
    [("1MiB", 1024**2), ("64KiB", 65536), ("2mb", 2_000_000), ("65536", 65536), ("1GiB", 1024**3)],
)
def test_sizes(tmp_path: Path, text: str, size: int) -> None:
    # max_drain_size may be no smaller than max_body_size
    config = write(tmp_path, f"server:\n  max_body_size: {text}\n  max_drain_size: {text}\n")
    assert load(["--config", config], {}).server.max_body_size == size


# -- refusals name the key -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("colour: blue\n", "colour"),
        ("server:\n  hots: x\n", "server.hots"),
        ("services:\n  auth:\n    hostname: x\n", "services.auth.hostname"),
        ("pipeline:\n  steps:\n    - name: a\n      retries: 2\n", "pipeline.steps[0].retries"),
        ("server:\n  1: a\n  zz: b\n", "server.1"),  # keys of mixed kinds
        ("null: 1\nzz: 2\n", "None"),
        ("server: 5\n", "server"),
        ("server:\n  port: x\n", "server.port"),
        ("server:\n  port: 70000\n", "server.port"),
        ("server:\n  port: -1\n", "server.port"),
        ("server:\n  port: 80.5\n", "server.port"),
        ("server:\n  port: true\n", "server.port"),
        ("server:\n  environment: prod\n", "server.environment"),
        ("server:\n  host: [a, b]\n", "server.host"),
        ("server:\n  max_body_size: lots\n", "server.max_body_size"),
        ("server:\n  max_body_size: 0\n", "server.max_body_size"),
        ("server:\n  sweep_interval: 0\n", "server.sweep_interval"),
        ("server:\n  relay_interval: 1ms\n", "server.relay_interval"),
        ("rabbitmq:\n  retry_delay: soon\n", "rabbitmq.retry_delay"),
        ("rabbitmq:\n  retry_delay: -5s\n", "rabbitmq.retry_delay"),
        ("rabbitmq:\n  retry_delay: .inf\n", "rabbitmq.retry_delay"),
        ("jwt:\n  expiry: 1.0e+300\n", "jwt.expiry"),
        ("rabbitmq:\n  max_retries: many\n", "rabbitmq.max_retries"),
        ("rabbitmq:\n  max_retries: -1\n", "rabbitmq.max_retries"),
        ("rabbitmq:\n  exchange: ''\n", "rabbitmq.exchange"),
        ("rabbitmq:\n  prefix: 'a b'\n", "rabbitmq.prefix"),
        ("rabbitmq:\n  prefetch: 0\n", "rabbitmq.prefetch"),
        ("rabbitmq:\n  confirm_timeout: 0s\n", "rabbitmq.confirm_timeout"),
        ("rabbitmq:\n  heartbeat: 500ms\n", "rabbitmq.heartbeat"),
        ("rabbitmq:\n  blocked_timeout: 0\n", "rabbitmq.blocked_timeout"),
        ("storage:\n  url: postgres://x\n", "storage.url"),
        ("storage:\n  url: 'sqlite://no-slash.db'\n", "storage.url"),
        ("rabbitmq:\n  url: http://x\n", "rabbitmq.url"),
        ("logging:\n  level: loud\n", "logging.level"),
        ("logging:\n  format: xml\n", "logging.format"),
        ("demo_workers: maybe\n", "demo_workers"),
        ("cors:\n  allowed_origins: 5\n", "cors.allowed_origins"),
        ("services:\n  auth: nohost\n", "services.auth"),
        ("services:\n  auth: 'h:x'\n", "services.auth.port"),
        ("pipeline:\n  steps: []\n", "pipeline.steps"),
        ("pipeline:\n  steps: x\n", "pipeline.steps"),
        ("pipeline:\n  steps:\n    - a\n", "pipeline.steps[0]"),
        (
            "pipeline:\n  steps:\n    - name: a\n      max_attempts: 0\n",
            "pipeline.steps[0].max_attempts",
        ),
        ("pipeline:\n  steps:\n    - name: a\n      timeout: 0\n", "pipeline.steps[0].timeout"),
        ("pipeline:\n  steps:\n    - name: a\n      timeout: .inf\n", "pipeline.steps[0].timeout"),
        ("pipeline:\n  steps:\n    - name: a\n      backoff: .inf\n", "pipeline.steps[0].backoff"),
        ("pipeline:\n  steps:\n    - name: a\n    - name: a\n", "pipeline.steps[0].name"),
        ("pipeline:\n  steps:\n    - name: Resize\n", "pipeline.steps[0].name"),
        ("pipeline:\n  steps:\n    - name: 'a b'\n", "pipeline.steps[0].name"),
        ("pipeline:\n  steps:\n    - timeout: 5s\n", "pipeline.steps[0].name"),
        ("metrics:\n  enabled: sometimes\n", "metrics.enabled"),
        ("metrics:\n  listen: nine\n", "metrics.listen"),
        ("metrics:\n  listen: 'host:'\n", "metrics.listen"),
        ("metrics:\n  listen: ':9100'\n", "metrics.listen"),
        ("metrics:\n  listen: 70000\n", "metrics.listen"),
        ("metrics:\n  listen: 0\n", "metrics.listen"),
    ],
)
def test_a_bad_yaml_value_is_refused_naming_the_key(
    tmp_path: Path, yaml_text: str, key: str
) -> None:
    refused(["--config", write(tmp_path, yaml_text)], {}, key)


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"STOX_PORT": "x"}, "server.port"),
        ({"STOX_PORT": "70000"}, "server.port"),
        ({"STOX_ENV": "prod"}, "server.environment"),
        ({"STOX_EVENT_LOOP": "trio"}, "server.event_loop"),
        ({"STOX_STORAGE_URL": "postgres://x"}, "storage.url"),
        ({"STOX_RABBITMQ_URL": "http://x"}, "rabbitmq.url"),
        ({"STOX_AUTH_ADDR": "just-a-host"}, "services.auth"),
        ({"STOX_AUTH_ADDR": ":50051"}, "services.auth"),
        ({"STOX_LOG_LEVEL": "chatty"}, "logging.level"),
    ],
)
def test_a_bad_environment_value_is_refused_naming_the_key(
    environ: dict[str, str], key: str
) -> None:
    refused([], environ, key)


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["--port", "x"], "server.port"),
        (["--port", "70000"], "server.port"),
        (["--storage-url", "postgres://x"], "storage.url"),
        (["--rabbitmq-url", "http://x"], "rabbitmq.url"),
        (["--auth-addr", "nohost"], "services.auth"),
        (["--log-level", "loud"], "logging.level"),
    ],
)
def test_a_bad_flag_is_refused_naming_the_key(argv: list[str], key: str) -> None:
    refused(argv, {}, key)


def test_an_unknown_key_message_lists_the_known_ones(tmp_path: Path) -> None:
    message = refused(["--config", write(tmp_path, "server:\n  hots: x\n")], {}, "server.hots")
    assert "host" in message and "port" in message


@pytest.mark.parametrize(
    ("yaml_text", "why"),
    [("- server\n- port\n", "mapping"), ("server: [\n", "YAML"), ("42\n", "mapping")],
)
def test_a_config_file_that_is_not_a_mapping_of_sections_is_refused(
    tmp_path: Path, yaml_text: str, why: str
) -> None:
    message = refused(["--config", write(tmp_path, yaml_text)], {}, "--config")
    assert why in message


def test_a_config_file_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    message = refused(["--config", str(missing)], {}, "--config")
    assert str(missing) in message
    refused(["--config", str(tmp_path)], {}, "--config")  # a directory
    undecodable = tmp_path / "latin1.yaml"
    undecodable.write_bytes(b"server:\n  host: caf\xe9\n")
    refused(["--config", str(undecodable)], {}, "--config")


def test_metrics_listen_takes_a_port_or_host_and_port(tmp_path: Path) -> None:
    for text, address in [("9100", ("", 9100)), ("0.0.0.0:9100", ("0.0.0.0", 9100))]:
        s = load(["--config", write(tmp_path, f"metrics:\n  listen: '{text}'\n")], {})
        assert s.metrics.address == address


def test_the_example_config_loads() -> None:
    example = ROOT / "config.example.yaml"
    assert example.exists(), "config.example.yaml belongs at the repository root"
    s = load(["--config", str(example)], {})
    assert s.pipeline.steps
    # its named pipeline is the README's example, and leaves the default as it is
    pipelines = s.named_pipelines()
    assert list(pipelines) == ["default", "apparel"]
    assert pipelines["default"].deps == load([], {}).named_pipelines()["default"].deps
    apparel = pipelines["apparel"]
    assert apparel.deps["copy_review"] == ("image_processing", "ai_enhancement")
    assert apparel.deps["image_processing"] == apparel.deps["ai_enhancement"] == ()
    assert apparel.spec("copy_review").kind == "review"


def test_the_readmes_pipelines_example_loads(tmp_path: Path) -> None:
    """The worked example of the README's "Pipelines" section is a valid settings file."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Pipelines") :]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    pipelines = load(["--config", write(tmp_path, example)], {}).named_pipelines()
    assert list(pipelines) == ["default", "apparel"]
    assert pipelines["apparel"].deps == {
        "image_processing": (),
        "ai_enhancement": (),
        "copy_review": ("image_processing", "ai_enhancement"),
        "seo_generation": ("copy_review",),
    }
    assert pipelines["apparel"].spec("copy_review").timeout == 24 * 3600


# -- the server refuses to start on bad settings -------------------------------------------


@pytest.mark.parametrize(
    ("config", "argv", "key"),
    [(None, ["--port", "x"], "server.port"), ("server:\n  hots: x\n", [], "server.hots")],
    ids=["bad flag", "bad config file"],
)
def test_server_py_exits_2_naming_the_key(
    tmp_path: Path, config: str | None, argv: list[str], key: str
) -> None:
    if config is not None:
        argv = ["--config", write(tmp_path, config)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOX_")}
    result = subprocess.run(
        [sys.executable, "server.py", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result
    assert key in result.stderr
    assert "Traceback" not in result.stderr


# -- the signing secret --------------------------------------------------------------------


def test_production_without_a_secret_is_refused(tmp_path: Path) -> None:
    s = load([], {"STOX_ENV": "production", "STOX_STORAGE_URL": f"sqlite:///{tmp_path}/x.db"})
    with pytest.raises(SettingsError) as info:
        make_tokens(s)
    assert str(info.value).startswith("jwt.secret")
    assert not (tmp_path / secret.SECRET_FILE).exists()


def test_production_with_a_secret_uses_it(tmp_path: Path) -> None:
    env = {"STOX_ENV": "production", "STOX_JWT_SECRET": "p" * 40}
    tokens = make_tokens(load([], {**env, "STOX_STORAGE_URL": f"sqlite:///{tmp_path}/x.db"}))
    assert tokens._secret == "p" * 40
    assert not (tmp_path / secret.SECRET_FILE).exists()


def test_development_generates_a_secret_beside_the_database_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    s = load([], {"STOX_STORAGE_URL": f"sqlite:///{data}/stox.db"})

    first = make_tokens(s)
    path = data / secret.SECRET_FILE
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().strip()) >= 32
    token = first.issue("alice", "alice", "user")

    second = make_tokens(s)
    assert second._secret == first._secret
    assert second.verify(token).id == "alice"
    assert [p.name for p in data.iterdir()] == [secret.SECRET_FILE]  # no stray temp files


def test_a_different_data_folder_gets_a_different_secret(tmp_path: Path) -> None:
    one = make_tokens(load([], {"STOX_STORAGE_URL": f"sqlite:///{tmp_path}/a/x.db"}))
    two = make_tokens(load([], {"STOX_STORAGE_URL": f"sqlite:///{tmp_path}/b/x.db"}))
    assert one._secret != two._secret


def test_processes_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    """Concurrent first starts never read an empty or half-written secret file."""
    for round_ in range(30):
        folder = tmp_path / f"round{round_}"
        barrier = threading.Barrier(8)
        found: list[str] = []

        def start(folder: Path, barrier: threading.Barrier, found: list[str]) -> None:
            barrier.wait()
            found.append(secret.load_or_create(folder))

        threads = [threading.Thread(target=start, args=(folder, barrier, found)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(found) == 8
        assert len(set(found)) == 1 and found[0], round_
        assert (folder / secret.SECRET_FILE).read_text().strip() == found[0]
        assert [p.name for p in folder.iterdir()] == [secret.SECRET_FILE]


def test_the_store_modules_say_where_a_storage_url_keeps_its_data(tmp_path: Path) -> None:
    from stox import store

    assert store.data_folder(f"sqlite:///{tmp_path}/data/stox.db") == tmp_path / "data"
    assert store.data_folder("sqlite://:memory:") is None
    assert store.data_folder("mongodb://db:27017/shop") is None
    with pytest.raises(ValueError, match=r"storage.url: expected sqlite:///PATH or mongodb://"):
        store.data_folder("postgres://x")


def test_the_demo_pipelines_come_under_the_config_file(tmp_path: Path) -> None:
    """`--demo` reads stox/demo.yaml first: a config file changes or adds to it."""
    apparel = load(["--demo"], {}).named_pipelines()["apparel"]
    kinds = {spec.name: spec.kind for spec in apparel.steps}
    assert kinds == {
        "image_processing": "service",
        "ai_enhancement": "service",
        "copy_review": "review",
        "seo_generation": "service",
    }
    assert apparel.spec("copy_review").on_reject == "ai_enhancement"
    assert load(["--demo-workers"], {}).pipelines == {}  # the demo workers alone: no apparel
    config = tmp_path / "config.yaml"
    config.write_text(
        "pipeline: {steps: [{name: image_processing}]}\n"
        "pipelines: {apparel: {steps: [{name: ai_enhancement}]}}\n"
    )
    mine = load(["--demo", "--config", str(config)], {}).named_pipelines()
    assert [spec.name for spec in mine["default"].steps] == ["image_processing"]
    assert [spec.name for spec in mine["apparel"].steps] == ["ai_enhancement"]
