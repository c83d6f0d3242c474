"""Marshmallow schemas: the one place client and service input is checked."""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import operator
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from marshmallow import (
    EXCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    pre_load,
    validate,
    validates_schema,
)

from stox.codec import dumps
from stox.store.base import Filters
from stox.workflow import REVIEW_DECISIONS, WORKFLOW_STATUSES, Report, isoformat

HEX_ID = validate.Regexp(r"^[0-9a-f]{32}\Z", error="expected a 32-character hex id")
MAX_METADATA_BYTES = 16 * 1024
MAX_DEPTH = 32  # nesting of free-form values (metadata, result)
# nesting a JSON text may have to be parsed at all: json.loads recurses once a level, and
# where it stops (RecursionError) depends on the Python version, and on the stack below it:
# under 1,000 levels on 3.11, 1,500 on 3.12, 10,000 on 3.13. Below all of them, so a deeper
# body gets the same answer on each.
MAX_JSON_DEPTH = 800


def _is_text(value: str) -> bool:
    """False for strings with lone surrogates (`"\\ud800"` in JSON): not storable as UTF-8."""
    if value.isascii():  # the usual case, checked in C
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_WHOLE = range(-(2**63), 2**63)  # what BSON's int64 holds

# a JSON string, also one left open at the end (so every match succeeds: no quadratic retries)
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
# the brackets alone: an opening one becomes 2, a closing one 0 (each counts as its value - 1)
_BRACKETS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[{]}"))


def nested_beyond(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text `raw` nests arrays and objects more than `limit` levels deep.

    Answered without parsing: from two counts when there are no more than `limit` opening
    brackets (any body of the usual kind), otherwise from a running sum of the brackets
    outside strings, all of it in C. Text json.loads would not decode anyway may get either
    answer.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:  # in UTF-16 and -32 too
        return False
    encoding = json.detect_encoding(raw)
    if not encoding.startswith("utf-8"):
        try:
            raw = raw.decode(encoding).encode()
        except UnicodeError:
            return False
    brackets = _STRING.sub(b"", raw).translate(_BRACKETS, _NOT_BRACKETS)
    # the deepest pairs hold no other bracket: dropping every adjacent pair takes one level
    # off the depth, and most of the sum's work off wide bodies ([[], [], …])
    brackets = brackets.replace(b"\2\0", b"")
    depths = map(operator.sub, itertools.accumulate(brackets), itertools.count(1))
    return next(filter((limit - 1).__lt__, depths), None) is not None


def storable_problem(value: Any) -> str | None:
    """Why a decoded JSON value could not be stored and sent on as it is; None if it can.

    Free-form values are copied, stored (SQLite JSON, MongoDB BSON) and re-encoded for every
    event; too deep a nesting overflows the recursion of those copies, NaN and Infinity are
    not JSON, lone surrogates are not UTF-8, and BSON holds neither NUL in keys nor integers
    beyond 64 bits. Every request body goes through this, so it checks exact types first
    (what json.loads makes) and falls back to isinstance for anything else.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"nested more than {MAX_DEPTH} levels deep"
        kind = type(item)
        if kind is str:
            if not _is_text(item):
                return "not valid Unicode text"
        elif kind is dict or (kind is not list and isinstance(item, Mapping)):
            for key, sub in item.items():
                if isinstance(key, str) and ("\x00" in key or not _is_text(key)):
                    return "keys must be valid Unicode text without NUL"
                stack.append((sub, depth + 1))
        elif kind is list:
            stack.extend((sub, depth + 1) for sub in item)
        elif isinstance(item, float):
            if not math.isfinite(item):
                return "NaN and Infinity are not permitted"
        elif isinstance(item, int) and item not in _WHOLE:
            return "whole numbers must fit in 64 bits"
        elif isinstance(item, str) and not _is_text(item):
            return "not valid Unicode text"
    return None


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE

    @pre_load
    def _storable(self, data: Any, **_: Any) -> Any:
        # one walk of the whole body; only a body with a problem is walked again, per field,
        # to name the fields
        if isinstance(data, Mapping) and storable_problem(data) is not None:
            errors = {
                name: [problem]
                for name, value in data.items()
                if (problem := storable_problem({name: value}))
            }
            if errors:
                raise ValidationError(errors)
        return data


class ProductSchema(StrictSchema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=200))
    description = fields.String(load_default="", validate=validate.Length(max=10_000))
    images = fields.List(
        fields.String(validate=validate.Length(min=1, max=2048)),
        load_default=list,
        validate=validate.Length(max=50),
    )
    category = fields.String(load_default="", validate=validate.Length(max=100))
    price = fields.Float(
        load_default=None,
        allow_none=True,
        allow_nan=False,
        validate=validate.Range(min=0, max=1e12),
    )
    # no `keys=` field: the keys of a JSON object are strings already (a key field would
    # deserialise each one again, on every request)
    metadata = fields.Dict(load_default=dict)

    @validates_schema
    def _metadata_size(self, data: dict[str, Any], **_: Any) -> None:
        if len(dumps(data.get("metadata", {}))) > MAX_METADATA_BYTES:
            raise ValidationError(f"at most {MAX_METADATA_BYTES} bytes of JSON", "metadata")


class UploadSchema(ProductSchema):
    """A product, and optionally the pipeline to run it on (a configured name)."""

    pipeline = fields.String(
        load_default=None,
        validate=validate.Regexp(r"^[a-z][a-z0-9_]{0,63}\Z", error="expected a pipeline name"),
        metadata={"description": "a configured pipeline (default: `default`)"},
    )
    callback_url = fields.String(
        load_default=None,
        validate=validate.Length(min=1, max=2048),
        metadata={
            "description": "where to POST this workflow's end (workflow.completed, .failed, "
            ".cancelled), signed; its host must be in webhooks.allowed_hosts"
        },
    )


class ReviewSchema(StrictSchema):
    """A person's decision on a step waiting for review."""

    workflow_id = fields.String(required=True, validate=HEX_ID)
    step_id = fields.String(required=True, validate=HEX_ID)
    decision = fields.String(required=True, validate=validate.OneOf(REVIEW_DECISIONS))
    result = fields.Dict(
        load_default=None,
        allow_none=True,
        metadata={"description": "approve: the edited values, which become the step's result"},
    )
    reason = fields.String(
        load_default=None, allow_none=True, validate=validate.Length(min=1, max=4000)
    )

    @validates_schema
    def _reason(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("decision") == "reject" and not data.get("reason"):
            raise ValidationError("a rejection needs a reason", "reason")
        if data.get("decision") != "reject" and data.get("reason") is not None:
            raise ValidationError("only a rejection has a reason", "reason")
        if data.get("decision") == "reject" and data.get("result") is not None:
            raise ValidationError("only an approval has a result", "result")


class CompletionSchema(StrictSchema):
    workflow_id = fields.String(required=True, validate=HEX_ID)
    step_id = fields.String(required=True, validate=HEX_ID)
    step_type = fields.String(load_default=None, validate=validate.Length(min=1, max=64))
    success = fields.Boolean(required=True, truthy={True}, falsy={False})
    result = fields.Dict(load_default=None, allow_none=True)  # keys: see `metadata`
    error = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=4000))

    def to_report(self, data: dict[str, Any]) -> Report:
        return Report(**data)


class CompletionEventSchema(CompletionSchema):
    """A `step.completed` message also carries the common event fields."""

    class Meta:
        unknown = EXCLUDE


class WorkflowIdSchema(StrictSchema):
    workflow_id = fields.String(required=True, validate=HEX_ID)


class _Instant(fields.String):
    """An ISO 8601 time with its zone (`Z` or an offset), as the stored timestamps write it."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            moment = None
        if moment is None or moment.tzinfo is None or not 1970 <= moment.year <= 9999:
            raise ValidationError("expected an ISO 8601 time with its zone, e.g. 2026-12-04T10:00Z")
        return isoformat(moment.timestamp())


BULK_LIMIT = 100  # workflows one bulk call acts on at most


class BulkFilterSchema(StrictSchema):
    status = fields.String(load_default=None, validate=validate.OneOf(WORKFLOW_STATUSES))
    pipeline = fields.String(
        load_default=None,
        validate=validate.Regexp(r"^[a-z][a-z0-9_]{0,63}\Z", error="expected a pipeline name"),
    )
    created_after = _Instant(load_default=None, metadata={"description": "inclusive"})
    created_before = _Instant(load_default=None, metadata={"description": "exclusive"})


class BulkSchema(StrictSchema):
    """Retry or cancel the workflows `ids` names, or those `filter` selects."""

    action = fields.String(required=True, validate=validate.OneOf(["retry", "cancel"]))
    ids = fields.List(
        fields.String(validate=HEX_ID),
        load_default=None,
        validate=validate.Length(min=1, max=BULK_LIMIT),
    )
    filter = fields.Nested(BulkFilterSchema, load_default=None)
    cursor = fields.String(
        load_default=None, metadata={"description": "with filter: the answer's next_cursor"}
    )

    @validates_schema
    def _one_selection(self, data: dict[str, Any], **_: Any) -> None:
        if (data.get("ids") is None) == (data.get("filter") is None):
            raise ValidationError("give ids or filter, not both or neither", "ids")
        if data.get("cursor") is not None:
            if data.get("filter") is None:
                raise ValidationError("a cursor goes with a filter", "cursor")
            decode_cursor(data["cursor"])


class ListQuerySchema(Schema):
    """Query parameters; unknown ones (cache busters) are ignored."""

    class Meta:
        unknown = EXCLUDE

    status = fields.String(load_default=None, validate=validate.OneOf(WORKFLOW_STATUSES))
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = fields.String(load_default=None)
    q = fields.String(
        load_default=None,
        validate=validate.Length(min=1, max=200),
        metadata={"description": "a case-insensitive part of the product's name or category"},
    )
    pipeline = fields.String(
        load_default=None,
        validate=validate.Regexp(r"^[a-z][a-z0-9_]{0,63}\Z", error="expected a pipeline name"),
    )
    created_after = _Instant(
        load_default=None, metadata={"description": "created at or after (ISO 8601, with a zone)"}
    )
    created_before = _Instant(
        load_default=None, metadata={"description": "created before (ISO 8601, with a zone)"}
    )

    def filters(self, data: dict[str, Any]) -> Filters:
        return Filters(data["q"], data["pipeline"], data["created_after"], data["created_before"])

    @validates_schema
    def _cursor(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("cursor") is not None:
            decode_cursor(data["cursor"])


USERNAME = validate.Regexp(
    r"^[a-z0-9_.-]{3,64}\Z",  # \Z: `$` would let a trailing newline through
    error="3 to 64 characters: lowercase letters, digits, _ . and -",
)
MIN_PASSWORD = 12
MAX_PASSWORD = 1024  # every login hashes what it is sent: bound the work


class RegisterSchema(StrictSchema):
    username = fields.String(required=True, validate=USERNAME)
    password = fields.String(
        required=True,
        validate=validate.Length(
            min=MIN_PASSWORD,
            max=MAX_PASSWORD,
            error=f"{MIN_PASSWORD} to {MAX_PASSWORD} characters",
        ),
    )


class LoginSchema(StrictSchema):
    """Only lengths: a name that could never be registered fails like a wrong password."""

    username = fields.String(required=True, validate=validate.Length(min=1, max=64))
    password = fields.String(required=True, validate=validate.Length(min=1, max=MAX_PASSWORD))


class TokenSchema(StrictSchema):
    token = fields.String(required=True, validate=validate.Length(min=1, max=8192))


def encode_cursor(created_at: str, workflow_id: str) -> str:
    raw = json.dumps([created_at, workflow_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


MAX_CURSOR = 128  # an issued cursor is under 100 characters
_CURSOR_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z", re.ASCII)  # isoformat
_CURSOR_ID = re.compile(r"[0-9a-f]{32}\Z")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """The (created_at, id) an opaque cursor stands for; ValidationError if it is not one.

    Only what `encode_cursor` makes passes: anything else (a lone surrogate no store can
    take, JSON nested past the decoder's recursion) would otherwise reach the store.
    """
    bad = ValidationError("not a cursor this server issued", "cursor")
    if len(cursor) > MAX_CURSOR:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        raise bad from None
    if not isinstance(value, list) or len(value) != 2:
        raise bad
    created_at, workflow_id = value
    if not (
        isinstance(created_at, str)
        and isinstance(workflow_id, str)
        and _CURSOR_TIME.match(created_at)
        and _CURSOR_ID.match(workflow_id)
    ):
        raise bad
    return created_at, workflow_id


upload_schema = UploadSchema()
bulk_schema = BulkSchema()
review_schema = ReviewSchema()
completion_schema = CompletionSchema()
completion_event_schema = CompletionEventSchema()
workflow_id_schema = WorkflowIdSchema()
list_query_schema = ListQuerySchema()
register_schema = RegisterSchema()
login_schema = LoginSchema()
token_schema = TokenSchema()
