"""The protocols every store implements (SQLite, MongoDB): workflows, and the users of the
built-in AuthService."""

from __future__ import annotations

from typing import Any, Protocol


class StoreError(Exception):
    """The store could not do what was asked (unreachable, corrupt, ...)."""


class AlreadyExists(StoreError):
    pass


class WorkflowStore(Protocol):
    """Keeps workflow documents (the shape `Workflow.to_doc` produces).

    Writes are compare-and-swap on `version`: `replace` succeeds only when the stored
    document still has `expected_version`. Both writes return the size of what was stored
    (the encoded document, in bytes), which the orchestrator's cache is bounded by.
    """

    async def open(self) -> None:
        """Connect and create tables or indexes; idempotent."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreError when the store cannot serve."""

    async def insert(self, doc: dict[str, Any]) -> int:
        """Add a new workflow; its stored size. AlreadyExists if its id is taken."""

    async def get(self, workflow_id: str) -> dict[str, Any] | None: ...

    async def replace(self, doc: dict[str, Any], expected_version: int) -> int:
        """Write `doc` if the stored version is `expected_version`: its stored size, else 0."""

    async def list(
        self,
        *,
        owner: str | None,
        status: str | None,
        limit: int,
        before: tuple[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first by (created_at, id), only those strictly before `before`."""

    async def due(self, now: str, limit: int) -> list[dict[str, Any]]:
        """Workflows whose `wake_at` is at or before `now`."""

    async def unpublished(self, written_before: str, limit: int) -> list[dict[str, Any]]:
        """Workflows with an outbox entry written at or before `written_before`."""

    async def steps_in_use(self) -> dict[str, list[str]]:
        """Each step name a running workflow has not finished (pending or dispatched), with
        the ids of those workflows."""


class UserStore(Protocol):
    """Keeps user accounts: `{id, username, password_hash, role, created_at}`.

    User names are unique (an index, so concurrent registrations cannot both win).
    """

    async def open(self) -> None:
        """Connect and create tables or indexes; idempotent."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreError when the store cannot serve."""

    async def insert_user(self, user: dict[str, Any]) -> None:
        """Add a user; AlreadyExists if its user name (or id) is taken."""

    async def user_by_id(self, user_id: str) -> dict[str, Any] | None: ...

    async def user_by_name(self, username: str) -> dict[str, Any] | None: ...

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        """Replace a user's password hash (a rehash with stronger parameters)."""
