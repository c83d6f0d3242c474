"""GET /api/v1/pipelines: the pipelines an upload may name, as the gateway runs them."""

from __future__ import annotations

from typing import Any

import tornado.web

from handlers import responses
from handlers.base import BaseHandler, requires
from handlers.openapi import operation


class PipelinesHandler(BaseHandler):
    @operation(
        "The configured pipelines, `default` first",
        description="What an upload's `pipeline` may name: each definition (its steps, their "
        "kinds and dependencies) and its version, the short hash a workflow records.",
        answers={200: ("the pipelines", responses.PipelinesSchema())},
    )
    @requires("user")
    async def get(self) -> None:
        pipelines = self.orchestrator.pipelines.values()
        body: dict[str, Any] = {"pipelines": [p.definition() for p in pipelines]}
        self.write_json(200, body)


routes: list[Any] = [tornado.web.url(r"/api/v1/pipelines", PipelinesHandler)]
