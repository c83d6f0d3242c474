"""Hashing capacity under a registration flood: registrations hash on a bounded share of their
own, so logins never wait behind them; a taken name costs no hash; registrations are limited
per client address. Counted, not timed: registration hashes are held on an Event."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import tornado.httpclient
from argon2 import PasswordHasher
from support import RunningGateway, auth_answer, eventually, running_gateway

from settings import Duration
from stox.auth.client import AuthClient
from stox.auth.passwords import REGISTRATION_QUEUE, REGISTRATION_WORKERS, Busy, Passwords

REGISTER = "/api/v1/auth/register"
LOGIN = "/api/v1/auth/login"
PASSWORD = "correct horse battery staple"
SLOTS = REGISTRATION_WORKERS + REGISTRATION_QUEUE  # registrations hashing or waiting to


class GatedHasher(PasswordHasher):
    """A PasswordHasher like `like` whose hash() waits for `release` (once it is cleared) and
    counts its calls; verify() is untouched."""

    def __init__(self, like: PasswordHasher) -> None:
        super().__init__(
            time_cost=like.time_cost,
            memory_cost=like.memory_cost,
            parallelism=like.parallelism,
            hash_len=like.hash_len,
            salt_len=like.salt_len,
            type=like.type,
        )
        self.release = threading.Event()
        self.release.set()
        self._calls = itertools.count()  # next() is atomic: hash() runs on worker threads
        self.calls = 0

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        self.calls = next(self._calls) + 1
        self.release.wait(timeout=30)  # bounded, so a failing test cannot strand a thread
        return super().hash(password, salt=salt)


def gate(passwords: Passwords) -> GatedHasher:
    gated = GatedHasher(passwords.hasher)
    passwords.hasher = gated
    return gated


# -- Passwords --------------------------------------------------------------------------------


async def test_verifications_do_not_wait_behind_registration_hashes(passwords: Passwords) -> None:
    stored = await passwords.hash(PASSWORD)
    gated = gate(passwords)
    gated.release.clear()
    try:
        held = [asyncio.ensure_future(passwords.hash(f"new password {i}")) for i in range(SLOTS)]
        await eventually(lambda: gated.calls == REGISTRATION_WORKERS)
        with pytest.raises(Busy):  # every slot is taken: refused at once, never queued
            await passwords.hash("one too many")

        verifications = [
            asyncio.ensure_future(passwords.verify(stored, PASSWORD)) for _ in range(20)
        ]
        done, pending = await asyncio.wait(verifications, timeout=15)  # a bound against hanging
        assert not pending, f"{len(pending)} verifications waited behind registrations"
        assert all(task.result() for task in done)
        assert not any(task.done() for task in held)
    finally:
        gated.release.set()
    assert all(made.startswith("$argon2id$") for made in await asyncio.gather(*held))
    assert gated.calls == SLOTS  # the refused one was never hashed
    await passwords.hash("there is room again")


async def test_a_registration_cancelled_while_it_waits_frees_its_slot(passwords: Passwords) -> None:
    gated = gate(passwords)
    gated.release.clear()
    try:
        held = [asyncio.ensure_future(passwords.hash(f"new password {i}")) for i in range(SLOTS)]
        await eventually(lambda: gated.calls == REGISTRATION_WORKERS)
        held[-1].cancel()  # waiting, not yet hashing: its slot is free at once
        with pytest.raises(asyncio.CancelledError):
            await held[-1]
        replacement = asyncio.ensure_future(passwords.hash("in its place"))
        await asyncio.sleep(0)
        assert not replacement.done()  # queued, not refused
    finally:
        gated.release.set()
    await asyncio.gather(replacement, *held[:-1])


# -- through the gateway ----------------------------------------------------------------------


async def register_status(auth: AuthClient, username: str, address: str) -> int:
    """The HTTP status the register handler would answer."""
    return await auth_answer(auth.register(username, PASSWORD, address), 201)


async def test_logins_answer_while_every_registration_slot_is_held(tmp_path: Path) -> None:
    alice = {"username": "alice", "password": PASSWORD}
    async with running_gateway(tmp_path, auth__timeout=Duration(30)) as gw:
        assert (await gw.fetch("POST", REGISTER, alice)).status == 201
        assert gw.gateway.auth_server is not None
        gated = gate(gw.gateway.auth_server.passwords)
        gated.release.clear()
        auth = gw.gateway.auth
        try:
            flood = [
                asyncio.ensure_future(
                    register_status(auth, f"user{i}", f"10.3.{i // 200}.{i % 200}")
                )
                for i in range(SLOTS + 5)
            ]
            # the five past the bound are refused promptly, while the others wait for the gate
            await eventually(lambda: sum(task.done() for task in flood) == 5)
            assert sorted(task.result() for task in flood if task.done()) == [503] * 5

            logins = [
                asyncio.ensure_future(auth.login("alice", PASSWORD, f"10.4.0.{i}"))
                for i in range(20)
            ]
            done, pending = await asyncio.wait(logins, timeout=15)  # a bound against hanging
            assert not pending, f"{len(pending)} logins waited behind registrations"
            assert all(task.result()["token_type"] == "bearer" for task in done)

            busy = await gw.fetch("POST", REGISTER, {"username": "bob", "password": PASSWORD})
            assert busy.status == 503 and busy.headers["Retry-After"] == "1"
            assert busy.body["error"] == {
                "code": "auth_busy",
                "message": "too many registrations at once; try again shortly",
            }
            assert (await gw.fetch("POST", LOGIN, alice)).status == 200
            assert sum(task.done() for task in flood) == 5
        finally:
            gated.release.set()
        assert sorted(await asyncio.gather(*flood)) == [201] * SLOTS + [503] * 5
        assert gated.calls == SLOTS


async def test_a_flood_of_registrations_of_a_taken_name_hashes_nothing(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, auth__max_registrations=0) as gw:
        taken = {"username": "alice", "password": PASSWORD}
        assert (await gw.fetch("POST", REGISTER, taken)).status == 201
        assert gw.gateway.auth_server is not None
        gated = gate(gw.gateway.auth_server.passwords)

        client = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=64)
        try:

            async def post(path: str, body: dict[str, str]) -> int:
                request = tornado.httpclient.HTTPRequest(
                    gw.base_url + path, method="POST", body=json.dumps(body), request_timeout=20
                )
                return (await client.fetch(request, raise_error=False)).code

            flood = [post(REGISTER, {**taken, "password": f"guess number {i}"}) for i in range(40)]
            logins = [post(LOGIN, taken) for _ in range(10)]
            statuses = await asyncio.gather(*flood, *logins)
        finally:
            client.close()
        assert statuses == [409] * 40 + [200] * 10
        assert gated.calls == 0


# -- registrations per address ----------------------------------------------------------------


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with running_gateway(tmp_path, auth__max_registrations=3) as gateway:
        yield gateway


async def test_registrations_from_one_address_are_limited(gw: RunningGateway) -> None:
    for name in ("alice", "bob"):
        body = {"username": name, "password": PASSWORD}
        assert (await gw.fetch("POST", REGISTER, body)).status == 201
    taken = await gw.fetch("POST", REGISTER, {"username": "alice", "password": PASSWORD})
    assert taken.status == 409  # counts too: each costs the service a look-up

    limited = await gw.fetch("POST", REGISTER, {"username": "carol", "password": PASSWORD})
    assert limited.status == 429 and limited.body["error"]["code"] == "too_many_attempts"
    assert limited.body["error"]["message"] == (
        "too many registrations from this address; try again later"
    )
    assert 0 < int(limited.headers["Retry-After"]) <= 3600
    bad = await gw.fetch("POST", REGISTER, {"username": "x", "password": PASSWORD})
    assert bad.status == 400  # the input is checked before the limit
    assert (await gw.fetch("POST", LOGIN, {"username": "bob", "password": PASSWORD})).status == 200


async def test_another_address_still_registers(gw: RunningGateway) -> None:
    auth = gw.gateway.auth
    statuses = [await register_status(auth, f"user{i}", "203.0.113.9") for i in range(4)]
    assert statuses == [201, 201, 201, 429]
    assert await register_status(auth, "carol", "198.51.100.4") == 201
