"""`pip install .` into a fresh virtual environment gives a working `stox` command.

The copy of the source tree is installed with `--no-deps --no-build-isolation --no-index`:
the fresh environment sees this environment's packages (a `.pth` line) for the dependencies
and setuptools, so nothing is downloaded. Everything then runs from a directory outside the
source tree, with no PYTHONPATH: what it finds, it found installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from served import (
    assert_a_workflow_completes,
    assert_dashboard_served,
    assert_the_demo_pipelines,
    run,
    serving,
)
from support import ROOT

pytestmark = pytest.mark.slow

# what a fresh clone would not have
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "__pycache__",
    "build",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "*.db*",
    "stox.secret",
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `bin` folder of a fresh venv that has the project installed from a copy."""
    base = tmp_path_factory.mktemp("install")
    source, venv = base / "source", base / "venv"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = run(
        python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=base, env={}
    ).stdout.strip()
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(site, "dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", python, "install", "-q"]
    pip += ["--no-deps", "--no-build-isolation", "--no-index", "--disable-pip-version-check"]
    run(*pip, source, cwd=base, env=dict(os.environ))
    return venv / "bin"


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    """No STOX_* variables and no PYTHONPATH; the store in `tmp_path`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOX_")}
    env.pop("PYTHONPATH", None)
    env["STOX_STORAGE_URL"] = f"sqlite:///{tmp_path}/stox.db"
    return env


def test_the_stox_command_and_its_subcommands(
    installed: Path, tmp_path: Path, environ: dict[str, str]
) -> None:
    usage = run(installed / "stox", "--help", cwd=tmp_path, env=environ).stdout
    for command in ("serve", "token", "user", "auth-service"):
        assert command in usage
    serve = run(installed / "stox", "serve", "--help", cwd=tmp_path, env=environ).stdout
    assert "--demo-workers" in serve and "--storage-url" in serve
    modules = ["handlers", "protos.auth_pb2", "server", "settings", "stox"]
    show = f"import importlib; print(*(importlib.import_module(m).__file__ for m in {modules}))"
    where = run(installed / "python", "-c", show, cwd=tmp_path, env=environ).stdout.split()
    assert len(where) == len(modules)
    assert all(Path(path).is_relative_to(installed.parent) for path in where), where


def test_stox_serve_runs_the_demo_from_any_directory(
    installed: Path, tmp_path: Path, environ: dict[str, str]
) -> None:
    with serving([installed / "stox", "serve", "--demo"], tmp_path, environ) as base:
        assert_dashboard_served(base)
        # a token from the same settings, and a workflow through the demo workers
        token = run(installed / "stox", "token", "--user", "alice", cwd=tmp_path, env=environ)
        assert_a_workflow_completes(base, token.stdout.strip())
        assert_the_demo_pipelines(base, token.stdout.strip())  # stox/demo.yaml is installed
