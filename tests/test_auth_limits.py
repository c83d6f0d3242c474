"""LoginLimiter: failed logins per key in a sliding window, in memory, bounded."""

from __future__ import annotations

import pytest

from stox.auth.limits import LoginLimiter, TooManyAttempts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fail(limiter: LoginLimiter, *keys: str) -> None:
    limiter.begin(*keys).end(failed=True)


def test_the_eleventh_attempt_waits_for_the_oldest_failure_to_age_out() -> None:
    clock = Clock()
    limiter = LoginLimiter(10, 300, clock=clock)
    for _ in range(10):
        fail(limiter, "user:alice")
        clock.now += 10  # failures at 1000, 1010, ..., 1090
    with pytest.raises(TooManyAttempts) as info:
        limiter.begin("user:alice")
    assert info.value.retry_after == 200  # the first ages out at 1300; now is 1100

    clock.now = 1300.5
    limiter.begin("user:alice").end(failed=True)  # one slot free again
    with pytest.raises(TooManyAttempts):
        limiter.begin("user:alice")


def test_any_key_at_its_limit_refuses_and_others_are_untouched() -> None:
    limiter = LoginLimiter(3, 60, clock=Clock())
    for name in ("a", "b", "c"):
        fail(limiter, f"user:{name}", "address:10.0.0.1")
    with pytest.raises(TooManyAttempts):
        limiter.begin("user:d", "address:10.0.0.1")
    limiter.begin("user:d", "address:10.0.0.2").end(failed=False)
    assert "user:d" not in limiter._failures  # a refused attempt recorded nothing


def test_an_attempt_counts_until_it_is_taken_back() -> None:
    limiter = LoginLimiter(2, 60, clock=Clock())
    first = limiter.begin("user:alice")
    second = limiter.begin("user:alice")
    with pytest.raises(TooManyAttempts):  # two in flight fill the limit
        limiter.begin("user:alice")
    first.end(failed=False)
    second.end(failed=False)
    assert len(limiter) == 0
    limiter.begin("user:alice").end(failed=True)
    limiter.begin("user:alice").end(failed=False)
    assert len(limiter._failures["user:alice"]) == 1


def test_the_number_of_keys_is_bounded_least_recently_used_first() -> None:
    clock = Clock()
    limiter = LoginLimiter(1, 60, max_keys=3, clock=clock)
    for name in ("a", "b", "c"):
        fail(limiter, f"user:{name}")
        clock.now += 1
    fail(limiter, "user:d")
    assert len(limiter) == 3
    limiter.begin("user:a").end(failed=False)  # "a" was evicted: allowed again
    with pytest.raises(TooManyAttempts):
        limiter.begin("user:d")


def test_old_failures_are_dropped() -> None:
    clock = Clock()
    limiter = LoginLimiter(5, 60, clock=clock)
    fail(limiter, "user:alice")
    clock.now += 61
    limiter.begin("user:bob").end(failed=False)
    limiter.begin("user:alice").end(failed=False)
    assert len(limiter) == 0


def test_zero_means_no_limit() -> None:
    limiter = LoginLimiter(0, 60, clock=Clock())
    for _ in range(100):
        fail(limiter, "user:alice")
    assert len(limiter) == 0
