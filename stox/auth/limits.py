"""Failed-login limits: per user name and per client address, in memory, bounded.

Each key keeps the times of its recent failures (at most `max_failures`, none older than
`window`); a key with `max_failures` of them is refused until the oldest ages out. An attempt
counts as a failure from the moment it starts, so concurrent guesses cannot slip past the
limit while the password hashes; it is taken back when the login succeeds or fails for a
reason that is not the client's (the AuthService unavailable). At most `max_keys` keys are
kept; the least recently used go first.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable


class TooManyAttempts(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed logins; retry after {retry_after}s")
        self.retry_after = retry_after


class Attempt:
    """One login attempt, counted as a failure until `end(failed=False)` takes it back."""

    def __init__(self, limiter: LoginLimiter, keys: tuple[str, ...], stamp: float) -> None:
        self._limiter, self._keys, self._stamp = limiter, keys, stamp

    def end(self, *, failed: bool) -> None:
        if not failed:
            self._limiter._forget(self._keys, self._stamp)
        self._keys = ()


class LoginLimiter:
    def __init__(
        self,
        max_failures: int = 10,
        window: float = 300.0,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def begin(self, *keys: str) -> Attempt:
        """Start an attempt on behalf of `keys`; TooManyAttempts when any key is at its limit."""
        if self.max_failures <= 0:  # no limit configured
            return Attempt(self, (), 0.0)
        now = self._clock()
        waits = [
            times[0] + self.window - now
            for key in keys
            if (times := self._recent(key, now)) is not None and len(times) >= self.max_failures
        ]
        if waits:
            raise TooManyAttempts(max(1, math.ceil(max(waits))))
        for key in keys:
            times = self._failures.get(key)
            if times is None:
                times = self._failures[key] = deque()
                if len(self._failures) > self.max_keys:
                    self._failures.popitem(last=False)
            else:
                self._failures.move_to_end(key)
            times.append(now)
        return Attempt(self, keys, now)

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def _forget(self, keys: tuple[str, ...], stamp: float) -> None:
        for key in keys:
            times = self._failures.get(key)
            if times is None:  # evicted or aged out meanwhile
                continue
            with contextlib.suppress(ValueError):  # aged out meanwhile
                times.remove(stamp)
            if not times:
                del self._failures[key]
