"""OpenAPI 3.1 for the route table, built from what each handler method declares.

A method declares its operation with `@operation` (its input schemas, from stox/schemas.py,
and its answers); `@requires` (handlers/base.py) adds the role it needs. `build` walks the
routes and reads both, so the document holds every route served and nothing else: a method
without a declaration fails the build. The errors every operation of a kind can answer
(401/403 with a role, 400/413 with a body or query, 500) are added here, once.

Each operation's `operationId` is its method and its handler's name without "Handler"
(`postUpload` for UploadHandler.post): what the `links` of an answer name, for clients and
for Schemathesis's stateful run (tests/fuzz.py) to follow one answer to the next request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import tornado.routing
import tornado.web
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema

from handlers import responses
from handlers.base import BaseHandler
from stox import version

F = TypeVar("F", bound=Callable[..., Any])

METHODS = ("get", "head", "post", "put", "patch", "delete", "options")
ERROR = "Error"
BEARER = "bearer"
# headers of the answers: every JSON-error handler's carries its request id; every 429 says
# when to try again
REQUEST_ID = {
    "description": "the request's id, as in the server log (the client's own, if it sent one)",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}
RETRY_AFTER = {
    "description": "seconds to wait before trying again",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
}
_ROLES = {
    "user": "a `user` or `admin` token",
    "admin": "an `admin` token",
    "service": "a `service` token",
}


@dataclass(frozen=True)
class Operation:
    summary: str
    answers: dict[int, tuple[str, Schema | dict[str, Any] | None]]  # status: (when, body)
    errors: dict[int, str] = field(default_factory=dict)  # status: when; body: the error shape
    body: Schema | None = None
    query: Schema | None = None
    parameters: tuple[dict[str, Any], ...] = ()  # headers, and query parameters of no schema
    role: str | None = None  # for a handler that checks the role itself, without @requires
    description: str = ""
    media_type: str = "application/json"
    json_errors: bool = True  # False: an unexpected failure is Tornado's HTML page (the dashboard)
    links: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)  # status: links


def operation_id(method: str, handler: type[tornado.web.RequestHandler]) -> str:
    """`postUpload` for UploadHandler's `post`."""
    return method + handler.__name__.removesuffix("Handler")


def operation(summary: str, **declared: Any) -> Callable[[F], F]:
    """Declare a handler method's operation for the OpenAPI document (see `Operation`)."""
    declaration = Operation(summary, **declared)

    def decorate(method: F) -> F:
        method.openapi = declaration  # type: ignore[attr-defined]
        return method

    return decorate


class Undeclared(Exception):
    """A routed handler method without an `@operation`."""


def _error(when: str) -> dict[str, Any]:
    return {"description": when, "content": {"application/json": {"schema": ERROR}}}


def _describe(op: Operation, role: str | None, operation_id: str) -> dict[str, Any]:
    errors: dict[int, str] = {}
    if op.json_errors:
        errors[500] = "an unexpected failure (`internal`; details only in the server log)"
    if op.body is not None:
        errors[400] = "`invalid_json`, or `invalid_input` naming the fields in `fields`"
        errors[413] = "`body_too_large`: over `server.max_body_size`"
    if op.query is not None:
        errors[400] = "`invalid_input` naming the parameters in `fields`"
    if role is not None:
        errors[401] = "`unauthorized` (no token) or `invalid_token`"
        errors[403] = f"`forbidden`: needs {_ROLES[role]}"
    errors.update(op.errors)
    answers: dict[str, Any] = {
        str(status): {"description": when}
        | ({"content": {op.media_type: {"schema": body}}} if body is not None else {})
        | ({"links": op.links[status]} if status in op.links else {})
        for status, (when, body) in op.answers.items()
    }
    answers.update({str(status): _error(when) for status, when in sorted(errors.items())})
    for status, answer in answers.items():
        headers = {"X-Request-Id": dict(REQUEST_ID)} if op.json_errors else {}
        if status == "429":
            headers["Retry-After"] = dict(RETRY_AFTER)
        if headers:
            answer["headers"] = headers
    doc: dict[str, Any] = {
        "operationId": operation_id,
        "summary": op.summary,
        "responses": dict(sorted(answers.items())),
        "security": [{BEARER: []}] if role else [],
    }
    if role:
        doc["x-required-role"] = role
        doc["description"] = f"Needs {_ROLES[role]}. {op.description}".strip()
    elif op.description:
        doc["description"] = op.description
    parameters = [*op.parameters]
    if op.query is not None:
        parameters.append({"in": "query", "schema": op.query})
    if parameters:
        doc["parameters"] = parameters
    if op.body is not None:
        doc["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": op.body}},
        }
    return doc


def _handlers(routes: Iterable[Any]) -> dict[str, type[tornado.web.RequestHandler]]:
    """Each routed path and its handler class."""
    specs = (
        r if isinstance(r, tornado.routing.URLSpec) else tornado.routing.URLSpec(*r) for r in routes
    )
    found = {}
    for spec in specs:
        path = spec.reverse()
        assert path is not None  # the API's routes have no arguments
        found[path] = spec.target
    return found


def paths(routes: Iterable[Any]) -> dict[str, list[str]]:
    """Each routed path and the HTTP methods its handler defines (lower case)."""
    base = tornado.web.RequestHandler
    return {
        path: [m for m in METHODS if getattr(handler, m) is not getattr(base, m)]
        for path, handler in _handlers(routes).items()
    }


def build(routes: list[Any]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes`; Undeclared when a method declares nothing."""
    spec = APISpec(
        title="Stox gateway",
        version=version.version(),
        openapi_version="3.1.0",
        plugins=[MarshmallowPlugin()],
        info={
            "description": "Product-upload workflows: upload, follow, cancel, retry; services "
            'report step completions. Every error is `{"error": {"code", "message", '
            '"fields"?}}`.'
        },
    )
    spec.components.security_scheme(
        BEARER, {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    )
    spec.components.schema(ERROR, schema=responses.ErrorSchema)
    spec.components.schema("WebSocketMessage", schema=responses.WebSocketMessageSchema)  # /ws
    handlers = _handlers(routes)
    for path, methods in paths(routes).items():
        operations = {}
        for method in methods:
            function = getattr(handlers[path], method)
            declared: Operation | None = getattr(function, "openapi", None)
            if declared is None:
                name = handlers[path].__name__
                raise Undeclared(f"{method.upper()} {path}: {name} has no @operation")
            role = getattr(function, "required_role", None) or declared.role
            operations[method] = _describe(declared, role, operation_id(method, handlers[path]))
        spec.path(path=path, operations=operations)
    return spec.to_dict()


class OpenApiHandler(BaseHandler):
    """The document, public; encoded once per application (`make_app`)."""

    @operation(
        "This document",
        answers={200: ("the OpenAPI 3.1 document of this API", None)},
    )
    async def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "public, max-age=300")
        self.finish(self.settings["openapi"])


routes = [(r"/api/v1/openapi.json", OpenApiHandler)]
