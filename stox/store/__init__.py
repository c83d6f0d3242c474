"""Stores: the protocols, and `make_store(url)` / `make_user_store(url)` to pick one by URL."""

from __future__ import annotations

from typing import cast

from stox.store.base import AlreadyExists, NewEvent, StoreError, UserStore, WorkflowStore

__all__ = [
    "AlreadyExists",
    "NewEvent",
    "StoreError",
    "UserStore",
    "WorkflowStore",
    "make_store",
    "make_user_store",
]


def make_store(url: str) -> WorkflowStore:
    """`sqlite:///path` (or `sqlite://:memory:`) or `mongodb://…`."""
    return cast(WorkflowStore, _by_url(url, users=False))


def make_user_store(url: str) -> UserStore:
    """The users of the built-in AuthService, in the same database as the workflows."""
    return cast(UserStore, _by_url(url, users=True))


def _by_url(url: str, *, users: bool) -> object:
    # imported here: a SQLite deployment never loads PyMongo
    if url.startswith("sqlite:"):
        from stox.store import sqlite

        return (sqlite.SQLiteUserStore if users else sqlite.SQLiteStore).from_url(url)
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from stox.store import mongo

        return (mongo.MongoUserStore if users else mongo.MongoStore).from_url(url)
    raise ValueError(f"storage.url: expected sqlite:///PATH or mongodb://…, got {url!r}")
