"""The protocols every store implements (SQLite, MongoDB): workflows, and the users of the
built-in AuthService."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from stox.codec import dumps_text


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An outbox entry that a write adds, its payload encoded once as JSON (`body`): a store
    may keep that text, and the bus sends it as it is (`Event.body`)."""

    entry: dict[str, Any]
    body: str

    @classmethod
    def of(cls, entry: dict[str, Any]) -> NewEvent:
        return cls(entry, encode_json(entry["payload"]))


encode_json = dumps_text  # compact JSON text: what stores keep, and the bus sends


DEFER_DELAY = 0.1  # seconds a write nobody waits for (`drop_published`) waits for another


class StoreError(Exception):
    """The store could not do what was asked (unreachable, corrupt, ...)."""


class AlreadyExists(StoreError):
    pass


class KeyTaken(AlreadyExists):
    """Another workflow holds the idempotency key (expired or not: see `release_keys`)."""


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A client's `Idempotency-Key`, held by the workflow its upload created, with a hash of
    that upload's body, until `expires_at` (an ISO timestamp, as the documents' own)."""

    owner: str
    key: str
    body_hash: str
    expires_at: str

    @property
    def slot(self) -> str:
        """What a store keeps unique: the owner and the key, unambiguously (JSON text)."""
        return slot(self.owner, self.key)


def slot(owner: str, key: str) -> str:
    return encode_json([owner, key])


@dataclass(frozen=True, slots=True)
class Filters:
    """What a list may be narrowed to, beside the owner and the status. `text`: a
    case-insensitive substring of the product's name or category; `pipeline`: the name of
    the pipeline a workflow runs on (one stored without a definition runs on the default);
    `created_after` (inclusive) and `created_before` (exclusive): timestamps as
    `workflow.isoformat` writes them."""

    text: str | None = None
    pipeline: str | None = None
    created_after: str | None = None
    created_before: str | None = None


NO_FILTERS = Filters()


class WorkflowStore(Protocol):
    """Keeps workflow documents (the shape `Workflow.to_doc` produces) and their outboxes.

    Writes are compare-and-swap on `version`: `replace` succeeds only when the stored
    document still has `expected_version`. A document's product never changes after
    `insert`, and its outbox only grows by the events a `replace` brings and shrinks by
    `drop_published`, so a store need not write either again with every change. Writes
    return the size of what they stored (in bytes), which the orchestrator's cache is
    bounded by.
    """

    async def open(self) -> None:
        """Connect and create tables or indexes; idempotent."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreError when the store cannot serve."""

    async def insert(
        self,
        doc: dict[str, Any],
        events: Sequence[NewEvent] | None = None,
        key: IdempotencyKey | None = None,
    ) -> int:
        """Add a new workflow with its outbox (`events`: the entries of `doc["outbox"]`,
        encoded; by default encoded here) and, in the same atomic write, the idempotency
        `key` it holds; its stored size. AlreadyExists if its id is taken, KeyTaken if
        another workflow holds `key` (one owner's key is unique, an index decides)."""

    async def get(self, workflow_id: str) -> dict[str, Any] | None: ...

    async def keyed(self, owner: str, key: str) -> tuple[dict[str, Any], IdempotencyKey] | None:
        """The workflow that holds `owner`'s idempotency `key`, and the key as stored."""

    async def release_keys(self, now: str, limit: int, owner_key: tuple[str, str] | None) -> int:
        """Free up to `limit` idempotency keys that expired at or before `now` (only
        `owner_key`, (owner, key), when given), so they may be used again; how many.
        The workflows stay."""

    async def replace(
        self, doc: dict[str, Any], expected_version: int, new_events: Sequence[NewEvent]
    ) -> int:
        """If the stored version is `expected_version`: write the state of `doc` and add
        `new_events` (the events of this change, the last of `doc["outbox"]`) to its outbox,
        in one atomic write. The size written, or 0 when the version did not match."""

    def drop_published(
        self,
        workflow_id: str,
        version: int,
        message_ids: Sequence[str],
        kept: Sequence[dict[str, Any]],
    ) -> None:
        """Drop published events from the outbox of `workflow_id`, whose version stays, soon
        and without a write of their own: with the store's next write (in its transaction,
        or, where the outbox is part of the document, in that workflow's next change), or
        after at most DEFER_DELAY on their own, many in one. `kept` is what
        remains of the outbox as of `version`. What is not dropped (the process ended first;
        on MongoDB, another instance changed the workflow meanwhile) stays in the outbox for
        the relay, which publishes it again: at least once, never lost."""

    async def flush(self) -> None:
        """Write now what waits to go with a later write (`drop_published`)."""

    async def list_workflows(
        self,
        *,
        owner: str | None,
        status: str | None,
        limit: int,
        before: tuple[str, str] | None = None,
        filters: Filters = NO_FILTERS,
    ) -> list[dict[str, Any]]:
        """Newest first by (created_at, id), only those strictly before `before`, and those
        `filters` admits."""

    async def due(self, now: str, limit: int) -> list[dict[str, Any]]:
        """Workflows whose `wake_at` is at or before `now`."""

    async def unpublished(self, written_before: str, limit: int) -> list[dict[str, Any]]:
        """Workflows with an outbox entry written at or before `written_before`."""

    async def steps_in_use(self) -> dict[str, list[str]]:
        """Each step name a running workflow has not finished (pending or dispatched), with
        the ids of those workflows."""

    async def outbox_backlog(self) -> tuple[int, str | None]:
        """How many workflows have events in their outbox, and when the oldest of those was
        written (None when there is none): one cheap query, for the metrics."""


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
