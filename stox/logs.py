"""Logging set-up (JSON or text lines), the log context, the request log, and Tornado's
messages redacted.

The gateway's own lines never show a query string, a token or a password. Tornado's quote what
a client sent (a header value it cannot parse, the start of a query value that is not UTF-8),
so its loggers get a filter that takes those out (`redact_tornado_logs`).

Every line about a workflow carries its `workflow_id` (and `step`, `attempt`, the request's
`request_id` where there is one), whichever logger writes it: the code that handles a request,
a bus message or one workflow's background work sets the *log context* (a contextvar, so each
asyncio task has its own and the tasks it starts inherit it), and a filter on the handler
copies it onto every record. Work that serves many workflows at once (a group commit, a batch
of notifications) runs `detached()`, so its lines name none of them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType, TracebackType
from typing import IO, Any

import tornado.web
from tornado.log import app_log, gen_log

_ACCESS = logging.getLogger("stox.access")
TORNADO_LOGGERS = ("tornado.access", "tornado.application", "tornado.general")
REDACTED = "[redacted]"
# a value quoted by repr(), which is how Tornado quotes what a client sent: in single quotes,
# or in double quotes around a single quote (never around a word, as Tornado's own words are)
_QUOTED = re.compile(r"b?'(?:[^'\\\n]|\\.)*'" + "|" + r'b?"[^"\n]*\'[^"\n]*"')
_CREDENTIALS = [
    (re.compile(r"(/[^\s?'\"]*)\?[^\s'\"]+"), rf"\1?{REDACTED}"),  # a query string
    (re.compile(r"(?i)\b(bearer)\b[\s,]+[^\s,'\"]+"), rf"\1 {REDACTED}"),
    (re.compile(r"eyJ[\w-]{4,}(?:\.[\w-]*){0,2}"), REDACTED),  # a JWT, or its start
]


# what the log context may hold, in the order lines show it
CONTEXT_FIELDS = ("workflow_id", "step", "attempt", "request_id")
INSTANCE = "instance"  # the gateway instance's id, on every JSON line
_NOTHING: Mapping[str, Any] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "stox_log_context", default=_NOTHING
)
# what a workflow id read from a message may look like to be logged as one (ours are 32 hex
# digits; a client's may differ, but never holds spaces or control characters)
_PLAIN_ID = re.compile(r"[\w.:-]{1,64}")


def bind(**fields: Any) -> None:
    """Add `fields` (those not None) to the log context of the running task, for the rest of
    it and the tasks it starts from now on. For code that runs in a task of its own (a
    request's handler, a bus message's): the context goes with the task."""
    if None in fields.values():
        fields = {k: v for k, v in fields.items() if v is not None}
    _context.set({**_context.get(), **fields})


def start_context(**fields: Any) -> None:
    """Set the log context of the running task to exactly `fields` (those not None),
    dropping what it inherited: the first thing a task about one workflow does."""
    _context.set({k: v for k, v in fields.items() if v is not None})


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Exactly `fields` (those not None) for the block, then the context as it was: for one
    workflow's turn in a loop over many (the sweeper's, the relay's)."""
    token = _context.set({k: v for k, v in fields.items() if v is not None})
    try:
        yield
    finally:
        _context.reset(token)


def workflow_fields(workflow_id: object) -> dict[str, Any]:
    """`{"workflow_id": workflow_id}` if what a message names (its `correlation_id`) can be
    logged as it is; else nothing."""
    if isinstance(workflow_id, str) and _PLAIN_ID.fullmatch(workflow_id):
        return {"workflow_id": workflow_id}
    return {}


def message_context(workflow_id: object) -> None:
    """Start a bus message's task with the workflow it names (its `correlation_id`)."""
    _context.set(workflow_fields(workflow_id) or _NOTHING)


def event_log_fields(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The step and attempt an event names (a dispatch does), as `extra` for a line about it."""
    return {
        name: payload[key]
        for name, key in (("step", "step_type"), ("attempt", "attempt"))
        if key in payload
    }


def detached() -> contextvars.Context:
    """A copy of the current context with no log context, for a callback or task that serves
    many workflows (`loop.call_soon(f, context=detached())`), so that it does not carry the
    workflow or request of whoever happened to start it."""
    context = contextvars.copy_context()
    context.run(_context.set, _NOTHING)
    return context


class LogContext(logging.Filter):
    """Copies the log context, and the instance's id, onto each record (a field given to the
    call in `extra` is kept: it says more precisely what the line is about)."""

    def __init__(self, instance: str | None = None) -> None:
        super().__init__()
        self.instance = instance

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        for name, value in _context.get().items():
            fields.setdefault(name, value)
        if self.instance is not None:
            fields[INSTANCE] = self.instance
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = record.__dict__
        for name in (INSTANCE, *CONTEXT_FIELDS):
            value = fields.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # as logging.Formatter does: a filter may have set it
            entry["exc"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger message`, then ` workflow_id=… step=… attempt=… request_id=…` for
    those the line has (before its traceback, if any)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = record.__dict__
        for name in CONTEXT_FIELDS:
            value = fields.get(name)
            if value is not None:
                text += f" {name}={value}"
        return text


def make_handler(fmt: str, stream: IO[str], instance: str | None = None) -> logging.Handler:
    """A handler writing `fmt` ("json" or "text") lines to `stream`, with the log context."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(LogContext(instance))
    return handler


def configure(level: str, fmt: str, instance: str | None = None) -> None:
    """Every logger's lines to stderr as `fmt`; `instance`: the gateway's id, on each line."""
    root = logging.getLogger()
    root.handlers[:] = [make_handler(fmt, sys.stderr, instance)]
    root.setLevel(level.upper())
    # pika narrates every channel it opens at info and every failed connection attempt in five
    # errors; the RabbitMQ bus reports each failure in one line with its cause, so pika speaks
    # only at debug (then from warning up)
    quiet = logging.WARNING if root.level <= logging.DEBUG else logging.CRITICAL
    logging.getLogger("pika").setLevel(quiet)
    # PyMongo's debug lines are every command and every answer, documents (products) and all,
    # and they would double the cost of a request at debug: it speaks from info up
    logging.getLogger("pymongo").setLevel(max(root.level, logging.INFO))


def redact(text: str) -> str:
    """`text` without query strings, bearer credentials and JWTs."""
    for pattern, replacement in _CREDENTIALS:
        text = pattern.sub(replacement, text)
    return text


class RedactClientInput(logging.Filter):
    """Rewrites a record without what a client sent: quoted values and credentials.

    A traceback keeps its quoted strings (they are mostly source code); only credentials are
    taken out of it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: the handler reports it as usual
            return True
        record.msg, record.args = redact(_QUOTED.sub(REDACTED, message)), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redact_tornado_logs() -> None:
    """Put the RedactClientInput filter on Tornado's loggers (once)."""
    for name in TORNADO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactClientInput) for f in logger.filters):
            logger.addFilter(RedactClientInput())


def log_request(handler: tornado.web.RequestHandler) -> None:
    """One line a request: the path without its query (which may carry ?token=)."""
    status = handler.get_status()
    level = logging.DEBUG if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if not _ACCESS.isEnabledFor(level):
        return
    request_id = handler._headers.get("X-Request-Id")
    _ACCESS.log(
        level,
        "%d %s %s %.1fms %s",
        status,
        handler.request.method,
        handler.request.path,
        1000.0 * handler.request.request_time(),
        request_id or "-",
        # also where the request ends outside its handler's task (a 413 while reading)
        extra={"request_id": request_id},
    )


def log_exception(
    handler: tornado.web.RequestHandler,
    typ: type[BaseException] | None,
    value: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """Tornado's RequestHandler.log_exception, naming the path where Tornado names the URI.

    Tornado's own version logs the whole URI, whose query may carry ?token=. The log
    message of an HTTPError is logged without its arguments; it may still quote what the
    client sent (Tornado's "Invalid unicode in token: b'…'"), which the filter on Tornado's
    loggers takes out.
    """
    request = handler.request
    summary = f"{request.method} {request.path} ({request.remote_ip})"
    if isinstance(value, tornado.web.HTTPError):
        if value.log_message:
            gen_log.warning("%d %s: %s", value.status_code, summary, value.log_message)
    else:
        app_log.error("Uncaught exception %s", summary, exc_info=value)
