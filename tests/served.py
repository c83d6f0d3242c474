"""A `stox serve` started as a user would (an installed command, the binary), driven over
plain HTTP: its health, its dashboard, one workflow through its workers."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from support import ROOT, free_port


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


@contextmanager
def serving(
    command: list[str | Path], cwd: Path, env: dict[str, str], within: float = 30.0
) -> Iterator[str]:
    """`command --port P` running in `cwd` until /healthz answers: its base URL. Stopped
    with SIGTERM afterwards, which must end it with status 0."""
    port = free_port()
    log_path = cwd / "gateway.log"
    with open(log_path, "wb") as log:
        gateway = subprocess.Popen(
            [*map(str, command), "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + within
        while True:
            assert gateway.poll() is None, log_path.read_text()
            try:
                if get(f"{base}/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield base
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(10)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait(10)
    assert gateway.returncode == 0, log_path.read_text()


def assert_dashboard_served(base: str) -> None:
    """The page, and its script as written but for the versions its imports carry."""
    status, kind, page = get(f"{base}/")
    assert status == 200 and kind.startswith("text/html")
    script = re.search(rb'src="(/static/app\.js\?v=[0-9a-f]+)"', page)
    assert script is not None, page[:500]
    status, kind, asset = get(base + script.group(1).decode())
    assert status == 200 and "javascript" in kind
    assert re.sub(rb"\?v=[0-9a-f]+", b"", asset) == (ROOT / "static" / "app.js").read_bytes()
    for sheet in re.findall(rb'href="(/static/[^"]+\.css[^"]*)"', page):
        status, kind, _ = get(base + sheet.decode())
        assert status == 200 and kind.startswith("text/css"), sheet


def assert_a_workflow_completes(base: str, token: str, within: float = 30.0) -> dict[str, Any]:
    status, _, body = get(f"{base}/api/v1/workflow/upload", {"name": "Mug"}, token)
    assert status == 202, body
    workflow_id = json.loads(body)["workflow_id"]
    deadline = time.monotonic() + within
    while True:
        url = f"{base}/api/v1/workflow/status?workflow_id={workflow_id}"
        workflow: dict[str, Any] = json.loads(get(url, token=token)[2])
        if workflow["status"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert workflow["status"] == "completed", workflow
    return workflow


def assert_the_demo_pipelines(base: str, token: str) -> None:
    """`--demo` found its settings where it is installed: apparel beside the default, its
    review after the two parallel steps."""
    status, _, body = get(f"{base}/api/v1/pipelines", token=token)
    assert status == 200, body
    pipelines = json.loads(body)["pipelines"]
    assert [p["name"] for p in pipelines] == ["default", "apparel"]
    review = next(s for s in pipelines[1]["steps"] if s.get("kind") == "review")
    assert review["after"] == ["image_processing", "ai_enhancement"]
