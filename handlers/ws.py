"""GET /ws: live workflow changes over a WebSocket (DESIGN §6).

Authenticated before the upgrade (`Sec-WebSocket-Protocol: bearer, <jwt>` or `?token=`),
Origin checked against `cors.allowed_origins`. A client whose unsent backlog passes
`MAX_BACKLOG` messages is dropped rather than buffered without bound.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit

import tornado.web
import tornado.websocket
from marshmallow import ValidationError

from handlers.base import BoundedBody, PathOnlyErrorLog
from stox.auth.tokens import SERVICE, InvalidToken, Principal, TokenAuthority
from stox.hub import Hub, Subscription
from stox.orchestrator import NotFound
from stox.schemas import HEX_ID

MAX_BACKLOG = 1000
CLOSE_TOO_SLOW = 4008
CLOSE_NOT_FOUND = 4404


class WorkflowSocket(PathOnlyErrorLog, BoundedBody, tornado.websocket.WebSocketHandler):
    def initialize(self) -> None:
        self.principal: Principal | None = None
        self.subscription: Subscription | None = None
        self.backlog = 0
        self.workflow_id: str | None = None

    @property
    def hub(self) -> Hub:
        return cast(Hub, self.settings["hub"])

    def check_origin(self, origin: str) -> bool:
        allowed = cast(list[str], self.settings["allowed_origins"])
        if "*" in allowed:
            return True
        parts = urlsplit(origin)
        return f"{parts.scheme}://{parts.netloc}".lower() in {
            o.lower().rstrip("/") for o in allowed
        }

    def _token(self) -> str | None:
        protocols = [
            p.strip() for p in self.request.headers.get("Sec-WebSocket-Protocol", "").split(",")
        ]
        if len(protocols) == 2 and protocols[0].lower() == "bearer":
            return protocols[1]
        return self.get_query_argument("token", None)

    async def get(self, *args: Any, **kwargs: Any) -> None:
        token = self._token()
        if not token:
            raise tornado.web.HTTPError(401, reason="send a bearer token")
        try:
            self.principal = cast(TokenAuthority, self.settings["tokens"]).verify(token)
        except InvalidToken:
            raise tornado.web.HTTPError(401, reason="invalid or expired token") from None
        if self.principal.role == SERVICE:
            raise tornado.web.HTTPError(403, reason="services do not subscribe")
        workflow_id = self.get_query_argument("workflow_id", None)
        if workflow_id is not None:
            try:
                HEX_ID(workflow_id)
            except ValidationError:
                raise tornado.web.HTTPError(400, reason="workflow_id: expected a hex id") from None
        self.workflow_id = workflow_id
        await super().get(*args, **kwargs)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        # echo the client's own spelling: tornado insists the answer is one it offered
        return subprotocols[0] if subprotocols and subprotocols[0].lower() == "bearer" else None

    async def open(self, *args: Any, **kwargs: Any) -> None:
        assert self.principal is not None
        owner = None if self.principal.is_admin and self.workflow_id else self.principal.id
        try:
            self.subscription = await self.hub.subscribe(
                self, owner=owner, workflow_id=self.workflow_id
            )
        except NotFound:
            self.close(CLOSE_NOT_FOUND, "no such workflow")

    def on_message(self, message: str | bytes) -> None:
        """Clients only listen; anything they send is ignored."""

    def on_close(self) -> None:
        if self.subscription is not None:
            self.hub.unsubscribe(self.subscription)
            self.subscription = None

    def send(self, message: bytes) -> bool:
        if self.backlog >= MAX_BACKLOG:
            self.close(CLOSE_TOO_SLOW, "too slow: backlog over limit")
            return False
        try:
            future = self.write_message(message)
        except tornado.websocket.WebSocketClosedError:
            return False
        self.backlog += 1
        future.add_done_callback(self._sent)
        return True

    def _sent(self, future: Any) -> None:
        self.backlog -= 1
        future.exception()  # a write to a closed socket is expected here; mark it seen


routes = [(r"/ws", WorkflowSocket)]
