"""Service completion reports arriving over the bus (`step.completed`).

They obey the same rules as the HTTP endpoint, including its credentials: a message must
carry a service token in the header `authorization: Bearer <jwt>`. A message that can never
be applied (malformed, or without a valid service token) is rejected to the dead-letter
queue, once; a stale or unknown one is acknowledged and logged, since redelivering it would
never change the answer.
"""

from __future__ import annotations

import logging

from marshmallow import ValidationError

from stox import tracecontext
from stox.auth import bearer
from stox.auth.tokens import SERVICE, InvalidToken, TokenAuthority
from stox.bus.base import Event, Handler, Rejected
from stox.logs import bind
from stox.orchestrator import NotFound, Orchestrator
from stox.schemas import completion_event_schema
from stox.workflow import Report, StaleReport

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"  # the AMQP header; its name is matched in any case


def completion_handler(orchestrator: Orchestrator, tokens: TokenAuthority) -> Handler:
    async def handle(event: Event) -> None:
        service = authorize(tokens, event)
        try:
            report = Report(**completion_event_schema.load(event.payload), by=f"service:{service}")
        except ValidationError as exc:
            raise Rejected(f"malformed completion {event.message_id}: {exc.messages}") from None
        bind(workflow_id=report.workflow_id, step=report.step_type)  # the attempt: see report()
        try:
            with tracecontext.continuing(event.headers.get(tracecontext.HEADER)):
                await orchestrator.report(report)
        except (StaleReport, NotFound) as exc:
            log.info("completion %s ignored: %s %s", event.message_id, type(exc).__name__, exc)

    return handle


def authorize(tokens: TokenAuthority, event: Event) -> str:
    """The name of the service whose valid token the event carries; Rejected if it carries
    none (the reason names no token)."""
    header = next((v for k, v in event.headers.items() if k.lower() == AUTHORIZATION), None)
    token = bearer.from_authorization(header)
    if token is None:
        raise Rejected(f"completion {event.message_id} has no authorization: Bearer header")
    try:
        principal = tokens.verify(token)
    except InvalidToken as exc:
        raise Rejected(f"completion {event.message_id}: invalid service token ({exc})") from None
    if principal.role != SERVICE:
        raise Rejected(f"completion {event.message_id}: a {principal.role} token, not a service's")
    return principal.username
