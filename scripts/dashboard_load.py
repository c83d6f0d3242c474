"""A live gateway under a moderate, mixed load, and its /metrics scraped as Prometheus would.

For scripts/render_dashboard.py: `server.py --demo-workers` on a free port, with a pipeline
that makes every panel move (an AI step whose deadline the slower demo answers miss, so
attempts time out, are retried, and their late reports are stale; an SEO step with one
attempt, so the demo workers' simulated outages fail workflows). Meanwhile uploads arrive at a
steady rate (a few of them invalid, a few without a token), workflows are read, listed,
cancelled and retried, reports are sent twice, and WebSocket watchers come and go.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import tornado.httpclient
import tornado.websocket

REPO = Path(__file__).resolve().parent.parent
SECRET = "render-dashboard-" + "x" * 32
CONFIG = """\
server:
  sweep_interval: 100ms
  relay_interval: 2s
pipeline:
  steps:
    - {name: image_processing, timeout: 10s, max_attempts: 3, backoff: 500ms}
    - {name: ai_enhancement, timeout: 1400ms, max_attempts: 3, backoff: 500ms}
    - {name: seo_generation, timeout: 10s, max_attempts: 1}
"""
Scrape = tuple[float, str]  # (unix time, exposition text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """`server.py --demo-workers` in a process of its own, on a free port, in a temporary
    folder (its SQLite file, settings and log)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="stox-render-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("STOX_")}
        self.env |= {"STOX_JWT_SECRET": SECRET, "STOX_CONFIG": str(self.folder / "stox.yaml")}
        (self.folder / "stox.yaml").write_text(CONFIG)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["server.py", "--demo-workers", "--port", str(self.port), "--log-level", "warning"]
        args += ["--storage-url", f"sqlite:///{self.folder}/stox.db"]
        with open(self.folder / "gateway.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, *args], cwd=REPO, env=self.env, stdout=log, stderr=log
            )

    async def ready(self, within: float = 30.0) -> None:
        assert self.process is not None, "start() first"
        client = tornado.httpclient.AsyncHTTPClient()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited; see {self.folder / 'gateway.log'}")
            with suppress(OSError, tornado.httpclient.HTTPClientError):
                await client.fetch(self.url + "/readyz", request_timeout=2)
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the gateway did not get ready in {within:g} s")

    def token(self, *who: str) -> str:
        """`python -m stox token …` against the gateway's own settings."""
        out = subprocess.run(
            [sys.executable, "-m", "stox", "token", *who],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


class Load:
    """The clients' side: `rate` uploads a second and the rest in proportion."""

    def __init__(self, gateway: Gateway, rate: float, seed: int = 7) -> None:
        self.gateway = gateway
        self.rate = rate
        self.rng = random.Random(seed)
        self.client = tornado.httpclient.AsyncHTTPClient(max_clients=50)
        self.user = gateway.token("--user", "alice")
        self.service = gateway.token("--service", "render")
        self.workflows: list[str] = []
        self.sockets: list[tornado.websocket.WebSocketClientConnection] = []
        self.readers: set[asyncio.Task[None]] = set()

    async def call(self, method: str, path: str, body: Any = None, token: str | None = "") -> Any:
        headers = {"Content-Type": "application/json"}
        token = self.user if token == "" else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
        response = await self.client.fetch(
            self.gateway.url + path,
            method=method,
            headers=headers,
            body=data if method == "POST" else None,
            raise_error=False,
            request_timeout=20,
        )
        return json.loads(response.body) if response.body and response.code < 300 else None

    async def upload(self) -> None:
        roll = self.rng.random()
        if roll < 0.04:  # a 400: the price is not a number
            await self.call("POST", "/api/v1/workflow/upload", {"name": "Mug", "price": "cheap"})
            return
        if roll < 0.06:  # a 401
            await self.call("POST", "/api/v1/workflow/upload", {"name": "Mug"}, token=None)
            return
        product = {
            "name": f"Mug {self.rng.randrange(1000)}",
            "description": "A stoneware mug.",
            "category": "Kitchen",
            "price": 12.5,
            "images": ["mug-front.jpg"],
        }
        answer = await self.call("POST", "/api/v1/workflow/upload", product)
        if answer is None:
            return
        self.workflows.append(answer["workflow_id"])
        if self.rng.random() < 0.04:
            await asyncio.sleep(self.rng.uniform(0.1, 1.0))
            await self.call(
                "POST", "/api/v1/workflow/cancel", {"workflow_id": answer["workflow_id"]}
            )

    async def read(self) -> None:
        if self.workflows:
            workflow_id = self.rng.choice(self.workflows[-50:])
            await self.call("GET", f"/api/v1/workflow/status?workflow_id={workflow_id}")
        if self.rng.random() < 0.3:
            await self.call("GET", "/api/v1/workflow/list?limit=20")

    async def retry_failed(self) -> None:
        page = await self.call("GET", "/api/v1/workflow/list?status=failed&limit=5")
        for doc in (page or {}).get("workflows", [])[:2]:
            await self.call("POST", "/api/v1/workflow/retry", {"workflow_id": doc["id"]})

    async def report_again(self) -> None:
        """A service repeating its report on a completed step (answered as a duplicate)."""
        page = await self.call("GET", "/api/v1/workflow/list?status=completed&limit=20")
        docs = (page or {}).get("workflows", [])
        if docs:
            doc = self.rng.choice(docs)
            step = self.rng.choice(doc["steps"])
            report = {
                "workflow_id": doc["id"],
                "step_id": step["step_id"],
                "step_type": step["name"],
                "success": True,
                "result": step["result"],
            }
            await self.call("POST", "/api/v1/workflow/step-completed", report, token=self.service)

    async def watch(self) -> None:
        """One more dashboard watching alice's workflows (it reads everything it is sent)."""
        request = tornado.httpclient.HTTPRequest(
            self.gateway.url.replace("http", "ws") + "/ws",
            headers={"Origin": self.gateway.url},
        )
        watcher = await tornado.websocket.websocket_connect(
            request, subprotocols=["bearer", self.user]
        )
        self.sockets.append(watcher)

        async def drain() -> None:
            while await watcher.read_message() is not None:
                pass

        reader = asyncio.ensure_future(drain())
        self.readers.add(reader)
        reader.add_done_callback(self.readers.discard)

    async def run(self, seconds: float) -> None:
        """The load for `seconds`: watchers open at 0, ⅓ and ½ of the run, one closes at ¾."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks: set[asyncio.Task[None]] = set()
        schedule: list[tuple[float, Callable[[], Awaitable[None]]]] = [
            (0.0, self.watch),
            (seconds / 3, self.watch),
            (seconds / 2, self.watch),
        ]
        every = [
            (1 / self.rate, self.upload),
            (0.5, self.read),
            (4.0, self.retry_failed),
            (1.5, self.report_again),
        ]
        due = {action: start for _, action in every}
        closed = False
        while (now := loop.time()) < start + seconds:
            while schedule and start + schedule[0][0] <= now:
                tasks.add(asyncio.ensure_future(schedule.pop(0)[1]()))
            if not closed and now >= start + seconds * 0.75 and self.sockets:
                self.sockets.pop(0).close()
                closed = True
            for interval, action in every:
                if due[action] <= now:
                    due[action] += interval * self.rng.uniform(0.5, 1.5)
                    tasks.add(asyncio.ensure_future(action()))
            tasks = {task for task in tasks if not task.done()}
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)
        for watcher in self.sockets:
            watcher.close()


async def scrape_while(url: str, interval: float, work: Awaitable[None]) -> list[Scrape]:
    """GET `url` every `interval` seconds until `work` is done (and once after)."""
    client = tornado.httpclient.AsyncHTTPClient()
    scrapes: list[Scrape] = []

    async def once() -> None:
        response = await client.fetch(url, request_timeout=10)
        scrapes.append((time.time(), response.body.decode()))

    task = asyncio.ensure_future(work)
    while not task.done():
        await once()
        await asyncio.wait([task], timeout=interval)
    await task
    await once()
    return scrapes


async def run_and_scrape(seconds: float, rate: float, interval: float) -> tuple[list[Scrape], str]:
    """Scrapes of a live gateway under the load; and the gateway's `instance` (host:port)."""
    gateway = Gateway()
    try:
        gateway.start()
        await gateway.ready()
        load = Load(gateway, rate)
        scrapes = await scrape_while(gateway.url + "/metrics", interval, load.run(seconds))
        return scrapes, f"127.0.0.1:{gateway.port}"
    finally:
        gateway.stop()
