"""The UserStore contract: every test runs on every store (SQLite, MongoDB via `store_url`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from stox.store import AlreadyExists, StoreError, UserStore, make_store, make_user_store


def user(username: str = "alice", **fields: Any) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "username": username,
        "password_hash": "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA",
        "role": "user",
        "created_at": "2026-01-01T00:00:00.123456Z",
        **fields,
    }


@pytest.fixture
async def users(store_url: str) -> AsyncIterator[UserStore]:
    opened = make_user_store(store_url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def test_a_user_is_found_by_id_and_by_name(users: UserStore) -> None:
    alice = user("alice", role="admin")
    await users.insert_user(alice)
    await users.insert_user(user("bob"))

    assert await users.user_by_id(alice["id"]) == alice
    assert await users.user_by_name("alice") == alice
    assert await users.user_by_name("carol") is None
    assert await users.user_by_id(uuid.uuid4().hex) is None
    assert await users.user_by_name("ALICE") is None  # names are exact


async def test_a_taken_user_name_is_refused(users: UserStore) -> None:
    first = user("alice")
    await users.insert_user(first)
    with pytest.raises(AlreadyExists):
        await users.insert_user(user("alice"))
    with pytest.raises(AlreadyExists):
        await users.insert_user(user("bob", id=first["id"]))
    assert await users.user_by_name("alice") == first
    assert await users.user_by_name("bob") is None


async def test_concurrent_registrations_of_one_name_leave_one_user(users: UserStore) -> None:
    candidates = [user("alice") for _ in range(8)]
    results = await asyncio.gather(
        *(users.insert_user(c) for c in candidates), return_exceptions=True
    )
    winners = [c for c, r in zip(candidates, results, strict=True) if r is None]
    assert len(winners) == 1
    assert all(isinstance(r, AlreadyExists) for r in results if r is not None)
    assert await users.user_by_name("alice") == winners[0]


async def test_a_password_hash_is_replaced(users: UserStore) -> None:
    alice = user("alice")
    await users.insert_user(alice)
    await users.set_password_hash(alice["id"], "$argon2id$new")
    stored = await users.user_by_name("alice")
    assert stored == {**alice, "password_hash": "$argon2id$new"}


async def test_users_outlive_the_connection_and_sit_beside_workflows(store_url: str) -> None:
    alice = user("alice")
    first = make_user_store(store_url)
    await first.open()
    await first.insert_user(alice)
    await first.close()

    workflows = make_store(store_url)  # the same database serves both
    await workflows.open()
    again = make_user_store(store_url)
    await again.open()
    try:
        await again.open()  # idempotent
        await again.ping()
        assert await again.user_by_name("alice") == alice
        assert await workflows.list_workflows(owner=None, status=None, limit=10) == []
    finally:
        await again.close()
        await workflows.close()


async def test_a_closed_store_raises_store_error(store_url: str) -> None:
    users = make_user_store(store_url)
    with pytest.raises(StoreError):
        await users.ping()
    await users.open()
    await users.close()
    with pytest.raises(StoreError):
        await users.user_by_name("alice")
