"""`pip install .` into a fresh virtual environment gives a working `stox` command.

The copy of the source tree is installed with `--no-deps --no-build-isolation --no-index`:
the fresh environment sees this environment's packages (a `.pth` line) for the dependencies
and setuptools, so nothing is downloaded. Everything then runs from a directory outside the
source tree, with no PYTHONPATH: what it finds, it found installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, free_port

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


def run(*args: str | Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result


def get(url: str, body: Any = None, token: str | None = None) -> tuple[int, str, bytes]:
    """(status, Content-Type, body) of a GET, or of a POST of `body` as JSON."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


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
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [installed / "stox", "serve", "--demo-workers", "--host", "127.0.0.1"]
    with open(tmp_path / "gateway.log", "wb") as log:
        gateway = subprocess.Popen(
            [*map(str, command), "--port", str(port)],
            cwd=tmp_path,
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert gateway.poll() is None, (tmp_path / "gateway.log").read_text()
            try:
                if get(f"{base}/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
            time.sleep(0.1)

        status, kind, page = get(f"{base}/")
        assert status == 200 and kind.startswith("text/html")
        script = re.search(rb'src="(/static/app\.js\?v=[0-9a-f]+)"', page)
        assert script is not None, page[:500]
        status, kind, asset = get(base + script.group(1).decode())
        assert status == 200 and "javascript" in kind
        # served as written, but for the versions its imports of its siblings carry
        assert re.sub(rb"\?v=[0-9a-f]+", b"", asset) == (ROOT / "static" / "app.js").read_bytes()

        # a token from the same settings, and a workflow through the demo workers
        token = run(installed / "stox", "token", "--user", "alice", cwd=tmp_path, env=environ)
        bearer = token.stdout.strip()
        status, _, body = get(f"{base}/api/v1/workflow/upload", {"name": "Mug"}, bearer)
        assert status == 202, body
        workflow_id = json.loads(body)["workflow_id"]
        deadline = time.monotonic() + 30
        while True:
            url = f"{base}/api/v1/workflow/status?workflow_id={workflow_id}"
            workflow = json.loads(get(url, token=bearer)[2])
            if workflow["status"] != "running" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert workflow["status"] == "completed", workflow
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(10)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait(10)
    assert gateway.returncode == 0, (tmp_path / "gateway.log").read_text()
