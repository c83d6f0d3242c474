"""Password hashing with argon2id (argon2-cffi), on worker threads so the IOLoop never waits.

The costs come from settings (`auth.hash_*`); their defaults are RFC 9106's recommended
argon2id parameters. A login for a user that does not exist verifies the password against a
dummy hash made with the same costs, so it takes as long as a wrong password for a real user.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from settings import AuthSettings

T = TypeVar("T")
HASH_WORKERS = 4  # each hash holds hash_memory_cost of memory while it runs


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
        self._dummy_hash = ""

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> Passwords:
        return cls(auth.hash_time_cost, auth.hash_memory_cost, auth.hash_parallelism)

    async def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(HASH_WORKERS, thread_name_prefix="stox-argon2")
            self._dummy_hash = await self.hash(secrets.token_urlsafe(16))

    def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._executor is None:
            raise RuntimeError("Passwords.start() has not run")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def hash(self, password: str) -> str:
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
