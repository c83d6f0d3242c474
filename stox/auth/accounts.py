"""User accounts: register, check a password, read a profile. No gRPC and no HTTP here.

The AuthService serves these over gRPC; `python -m stox user create` calls them directly.
Input is checked with the marshmallow schemas of stox/schemas.py (ValidationError).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from marshmallow import ValidationError

from stox.auth.passwords import Passwords
from stox.auth.tokens import ADMIN, REVIEWER, USER
from stox.schemas import login_schema, register_schema
from stox.store.base import AlreadyExists, UserStore
from stox.workflow import isoformat

ACCOUNT_ROLES = (
    USER,
    ADMIN,
    REVIEWER,
)  # services get tokens from `python -m stox token`, not accounts
PROFILE_FIELDS = ("id", "username", "role", "created_at")


class BadCredentials(Exception):
    """An unknown user name or a wrong password; deliberately not saying which."""


class UnknownUser(LookupError):
    pass


def profile(user: dict[str, Any]) -> dict[str, Any]:
    """What may be shown of a user: never the password hash."""
    return {name: user[name] for name in PROFILE_FIELDS}


class Accounts:
    def __init__(
        self, store: UserStore, passwords: Passwords, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.passwords = passwords
        self.clock = clock

    async def register(self, username: str, password: str, role: str = USER) -> dict[str, Any]:
        """The new user's profile; ValidationError for bad input, AlreadyExists for a taken name,
        Busy when too many registrations are hashing already.

        A taken name is refused before the password is hashed (registering says "taken"
        anyway, so asking first reveals nothing more); the unique index still decides races.
        """
        data = register_schema.load({"username": username, "password": password})
        if role not in ACCOUNT_ROLES:
            raise ValidationError(f"one of {', '.join(ACCOUNT_ROLES)}", "role")
        if await self.store.user_by_name(data["username"]) is not None:
            raise AlreadyExists("user already exists")
        user = {
            "id": uuid.uuid4().hex,
            "username": data["username"],
            "password_hash": await self.passwords.hash(data["password"]),
            "role": role,
            "created_at": isoformat(self.clock()),
        }
        await self.store.insert_user(user)
        return profile(user)

    async def authenticate(self, username: str, password: str) -> dict[str, Any]:
        """The profile of the user whose password this is; BadCredentials otherwise.

        An unknown user costs a password verification too, so the two failures take as long.
        """
        data = login_schema.load({"username": username, "password": password})
        user = await self.store.user_by_name(data["username"])
        if user is None:
            await self.passwords.verify_nobody(data["password"])
            raise BadCredentials
        if not await self.passwords.verify(user["password_hash"], data["password"]):
            raise BadCredentials
        if self.passwords.needs_rehash(user["password_hash"]):  # the costs were raised
            new_hash = await self.passwords.rehash(data["password"])
            await self.store.set_password_hash(user["id"], new_hash)
        return profile(user)

    async def profile(self, user_id: str) -> dict[str, Any]:
        user = await self.store.user_by_id(user_id)
        if user is None:
            raise UnknownUser(user_id)
        return profile(user)
