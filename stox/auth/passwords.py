"""Password hashing with argon2id (argon2-cffi), on worker threads so the IOLoop never waits.

The costs come from settings (`auth.hash_*`); their defaults are RFC 9106's recommended
argon2id parameters. A login for a user that does not exist verifies the password against a
dummy hash made with the same costs, so it takes as long as a wrong password for a real user.

Registrations hash on threads of their own, with a bounded queue in front: a flood of them
is refused (Busy) rather than let logins wait behind it.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from settings import AuthSettings

T = TypeVar("T")
# each hash holds hash_memory_cost of memory while it runs: at most 4 + 1 run at once
HASH_WORKERS = 4  # verifications, and the rehash of a login
REGISTRATION_WORKERS = 1  # new accounts' hashes
REGISTRATION_QUEUE = 8  # registrations that may wait for those (a few hash times); more are refused


class Busy(Exception):
    """Every registration slot is taken: hashing more would delay logins or eat memory."""


class Passwords:
    def __init__(self, time_cost: int, memory_cost: int, parallelism: int) -> None:
        self.hasher = PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._executor: ThreadPoolExecutor | None = None
        self._registrations: ThreadPoolExecutor | None = None
        self._registration_slots = threading.BoundedSemaphore(
            REGISTRATION_WORKERS + REGISTRATION_QUEUE
        )
        self._dummy_hash = ""

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> Passwords:
        return cls(auth.hash_time_cost, auth.hash_memory_cost, auth.hash_parallelism)

    async def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(HASH_WORKERS, thread_name_prefix="stox-argon2")
            self._registrations = ThreadPoolExecutor(
                REGISTRATION_WORKERS, thread_name_prefix="stox-argon2-register"
            )
            self._dummy_hash = await self.rehash(secrets.token_urlsafe(16))

    def close(self) -> None:
        executors = (self._executor, self._registrations)
        self._executor = self._registrations = None
        for executor in executors:
            if executor is not None:
                executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._executor is None:
            raise RuntimeError("Passwords.start() has not run")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def hash(self, password: str) -> str:
        """A new account's hash, on the registrations' threads; Busy when their queue is full."""
        executor, slots = self._registrations, self._registration_slots
        if executor is None:
            raise RuntimeError("Passwords.start() has not run")
        if not slots.acquire(blocking=False):
            raise Busy
        # the slot is free again when the hash is done, or when it is cancelled before it runs
        future = executor.submit(self.hasher.hash, password)
        future.add_done_callback(lambda _: slots.release())
        return await asyncio.wrap_future(future)

    async def rehash(self, password: str) -> str:
        """A hash on the verifications' threads: a login's new hash when the costs changed."""
        return await self._run(self.hasher.hash, password)

    async def verify(self, password_hash: str, password: str) -> bool:
        """True when `password` matches; False when it does not or the hash is unusable."""
        return await self._run(self._verify_sync, password_hash, password)

    def _verify_sync(self, password_hash: str, password: str) -> bool:
        try:
            return self.hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    async def verify_nobody(self, password: str) -> None:
        """The work of a verification, for a user that does not exist; always fails."""
        await self.verify(self._dummy_hash, password)

    def needs_rehash(self, password_hash: str) -> bool:
        """True when the hash was made with other costs than the configured ones."""
        try:
            return self.hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return False
