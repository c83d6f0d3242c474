"""Gateways (`server.py`) and reference workers (`examples/worker.py`) as real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import tornado.httpclient
from support import RunningGateway

from stox.auth.tokens import TokenAuthority

REPO = Path(__file__).resolve().parent.parent
SECRET = "procs-secret-" + "x" * 32


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, within: float = 10.0) -> int:
        """SIGTERM, and the exit status (SIGKILL if it does not stop `within` seconds)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(within)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.popen.returncode)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)


def spawn(name: str, args: list[str], log_dir: Path, **stox_env: str) -> Proc:
    """`python ARGS` in the repository, with no STOX_* variables but `stox_env`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOX_")} | stox_env
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Proc(name, popen, log_path)


def start_worker(
    log_dir: Path,
    url: str,
    exchange: str,
    prefix: str,
    step: str,
    token: str,
    *extra: str,
) -> Proc:
    """examples/worker.py for `step`, working 0-20 ms a job."""
    args = ["examples/worker.py", "--step", step, "--rabbitmq-url", url, "--exchange", exchange]
    args += ["--prefix", prefix, "--token", token, "--min-delay", "0", "--max-delay", "0.02"]
    return spawn(f"worker-{step}", [*args, *extra], log_dir)


def gateway_config(
    port: int, instance_id: str, storage_url: str, rabbitmq_yaml: str, log_format: str = "text"
) -> str:
    return (
        f"server:\n  host: 127.0.0.1\n  port: {port}\n  instance_id: {instance_id}\n"
        "  sweep_interval: 100ms\n  relay_interval: 500ms\n"
        f"storage:\n  url: {storage_url}\n"
        f"jwt:\n  secret: {SECRET}\n"
        f"logging:\n  level: info\n  format: {log_format}\n" + rabbitmq_yaml
    )


def start_gateway(log_dir: Path, name: str, config: str, **stox_env: str) -> Proc:
    path = log_dir / f"{name}.yaml"
    path.write_text(config)
    return spawn(name, ["server.py", "--config", str(path)], log_dir, **stox_env)


async def wait_ready(proc: Proc, port: int, within: float = 20.0) -> None:
    client = tornado.httpclient.AsyncHTTPClient()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.log()}")
        try:
            response = await client.fetch(f"http://127.0.0.1:{port}/readyz", raise_error=False)
            if response.code == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{proc.name} not ready within {within:g}s:\n{proc.log()}")


def remote(port: int) -> RunningGateway:
    """A client of a gateway process on `port`, minting tokens with its secret."""
    tokens = TokenAuthority(SECRET)
    fake: Any = SimpleNamespace(tokens=tokens)
    return RunningGateway(fake, port)
