"""The release's version lives in stox/version.py alone; every place that shows it agrees."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import types
from pathlib import Path

import pytest
from support import RunningGateway

from stox import version

ROOT = Path(__file__).resolve().parent.parent


def head() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_the_commit_is_the_checkouts_head() -> None:
    assert version.commit() == head()
    assert version.describe() == f"stox {version.VERSION} (commit {head()})"


def test_a_build_names_its_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A binary has no git: its build registers the module stox._build, which wins."""
    build = types.ModuleType("stox._build")
    build.COMMIT = "feedfacecafe"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "stox._build", build)
    version.commit.cache_clear()
    try:
        assert version.commit() == "feedfacecafe"
    finally:
        version.commit.cache_clear()


def test_the_installed_package_has_the_version() -> None:
    assert importlib.metadata.version("stox") == version.VERSION


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "stox", "--version"],
        [sys.executable, str(ROOT / "server.py"), "--version"],
        [str(Path(sys.executable).parent / "stox"), "--version"],
    ],
    ids=["python -m stox", "server.py", "stox"],
)
def test_every_command_prints_the_version_and_the_commit(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"stox {version.VERSION} (commit {head()})"


async def test_healthz_and_the_openapi_document_carry_it(gw: RunningGateway) -> None:
    health = await gw.fetch("GET", "/healthz")
    assert health.status == 200
    assert health.body == {"status": "ok", "version": version.VERSION, "commit": head()}
    document = await gw.fetch("GET", "/api/v1/openapi.json")
    assert document.body["info"]["version"] == version.VERSION
