"""The event loop a process runs on: uvloop's by default, when it is installed, or asyncio's.

Tornado, pika's TornadoConnection, grpc.aio and PyMongo's async client all run on whichever
asyncio loop is running, so the choice (`server.event_loop`) changes nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: str) -> LoopFactory | None:
    """uvloop's new_event_loop for "uvloop" when uvloop is importable; None (asyncio's own
    loop, as `asyncio.run` makes it) for "asyncio" or without uvloop."""
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            return None
        return uvloop.new_event_loop
    return None


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """`asyncio.run(main)` on the loop `choice` names (see `loop_factory`)."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def running_loop() -> str:
    """Which loop is running, "uvloop" or "asyncio", for the start-up log."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.partition(".")[0] == "uvloop" else "asyncio"
