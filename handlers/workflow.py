"""Workflow endpoints: upload, status, step-completed, list, cancel, retry.

The orchestrator's NotFound, NotAllowed, StaleReport and Contention propagate: the base
handler's error path answers them (`handlers.base.DOMAIN_ERRORS`)."""

from __future__ import annotations

import re
from typing import Any, cast

import tornado.web

from handlers import responses
from handlers.base import IDEMPOTENCY_KEY, ApiError, BaseHandler, requires
from handlers.openapi import operation
from stox import tracecontext
from stox.auth.limits import UploadLimiter
from stox.schemas import (
    completion_schema,
    decode_cursor,
    encode_cursor,
    list_query_schema,
    upload_schema,
    workflow_id_schema,
)
from stox.workflow import RUNNING, Report, Workflow

STEP_COMPLETED = "step_completed"  # the route's name: the dispatches' HTTP reply address
MAX_KEY_LENGTH = 255
_KEY = re.compile(rf"[\x20-\x7e]{{1,{MAX_KEY_LENGTH}}}")  # printable ASCII, as Stripe's


class WorkflowHandler(BaseHandler):
    def owner_filter(self) -> str | None:
        """Admins see every workflow; everyone else only their own."""
        return None if self.principal.is_admin else self.principal.id

    async def change(self, action: str) -> None:
        workflow_id = self.load(workflow_id_schema, self.json_body())["workflow_id"]
        command = getattr(self.orchestrator, action)
        workflow: Workflow = await command(workflow_id, self.owner_filter())
        self.write_json(200, workflow.public())


class UploadHandler(WorkflowHandler):
    @property
    def uploads(self) -> UploadLimiter:
        return cast(UploadLimiter, self.settings["uploads"])

    @operation(
        "Upload a product: start its workflow",
        body=upload_schema,
        parameters=(
            {
                "in": "header",
                "name": IDEMPOTENCY_KEY,
                "required": False,
                "description": "the same key again gets the first answer (see the README)",
                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
            },
        ),
        answers={202: ("accepted; the first step is dispatched", responses.UploadAnswerSchema())},
        errors={
            400: "`invalid_json`, `invalid_input` or `invalid_idempotency_key`",
            422: "`idempotency_key_reused` with a different body",
            429: "`too_many_attempts`: over `server.max_uploads_per_user`, with `Retry-After`",
            503: "`store_unavailable` or `contention`, with `Retry-After`",
        },
    )
    @requires("user")
    async def post(self) -> None:
        self.uploads.begin(self.principal.id)
        key = self.idempotency_key()
        product = self.load(upload_schema, self.json_body())
        workflow = await self.orchestrator.upload(self.principal.id, product, key)
        # the answer as the upload that made it gave it (a retry with its key gets the same)
        self.write_json(
            202,
            {
                "workflow_id": workflow.id,
                "status": RUNNING,
                "message": f"workflow accepted; {workflow.steps[0].name} dispatched",
            },
        )

    def idempotency_key(self) -> str | None:
        """The Idempotency-Key header; 400 naming it unless it is one of 1-255 printable
        ASCII characters."""
        values = self.request.headers.get_list(IDEMPOTENCY_KEY)
        if not values:
            return None
        if len(values) == 1 and _KEY.fullmatch(values[0]):
            return values[0]
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"{IDEMPOTENCY_KEY}: expected one header of 1-{MAX_KEY_LENGTH} printable ASCII "
            "characters",
            {IDEMPOTENCY_KEY: f"expected 1-{MAX_KEY_LENGTH} printable ASCII characters"},
        )


class StatusHandler(WorkflowHandler):
    @operation(
        "A workflow's state",
        query=workflow_id_schema,
        description="Admins see any workflow; users their own.",
        answers={200: ("the workflow", responses.WorkflowSchema())},
        errors={
            404: "`not_found`: no such workflow, or another user's",
            503: "`store_unavailable` or `contention`, with `Retry-After`",
        },
    )
    @requires("user")
    async def get(self) -> None:
        workflow_id = self.load(workflow_id_schema, self.query())["workflow_id"]
        workflow = await self.orchestrator.get(workflow_id, self.owner_filter())
        self.write_json(200, workflow.public())


class StepCompletedHandler(BaseHandler):
    @operation(
        "A service reports a step attempt's outcome",
        body=completion_schema,
        parameters=(
            {
                "in": "header",
                "name": tracecontext.HEADER,
                "required": False,
                "description": "W3C Trace Context: the report's span joins the workflow's trace",
                "schema": {"type": "string", "maxLength": tracecontext.MAX_LENGTH},
            },
        ),
        answers={
            200: ("`applied`, or `duplicate` (changed nothing)", responses.ReportAnswerSchema())
        },
        errors={
            404: "`not_found`: no such workflow",
            409: "a stale report (an older attempt, another step) or not allowed now",
            503: "`store_unavailable` or `contention`, with `Retry-After`",
        },
    )
    @requires("service")
    async def post(self) -> None:
        report = Report(**self.load(completion_schema, self.json_body()))
        with tracecontext.continuing(self.request.headers.get(tracecontext.HEADER)):
            outcome = await self.orchestrator.report(report)
        workflow = outcome.workflow
        self.write_json(
            200,
            {
                "result": "applied" if outcome.applied else "duplicate",
                "workflow_id": workflow.id,
                "status": workflow.status,
                "version": workflow.version,
            },
        )


class ListHandler(WorkflowHandler):
    @operation(
        "Workflows, newest first, a page at a time",
        query=list_query_schema,
        description="Admins see every workflow; users their own. Follow `next_cursor`.",
        answers={200: ("a page", responses.WorkflowPageSchema())},
        errors={503: "`store_unavailable` or `contention`, with `Retry-After`"},
    )
    @requires("user")
    async def get(self) -> None:
        query = self.load(list_query_schema, self.query())
        before = decode_cursor(query["cursor"]) if query["cursor"] else None
        limit = query["limit"]
        workflows = await self.orchestrator.list_workflows(
            self.owner_filter(), query["status"], limit + 1, before
        )
        page = workflows[:limit]
        body: dict[str, Any] = {
            "workflows": [w.public() for w in page],
            "next_cursor": (
                encode_cursor(page[-1].created_at, page[-1].id) if len(workflows) > limit else None
            ),
        }
        self.write_json(200, body)


class CancelHandler(WorkflowHandler):
    @operation(
        "Cancel a workflow",
        body=workflow_id_schema,
        answers={200: ("the cancelled workflow", responses.WorkflowSchema())},
        errors={
            404: "`not_found`: no such workflow, or another user's",
            409: "not allowed in its state",
            503: "`store_unavailable` or `contention`, with `Retry-After`",
        },
    )
    @requires("user")
    async def post(self) -> None:
        await self.change("cancel")


class RetryHandler(WorkflowHandler):
    @operation(
        "Retry a failed workflow from the step that failed",
        body=workflow_id_schema,
        answers={200: ("the restarted workflow", responses.WorkflowSchema())},
        errors={
            404: "`not_found`: no such workflow, or another user's",
            409: "not allowed in its state",
            503: "`store_unavailable` or `contention`, with `Retry-After`",
        },
    )
    @requires("user")
    async def post(self) -> None:
        await self.change("retry")


routes = [
    (r"/api/v1/workflow/upload", UploadHandler),
    (r"/api/v1/workflow/status", StatusHandler),
    tornado.web.url(r"/api/v1/workflow/step-completed", StepCompletedHandler, name=STEP_COMPLETED),
    (r"/api/v1/workflow/list", ListHandler),
    (r"/api/v1/workflow/cancel", CancelHandler),
    (r"/api/v1/workflow/retry", RetryHandler),
]
