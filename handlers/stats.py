"""GET /api/v1/stats: the dashboard's charts (stox/stats.py), of the workflows one may read."""

from __future__ import annotations

from typing import Any, cast

import tornado.web

from handlers import responses
from handlers.base import BaseHandler, requires
from handlers.openapi import operation
from stox.hub import Hub


class StatsHandler(BaseHandler):
    @operation(
        "Workflows finished per minute, the steps' durations and failures, what runs now",
        description=(
            "Over the last hour (a bucket a minute, oldest first): the workflows completed and "
            "failed; each step's attempts ended, failed (a failure or a timeout), failure rate "
            "and duration from dispatch to report (p50, p95, seconds; a timeout has none); and "
            "now: the workflows running, and those of them waiting for a review. Of one's own "
            "workflows; an admin's or a reviewer's: everyone's. Counted by each instance from "
            "the change notifications it hears since it started (`since`); the running and "
            "waiting counts start from the store. `/ws?stats=1` pushes the same figures."
        ),
        answers={200: ("the figures", responses.StatsSchema())},
    )
    @requires("user")
    async def get(self) -> None:
        owner = None if self.principal.can_review_any else self.principal.id
        body: dict[str, Any] = cast(Hub, self.settings["hub"]).stats.view(owner)
        self.write_json(200, body)


routes: list[Any] = [tornado.web.url(r"/api/v1/stats", StatsHandler)]
