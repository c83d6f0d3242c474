"""The base handler: JSON bodies with a size limit, one error shape, bearer-token users.

Every error leaves as `{"error": {"code", "message", "fields"?}}`; unexpected exceptions
become a 500 that reveals nothing of the internals (and are logged with the request id).
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from types import TracebackType
from typing import Any, TypeVar, cast

import tornado.web
from marshmallow import Schema, ValidationError

from stox.auth.tokens import ADMIN, SERVICE, USER, InvalidToken, Principal, TokenAuthority
from stox.logs import log_exception
from stox.orchestrator import Orchestrator

log = logging.getLogger("stox.http")

F = TypeVar("F", bound=Callable[..., Awaitable[None]])

# which token roles each declared audience admits
_ADMITS = {USER: {USER, ADMIN}, ADMIN: {ADMIN}, SERVICE: {SERVICE}}


class ApiError(tornado.web.HTTPError):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, reason=HTTPStatus(status).phrase)
        self.code = code
        self.message = message
        self.fields = fields
        self.headers = headers or {}


def requires(role: str) -> Callable[[F], F]:
    """Declare who may call a handler method: "user" (users and admins), "admin", "service"."""
    admitted = _ADMITS[role]

    def decorate(method: F) -> F:
        @functools.wraps(method)
        async def wrapper(self: BaseHandler, *args: Any, **kwargs: Any) -> None:
            principal = self.principal
            if principal.role not in admitted:
                raise ApiError(403, "forbidden", f"this endpoint needs a {role} token")
            await method(self, *args, **kwargs)

        return cast(F, wrapper)

    return decorate


class PathOnlyErrorLog(tornado.web.RequestHandler):
    """Logs handler errors by path: Tornado's own log names the URI, ?token= and all."""

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        log_exception(self, typ, value, tb)


@tornado.web.stream_request_body
class BaseHandler(PathOnlyErrorLog):
    """Reads the body itself so an oversized one gets a 413 before it is buffered."""

    def initialize(self) -> None:
        self._chunks: list[bytes] = []
        self._received = 0
        self._principal: Principal | None = None

    # -- dependencies, read from the application settings -------------------------------

    @property
    def orchestrator(self) -> Orchestrator:
        return cast(Orchestrator, self.settings["orchestrator"])

    @property
    def tokens(self) -> TokenAuthority:
        return cast(TokenAuthority, self.settings["tokens"])

    @property
    def max_body_size(self) -> int:
        return cast(int, self.settings["max_body_size"])

    # -- request body ---------------------------------------------------------------------

    def set_default_headers(self) -> None:
        self.set_header("X-Request-Id", self.request_id)

    def prepare(self) -> None:
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_size:
            raise self._too_large()

    def data_received(self, chunk: bytes) -> None:
        if self._finished:
            return
        self._received += len(chunk)
        if self._received > self.max_body_size:
            self._chunks.clear()
            error = self._too_large()
            self.send_error(error.status_code, exc_info=(type(error), error, None))
            return
        self._chunks.append(chunk)

    def _too_large(self) -> ApiError:
        return ApiError(
            413, "body_too_large", f"the request body is over {self.max_body_size} bytes"
        )

    @property
    def request_id(self) -> str:
        if not hasattr(self, "_request_id"):
            self._request_id = self.request.headers.get("X-Request-Id") or uuid.uuid4().hex
        return self._request_id

    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(b"".join(self._chunks) or b"null")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
        except RecursionError:  # arrays or objects nested about a thousand levels deep
            raise ApiError(400, "invalid_json", "the body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        return body

    def load(self, schema: Schema, data: dict[str, Any]) -> dict[str, Any]:
        try:
            return cast(dict[str, Any], schema.load(data))
        except ValidationError as exc:
            raise invalid(exc) from None

    def query(self) -> dict[str, str]:
        """Query parameters, the last value of each."""
        return {
            name: self.decode_argument(values[-1], name)
            for name, values in self.request.query_arguments.items()
        }

    # -- authentication -------------------------------------------------------------------

    @property
    def principal(self) -> Principal:
        if self._principal is None:
            self._principal = self._authenticate()
        return self._principal

    @property
    def bearer_token(self) -> str:
        """The token of the Authorization header; 401 when there is none."""
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "unauthorized",
                "send Authorization: Bearer <token>",
                headers={"WWW-Authenticate": 'Bearer realm="stox"'},
            )
        return token.strip()

    def _authenticate(self) -> Principal:
        token = self.bearer_token
        try:
            return self.tokens.verify(token)
        except InvalidToken:
            raise ApiError(
                401,
                "invalid_token",
                "the token is invalid or has expired",
                headers={"WWW-Authenticate": 'Bearer realm="stox", error="invalid_token"'},
            ) from None

    # -- responses ------------------------------------------------------------------------

    def allowed_methods(self) -> list[str]:
        base = tornado.web.RequestHandler
        return [
            method
            for method in ("GET", "POST", "PUT", "PATCH", "DELETE")
            if getattr(type(self), method.lower()) is not getattr(base, method.lower())
        ]

    def render(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body, separators=(",", ":")))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        if isinstance(exc, ApiError):
            error: dict[str, Any] = {"code": exc.code, "message": exc.message}
            if exc.fields:
                error["fields"] = exc.fields
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif status_code >= 500:
            log.error("request %s failed", self.request_id, exc_info=kwargs.get("exc_info"))
            error = {"code": "internal", "message": "internal error; see the server log"}
        else:
            phrase = HTTPStatus(status_code).phrase
            error = {"code": phrase.lower().replace(" ", "_"), "message": phrase}
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": error}, separators=(",", ":")))


def invalid(exc: ValidationError) -> ApiError:
    messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
    fields = {name: _flatten(value) for name, value in messages.items()}
    first = next(iter(fields), "body")
    return ApiError(400, "invalid_input", f"invalid value for {first}", fields)


def _flatten(value: Any) -> Any:
    """Marshmallow's nested messages, as they are; lists of one message become that message."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    return value


class NotFoundHandler(BaseHandler):
    """Any path no route matches: a JSON 404 for every method."""

    def prepare(self) -> None:
        super().prepare()
        raise ApiError(404, "not_found", f"no such endpoint: {self.request.path}")
