"""Logging set-up (JSON or text lines) and the request log, which never shows credentials."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import tornado.web

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
