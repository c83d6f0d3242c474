"""The benchmarks' processes: the gateway and the other servers they start (and stop), and
what /proc says of them (CPU time, RSS, open files) while they run. Linux only for /proc;
elsewhere those figures are missing, not wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from httpclient import TRANSPORT_ERRORS, HttpClient

REPO = Path(__file__).resolve().parent.parent
now = time.perf_counter  # the clock of every figure but bench/ws.py's (see wsclient.py)


@dataclass
class Target:
    base_url: str
    host: str
    port: int
    origin: str
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_target(url: str, origin: str | None) -> Target:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback or not parts.port:
        raise ValueError(f"--url must be http://<loopback address>:<port>, not {url!r}")
    base = f"http://{parts.netloc}"
    return Target(base, host, parts.port, origin or base)


def check_loopback(parser: argparse.ArgumentParser, url: str, origin: str | None) -> None:
    """A usage error unless `url` is a gateway on this host (see loopback_target)."""
    try:
        loopback_target(url, origin)
    except ValueError as exc:
        parser.error(str(exc))


def spawn(
    cmd: list[str], env: dict[str, str], log_path: Path, group: bool = False
) -> subprocess.Popen[bytes]:
    """Start `cmd` in the repository; `group`: in a process group of its own (see stop)."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=group,
        )


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without STOX_* variables (the gateway's settings), plus
    `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOX_")}
    env.update(extra)
    return env


def start_gateway(
    tmpdir: Path,
    name: str,
    secret: str,
    server_args: list[str],
    *,
    port: int = 0,
    origin: str | None = None,
    python_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Target:
    """server.py on 127.0.0.1:`port` (0: a free one) with SQLite at `tmpdir`/`name`.db, its
    log (warnings and worse) in `tmpdir`/gateway-`name`.log, tokens signed with `secret`.
    `python_args` go before the script (a profiler); `server_args` after it; `env` adds
    settings (STOX_* variables) to its environment."""
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmpdir / f"gateway-{name}.log"
    # one user uploads thousands a second here: the per-user upload limit is off
    settings = dict(STOX_LOG_LEVEL="warning", STOX_MAX_UPLOADS_PER_USER="0", **(env or {}))
    cmd = [sys.executable, *(python_args or []), "server.py", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--storage-url", f"sqlite:///{tmpdir}/{name}.db", *server_args]
    process = spawn(cmd, clean_env(STOX_JWT_SECRET=secret, **settings), log)
    return Target(base, "127.0.0.1", port, origin or base, process, log)


async def wait_ready(target: Target, path: str, within: float) -> None:
    """Poll `path` until it answers 200; fail fast if the process exits."""
    client = HttpClient(target.host, target.port, 2.0)
    deadline = now() + within
    try:
        while now() < deadline:
            if target.process is not None and target.process.poll() is not None:
                raise RuntimeError(f"exited with status {target.process.returncode}")
            try:
                status, _ = await client.request("GET", path)
                if status == 200:
                    return
            except TRANSPORT_ERRORS:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"not ready within {within:g}s")
    finally:
        client.close()


def stop(
    process: subprocess.Popen[bytes] | None, grace: float = 10.0, group: bool = False
) -> int | None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit status.

    `group`: the process was spawned with `group=True`; whatever is left of its group
    afterwards (children it did not stop) is killed too.
    """
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: state, ppid, … (Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = _stat(pid)
    try:
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else None
    except (IndexError, ValueError):
        return None


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat(entry.name) if entry.name.isdigit() else None
        if fields and len(fields) > 1 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree: list[int] = []
    todo = [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU time of `pid` and its descendants, with that of the children they have reaped."""
    ticks = 0
    for each in process_tree(pid):  # `pid` first
        fields = _stat(each)
        if fields is None:
            if each == pid:
                return None
            continue  # exited meanwhile
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


def host_busy_seconds() -> float | None:
    """CPU seconds every process on the host has used (all cores), from /proc/stat."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class CpuMeter:
    """CPU used by the server under test, by this load generator and by everything else."""

    pid: int | None
    tree: bool = False  # count the process's children too (the Celery worker's pool)
    server0: float | None = None
    bench0: float = 0.0
    host0: float | None = None
    wall0: float = 0.0
    server: float | None = None
    bench: float | None = None
    others: float | None = None
    wall: float = 0.0

    def _server_cpu(self) -> float | None:
        if not self.pid:
            return None
        return tree_cpu_seconds(self.pid) if self.tree else cpu_seconds(self.pid)

    def start(self) -> None:
        self.server0 = self._server_cpu()
        self.bench0 = time.process_time()
        self.host0 = host_busy_seconds()
        self.wall0 = now()

    def stop(self) -> None:
        self.wall = max(now() - self.wall0, 1e-9)
        server1 = self._server_cpu()
        self.bench = time.process_time() - self.bench0
        host1 = host_busy_seconds()
        if self.server0 is not None and server1 is not None:
            self.server = server1 - self.server0
        if self.host0 is not None and host1 is not None:
            self.others = max(0.0, host1 - self.host0 - self.bench - (self.server or 0.0))

    def describe(self, server_name: str) -> str:
        parts = []
        if self.server is not None:
            parts.append(f"{server_name} {100 * self.server / self.wall:.0f}%")
        if self.bench is not None:
            parts.append(f"load generator {100 * self.bench / self.wall:.0f}%")
        if self.others is not None:
            others = "other processes" if self.pid else f"other processes (with the {server_name})"
            parts.append(f"{others} {100 * self.others / self.wall:.0f}%")
        return ", ".join(parts) + f"  (host has {os.cpu_count()} CPUs)"


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def tree_rss_mib(pid: int) -> float | None:
    """The RSS of `pid` and its descendants added up (shared pages counted in each)."""
    sizes = [rss_mib(each) for each in process_tree(pid)]
    return sum(s for s in sizes if s is not None) if sizes and sizes[0] is not None else None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def tail(path: Path | None, lines: int = 8) -> list[str]:
    if path is None or not path.exists():
        return []
    return path.read_text(errors="replace").splitlines()[-lines:]


def count_lines(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    return len(path.read_text(errors="replace").splitlines())
