"""JSON for what the gateway itself encodes and decodes: stored documents, bus messages, WebSocket
messages and response bodies, with orjson (several times faster than the standard library, and
every transition encodes its document and events).

What a client or a service sends is parsed by the standard library instead (handlers/base.py,
the RabbitMQ bus's deliveries): orjson turns a whole number beyond 64 bits into a float
silently, where the request must be refused with its field named (stox/schemas.py). What is
encoded here has passed that check, so orjson can carry all of it: no NaN, no lone surrogate,
no whole number beyond 64 bits.
"""

from __future__ import annotations

from typing import Any

import orjson

loads = orjson.loads  # bytes or str


def dumps(value: Any) -> bytes:
    """`value` as compact JSON, UTF-8 bytes."""
    return orjson.dumps(value)


def dumps_text(value: Any) -> str:
    """`value` as compact JSON text (for a TEXT column or a str body)."""
    return orjson.dumps(value).decode()


def canonical(value: Any) -> bytes:
    """`value` as compact JSON with sorted keys: equal values, equal bytes (to hash them)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
