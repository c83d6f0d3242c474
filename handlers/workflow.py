"""Workflow endpoints: upload, status, step-completed, review, list, cancel, retry.

The orchestrator's NotFound, NotAllowed, StaleReport and Contention propagate: the base
handler's error path answers them (`handlers.base.DOMAIN_ERRORS`)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, cast

import tornado.web

from handlers import responses
from handlers.base import IDEMPOTENCY_KEY, ApiError, BaseHandler, requires
from handlers.openapi import operation
from stox import tracecontext
from stox.auth.limits import UploadLimiter
from stox.logs import bind
from stox.orchestrator import Outcome
from stox.schemas import (
    BULK_LIMIT,
    bulk_schema,
    completion_schema,
    decode_cursor,
    encode_cursor,
    list_query_schema,
    review_schema,
    upload_schema,
    workflow_id_schema,
)
from stox.store.base import Filters
from stox.workflow import DEFAULT_STEPS, RUNNING, Report, Review, Workflow, history_entry

STEP_COMPLETED = "step_completed"  # the route's name: the dispatches' HTTP reply address
MAX_KEY_LENGTH = 255
_KEY = re.compile(rf"[\x20-\x7e]{{1,{MAX_KEY_LENGTH}}}")  # printable ASCII, as Stripe's


def _follow(workflow_id: str) -> dict[str, dict[str, Any]]:
    """The OpenAPI links from an answer naming a workflow (the runtime expression
    `workflow_id`) to the operations on it: its status, cancel and retry."""
    return {
        "status": {"operationId": "getStatus", "parameters": {"workflow_id": workflow_id}},
        "cancel": {"operationId": "postCancel", "requestBody": {"workflow_id": workflow_id}},
        "retry": {"operationId": "postRetry", "requestBody": {"workflow_id": workflow_id}},
    }


_ANSWER_ID = "$response.body#/workflow_id"  # the upload's and the report's answers
_DOCUMENT_ID = "$response.body#/id"  # a workflow document
# a workflow document to the report on each of its steps (a step not dispatched yet has a
# null step_id: that report is refused, 400)
_REPORTS = {
    f"report_step_{i}": {
        "operationId": "postStepCompleted",
        "requestBody": {
            "workflow_id": _DOCUMENT_ID,
            "step_id": f"$response.body#/steps/{i}/step_id",
            "step_type": f"$response.body#/steps/{i}/name",
        },
    }
    for i in range(len(DEFAULT_STEPS))
}


class WorkflowHandler(BaseHandler):
    def owner_filter(self) -> str | None:
        """Admins change every workflow; everyone else only their own."""
        return None if self.principal.is_admin else self.principal.id

    def write_outcome(self, outcome: Outcome) -> None:
        """The answer to a report or a review: applied, or a duplicate that changed nothing."""
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

    async def requested(self, owner: str | None) -> Workflow:
        """The workflow the query's `workflow_id` names, as `owner` (None: anyone) sees it."""
        workflow_id = self.load(workflow_id_schema, self.query())["workflow_id"]
        bind(workflow_id=workflow_id)
        return await self.orchestrator.get(workflow_id, owner)

    def by(self) -> str:
        """Who is asking, as the history names them."""
        return f"user:{self.principal.username}"

    def reader_filter(self) -> str | None:
        """Admins and reviewers see every workflow (a reviewer must find what waits for
        review); everyone else only their own."""
        return None if self.principal.can_review_any else self.principal.id

    async def change(self, action: str) -> None:
        workflow_id = self.load(workflow_id_schema, self.json_body())["workflow_id"]
        bind(workflow_id=workflow_id)
        command = getattr(self.orchestrator, action)
        workflow: Workflow = await command(workflow_id, self.owner_filter(), self.by())
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
        links={202: _follow(_ANSWER_ID)},
        errors={
            400: "`invalid_json`, `invalid_input` (an unknown `pipeline` too) or "
            "`invalid_idempotency_key`",
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
        pipeline, callback_url = product.pop("pipeline"), product.pop("callback_url")
        principal = self.principal
        workflow = await self.orchestrator.upload(
            principal.id,
            product,
            key,
            pipeline,
            owner_name=principal.username,
            callback_url=callback_url,
        )
        # the answer as the upload that made it gave it (a retry with its key gets the same)
        deps = self.orchestrator.pipeline_of(workflow).deps
        begun = [step.name for step in workflow.steps if not deps.get(step.name)]
        self.write_json(
            202,
            {
                "workflow_id": workflow.id,
                "status": RUNNING,
                "message": f"workflow accepted; {', '.join(begun)} dispatched",
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
        description="Admins and reviewers see any workflow; users their own.",
        answers={200: ("the workflow", responses.WorkflowSchema())},
        links={200: _follow(_DOCUMENT_ID) | _REPORTS},
        errors={
            404: "`not_found`: no such workflow, or another user's",
            503: "`store_unavailable` or `contention`, with `Retry-After`",
        },
    )
    @requires("user")
    async def get(self) -> None:
        workflow = await self.requested(self.reader_filter())
        self.write_json(200, workflow.public())


class StepCompletedHandler(WorkflowHandler):
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
        links={200: _follow(_ANSWER_ID)},
        errors={
            404: "`not_found`: no such workflow",
            409: "a stale report (an older attempt, another step) or not allowed now",
            503: "`store_unavailable` or `contention`, with `Retry-After`",
        },
    )
    @requires("service")
    async def post(self) -> None:
        body = self.load(completion_schema, self.json_body())
        report = Report(**body, by=f"service:{self.principal.username}")
        bind(workflow_id=report.workflow_id, step=report.step_type)  # the attempt: see report()
        with tracecontext.continuing(self.request.headers.get(tracecontext.HEADER)):
            outcome = await self.orchestrator.report(report)
        self.write_outcome(outcome)


class ReviewHandler(WorkflowHandler):
    @operation(
        "Approve or reject a step waiting for review",
        body=review_schema,
        description="The workflow's owner, a `reviewer` or an admin; anyone else gets 404, as "
        "for another's workflow. Approve with `result` (the edited values, which become the "
        "step's result) or without; reject with a `reason` (the workflow fails, or the step "
        "the pipeline names runs again). The same decision again answers `duplicate`.",
        answers={
            200: ("`applied`, or `duplicate` (changed nothing)", responses.ReportAnswerSchema())
        },
        links={200: _follow(_ANSWER_ID)},
        errors={
            404: "`not_found`: no such workflow, or one this user may not review",
            409: "`not_allowed`: the step is not waiting for review (or not a review step)",
            503: "`store_unavailable` or `contention`, with `Retry-After`",
        },
    )
    @requires("user")
    async def post(self) -> None:
        body = self.load(review_schema, self.json_body())
        bind(workflow_id=body["workflow_id"])
        decision = Review(by=self.principal.username, **body)
        outcome = await self.orchestrator.review(decision, self.reader_filter())
        self.write_outcome(outcome)


class HistoryHandler(WorkflowHandler):
    @operation(
        "What happened to a workflow, oldest first",
        query=workflow_id_schema,
        description="Each transition's changes as entries: when, what, the step and attempt, "
        "who or what caused it (`user:NAME`, `service:NAME`, `sweeper`), the error of an "
        "attempt that failed. The newest `storage.history_limit` are kept; `dropped` counts "
        "the older ones. The owner's, or any for an admin.",
        answers={200: ("the history", responses.HistorySchema())},
        errors={
            404: "`not_found`: no such workflow, or another user's",
            503: "`store_unavailable`, with `Retry-After`",
        },
    )
    @requires("user")
    async def get(self) -> None:
        workflow = await self.requested(self.owner_filter())
        body = {
            "workflow_id": workflow.id,
            "entries": [history_entry(e) for e in workflow.history],
            "dropped": workflow.history_dropped,
        }
        self.write_json(200, body)


class DeliveriesHandler(WorkflowHandler):
    @operation(
        "A workflow's webhook deliveries",
        query=workflow_id_schema,
        description="Each delivery of its events to a configured endpoint or its callback_url: "
        "status (`pending`, `delivered`, `given_up`), attempts, the last error, when it is "
        "tried next. The owner's, or any for an admin.",
        answers={200: ("the deliveries", responses.DeliveriesSchema())},
        errors={
            404: "`not_found`: no such workflow, or another user's",
            503: "`store_unavailable`, with `Retry-After`",
        },
    )
    @requires("user")
    async def get(self) -> None:
        workflow = await self.requested(self.owner_filter())
        shown = [{k: v for k, v in d.items() if k != "payload"} for d in workflow.deliveries]
        self.write_json(200, {"workflow_id": workflow.id, "deliveries": shown})


class BulkHandler(WorkflowHandler):
    @operation(
        "Retry or cancel many workflows",
        body=bulk_schema,
        description=f"By `ids` (at most {BULK_LIMIT}) or by `filter` (the first {BULK_LIMIT} "
        "it selects, newest first; `next_cursor` continues), among the caller's workflows "
        "(an admin's: anyone's). Each is acted on as the single command does, and the answer "
        "says per workflow what happened; one that cannot be does not stop the others.",
        answers={200: ("what happened to each", responses.BulkAnswerSchema())},
        errors={503: "`store_unavailable` or `contention`, with `Retry-After`"},
    )
    @requires("user")
    async def post(self) -> None:
        body = self.load(bulk_schema, self.json_body())
        owner = self.owner_filter()
        next_cursor = None
        if body["ids"] is not None:
            workflow_ids = body["ids"]
        else:
            chosen = body["filter"]
            filters = Filters(
                None, chosen["pipeline"], chosen["created_after"], chosen["created_before"]
            )
            before = decode_cursor(body["cursor"]) if body["cursor"] else None
            found = await self.orchestrator.list_workflows(
                owner, chosen["status"], BULK_LIMIT + 1, before, filters
            )
            page = found[:BULK_LIMIT]
            workflow_ids = [w.id for w in page]
            if len(found) > BULK_LIMIT:
                next_cursor = encode_cursor(page[-1].created_at, page[-1].id)
        results = await self.orchestrator.bulk(body["action"], owner, workflow_ids, self.by())
        self.write_json(
            200,
            {
                "action": body["action"],
                "results": [dataclasses.asdict(result) for result in results],
                "next_cursor": next_cursor,
            },
        )


class ListHandler(WorkflowHandler):
    @operation(
        "Workflows, newest first, a page at a time",
        query=list_query_schema,
        description="Admins and reviewers see every workflow; users their own. Follow "
        "`next_cursor` (with "
        "the same filters). `q` matches part of the product's name or category, any case.",
        answers={200: ("a page", responses.WorkflowPageSchema())},
        errors={503: "`store_unavailable` or `contention`, with `Retry-After`"},
    )
    @requires("user")
    async def get(self) -> None:
        query = self.load(list_query_schema, self.query())
        before = decode_cursor(query["cursor"]) if query["cursor"] else None
        limit = query["limit"]
        filters = list_query_schema.filters(query)
        workflows = await self.orchestrator.list_workflows(
            self.reader_filter(), query["status"], limit + 1, before, filters
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
        links={200: _follow(_DOCUMENT_ID)},
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
        links={200: _follow(_DOCUMENT_ID)},
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
    (r"/api/v1/workflow/review", ReviewHandler),
    (r"/api/v1/workflow/bulk", BulkHandler),
    (r"/api/v1/workflow/history", HistoryHandler),
    (r"/api/v1/workflow/deliveries", DeliveriesHandler),
    (r"/api/v1/workflow/list", ListHandler),
    (r"/api/v1/workflow/cancel", CancelHandler),
    (r"/api/v1/workflow/retry", RetryHandler),
]
