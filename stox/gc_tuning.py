"""The cyclic garbage collector, tuned for a server whose heap is mostly long-lived.

A gateway keeps a large heap that is nearly all alive (cached documents, sockets,
subscriptions), and a full collection walks all of it, stopping the loop: tens of milliseconds
with a few thousand workflows cached, up to a second with 10,000 sockets open (bench/ws.py),
to find next to nothing (reference counting frees nearly everything; what is left are small
cycles, asyncio's tasks and their frames, which the young collections free).

So, once the gateway has started, what start-up made (modules, settings, routes) is frozen
out of the collector's reach (`gc.freeze()`), and a full collection comes FULL_EVERY
collections of the middle generation apart instead of CPython's 10. The young generations keep
CPython's thresholds: raising those too (50,000 allocations) cost about 8% more CPU per
workflow in bench/e2e.py, collecting the short-lived garbage later and from colder memory.
"""

from __future__ import annotations

import gc

FULL_EVERY = 100  # collections of the middle generation per full one (CPython: 10)


def tune() -> None:
    """Call once, when start-up is done."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_EVERY)
