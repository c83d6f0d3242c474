"""Stores: the protocols, and `make_store(url)` / `make_user_store(url)` to pick one by URL.

Each backend's URL module (light: a deployment on SQLite never loads PyMongo) declares the
schemes it takes, an example, and where its data lives; settings and the secret file ask
here, and nothing else parses a storage URL.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from stox.store import mongo_url, sqlite_db
from stox.store.base import (
    AlreadyExists,
    IdempotencyKey,
    KeyTaken,
    NewEvent,
    StoreError,
    UserStore,
    WorkflowStore,
)

__all__ = [
    "AlreadyExists",
    "IdempotencyKey",
    "KeyTaken",
    "NewEvent",
    "StoreError",
    "UserStore",
    "WorkflowStore",
    "check_url",
    "data_folder",
    "make_store",
    "make_user_store",
]


@dataclass(frozen=True)
class _Backend:
    urls: ModuleType  # SCHEMES, EXAMPLE, data_folder(url)
    stores: str  # the module of its stores, imported when one is made
    workflows: str
    users: str


_BACKENDS = (
    _Backend(sqlite_db, "stox.store.sqlite", "SQLiteStore", "SQLiteUserStore"),
    _Backend(mongo_url, "stox.store.mongo", "MongoStore", "MongoUserStore"),
)


def check_url(url: str) -> None:
    """ValueError naming the setting and what it takes, unless a backend takes `url`."""
    _checked(url)


def data_folder(url: str) -> Path | None:
    """The folder the store keeps its file in; None when it has none (a server, memory)."""
    return _checked(url)[1]


def make_store(url: str, *, sqlite_synchronous: str = "normal") -> WorkflowStore:
    """`sqlite:///path` (or `sqlite://:memory:`) or `mongodb://…`; `sqlite_synchronous`
    (storage.sqlite_synchronous) applies to SQLite only."""
    return cast(WorkflowStore, _make(url, "workflows", sqlite_synchronous))


def make_user_store(url: str, *, sqlite_synchronous: str = "normal") -> UserStore:
    """The users of the built-in AuthService, in the same database as the workflows."""
    return cast(UserStore, _make(url, "users", sqlite_synchronous))


def _make(url: str, kind: str, sqlite_synchronous: str) -> Any:
    backend, _ = _checked(url)
    cls = _store_class(backend, getattr(backend, kind))
    if backend.urls is sqlite_db:
        return cls.from_url(url, synchronous=sqlite_synchronous)
    return cls.from_url(url)


def _checked(url: str) -> tuple[_Backend, Path | None]:
    """The backend that takes `url`, and its data folder (parsing the URL checks it whole)."""
    for backend in _BACKENDS:
        if url.startswith(backend.urls.SCHEMES):
            try:
                return backend, backend.urls.data_folder(url)
            except ValueError as exc:
                raise ValueError(f"storage.url: {exc}") from None
    expected = " or ".join(backend.urls.EXAMPLE for backend in _BACKENDS)
    raise ValueError(f"storage.url: expected {expected}, got {url!r}")


def _store_class(backend: _Backend, name: str) -> Any:
    """The class; its `from_url` makes the store."""
    return getattr(importlib.import_module(backend.stores), name)
