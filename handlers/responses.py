"""Marshmallow schemas of the answers, for the OpenAPI document only (handlers/openapi.py).

Input is checked by stox/schemas.py; these describe what the handlers write, and
tests/test_openapi.py checks real answers against them.
"""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from stox.auth.tokens import ROLES
from stox.schemas import ProductSchema
from stox.workflow import WORKFLOW_STATUSES

_ROLE = fields.String(required=True, validate=validate.OneOf(ROLES))
_STATUS = fields.String(required=True, validate=validate.OneOf(WORKFLOW_STATUSES))


def _nullable_time() -> fields.String:
    return fields.String(required=True, allow_none=True, metadata={"format": "date-time"})


class ErrorDetailSchema(Schema):
    code = fields.String(required=True, metadata={"example": "invalid_input"})
    message = fields.String(required=True)
    # `fields` would shadow Schema.fields
    fields_ = fields.Dict(
        data_key="fields",
        metadata={"description": "what was wrong, by field (marshmallow's messages)"},
    )


class ErrorSchema(Schema):
    error = fields.Nested(ErrorDetailSchema, required=True)


class ProfileSchema(Schema):
    id = fields.String(required=True)
    username = fields.String(required=True)
    role = _ROLE
    created_at = fields.String(required=True, metadata={"format": "date-time"})


class LoginAnswerSchema(Schema):
    access_token = fields.String(required=True)
    token_type = fields.String(required=True, validate=validate.OneOf(["bearer"]))
    expires_in = fields.Integer(required=True, metadata={"description": "seconds"})


class TokenUserSchema(Schema):
    id = fields.String(required=True)
    username = fields.String(required=True)
    role = _ROLE


class ValidateAnswerSchema(Schema):
    valid = fields.Boolean(required=True)
    user = fields.Nested(TokenUserSchema, required=True)
    expires_at = fields.Integer(required=True, metadata={"description": "Unix time"})


class StepSchema(Schema):
    name = fields.String(required=True)
    status = fields.String(required=True)
    step_id = fields.String(required=True, allow_none=True)
    attempt = fields.Integer(required=True)
    dispatched_at = _nullable_time()
    deadline = _nullable_time()
    completed_at = _nullable_time()
    result = fields.Dict(required=True, allow_none=True)
    error = fields.String(required=True, allow_none=True)
    retry_at = _nullable_time()
    attempts = fields.List(fields.Dict(), required=True, metadata={"description": "finished"})
    review = fields.Dict(
        metadata={"description": "a review step's decision (decision, by, at, reason), once made"}
    )


class PipelineDefinitionSchema(Schema):
    name = fields.String(required=True)
    version = fields.String(required=True, metadata={"description": "a short hash of it"})
    steps = fields.List(
        fields.Dict(),
        required=True,
        metadata={"description": "name, kind, after, timeout, max_attempts, backoff, …"},
    )


class WorkflowSchema(Schema):
    id = fields.String(required=True)
    owner = fields.String(required=True)
    owner_name = fields.String(metadata={"description": "the owner's user name, when known"})
    status = _STATUS
    product = fields.Nested(ProductSchema, required=True)
    steps = fields.List(fields.Nested(StepSchema), required=True)
    current_step = fields.Integer(required=True)
    version = fields.Integer(required=True)
    created_at = fields.String(required=True, metadata={"format": "date-time"})
    updated_at = fields.String(required=True, metadata={"format": "date-time"})
    wake_at = _nullable_time()
    outbox_at = _nullable_time()
    pipeline = fields.Nested(
        PipelineDefinitionSchema,
        metadata={"description": "the definition it runs on (absent: stored before they were)"},
    )


class PipelinesSchema(Schema):
    pipelines = fields.List(fields.Nested(PipelineDefinitionSchema), required=True)


class HistoryEntrySchema(Schema):
    at = fields.String(required=True, metadata={"format": "date-time"})
    version = fields.Integer(required=True, metadata={"description": "the workflow's, after it"})
    event = fields.String(
        required=True,
        metadata={"description": "workflow_started, or a change type (step_dispatched, …)"},
    )
    by = fields.String(required=True, metadata={"description": "user:NAME, service:NAME, sweeper"})
    step = fields.String()
    attempt = fields.Integer()
    error = fields.String()


class HistorySchema(Schema):
    workflow_id = fields.String(required=True)
    entries = fields.List(fields.Nested(HistoryEntrySchema), required=True)
    dropped = fields.Integer(required=True, metadata={"description": "older entries dropped"})


class DeliverySchema(Schema):
    id = fields.String(required=True, metadata={"description": "its Stox-Delivery header"})
    url = fields.String(required=True)
    signer = fields.String(required=True, validate=validate.OneOf(["endpoint", "callback"]))
    event = fields.String(required=True)
    message_id = fields.String(required=True)
    status = fields.String(
        required=True, validate=validate.OneOf(["pending", "delivered", "given_up"])
    )
    attempts = fields.Integer(required=True)
    created_at = fields.String(required=True, metadata={"format": "date-time"})
    next_at = fields.String(required=True, metadata={"format": "date-time"})
    last_error = fields.String(required=True, allow_none=True)
    ended_at = fields.String(required=True, allow_none=True, metadata={"format": "date-time"})


class DeliveriesSchema(Schema):
    workflow_id = fields.String(required=True)
    deliveries = fields.List(fields.Nested(DeliverySchema), required=True)


class BulkResultSchema(Schema):
    workflow_id = fields.String(required=True)
    outcome = fields.String(
        required=True,
        validate=validate.OneOf(
            ["retried", "cancelled", "not_allowed", "not_found", "unavailable"]
        ),
    )
    status = fields.String(required=True, allow_none=True)
    message = fields.String(required=True, allow_none=True)


class BulkAnswerSchema(Schema):
    action = fields.String(required=True, validate=validate.OneOf(["retry", "cancel"]))
    results = fields.List(fields.Nested(BulkResultSchema), required=True)
    next_cursor = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "more matched the filter: send it back as `cursor`"},
    )


class UploadAnswerSchema(Schema):
    workflow_id = fields.String(required=True)
    status = _STATUS
    message = fields.String(required=True)


class ReportAnswerSchema(Schema):
    result = fields.String(required=True, validate=validate.OneOf(["applied", "duplicate"]))
    workflow_id = fields.String(required=True)
    status = _STATUS
    version = fields.Integer(required=True)


class WorkflowPageSchema(Schema):
    workflows = fields.List(fields.Nested(WorkflowSchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class HealthSchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(["ok"]))
    version = fields.String(required=True, metadata={"description": "the release"})
    commit = fields.String(required=True, metadata={"description": "the commit it was built from"})


class ReadySchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(["ready", "unready"]))
    store = fields.String(required=True, metadata={"description": '"ok" or why not'})
    bus = fields.String(required=True, validate=validate.OneOf(["ok", "disconnected"]))
    auth = fields.String(required=True, validate=validate.OneOf(["ok", "unavailable"]))


class StatsMinuteSchema(Schema):
    start = fields.String(required=True, metadata={"format": "date-time"})
    completed = fields.Integer(required=True)
    failed = fields.Integer(required=True)


def _seconds() -> fields.Float:
    return fields.Float(required=True, allow_none=True, metadata={"description": "seconds"})


class StatsStepSchema(Schema):
    step = fields.String(required=True)
    attempts = fields.Integer(required=True, metadata={"description": "attempts ended"})
    failures = fields.Integer(required=True, metadata={"description": "failed or timed out"})
    failure_rate = fields.Float(required=True, metadata={"description": "failures / attempts"})
    p50 = _seconds()
    p95 = _seconds()


class StatsSchema(Schema):
    since = fields.String(
        required=True,
        metadata={"format": "date-time", "description": "when this instance began counting"},
    )
    minutes = fields.List(
        fields.Nested(StatsMinuteSchema),
        required=True,
        metadata={"description": "the last 60 minutes, oldest first (the last one: now's)"},
    )
    completed = fields.Integer(required=True, metadata={"description": "over the hour"})
    failed = fields.Integer(required=True, metadata={"description": "over the hour"})
    steps = fields.List(fields.Nested(StatsStepSchema), required=True)
    running = fields.Integer(required=True)
    waiting = fields.Integer(
        required=True, metadata={"description": "running workflows waiting for a review"}
    )


class WebSocketMessageSchema(Schema):
    """One message the gateway sends on /ws (a text frame of JSON)."""

    type = fields.String(
        required=True,
        validate=validate.OneOf(
            [
                "snapshot",
                "step_dispatched",
                "step_completed",
                "step_retrying",
                "step_failed",
                "step_waiting_review",
                "step_reviewed",
                "step_review_escalated",
                "workflow_completed",
                "workflow_failed",
                "workflow_cancelled",
                "webhook_delivered",
                "webhook_retrying",
                "webhook_given_up",
                "stats",
            ]
        ),
    )
    workflow_id = fields.String(required=True, metadata={"description": "stats: empty"})
    version = fields.Integer(
        required=True, metadata={"description": "stats: a counter of this instance's pushes"}
    )
    data = fields.Dict(
        required=True,
        metadata={
            "description": "snapshot: the workflow; stats: the figures (`Stats`); the others: "
            "{step, workflow}"
        },
    )
    ts = fields.String(required=True, metadata={"format": "date-time"})
