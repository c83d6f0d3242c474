"""Logging set-up (JSON or text lines) and the request log, which never shows credentials."""

from __future__ import annotations

import json
import logging
import sys
import time
from types import TracebackType
from typing import Any

import tornado.web
from tornado.log import app_log, gen_log

_ACCESS = logging.getLogger("stox.access")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
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
    message of an HTTPError is logged without its arguments, which may quote the query
    (Tornado's "Invalid unicode in %s: %r").
    """
    request = handler.request
    summary = f"{request.method} {request.path} ({request.remote_ip})"
    if isinstance(value, tornado.web.HTTPError):
        if value.log_message:
            gen_log.warning("%d %s: %s", value.status_code, summary, value.log_message)
    else:
        app_log.error("Uncaught exception %s", summary, exc_info=(typ, value, tb))
