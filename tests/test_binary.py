"""`make binary`'s one-file executable runs the whole gateway on a host with no Python.

The binary is built once a session (packaging/build.py, as `make binary` runs it; see
conftest.py), then run from an empty directory with an environment that has no Python on
PATH, no venv and no PYTHON* variables: what it needs, it carries.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import rabbit
from served import (
    assert_a_workflow_completes,
    assert_dashboard_served,
    assert_the_demo_pipelines,
    run,
    serving,
)

from stox import version

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SECRET = "binary-test-secret-" + "b" * 40


@pytest.fixture
def binary(built_binary: Path) -> Path:
    """Built by conftest.py in the background since the session began."""
    return built_binary


@pytest.fixture
def bare_environ(tmp_path: Path) -> dict[str, str]:
    """A host without Python: PATH is an empty folder, no venv, no PYTHON* variables."""
    nothing = tmp_path / "empty-path"
    nothing.mkdir()
    env = {"PATH": str(nothing), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    assert shutil.which("python3", path=env["PATH"]) is None
    assert shutil.which("git", path=env["PATH"]) is None  # the commit is the binary's own
    assert not any(k.startswith("PYTHON") or k == "VIRTUAL_ENV" for k in env)
    return env


def test_it_is_one_file_that_prints_its_version_and_commit(
    binary: Path, tmp_path: Path, bare_environ: dict[str, str]
) -> None:
    assert binary.is_file() and os.access(binary, os.X_OK)
    assert list(binary.parent.iterdir()) == [binary]
    printed = run(binary, "--version", cwd=tmp_path, env=bare_environ).stdout.strip()
    assert printed == version.describe()  # the commit of this checkout, built in
    usage = run(binary, "--help", cwd=tmp_path, env=bare_environ).stdout
    for command in ("serve", "token", "user", "auth-service"):
        assert command in usage


def test_it_serves_the_demo_with_its_dashboard(
    binary: Path, tmp_path: Path, bare_environ: dict[str, str]
) -> None:
    with serving([binary, "serve", "--demo"], tmp_path, bare_environ) as base:
        assert_dashboard_served(base)
        # the token command of the same binary, sharing the secret it generated in this folder
        token = run(binary, "token", "--user", "alice", cwd=tmp_path, env=bare_environ)
        workflow = assert_a_workflow_completes(base, token.stdout.strip())
        assert_the_demo_pipelines(base, token.stdout.strip())  # stox/demo.yaml is carried
    assert [step["status"] for step in workflow["steps"]] == ["completed"] * 3
    assert version.describe() in (tmp_path / "gateway.log").read_text()  # logged at start-up


@pytest.mark.rabbitmq
@pytest.mark.mongo
def test_it_runs_on_rabbitmq_and_mongodb(
    binary: Path,
    tmp_path: Path,
    bare_environ: dict[str, str],
    rabbit_ns: rabbit.Namespace,
    mongo_url: str,
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(rabbit_ns.config_yaml())
    env = {**bare_environ, "STOX_JWT_SECRET": SECRET, "STOX_STORAGE_URL": mongo_url}
    command: list[str | Path] = [binary, "serve", "--demo-workers", "--config", config]
    with serving(command, tmp_path, env) as base:
        token = run(binary, "token", "--user", "alice", "--config", config, cwd=tmp_path, env=env)
        assert_a_workflow_completes(base, token.stdout.strip())
    log = (tmp_path / "gateway.log").read_text()
    assert "bus rabbitmq" in log and "store mongodb" in log, log
