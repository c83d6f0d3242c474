"""GET /ws: live workflow changes over a WebSocket (docs/architecture.md#the-hub-and-the-websocket).

Authenticated before the upgrade (`Sec-WebSocket-Protocol: bearer, <jwt>` or `?token=`),
Origin checked against `cors.allowed_origins`; a handshake refused before the upgrade is
answered in the API's JSON error shape, like every other endpoint. Refusals a browser must be
able to tell apart (it cannot read a refused handshake's answer) come after the upgrade, as
close codes: 4029 for a socket over the user's limit, 1013 (try again later) for one over
the instance's, 4401 when the token expires (the socket is closed at its `exp`), 4404 for a
workflow the user may not see. The hub bounds what each socket may queue (4008, too slow).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from typing import Any, cast
from urllib.parse import urlsplit

import tornado.web
import tornado.websocket
from marshmallow import ValidationError
from tornado.iostream import StreamClosedError

from handlers.base import (
    ApiError,
    BoundedBody,
    JsonErrors,
    PathOnlyErrorLog,
    invalid,
    status_error,
    unauthorized,
    verified,
    write_json_error,
)
from handlers.openapi import operation
from stox.auth import bearer
from stox.auth.tokens import SERVICE, Principal, TokenAuthority
from stox.hub import Hub, ServerFull, Subscription, TooManySockets
from stox.orchestrator import NotFound
from stox.schemas import workflow_id_schema

CLOSE_TOO_MANY = 4029
CLOSE_TRY_AGAIN_LATER = 1013  # RFC 6455's registry: the server is overloaded
CLOSE_EXPIRED = 4401
CLOSE_NOT_FOUND = 4404
MAX_CLIENT_MESSAGE = 64 * 1024  # clients only listen: a larger message closes with 1009


class WorkflowSocket(JsonErrors, PathOnlyErrorLog, BoundedBody, tornado.websocket.WebSocketHandler):
    def initialize(self) -> None:
        self._error_written = False  # an error answer, in the JSON shape, is being written
        self.principal: Principal | None = None
        self.subscription: Subscription | None = None
        self.workflow_id: str | None = None
        self.stats = False  # ?stats=1: the figures too
        self._expiry: asyncio.TimerHandle | None = None
        self._outgoing: list[bytes] = []  # messages of this turn of the loop, not yet written
        self._written: asyncio.Future[None] | None = None  # resolved once they are flushed

    @property
    def hub(self) -> Hub:
        return cast(Hub, self.settings["hub"])

    @property
    def max_message_size(self) -> int:
        return MAX_CLIENT_MESSAGE

    def check_origin(self, origin: str) -> bool:
        allowed = cast(list[str], self.settings["allowed_origins"])
        if "*" in allowed:
            return True
        parts = urlsplit(origin)
        return f"{parts.scheme}://{parts.netloc}".lower() in {
            o.lower().rstrip("/") for o in allowed
        }

    def _token(self) -> str | None:
        """The bearer token: `Authorization` (the document's security scheme, what clients
        other than browsers send), else the subprotocols (browsers), else `?token=`."""
        headers = self.request.headers
        return (
            bearer.from_authorization(headers.get("Authorization"))
            or bearer.from_subprotocols(headers.get("Sec-WebSocket-Protocol", ""))
            or self.get_query_argument("token", None)
        )

    @operation(
        "Live workflow changes over a WebSocket",
        role="user",
        description=(
            "A WebSocket upgrade (`Upgrade: websocket`). Send the token as `Authorization: "
            "Bearer <jwt>`, `Sec-WebSocket-Protocol: bearer, <jwt>` (browsers, which cannot set "
            "the header) or `?token=`; the `Origin` must "
            "be one of `cors.allowed_origins`. The gateway sends text frames of JSON, "
            "`WebSocketMessage` in the components: first a `snapshot` of each workflow "
            "subscribed to (data: the workflow), then every change in `version` order: "
            "`step_dispatched`, `step_completed`, `step_retrying`, `step_failed`, "
            "`step_waiting_review`, `step_reviewed`, `step_review_escalated`, "
            "`workflow_completed`, `workflow_failed`, `workflow_cancelled`, and "
            "`webhook_delivered`, `webhook_retrying`, `webhook_given_up` when a webhook "
            "delivery of the workflow's events is recorded (data: `{step, workflow}`). "
            "With `?stats=1` (not with `workflow_id`) the socket also carries `stats` "
            "messages (workflow_id empty, version a counter, data: the figures GET "
            "/api/v1/stats answers, of the same workflows): one once the snapshot is out, "
            "then one after changes that move them, at most one a second. "
            "Clients only listen; a message over 64 KiB closes with 1009. "
            "Close codes: 4008 too slow, 4029 too many sockets for the user, 1013 too many for "
            "the instance, 4401 the token expired, 4404 no such workflow."
        ),
        parameters=(
            {
                "in": "query",
                "name": "workflow_id",
                "required": False,
                "description": "follow one workflow (default: all of the user's)",
                "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            },
            {
                "in": "query",
                "name": "stats",
                "required": False,
                "description": "`1`: the figures too (`stats` messages)",
                "schema": {"type": "string", "enum": ["0", "1"]},
            },
            {
                "in": "query",
                "name": "token",
                "required": False,
                "description": "the bearer token, for clients that cannot set the subprotocol",
                "schema": {"type": "string"},
            },
        ),
        answers={101: ("switching to the WebSocket protocol", None)},
        errors={
            400: "`invalid_input` (a malformed `workflow_id`, a `stats` other than 0 or 1 or "
            "with a `workflow_id`) or not a WebSocket handshake",
            403: "`forbidden`: a service token, or an origin not allowed",
            426: "another WebSocket protocol version",
        },
    )
    async def get(self, *args: Any, **kwargs: Any) -> None:
        token = self._token()
        if not token:
            raise unauthorized()
        self.principal = verified(cast(TokenAuthority, self.settings["tokens"]), token)
        if self.principal.role == SERVICE:
            raise ApiError(403, "forbidden", "services do not subscribe")
        workflow_id = self.get_query_argument("workflow_id", None)
        if workflow_id is not None:
            try:
                workflow_id_schema.load({"workflow_id": workflow_id})
            except ValidationError as exc:
                raise invalid(exc) from None
        self.workflow_id = workflow_id
        stats = self.get_query_argument("stats", "0")
        if stats not in ("0", "1") or (stats == "1" and workflow_id is not None):
            raise ApiError(
                400,
                "invalid_input",
                "stats is 0 or 1, and 1 watches no one workflow",
                {"stats": ["must be 0 or 1, and not with workflow_id"]},
            )
        self.stats = stats == "1"
        await super().get(*args, **kwargs)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self._error_written = True
        super().write_error(status_code, **kwargs)

    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> asyncio.Future[None]:
        """Tornado refuses a handshake it cannot take (no `Upgrade: websocket`, an origin
        `check_origin` refuses, missing WebSocket headers: a plain-text message; a version
        it does not speak: 426 and no body). Those answers leave in the JSON error shape."""
        status = self.get_status()
        if status < 400 or self._error_written:
            return super().finish(chunk)
        self._error_written = True
        message = chunk if isinstance(chunk, str) else None  # Tornado's words, when it has any
        return write_json_error(self, status_error(status, message))

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        # echo the client's own spelling: tornado insists the answer is one it offered
        return subprotocols[0] if subprotocols and subprotocols[0].lower() == "bearer" else None

    async def open(self, *args: Any, **kwargs: Any) -> None:
        self._bound_kernel_buffer()
        principal = self.principal
        assert principal is not None
        # an admin's or a reviewer's: everyone's (a reviewer finds what waits for review)
        owner = None if principal.can_review_any else principal.id
        try:
            self.subscription = self.hub.subscribe(
                self, user=principal.id, owner=owner, workflow_id=self.workflow_id, stats=self.stats
            )
        except TooManySockets as exc:
            self.close(CLOSE_TOO_MANY, str(exc))
            return
        except ServerFull as exc:
            self.close(CLOSE_TRY_AGAIN_LATER, str(exc))
            return
        self._expiry = asyncio.get_running_loop().call_later(
            max(0.0, principal.expires_at - time.time()), self._token_expired
        )
        try:
            await self.hub.send_snapshot(self.subscription)
        except NotFound:
            self.close(CLOSE_NOT_FOUND, "no such workflow")

    def _bound_kernel_buffer(self) -> None:
        """Without a bound, Linux lets the send queue of a client that does not read grow
        to tcp_wmem's maximum (4 MiB) on top of what the hub keeps."""
        size = cast(int, self.settings["websocket_send_buffer"])
        stream = self.ws_connection.stream if self.ws_connection is not None else None
        if size and stream is not None and stream.socket is not None:
            with contextlib.suppress(OSError):
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def _token_expired(self) -> None:
        self._expiry = None
        self._unsubscribe()
        self.close(CLOSE_EXPIRED, "token expired")

    def on_message(self, message: str | bytes) -> None:
        """Clients only listen; anything they send is ignored."""

    def on_close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._unsubscribe()

    def _unsubscribe(self) -> None:
        if self.subscription is not None:
            self.hub.unsubscribe(self.subscription)
            self.subscription = None

    def send(self, message: bytes) -> asyncio.Future[None] | None:
        """Queue `message` with the others sent in this turn of the loop: they go out as one
        write at its end (one system call, not one each, for a socket that watches many
        workflows). The future resolves once they are flushed to the kernel."""
        if self._written is None:
            if self.is_closing():
                return None
            loop = asyncio.get_running_loop()
            self._written = loop.create_future()
            loop.call_soon(self._write_out)
        self._outgoing.append(message)
        return self._written

    def is_closing(self) -> bool:
        connection = self.ws_connection
        return connection is None or connection.is_closing()

    def _write_out(self) -> None:
        messages, self._outgoing = self._outgoing, []
        written, self._written = self._written, None
        assert written is not None
        try:
            flushed = self.write_messages(messages)
        except (StreamClosedError, tornado.websocket.WebSocketClosedError) as exc:
            written.set_exception(exc)
            return
        flushed.add_done_callback(lambda done: _settle(written, done))

    def write_messages(self, messages: list[bytes]) -> asyncio.Future[None]:
        """Write the frames of `messages` at once; resolves once they are flushed."""
        connection = self.ws_connection
        if connection is None or connection.is_closing() or connection.stream is None:
            raise tornado.websocket.WebSocketClosedError()
        return connection.stream.write(b"".join(map(text_frame, messages)))


def text_frame(message: bytes) -> bytes:
    """One unfragmented, unmasked text frame (RFC 6455 §5.2), as a server sends it: what
    Tornado's `write_message` makes when no compression is negotiated (this handler offers
    none: `get_compression_options` is Tornado's, None)."""
    size = len(message)
    if size < 126:
        head = struct.pack("!BB", 0x81, size)
    elif size <= 0xFFFF:
        head = struct.pack("!BBH", 0x81, 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 127, size)
    return head + message


def _settle(written: asyncio.Future[None], flushed: asyncio.Future[None]) -> None:
    if written.done():
        return
    problem = None if flushed.cancelled() else flushed.exception()
    if problem is None:
        written.set_result(None)
    else:
        written.set_exception(problem)


routes = [(r"/ws", WorkflowSocket)]
