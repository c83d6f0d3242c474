"""Workflow endpoints: upload, status, step-completed, list, cancel, retry."""

from __future__ import annotations

from typing import Any

import tornado.web

from handlers.base import ApiError, BaseHandler, requires
from stox.orchestrator import Contention, NotFound
from stox.schemas import (
    completion_schema,
    decode_cursor,
    encode_cursor,
    list_query_schema,
    upload_schema,
    workflow_id_schema,
)
from stox.workflow import NotAllowed, Report, StaleReport, Workflow

STEP_COMPLETED = "step_completed"  # the route's name: the dispatches' HTTP reply address


def _not_found(workflow_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no workflow {workflow_id}", {"workflow_id": "not found"})


def _contended() -> ApiError:
    return ApiError(
        503,
        "contention",
        "the workflow is changing too fast; try again",
        headers={"Retry-After": "1"},
    )


class WorkflowHandler(BaseHandler):
    def owner_filter(self) -> str | None:
        """Admins see every workflow; everyone else only their own."""
        return None if self.principal.is_admin else self.principal.id

    async def change(self, action: str) -> None:
        workflow_id = self.load(workflow_id_schema, self.json_body())["workflow_id"]
        command = getattr(self.orchestrator, action)
        try:
            workflow: Workflow = await command(workflow_id, self.owner_filter())
        except NotFound:
            raise _not_found(workflow_id) from None
        except NotAllowed as exc:
            raise ApiError(409, exc.code, str(exc)) from None
        except Contention:
            raise _contended() from None
        self.render(200, workflow.public())


class UploadHandler(WorkflowHandler):
    @requires("user")
    async def post(self) -> None:
        product = self.load(upload_schema, self.json_body())
        workflow = await self.orchestrator.upload(self.principal.id, product)
        self.render(
            202,
            {
                "workflow_id": workflow.id,
                "status": workflow.status,
                "message": f"workflow accepted; {workflow.step.name} dispatched",
            },
        )


class StatusHandler(WorkflowHandler):
    @requires("user")
    async def get(self) -> None:
        workflow_id = self.load(workflow_id_schema, self.query())["workflow_id"]
        try:
            workflow = await self.orchestrator.get(workflow_id, self.owner_filter())
        except NotFound:
            raise _not_found(workflow_id) from None
        self.render(200, workflow.public())


class StepCompletedHandler(BaseHandler):
    @requires("service")
    async def post(self) -> None:
        report = Report(**self.load(completion_schema, self.json_body()))
        try:
            outcome = await self.orchestrator.report(report)
        except NotFound:
            raise _not_found(report.workflow_id) from None
        except StaleReport as exc:
            raise ApiError(409, exc.code, str(exc)) from None
        except Contention:
            raise _contended() from None
        workflow = outcome.workflow
        self.render(
            200,
            {
                "result": "applied" if outcome.applied else "duplicate",
                "workflow_id": workflow.id,
                "status": workflow.status,
                "version": workflow.version,
            },
        )


class ListHandler(WorkflowHandler):
    @requires("user")
    async def get(self) -> None:
        query = self.load(list_query_schema, self.query())
        before = decode_cursor(query["cursor"]) if query["cursor"] else None
        limit = query["limit"]
        workflows = await self.orchestrator.list(
            self.owner_filter(), query["status"], limit + 1, before
        )
        page = workflows[:limit]
        body: dict[str, Any] = {
            "workflows": [w.public() for w in page],
            "next_cursor": (
                encode_cursor(page[-1].created_at, page[-1].id) if len(workflows) > limit else None
            ),
        }
        self.render(200, body)


class CancelHandler(WorkflowHandler):
    @requires("user")
    async def post(self) -> None:
        await self.change("cancel")


class RetryHandler(WorkflowHandler):
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
