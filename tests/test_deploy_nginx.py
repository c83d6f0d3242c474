"""The deployment of deploy/: Debian's nginx (deploy/nginx/stox.conf) in front of two
`server.py` instances on RabbitMQ and one MongoDB (nx-27017), with the AuthService of their
own (`stox auth-service`) and deploy/stox.env's settings, trusted proxies included.

One gateway is SIGKILLed mid-run: requests keep succeeding through nginx, browser-like
watchers through nginx see every version or resync from a snapshot, every workflow
completes, and a timer of the dead instance is fired by the live one. And the login limit
sees each client's own address through nginx, which no client can forge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nginx
import pytest
import rabbit
import tornado.httpclient
import tornado.websocket
from procs import SECRET, Proc, remote, spawn, start_worker, wait_ready
from support import UPLOAD, RunningGateway, eventually, free_port

from stox import workflow as w

pytestmark = [pytest.mark.deploy, pytest.mark.rabbitmq, pytest.mark.mongo]

STEP_TIMEOUT = 10.0  # each step's deadline: the silent step is timed out after this
MAX_LOGIN_FAILURES = 3  # auth.max_login_failures, small so the limit is reached quickly
LOGIN = "/api/v1/auth/login"
PASSWORD = "correct horse battery staple"


def settings_yaml(instance: str, ns: rabbit.Namespace) -> str:
    """What deploy/stox.env leaves out: the test's names and quick timers."""
    steps = "".join(
        f"    - {{name: {step}, timeout: {STEP_TIMEOUT:g}s, max_attempts: 3, backoff: 500ms}}\n"
        for step in rabbit.STEPS
    )
    return (
        f"server:\n  instance_id: {instance}\n  sweep_interval: 100ms\n  relay_interval: 500ms\n"
        + ns.config_yaml()
        + "logging:\n  level: info\n  format: text\n"
        + f"auth:\n  max_login_failures: {MAX_LOGIN_FAILURES}\n"
        + "  hash_time_cost: 1\n  hash_memory_cost: 1024\n  hash_parallelism: 1\n"
        + f"pipeline:\n  steps:\n{steps}"
    )


@dataclass
class Deployment:
    folder: Path
    ns: rabbit.Namespace
    port: int  # nginx's
    gateways: dict[str, tuple[Proc, int]]  # name -> (process, port)
    procs: list[Proc]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def client(self) -> RunningGateway:
        """A client of the deployment: it talks to nginx."""
        return remote(self.port)

    def worker(self, step: str) -> Proc:
        token = self.client.service_token("deploy-worker")
        ns = self.ns
        proc = start_worker(self.folder, ns.url, ns.exchange, ns.prefix, step, token)
        self.procs.append(proc)
        return proc


@contextlib.contextmanager
def stopped_at_exit(procs: list[Proc]) -> Iterator[None]:
    """Stop every process started meanwhile, last first (nginx's workers go with its master
    only when it is stopped, not killed)."""
    try:
        yield
    finally:
        for proc in reversed(procs):
            proc.stop(within=10)


@contextlib.asynccontextmanager
async def deployment(
    tmp_path: Path, ns: rabbit.Namespace, mongo_url: str
) -> AsyncIterator[Deployment]:
    nginx.require_nginx()
    port, auth_port = free_port(), free_port()
    ports = {"gw-a": free_port(), "gw-b": free_port()}
    env = nginx.stox_env(
        STOX_JWT_SECRET=SECRET,
        STOX_STORAGE_URL=mongo_url,
        STOX_RABBITMQ_URL=ns.url,
        STOX_AUTH_ADDR=f"127.0.0.1:{auth_port}",
        STOX_PUBLIC_URL=f"http://127.0.0.1:{port}",
        STOX_ALLOWED_ORIGINS=f"http://127.0.0.1:{port}",
    )
    # what the test relies on comes from the file itself: nginx's address is trusted
    assert env["STOX_TRUSTED_PROXIES"] == "127.0.0.1" and env["STOX_ENV"] == "production"
    procs: list[Proc] = []
    with stopped_at_exit(procs):

        def config(name: str) -> str:
            path = tmp_path / f"{name}.yaml"
            path.write_text(settings_yaml(f"{name}-{ns.prefix[-6:]}", ns))
            return str(path)

        auth = ["-m", "stox", "auth-service", "--port", str(auth_port)]
        procs.append(spawn("auth", [*auth, "--config", config("auth")], tmp_path, **env))
        gateways = {}
        for name, gw_port in ports.items():
            args = ["server.py", "--config", config(name), "--host", "127.0.0.1"]
            proc = spawn(name, [*args, "--port", str(gw_port)], tmp_path, **env)
            procs.append(proc)
            gateways[name] = (proc, gw_port)
        proxy = nginx.start(tmp_path / "nginx", port, (ports["gw-a"], ports["gw-b"]))
        procs.append(proxy)
        await asyncio.gather(*(wait_ready(proc, p, within=60) for proc, p in gateways.values()))
        await wait_ready(proxy, port, 30.0)  # /readyz through nginx
        try:
            yield Deployment(tmp_path, ns, port, gateways, procs)
        except BaseException:  # what each process said, for the report (pytest shows stdout)
            for proc in procs:
                if proc.log_path.exists():
                    tail = proc.log_path.read_text(errors="replace").splitlines()[-40:]
                    print(f"--- {proc.name} ({proc.log_path}), last lines:", *tail, sep="\n")
            print("--- nginx error log:", nginx.error_log(tmp_path / "nginx")[-4000:], sep="\n")
            raise


# -- a browser's view ----------------------------------------------------------------------


@dataclass
class Watcher:
    """The dashboard's socket through nginx, reconnecting (as the page does) when it drops.
    Each session is what one socket brought: (workflow id, version, type), in order."""

    url: str
    token: str
    sessions: list[list[tuple[str, int, str]]] = field(default_factory=list)

    async def run(self) -> None:
        ws_url = self.url.replace("http://", "ws://") + "/ws"
        while True:
            request = tornado.httpclient.HTTPRequest(
                ws_url, headers={"Origin": self.url}, request_timeout=10
            )
            try:
                conn = await tornado.websocket.websocket_connect(
                    request, subprotocols=["bearer", self.token]
                )
            except (OSError, tornado.httpclient.HTTPClientError, tornado.websocket.WebSocketError):
                await asyncio.sleep(0.2)
                continue
            session: list[tuple[str, int, str]] = []
            self.sessions.append(session)
            try:
                while (message := await conn.read_message()) is not None:
                    parsed = json.loads(message)
                    session.append((parsed["workflow_id"], parsed["version"], parsed["type"]))
            finally:
                conn.close()
            await asyncio.sleep(0.2)  # the page's backoff, shortened

    def latest(self, workflow_id: str) -> int:
        return max((v for s in self.sessions for wid, v, _ in s if wid == workflow_id), default=0)

    def caught_up(self, finals: dict[str, int]) -> bool:
        """Whether it has seen each workflow at its final version."""
        return all(self.latest(workflow_id) == final for workflow_id, final in finals.items())

    def out_of_order(self) -> list[str]:
        """Within a session each workflow's versions go up one at a time (one transition may
        bring two messages of one version: a step completed, the next dispatched)."""
        problems = []
        for number, session in enumerate(self.sessions):
            last: dict[str, int] = {}
            for workflow_id, version, kind in session:
                before = last.get(workflow_id)
                if before is not None and not before <= version <= before + 1:
                    problems.append(
                        f"session {number}: {kind} {workflow_id} v{version} after v{before}"
                    )
                last[workflow_id] = version
        return problems

    def unaccounted(self, workflow_id: str, final: int) -> set[int]:
        """The versions up to `final` neither seen nor superseded by a snapshot."""
        covered: set[int] = set()
        for session in self.sessions:
            for wid, version, kind in session:
                if wid == workflow_id:
                    covered |= set(range(1, version + 1)) if kind == "snapshot" else {version}
        return set(range(1, final + 1)) - covered


# -- clients that retry what may be retried ------------------------------------------------


@dataclass
class Traffic:
    ids: list[str] = field(default_factory=list)  # accepted uploads, in order
    upload_retries: list[str] = field(default_factory=list)  # why each was sent again
    polls: int = 0
    polls_after_kill: int = 0
    failed_polls: list[str] = field(default_factory=list)
    killed: bool = False


async def upload(client: RunningGateway, token: str, n: int, traffic: Traffic) -> None:
    """An upload with an Idempotency-Key, sent again with it after an answer that was not
    one (nginx's 502 for a request in flight when its gateway died; a lost connection)."""
    key = uuid.uuid4().hex
    body = {"name": f"Proxied mug {n}", "images": [f"mug-{n}.jpg"]}
    async with asyncio.timeout(60):
        while True:
            try:
                response = await client.fetch(
                    "POST", UPLOAD, body, token=token, headers={"Idempotency-Key": key}
                )
            except (OSError, tornado.httpclient.HTTPClientError) as exc:  # no answer at all
                traffic.upload_retries.append(f"upload {n}: {exc!r}")
            else:
                if response.status == 202:
                    traffic.ids.append(response.body["workflow_id"])
                    return
                assert response.status in (502, 503, 504), (response.status, response.body)
                traffic.upload_retries.append(f"upload {n}: {response.status}")
            await asyncio.sleep(0.2)


async def poll(client: RunningGateway, token: str, traffic: Traffic) -> None:
    """GET every accepted workflow's status through nginx, never retried by the client:
    nginx sends a GET that its gateway could not answer on to the other instance."""
    while True:
        for workflow_id in list(traffic.ids):
            path = f"/api/v1/workflow/status?workflow_id={workflow_id}"
            try:
                response = await client.fetch("GET", path, token=token)
            except (OSError, tornado.httpclient.HTTPClientError) as exc:
                traffic.failed_polls.append(repr(exc))
                continue
            traffic.polls += 1
            traffic.polls_after_kill += traffic.killed
            if response.status != 200:
                traffic.failed_polls.append(f"{response.status} {response.body}")
        await asyncio.sleep(0.05)


# -- one instance killed -------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_two_instances_behind_nginx_survive_one_killed(
    tmp_path: Path, rabbit_ns: rabbit.Namespace, mongo_url: str
) -> None:
    async with deployment(tmp_path, rabbit_ns, mongo_url) as d:
        client, token = d.client, d.client.token()
        gw_a, port_a = d.gateways["gw-a"]
        d.worker("ai_enhancement")
        d.worker("seo_generation")

        # a step whose worker never answers, dispatched by the instance about to die: the
        # test takes its dispatch off the queue before any image worker runs
        silent_id = await remote(port_a).upload(token, name="Silent mug")
        [taken] = await d.ns.drained(d.ns.step_queue("image_processing"), 1, within=20)
        assert taken.payload["workflow_id"] == silent_id and taken.payload["attempt"] == 1
        deadline = taken.payload["deadline"]  # ISO 8601 in UTC: compared as text
        d.worker("image_processing")

        # two watchers through nginx: least_conn puts one on each instance
        watchers = [Watcher(d.url, token) for _ in range(2)]
        watching = [asyncio.ensure_future(watcher.run()) for watcher in watchers]
        await eventually(lambda: all(watcher.latest(silent_id) for watcher in watchers))

        traffic = Traffic()
        uploads = 30
        numbers = iter(range(uploads))

        async def uploader() -> None:
            for n in numbers:
                await upload(client, token, n, traffic)

        async def killer() -> None:
            """SIGKILL gw-a mid-run: uploads in flight, workflows of both instances running,
            the silent one's deadline still ahead (the live instance must be the one to
            fire it)."""
            await eventually(lambda: len(traffic.ids) >= 10, within=60)
            gw_a.popen.send_signal(signal.SIGKILL)
            gw_a.popen.wait(10)
            traffic.killed = True
            assert w.isoformat(time.time()) < deadline, "killed too late to show the timer move"

        polling = asyncio.ensure_future(poll(client, token, traffic))
        try:
            await asyncio.gather(killer(), *(uploader() for _ in range(3)))
            ids = list(traffic.ids)
            docs = await client.wait_finished([silent_id, *ids], within=STEP_TIMEOUT * 4)
        finally:
            polling.cancel()

        # every workflow completed, each upload once (its retries made no second workflow)
        assert {doc["status"] for doc in docs.values()} == {w.COMPLETED}
        listed = await client.fetch("GET", "/api/v1/workflow/list?limit=100", token=token)
        assert len(listed.body["workflows"]) == uploads + 1
        assert traffic.failed_polls == [] and traffic.polls_after_kill > 0

        # the dead instance's timer, fired by the live one: its attempt timed out, the next
        # was dispatched and completed
        attempts = docs[silent_id]["steps"][0]["attempts"]
        assert [(a["attempt"], a["outcome"]) for a in attempts] == [
            (1, w.TIMED_OUT),
            (2, w.COMPLETED),
        ]
        assert attempts[0]["step_id"] == taken.payload["step_id"]

        # the watchers: the one on the dead instance reconnected through nginx and resynced
        # from a snapshot; both saw every version, in order, or one superseding it
        finals = {workflow_id: doc["version"] for workflow_id, doc in docs.items()}
        await eventually(lambda: all(watcher.caught_up(finals) for watcher in watchers))
        for task in watching:
            task.cancel()
        for watcher in watchers:
            assert watcher.out_of_order() == []
            for workflow_id, final in finals.items():
                assert watcher.unaccounted(workflow_id, final) == set(), workflow_id
        moved, stayed = sorted(watchers, key=lambda watcher: len(watcher.sessions), reverse=True)
        assert len(moved.sessions) >= 2, "the watcher on the killed instance never reconnected"
        assert moved.sessions[1][0][2] == "snapshot", "its new socket did not start from one"
        if len(stayed.sessions) == 1:  # on the live instance throughout: it saw each version
            assert all(kind != "snapshot" for wid, _, kind in stayed.sessions[0] if wid in ids)

        # nginx found the dead instance by itself (passive health) and left it out
        assert "upstream server temporarily disabled" in nginx.error_log(d.folder / "nginx")
        print(f"upload retries: {traffic.upload_retries}, status polls: {traffic.polls}")


# -- the client's address, through nginx -----------------------------------------------------


async def login(url: str, source: str, password: str, **headers: str) -> int:
    """A login of `carol` through nginx, connecting from the local address `source`."""
    request = tornado.httpclient.HTTPRequest(
        url + LOGIN,
        method="POST",
        body=json.dumps({"username": "carol", "password": password}),
        headers=headers,
        network_interface=source,
        request_timeout=20,
    )
    response = await tornado.httpclient.AsyncHTTPClient().fetch(request, raise_error=False)
    return response.code


async def exhaust(url: str, source: str, **headers: str) -> list[int]:
    """Wrong passwords from `source` until every instance refuses (each counts on its own:
    the limits are per instance): the answers, ending in four 429s in a row."""
    codes: list[int] = []
    while codes[-4:] != [429] * 4:
        assert len(codes) < 4 * MAX_LOGIN_FAILURES + 8, codes
        codes.append(await login(url, source, "wrong password", **headers))
    assert codes[:MAX_LOGIN_FAILURES] == [401] * MAX_LOGIN_FAILURES, codes
    assert set(codes) == {401, 429}, codes
    return codes


async def test_the_login_limit_sees_each_client_through_nginx_and_cannot_be_forged(
    tmp_path: Path, rabbit_ns: rabbit.Namespace, mongo_url: str
) -> None:
    async with deployment(tmp_path, rabbit_ns, mongo_url) as d:
        register = await d.client.fetch(
            "POST", "/api/v1/auth/register", {"username": "carol", "password": PASSWORD}
        )
        assert register.status == 201, register.body

        # 127.0.0.2 exhausts its limit; carol at 127.0.0.3 still signs in: the gateways see
        # the two apart, though nginx (127.0.0.1) is the only peer they have
        await exhaust(d.url, "127.0.0.2")
        for _ in range(4):  # on both instances
            assert await login(d.url, "127.0.0.2", PASSWORD) == 429
            assert await login(d.url, "127.0.0.3", PASSWORD) == 200

        # what a client writes itself changes nothing: nginx appends the address it saw,
        # and the gateway takes the right-most address that is not a trusted proxy
        for forged in ("127.0.0.3", "127.0.0.1", "203.0.113.9, 127.0.0.3"):
            for _ in range(2):
                headers = {"X-Forwarded-For": forged, "X-Real-IP": forged.split(",")[-1]}
                assert await login(d.url, "127.0.0.2", PASSWORD, **headers) == 429

        # nor can failures be pinned on another address: 127.0.0.4's, sent as 127.0.0.5's,
        # count against 127.0.0.4
        await exhaust(d.url, "127.0.0.4", **{"X-Forwarded-For": "127.0.0.5"})
        for _ in range(4):
            assert await login(d.url, "127.0.0.4", PASSWORD) == 429
            assert await login(d.url, "127.0.0.5", PASSWORD) == 200
