"""pika writes each AMQP frame with a system call of its own: a publish is three (method,
header, body), an ack one more. On a busy gateway that was a tenth of the loop's time on
RabbitMQ (py-spy, bench/e2e.py --rabbitmq-url), for frames that sit in pika's buffer together
anyway: it only sends once the socket is writable, on the loop's next turn. `coalesce()` makes
its plaintext transport join what is buffered into one chunk before sending, so the frames of a
turn go out in one call (a partial send is handled as pika handles it: the rest stays buffered).

This changes one private method of pika 1.4 (pinned in requirements.txt); should a later pika
lack it, nothing is changed and frames go out one by one as before.
"""

from __future__ import annotations

from typing import Any

from pika.adapters.utils import io_services_utils

_Transport: Any = getattr(io_services_utils, "_AsyncTransportBase", None)
_original = getattr(_Transport, "_produce", None)


def _produce_joined(self: Any) -> None:
    buffers = self._tx_buffers
    if len(buffers) > 1:
        joined = b"".join(buffers)
        buffers.clear()
        buffers.append(joined)
    assert _original is not None  # coalesce() installs this only where pika has it
    _original(self)


def coalesce() -> bool:
    """Join the buffered frames before each send; whether pika could be changed."""
    if _original is None or not hasattr(_Transport, "_sigint_safe_send"):
        return False
    _Transport._produce = _produce_joined
    return True
