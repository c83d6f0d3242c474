"""Accounts and argon2id passwords, below gRPC: registration rules, the dummy hash for
unknown users, rehashing when the costs change."""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from argon2.profiles import RFC_9106_LOW_MEMORY
from marshmallow import ValidationError

from settings import load
from stox.auth.accounts import Accounts, BadCredentials, UnknownUser
from stox.auth.passwords import Passwords
from stox.store import AlreadyExists, UserStore, make_user_store

PASSWORD = "correct horse battery staple"


@pytest.fixture
async def users(tmp_path: Path) -> AsyncIterator[UserStore]:
    store = make_user_store(f"sqlite:///{tmp_path}/stox.db")
    await store.open()
    yield store
    await store.close()


class Counting(Passwords):
    """Passwords that count the verifications and the registrations' hashes it runs."""

    verified: list[str]
    hashed = 0

    async def verify(self, password_hash: str, password: str) -> bool:
        self.verified.append(password_hash)
        return await super().verify(password_hash, password)

    async def hash(self, password: str) -> str:
        self.hashed += 1
        return await super().hash(password)


def test_the_default_costs_are_argon2ids_recommended_ones() -> None:
    hasher = Passwords.from_settings(load([], {}).auth).hasher
    recommended = PasswordHasher.from_parameters(RFC_9106_LOW_MEMORY)
    for name in ("time_cost", "memory_cost", "parallelism", "hash_len", "salt_len", "type"):
        assert getattr(hasher, name) == getattr(recommended, name), name


async def test_register_stores_a_hash_and_shows_only_the_profile(
    users: UserStore, passwords: Passwords
) -> None:
    accounts = Accounts(users, passwords, clock=lambda: 1_767_225_600.0)
    profile = await accounts.register("alice", PASSWORD)
    assert profile == {
        "id": profile["id"],
        "username": "alice",
        "role": "user",
        "created_at": "2026-01-01T00:00:00.000000Z",
    }
    stored = await users.user_by_name("alice")
    assert stored is not None and stored["password_hash"].startswith("$argon2id$")
    assert await accounts.authenticate("alice", PASSWORD) == profile
    assert await accounts.profile(profile["id"]) == profile
    with pytest.raises(UnknownUser):
        await accounts.profile("0" * 32)


async def test_register_checks_its_input(users: UserStore, passwords: Passwords) -> None:
    accounts = Accounts(users, passwords)
    with pytest.raises(ValidationError) as info:
        await accounts.register("x", "short")
    assert set(info.value.messages) == {"username", "password"}
    with pytest.raises(ValidationError):
        await accounts.register("alice", PASSWORD, role="service")
    await accounts.register("alice", PASSWORD, role="admin")
    with pytest.raises(AlreadyExists):
        await accounts.register("alice", PASSWORD)


async def test_a_taken_name_is_refused_without_hashing_the_password(users: UserStore) -> None:
    passwords = Counting(1, 1024, 1)
    await passwords.start()
    try:
        accounts = Accounts(users, passwords)
        await accounts.register("alice", PASSWORD)
        for _ in range(3):
            with pytest.raises(AlreadyExists):
                await accounts.register("alice", "another password entirely")
        assert passwords.hashed == 1
    finally:
        passwords.close()


async def test_a_registration_that_loses_the_race_for_a_name_is_refused_by_the_index(
    users: UserStore, passwords: Passwords, monkeypatch: pytest.MonkeyPatch
) -> None:
    accounts = Accounts(users, passwords)
    await accounts.register("alice", PASSWORD)

    async def not_yet(username: str) -> None:  # as a concurrent registration would see it
        return None

    monkeypatch.setattr(users, "user_by_name", not_yet)
    with pytest.raises(AlreadyExists):
        await accounts.register("alice", PASSWORD)


async def test_an_unknown_user_costs_a_verification_too(users: UserStore) -> None:
    passwords = Counting(1, 1024, 1)
    passwords.verified = []
    await passwords.start()
    try:
        accounts = Accounts(users, passwords)
        await accounts.register("alice", PASSWORD)
        for username in ("alice", "bob"):
            with pytest.raises(BadCredentials):
                await accounts.authenticate(username, "not the password")
        real, dummy = passwords.verified
        assert real.startswith("$argon2id$") and dummy.startswith("$argon2id$")
        # the dummy hash has the same costs, so it takes the same time to check
        assert real.split("$")[3] == dummy.split("$")[3] == "m=1024,t=1,p=1"
    finally:
        passwords.close()


async def test_an_unknown_user_and_a_wrong_password_take_about_as_long(
    users: UserStore,
) -> None:
    passwords = Passwords(2, 16 * 1024, 1)  # slow enough to dominate the store's lookup
    await passwords.start()
    try:
        accounts = Accounts(users, passwords)
        await accounts.register("alice", PASSWORD)

        async def timed(username: str) -> float:
            started = time.perf_counter()
            with pytest.raises(BadCredentials):
                await accounts.authenticate(username, "not the password")
            return time.perf_counter() - started

        samples: dict[str, list[float]] = {"alice": [], "nobody": []}
        for _ in range(5):  # interleaved, so a busy machine slows both alike
            for username, times in samples.items():
                times.append(await timed(username))
        wrong, unknown = (statistics.median(times) for times in samples.values())
        # without the dummy hash an unknown user answers some 50 times faster
        assert 0.25 < unknown / wrong < 4.0, (unknown, wrong)
    finally:
        passwords.close()


async def test_a_hash_made_with_other_costs_is_replaced_at_login(
    users: UserStore, passwords: Passwords
) -> None:
    old = Passwords(1, 512, 1)
    await old.start()
    try:
        await Accounts(users, old).register("alice", PASSWORD)
    finally:
        old.close()
    accounts = Accounts(users, passwords)

    with pytest.raises(BadCredentials):  # a wrong password changes nothing
        await accounts.authenticate("alice", "not the password")
    before = await users.user_by_name("alice")
    assert before is not None and "m=512," in before["password_hash"]

    await accounts.authenticate("alice", PASSWORD)
    after = await users.user_by_name("alice")
    assert after is not None and "m=1024,t=1,p=1" in after["password_hash"]
    assert await accounts.authenticate("alice", PASSWORD)


async def test_a_corrupt_stored_hash_fails_the_login(
    users: UserStore, passwords: Passwords
) -> None:
    accounts = Accounts(users, passwords)
    profile = await accounts.register("alice", PASSWORD)
    await users.set_password_hash(profile["id"], "not a hash")
    with pytest.raises(BadCredentials):
        await accounts.authenticate("alice", PASSWORD)
