"""The embedded store's durability: nothing acknowledged is lost to a SIGKILL during a burst of
writes, the synchronous level is a setting, and a full disk or a read-only data folder is a
clear error and 503s, not a crash loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
from procs import REPO, gateway_config, remote, start_gateway, wait_ready
from support import (
    COMPLETED,
    UPLOAD,
    assert_error,
    completion,
    free_port,
    running_gateway,
    stox_environ,
)

import settings as settings_module
from stox import workflow as w
from stox.app import underlying
from stox.store import StoreError, make_store
from stox.store.sqlite import SQLiteStore, SQLiteUserStore
from stox.store.sqlite_db import SQLiteDatabase

# -- the synchronous level -----------------------------------------------------------------


@pytest.mark.parametrize(("level", "pragma"), [("normal", 1), ("full", 2)])
async def test_the_synchronous_level_is_the_setting(
    tmp_path: Path, level: str, pragma: int
) -> None:
    async with running_gateway(tmp_path, storage__sqlite_synchronous=level) as gw:
        store = underlying(gw.gateway.store)
        assert isinstance(store, SQLiteStore)
        assert store.connection().execute("PRAGMA synchronous").fetchone()[0] == pragma
        users = gw.gateway.auth_server
        assert users is not None
        user_store = users.accounts.store
        assert isinstance(user_store, SQLiteUserStore)
        assert user_store.connection().execute("PRAGMA synchronous").fetchone()[0] == pragma


def test_the_synchronous_level_is_normal_or_full(tmp_path: Path) -> None:
    assert settings_module.load([], {}).storage.sqlite_synchronous == "normal"
    path = tmp_path / "config.yaml"
    path.write_text("storage:\n  sqlite_synchronous: off\n")
    with pytest.raises(
        settings_module.SettingsError, match=r"storage\.sqlite_synchronous: expected"
    ):
        settings_module.load(["--config", str(path)], {})


# -- a full disk -----------------------------------------------------------------------------


BIG = {"name": "Lamp", "description": "x" * 10_000}  # more than any page has free


def fill_up(store: SQLiteStore) -> None:
    """No page more than the file has: SQLite answers every write that needs one `full`."""
    conn = store.connection()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


async def test_a_full_disk_is_503_and_writes_resume_once_there_is_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_gateway(tmp_path) as gw:
        store = underlying(gw.gateway.store)
        assert isinstance(store, SQLiteStore)
        token = gw.token()
        kept = await gw.upload(token)
        fill_up(store)
        with caplog.at_level("WARNING"):
            for _ in range(3):
                response = await gw.fetch("POST", UPLOAD, BIG, token=token)
                assert_error(response, 503, "store_unavailable")
                assert response.headers["Retry-After"] == "1"
        assert "full" in caplog.text  # the operator's log says why
        assert (await gw.status(kept))["status"] == w.RUNNING  # reads go on
        assert (await gw.fetch("GET", "/healthz")).status == 200

        store.connection().execute("PRAGMA max_page_count = 1073741823")
        again = await gw.upload(token, **BIG)
        assert (await gw.status(again))["status"] == w.RUNNING


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB file system (a tmpfs: root only, skipped where it may not mount)."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"root cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


async def test_a_gateway_on_a_full_disk_answers_503_and_keeps_serving(
    tmp_path: Path, small_disk: Path
) -> None:
    port = free_port()
    config = gateway_config(port, "full", f"sqlite:///{small_disk}/stox.db", "")
    client = remote(port)
    token = client.token()
    gateway = start_gateway(tmp_path, "gateway-full", config)
    try:
        await wait_ready(gateway, port)
        accepted: list[str] = []
        statuses: set[int] = set()
        while 503 not in statuses:
            assert len(accepted) < 1000, "the disk never filled up"
            response = await client.fetch("POST", UPLOAD, BIG, token=token)
            statuses.add(response.status)
            if response.status == 202:
                accepted.append(response.body["workflow_id"])
            else:
                assert_error(response, 503, "store_unavailable")
                assert response.headers["Retry-After"] == "1"
        for _ in range(5):  # each write is refused as cleanly
            response = await client.fetch("POST", UPLOAD, BIG, token=token)
            assert response.status in (202, 503), response.body
        assert statuses == {202, 503}
        assert gateway.popen.poll() is None  # still serving
        assert (await client.fetch("GET", "/healthz")).status == 200
        assert (await client.status(accepted[0]))["status"] == w.RUNNING  # reads go on
    finally:
        gateway.stop()
    log = gateway.log()
    assert "store unavailable: SQLite: database or disk is full" in log
    assert "Traceback" not in log


# -- a read-only data folder -----------------------------------------------------------------


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A folder holding a database file (made by a store), which this process cannot write:
    by its mode, or, for root, whom modes do not stop, by a read-only mount (skipped where
    root may not mount)."""
    folder = tmp_path / "data"
    folder.mkdir()
    if os.geteuid() != 0:
        make_database(folder)
        (folder / "stox.db").chmod(0o444)
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"root cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        make_database(folder)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def make_database(folder: Path) -> None:
    async def make() -> None:
        store = make_store(f"sqlite:///{folder}/stox.db")
        await store.open()
        await store.close()

    asyncio.run(make())
    for leftover in ("stox.db-wal", "stox.db-shm"):
        (folder / leftover).unlink(missing_ok=True)


def test_a_read_only_data_folder_stops_start_up_naming_the_path(read_only: Path) -> None:
    port = free_port()
    config = gateway_config(port, "ro", f"sqlite:///{read_only}/stox.db", "")
    path = read_only.parent / "ro.yaml"
    path.write_text(config)
    result = subprocess.run(
        [sys.executable, "server.py", "--config", str(path)],
        cwd=REPO,
        env=stox_environ(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert f"stox: cannot start: the SQLite database '{read_only}/stox.db'" in result.stderr
    assert "read-only" in result.stderr
    assert "Traceback" not in result.stderr


async def test_opening_a_read_only_database_names_it(read_only: Path) -> None:
    store = make_store(f"sqlite:///{read_only}/stox.db")
    with pytest.raises(StoreError, match="read-only") as raised:
        await store.open()
    assert str(read_only) in str(raised.value)


# -- SIGKILL during a burst of writes ----------------------------------------------------------


@pytest.mark.parametrize("level", ["normal", "full"])
async def test_a_sigkill_during_a_burst_loses_no_acknowledged_transition(
    tmp_path: Path, level: str
) -> None:
    """Uploads and reports in flight together; the gateway is killed once some have been
    answered. After a restart on the same file every upload answered 202 is there, and every
    report answered 200 is applied (its step completed by that attempt)."""
    port = free_port()
    url = f"sqlite:///{tmp_path}/stox.db"
    config = gateway_config(port, "burst", url, "").replace(
        f"  url: {url}\n", f"  url: {url}\n  sqlite_synchronous: {level}\n"
    )
    assert f"sqlite_synchronous: {level}" in config
    client = remote(port)
    token, service = client.token(), client.service_token()
    first = start_gateway(tmp_path, "gateway-1", config)
    uploaded: list[str] = []
    reported: list[tuple[str, str]] = []
    try:
        await wait_ready(first, port)
        ready = [await client.upload(token) for _ in range(40)]
        steps = [(await client.status(i))["steps"][0] for i in ready]
        enough = asyncio.Event()

        async def upload(i: int) -> None:
            response = await client.fetch("POST", UPLOAD, {"name": f"Burst {i}"}, token=token)
            if response.status == 202:
                uploaded.append(response.body["workflow_id"])

        async def report(workflow_id: str, step: dict[str, Any]) -> None:
            body = completion(workflow_id, step["step_id"], step["name"])
            response = await client.fetch("POST", COMPLETED, body, token=service)
            if response.status == 200:
                assert response.body["result"] == "applied", response.body
                reported.append((workflow_id, step["step_id"]))

        async def guarded(call: Any) -> None:
            # the gateway killed under it: not acknowledged
            with contextlib.suppress(OSError, tornado.httpclient.HTTPClientError):
                await call
            if len(uploaded) >= 10 and len(reported) >= 10:
                enough.set()

        calls = []
        for n, (workflow_id, step) in enumerate(zip(ready, steps, strict=True)):
            calls += [guarded(upload(4 * n + i)) for i in range(4)]  # four uploads, a report
            calls.append(guarded(report(workflow_id, step)))
        burst = asyncio.gather(*calls)
        await enough.wait()
        first.popen.send_signal(signal.SIGKILL)
        first.popen.wait(10)
        await burst
    finally:
        first.kill()
    assert uploaded and reported
    assert len(uploaded) + len(reported) < 200  # killed with writes still in flight

    second = start_gateway(tmp_path, "gateway-2", config)
    try:
        await wait_ready(second, port)
        for workflow_id in uploaded:
            assert (await client.status(workflow_id))["status"] == w.RUNNING
        for workflow_id, step_id in reported:
            step = (await client.status(workflow_id))["steps"][0]
            assert step["status"] == w.COMPLETED, step
            assert [(a["step_id"], a["outcome"]) for a in step["attempts"]] == [
                (step_id, w.COMPLETED)
            ]
        assert integrity(tmp_path / "stox.db") == "ok"
    finally:
        second.stop()


def integrity(path: Path) -> str:
    with closing(sqlite3.connect(path)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


class Deferred(SQLiteDatabase):
    """A table whose foreign key is checked at COMMIT: a commit that fails, as a full disk's
    or a busy file's may."""

    SCHEMA = (
        "PRAGMA foreign_keys = ON",
        "CREATE TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY)",
        "CREATE TABLE IF NOT EXISTS child (parent INTEGER"
        " REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)",
    )


async def test_a_commit_that_fails_leaves_no_transaction_open() -> None:
    db = Deferred(":memory:")
    await db.open()
    try:
        with pytest.raises(StoreError, match="FOREIGN KEY"):
            await db.write(lambda conn: conn.execute("INSERT INTO child VALUES (1)"))
        assert not db.connection().in_transaction
        await db.write(lambda conn: conn.execute("INSERT INTO parent VALUES (1)"))
        assert db.connection().execute("SELECT count(*) FROM parent").fetchone() == (1,)
    finally:
        await db.close()
