"""The cyclic garbage collector, tuned for a server whose heap is mostly long-lived.

CPython's defaults collect the youngest generation every 2,000 container allocations and the
whole heap every hundred or so of those; a gateway allocates that many in a few milliseconds
(each request, event and socket message makes a few dozen), and keeps a large heap that is
nearly all alive (cached documents, sockets, subscriptions). Each collection stops the loop:
the young ones for about a millisecond, a full one for tens of milliseconds with a few
thousand workflows cached, and for up to a second with 20,000 sockets open (bench/ws.py).
What they find is little: reference counting frees nearly everything, and the rest are small
cycles (asyncio's tasks and their frames) that a rarer collection frees as well.

So, once the gateway has started, what start-up made (modules, settings, routes) is frozen
out of the collector's reach (`gc.freeze()`), and the thresholds are raised: the youngest
generation every THRESHOLDS[0] allocations, a full collection ten times rarer than CPython's.
"""

from __future__ import annotations

import gc

THRESHOLDS = (50_000, 20, 100)


def tune() -> None:
    """Call once, when start-up is done."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
