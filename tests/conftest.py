"""Shared pytest fixtures. Keep each area in its own delimited section."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import uvloop

if TYPE_CHECKING:
    import rabbit
    from support import RunningGateway

    from stox.auth.passwords import Passwords
    from stox.store import WorkflowStore

# ======================================================================================
# Event loops: the tests run on asyncio's loop; those marked `uvloop` on uvloop's too
# ======================================================================================
#
# server.py runs on uvloop (stox/loops.py); the tests that start it cover that loop end to
# end, and the marker runs in-process tests (the gRPC client and a scripted AuthService) on
# both loops, the test id naming the loop.


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if item.get_closest_marker("uvloop") is not None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


# ======================================================================================
# End of event loops
# ======================================================================================


# ======================================================================================
# Stores: `store` runs a test on every WorkflowStore (SQLite, MongoDB)
# ======================================================================================
#
# The MongoDB tests use STOX_TEST_MONGO_URL when set; otherwise one nx-27017 (a MongoDB
# wire-protocol server on SQLite, from PyPI) is started for the session on a free port.
# Every test gets its own database, dropped afterwards.

MONGO_URL_ENV = "STOX_TEST_MONGO_URL"
NX_START_TIMEOUT = 15.0


def _nx_27017_command() -> str:
    beside_python = Path(sys.executable).with_name("nx-27017")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nx-27017")
    if found is None:
        pytest.fail(f"nx-27017 is not installed; install it or set {MONGO_URL_ENV}")
    return found


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + NX_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"nx-27017 exited with code {proc.returncode} before accepting connections:\n"
                + log.read_text(errors="replace")
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(
        f"nx-27017 did not accept connections on 127.0.0.1:{port} within "
        f"{NX_START_TIMEOUT:g}s:\n" + log.read_text(errors="replace")
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def mongo_url_with_database(url: str, database: str) -> str:
    """`url` (`mongodb://hosts[/db][?opts]`) naming `database` instead."""
    scheme, _, rest = url.partition("://")
    hosts, _, path = rest.partition("/")
    _, question, query = path.partition("?")
    if "?" in hosts:  # mongodb://host?opts, without the slash
        hosts, _, query = hosts.partition("?")
        question = "?"
    return f"{scheme}://{hosts}/{database}{question}{query}"


@pytest.fixture(scope="session")
def mongo_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MongoDB URL (no database) for the whole session."""
    configured = os.environ.get(MONGO_URL_ENV)
    if configured:
        yield configured
        return
    from support import free_port

    workdir = tmp_path_factory.mktemp("nx-27017")
    port = free_port()
    log = workdir / "nx-27017.log"
    command = [
        _nx_27017_command(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--db",
        "memory",
        "--log-file",
        str(log),
        "--pid-file",
        str(workdir / "nx-27017.pid"),
    ]
    with open(workdir / "nx-27017.out", "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(proc, port, workdir / "nx-27017.out")
        yield f"mongodb://127.0.0.1:{port}/"
    finally:
        _stop(proc)


@pytest.fixture
def mongo_url(mongo_server_url: str) -> Iterator[str]:
    """A URL naming a fresh database of its own, dropped after the test."""
    from pymongo import MongoClient

    database = f"stox_test_{uuid.uuid4().hex}"
    yield mongo_url_with_database(mongo_server_url, database)
    client: MongoClient[dict[str, object]] = MongoClient(
        mongo_server_url, serverSelectionTimeoutMS=5000
    )
    try:
        client.drop_database(database)
    finally:
        client.close()
    # PyMongo's async monitor can leave a socket to the garbage collector when a client
    # closes mid-check; collect it here rather than have it reported in some later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("mongo", id="mongo", marks=pytest.mark.mongo),
    ]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """`storage.url` of an empty store, once for each kind of store."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'stox.db'}"
    url: str = request.getfixturevalue("mongo_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[WorkflowStore]:
    """An opened, empty WorkflowStore of each kind; closed after the test."""
    from stox.store import make_store

    opened = make_store(store_url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


# ======================================================================================
# End of stores
# ======================================================================================


# ======================================================================================
# RabbitMQ: tests marked `rabbitmq` use a real broker
# ======================================================================================
#
# STOX_TEST_RABBITMQ_URL, or guest@127.0.0.1:5672. With CI=true an unreachable broker fails
# those tests; elsewhere they are skipped, with the reason. Each test gets its own exchange
# and queue-name prefix (`rabbit`), deleted afterwards.

RABBITMQ_URL_ENV = "STOX_TEST_RABBITMQ_URL"


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    import rabbit

    url = os.environ.get(RABBITMQ_URL_ENV) or rabbit.DEFAULT_URL
    problem = rabbit.unreachable(url)
    if problem is not None:
        message = (
            f"RabbitMQ at {rabbit.where(url)} is unreachable ({problem}); start it with "
            f"`rabbitmq-server -detached` or set {RABBITMQ_URL_ENV}"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return url


@pytest.fixture
def rabbit_ns(rabbitmq_url: str) -> Iterator[rabbit.Namespace]:
    import rabbit

    namespace = rabbit.Namespace(rabbitmq_url)
    yield namespace
    namespace.delete()


# ======================================================================================
# End of RabbitMQ
# ======================================================================================


# ======================================================================================
# Auth: password hashing with the cheapest argon2id costs
# ======================================================================================


@pytest.fixture
async def passwords() -> AsyncIterator[Passwords]:
    from stox.auth.passwords import Passwords

    made = Passwords(1, 1024, 1)
    await made.start()
    yield made
    made.close()


# ======================================================================================
# End of auth
# ======================================================================================


# ======================================================================================
# Gateways: `gw`, a real gateway on the test settings (support.running_gateway)
# ======================================================================================
#
# A module that needs other settings defines a `gw` of its own, which takes precedence.


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    from support import running_gateway

    async with running_gateway(tmp_path) as gateway:
        yield gateway


# ======================================================================================
# End of gateways
# ======================================================================================


# ======================================================================================
# The binary: built in the background from the start of the session, its tests run last
# ======================================================================================
#
# PyInstaller takes a minute or more of one core; most of the suite waits on sockets, so the
# build overlaps it instead of adding to the suite's time.

BINARY_TESTS = "test_binary.py"


class BinaryBuild:
    """packaging/build.py (what `make binary` runs) into a folder of the session's own."""

    def __init__(self, base: Path) -> None:
        self.binary = base / "dist" / "stox"
        self.log = base / "build.log"
        root = Path(__file__).resolve().parent.parent
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(root / "packaging" / "build.py"),
                    f"--distpath={base / 'dist'}",
                    f"--workpath={base / 'work'}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait(self, within: float = 600.0) -> Path:
        assert self.proc.wait(within) == 0, self.log.read_text()
        return self.binary


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    binary = [item for item in items if item.path.name == BINARY_TESTS]
    if not binary:
        return
    items[:] = [item for item in items if item.path.name != BINARY_TESTS] + binary
    folder = Path(tempfile.mkdtemp(prefix="stox-binary-"))
    config.stash[_BINARY_BUILD] = BinaryBuild(folder)


def pytest_unconfigure(config: pytest.Config) -> None:
    build = config.stash.get(_BINARY_BUILD, None)
    if build is not None:
        if build.proc.poll() is None:
            build.proc.kill()
            build.proc.wait()
        shutil.rmtree(build.binary.parent.parent, ignore_errors=True)


_BINARY_BUILD = pytest.StashKey[BinaryBuild]()


@pytest.fixture(scope="session")
def built_binary(pytestconfig: pytest.Config) -> Path:
    return pytestconfig.stash[_BINARY_BUILD].wait()


# ======================================================================================
# End of the binary
# ======================================================================================
