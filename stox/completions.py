"""Service completion reports arriving over the bus (`step.completed`).

They obey the same rules as the HTTP endpoint. A message that can never be applied
(malformed) is rejected to the dead-letter queue; a stale or unknown one is acknowledged and
logged, since redelivering it would never change the answer.
"""

from __future__ import annotations

import logging

from marshmallow import ValidationError

from stox.bus.base import Event, Handler, Rejected
from stox.orchestrator import NotFound, Orchestrator
from stox.schemas import completion_event_schema
from stox.workflow import Report, StaleReport

log = logging.getLogger(__name__)


def completion_handler(orchestrator: Orchestrator) -> Handler:
    async def handle(event: Event) -> None:
        try:
            report = Report(**completion_event_schema.load(event.payload))
        except ValidationError as exc:
            raise Rejected(f"malformed completion {event.message_id}: {exc.messages}") from None
        try:
            await orchestrator.report(report)
        except (StaleReport, NotFound) as exc:
            log.info("completion %s ignored: %s %s", event.message_id, type(exc).__name__, exc)

    return handle
