"""deploy/'s systemd units and settings files say what the commands accept: each unit's
ExecStart parses with its program's own parser, and deploy/stox.env loads as valid settings
with what the units and nginx rely on (systemd itself is not run here)."""

from __future__ import annotations

import argparse
import configparser
import shlex

import nginx
from support import load_worker

import settings as settings_module
from stox import __main__ as commands

UNITS = nginx.DEPLOY / "systemd"
STOX = "/opt/stox/venv/bin/stox"


def exec_start(unit: str, instance: str = "") -> list[str]:
    """The unit's ExecStart as argv, `%i` filled in with `instance`."""
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / unit)
    service = parser["Service"]
    assert service["EnvironmentFile"].startswith("/etc/stox/")
    return shlex.split(service["ExecStart"].replace("%i", instance))


def env_file(name: str) -> dict[str, str]:
    lines = (nginx.DEPLOY / name).read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {key: value for key, value in pairs}


def test_the_gateway_unit_serves_on_its_instance_s_port_with_the_deployment_s_settings() -> None:
    argv = exec_start("stox-gateway@.service", "8082")
    assert argv[:2] == [STOX, "serve"]
    loaded = settings_module.load(argv[2:], env_file("stox.env"))
    assert (loaded.server.host, loaded.server.port) == ("127.0.0.1", 8082)
    assert loaded.server.environment == "production" and loaded.jwt.secret
    assert loaded.server.trusted_proxies == ["127.0.0.1"]  # nginx, on the same host
    assert loaded.storage.url.startswith("mongodb://") and loaded.rabbitmq.url
    assert (loaded.services.auth.host, loaded.services.auth.port) == ("127.0.0.1", 50051)


def test_the_gateway_ports_are_the_ones_nginx_sends_to() -> None:
    site = nginx.SITE.read_text()
    for upstream in nginx.UPSTREAMS:
        assert upstream in site
    assert "--host 127.0.0.1" in " ".join(exec_start("stox-gateway@.service", "8081"))


def test_the_auth_unit_listens_where_the_gateways_look_for_it() -> None:
    argv = exec_start("stox-auth.service")
    assert argv[0] == STOX
    parser = argparse.ArgumentParser()
    commands.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv[1:])
    assert args.command == "auth-service"
    assert f"{args.host}:{args.port}" == env_file("stox.env")["STOX_AUTH_ADDR"]


def test_the_worker_unit_runs_the_reference_worker_for_its_step() -> None:
    argv = exec_start("stox-worker@.service", "seo_generation")
    assert argv[1].endswith("/examples/worker.py")
    args = load_worker().parse_args(argv[2:])
    assert args.step == "seo_generation"
    assert set(env_file("worker.env")) == {"STOX_RABBITMQ_URL", "STOX_SERVICE_TOKEN"}
