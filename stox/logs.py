"""Logging set-up (JSON or text lines), the request log, and Tornado's messages redacted.

The gateway's own lines never show a query string, a token or a password. Tornado's quote what
a client sent (a header value it cannot parse, the start of a query value that is not UTF-8),
so its loggers get a filter that takes those out (`redact_tornado_logs`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from types import TracebackType
from typing import Any

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


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # as logging.Formatter does: a filter may have set it
            entry["exc"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pika narrates every channel it opens at info and every failed connection attempt in five
    # errors; the RabbitMQ bus reports each failure in one line with its cause, so pika speaks
    # only at debug (then from warning up)
    quiet = logging.WARNING if root.level <= logging.DEBUG else logging.CRITICAL
    logging.getLogger("pika").setLevel(quiet)


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
    _ACCESS.log(
        level,
        "%d %s %s %.1fms %s",
        status,
        handler.request.method,
        handler.request.path,
        1000.0 * handler.request.request_time(),
        handler._headers.get("X-Request-Id", "-"),
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
