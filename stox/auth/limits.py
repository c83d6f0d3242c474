"""Attempt limits, in memory, bounded: the auth endpoints' failed logins and registrations, and
uploads per user.

A `Window` keeps, per key, the times of its recent attempts (none older than its window); a
key with as many as its limit is refused until the oldest ages out. An attempt counts from
the moment it starts, so concurrent ones cannot slip past a limit while a password hashes; it
is taken back (`Attempt.cancel`) when it should not count. At most `max_keys` keys are kept;
the least recently used go first. A limit of 0 is no limit.

Failed logins are limited per (user name, client address): strictly, so an attacker
elsewhere cannot lock the owner out; per user name, much higher, against guessing from many
addresses (an address the name signed in from recently is exempt, so its owner still gets
in); and per address, against trying many names from one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from settings import AuthSettings, ServerSettings

Key = tuple[str, ...]
KNOWN_FOR = 30 * 24 * 3600.0  # how long a successful (name, address) is remembered


class TooManyAttempts(Exception):
    def __init__(self, what: str, retry_after: int) -> None:
        super().__init__(f"too many {what}; retry after {retry_after}s")
        self.what = what
        self.retry_after = retry_after


class Attempt:
    """One attempt, counted against its keys until `cancel` takes it back."""

    def __init__(self, window: Window, keys: tuple[Key, ...], stamp: float) -> None:
        self._window, self._keys, self._stamp = window, keys, stamp

    def cancel(self) -> None:
        self._window._forget(self._keys, self._stamp)
        self._keys = ()


class Window:
    """Recent attempts per key within `window` seconds; at most `max_keys` keys, LRU.
    `what` names the attempts in TooManyAttempts."""

    def __init__(
        self,
        window: float,
        what: str,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.what = what
        self.max_keys = max_keys
        self._clock = clock
        self._times: OrderedDict[Key, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._times)

    def begin(self, limits: Iterable[tuple[Key, int]]) -> Attempt:
        """Count an attempt against each (key, limit); TooManyAttempts, counting nothing,
        when any key is at its limit."""
        now = self._clock()
        limited = [(key, limit) for key, limit in limits if limit > 0]
        waits = [
            times[-limit] + self.window - now
            for key, limit in limited
            if (times := self._recent(key, now)) is not None and len(times) >= limit
        ]
        if waits:
            raise TooManyAttempts(self.what, max(1, math.ceil(max(waits))))
        for key, _ in limited:
            times = self._times.get(key)
            if times is None:
                times = self._times[key] = deque()
                if len(self._times) > self.max_keys:
                    self._times.popitem(last=False)
            else:
                self._times.move_to_end(key)
            times.append(now)
        return Attempt(self, tuple(key for key, _ in limited), now)

    def _recent(self, key: Key, now: float) -> deque[float] | None:
        times = self._times.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._times[key]
            return None
        return times

    def _forget(self, keys: tuple[Key, ...], stamp: float) -> None:
        for key in keys:
            times = self._times.get(key)
            if times is None:  # evicted or aged out meanwhile
                continue
            with contextlib.suppress(ValueError):  # aged out meanwhile
                times.remove(stamp)
            if not times:
                del self._times[key]


class LoginLimiter:
    """Failed logins per (name, address), per name and per address; successes remembered."""

    def __init__(
        self,
        max_failures: int = 10,
        window: float = 300.0,
        *,
        per_name: int = 100,
        per_address: int = 100,
        max_keys: int = 100_000,
        known_for: float = KNOWN_FOR,
        max_known: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.per_name = per_name
        self.per_address = per_address
        self.failures = Window(window, "failed logins", max_keys=max_keys, clock=clock)
        self.known_for = known_for
        self.max_known = max_known
        self._clock = clock
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()  # -> last success

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> LoginLimiter:
        return cls(
            auth.max_login_failures,
            auth.login_failure_window,
            per_name=auth.max_login_failures_per_name,
            per_address=auth.max_login_failures_per_address,
        )

    def begin(self, username: str, address: str) -> Attempt:
        """Start a login, counted as a failure until cancelled; TooManyAttempts when the
        pair, the address or (unless the pair is known) the name is at its limit."""
        limits = [
            (("pair", username, address), self.max_failures),
            (("address", address), self.per_address),
        ]
        if not self.known(username, address):
            limits.append((("name", username), self.per_name))
        return self.failures.begin(limits)

    def succeeded(self, username: str, address: str) -> None:
        """Remember that `username` signed in from `address` (the least recent go first)."""
        pair = (username, address)
        self._known[pair] = self._clock()
        self._known.move_to_end(pair)
        if len(self._known) > self.max_known:
            self._known.popitem(last=False)

    def known(self, username: str, address: str) -> bool:
        """True when `username` signed in from `address` within `known_for`."""
        last = self._known.get((username, address))
        if last is None:
            return False
        if last <= self._clock() - self.known_for:
            del self._known[(username, address)]
            return False
        return True


class RegistrationLimiter:
    """Registrations per client address."""

    def __init__(
        self,
        max_registrations: int = 10,
        window: float = 3600.0,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_registrations = max_registrations
        self.registrations = Window(
            window, "registrations from this address", max_keys=max_keys, clock=clock
        )

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> RegistrationLimiter:
        return cls(auth.max_registrations, auth.registration_window)

    def begin(self, address: str) -> Attempt:
        """Start a registration, counted until cancelled; TooManyAttempts at the limit."""
        return self.registrations.begin([(("address", address), self.max_registrations)])


class UploadLimiter:
    """Uploads per user (a flood from one user is refused; others upload on)."""

    def __init__(
        self,
        max_uploads: int = 300,
        window: float = 10.0,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_uploads = max_uploads
        self.uploads = Window(window, "uploads", max_keys=max_keys, clock=clock)

    @classmethod
    def from_settings(cls, server: ServerSettings) -> UploadLimiter:
        return cls(server.max_uploads_per_user, server.upload_window)

    def begin(self, user_id: str) -> Attempt:
        """Count an upload of `user_id`; TooManyAttempts at the limit."""
        return self.uploads.begin([(("user", user_id), self.max_uploads)])
