"""Workflow stores: the protocol, and `open_store(url)` to pick one by URL."""

from __future__ import annotations

from stox.store.base import AlreadyExists, StoreError, WorkflowStore

__all__ = ["AlreadyExists", "StoreError", "WorkflowStore", "make_store"]


def make_store(url: str) -> WorkflowStore:
    """`sqlite:///path` (or `sqlite://:memory:`) or `mongodb://…`."""
    if url.startswith("sqlite:"):
        from stox.store.sqlite import SQLiteStore

        return SQLiteStore.from_url(url)
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from stox.store.mongo import MongoStore

        return MongoStore.from_url(url)
    raise ValueError(f"storage.url: expected sqlite:///PATH or mongodb://…, got {url!r}")
