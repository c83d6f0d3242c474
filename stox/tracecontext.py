"""W3C Trace Context `traceparent` values, and whether traces are wanted. No OpenTelemetry here.

A traced workflow keeps its root context (the upload span's) as a `traceparent` in its
document. Each dispatch carries a child of it, whose span id is made from the attempt's
`step_id` (`dispatch_span_id`): the dispatch's context is known when its event is written,
before the span is recorded, on whichever instance, so the domain can put it into the
payload without any tracing library (stox/tracing.py records the span with that id).

The parsing here takes what services send, so it checks the format strictly and bounds it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, NamedTuple

HEADER = "traceparent"  # the HTTP and AMQP header, and the dispatch payload's field

# version 00 exactly; a later version may add fields after a dash (W3C Trace Context §3.2.4)
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
MAX_LENGTH = 512  # far more than any version needs; longer is not looked at
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16

_EXPORTERS = frozenset({"otlp", "console"})


class SpanContext(NamedTuple):
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    flags: str  # 2 hex digits; bit 0: sampled

    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


def parse(value: object) -> SpanContext | None:
    """The context `value` names, or None when it is not a valid traceparent."""
    if not isinstance(value, str) or len(value) > MAX_LENGTH:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE:
        return None
    if span_id == _ZERO_SPAN:
        return None
    return SpanContext(trace_id, span_id, flags)


def dispatch_span_id(step_id: str) -> str:
    """The span id of the dispatch of the attempt `step_id`: the same on every instance."""
    span_id = hashlib.blake2b(step_id.encode(), digest_size=8).hexdigest()
    return span_id if span_id != _ZERO_SPAN else "1".rjust(16, "0")


def dispatch(root: str, step_id: str) -> str:
    """The traceparent a dispatch carries: a child of the workflow's `root`."""
    # root is one this gateway wrote: "00-<trace id>-<span id>-<flags>"
    return f"{root[:36]}{dispatch_span_id(step_id)}{root[52:]}"


def headers(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The message headers an event with `payload` is published with: its traceparent."""
    value = payload.get(HEADER)
    return {HEADER: value} if value is not None else {}


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the standard OpenTelemetry variables ask for traces: an exporter named in
    OTEL_TRACES_EXPORTER, or (that unset) an OTLP endpoint; never with OTEL_SDK_DISABLED."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER")
    if exporters is not None:
        return bool(exporter_names(exporters))
    return any(
        environ.get(name, "").strip()
        for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def exporter_names(value: str) -> list[str]:
    """The exporters of an OTEL_TRACES_EXPORTER value (`none` and blanks left out)."""
    names = [name.strip().lower() for name in value.split(",")]
    return [name for name in names if name and name != "none"]


def unsupported(names: list[str]) -> list[str]:
    """The names of `names` this gateway has no exporter for (it has `otlp`, `console`)."""
    return [name for name in names if name not in _EXPORTERS]


# -- the context a call continues ---------------------------------------------------------

_continued: ContextVar[str | None] = ContextVar("stox_traceparent", default=None)


def continued() -> str | None:
    """The traceparent the caller's work continues (a service's report), if it sent one."""
    return _continued.get()


class continuing:
    """`with continuing(value):` what runs inside continues the context a service sent
    (a report's `traceparent` header); nothing is set when `value` is not a string."""

    __slots__ = ("_token", "_value")

    def __init__(self, value: object) -> None:
        self._value = value if isinstance(value, str) else None
        self._token: Token[str | None] | None = None

    def __enter__(self) -> None:
        if self._value is not None:
            self._token = _continued.set(self._value)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _continued.reset(self._token)
            self._token = None
