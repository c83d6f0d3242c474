"""Random ids, from a buffer of the operating system's random bytes.

Several ids are made per transition (the step attempt's, each event's) and one per request;
`os.urandom` is a system call each time, which under load was a few per cent of the loop's
time. The bytes are the same (the kernel's CSPRNG), taken 4 KiB at a time: one call per 256
ids. Each thread has its own buffer, and a forked child starts with none (never the
parent's bytes again).
"""

from __future__ import annotations

import os
import threading

_CHUNK = 16 * 256
_local = threading.local()


def random16() -> bytes:
    """16 random bytes."""
    state = _local.__dict__
    pos = state.get("pos", _CHUNK)
    if pos >= _CHUNK:
        state["buf"] = os.urandom(_CHUNK)
        pos = 0
    state["pos"] = pos + 16
    buf: bytes = state["buf"]
    return buf[pos : pos + 16]


def new_id() -> str:
    """A random (version 4) UUID as 32 hex digits, as uuid4().hex gives."""
    raw = bytearray(random16())
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    return raw.hex()


def _forget() -> None:
    global _local
    _local = threading.local()


os.register_at_fork(after_in_child=_forget)
