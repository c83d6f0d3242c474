"""Attempt limits: a sliding window per key, in memory, bounded; failed logins per (name,
address), per name and per address; registrations per address."""

from __future__ import annotations

import pytest
from support import Clock

from settings import AuthSettings, Duration
from stox.auth.limits import LoginLimiter, RegistrationLimiter, TooManyAttempts, Window

OWNER, ATTACKER, ELSEWHERE = "198.51.100.4", "203.0.113.9", "192.0.2.1"
START = 1000.0  # what the clock reads when a test begins


def fail(limiter: LoginLimiter, username: str, address: str) -> None:
    limiter.begin(username, address)  # a failure counts as it begins, and stays


def succeed(limiter: LoginLimiter, username: str, address: str) -> None:
    limiter.begin(username, address).cancel()
    limiter.succeeded(username, address)


def refused(limiter: LoginLimiter, username: str, address: str) -> int:
    """The Retry-After of a refused login; fails the test when it is let through."""
    with pytest.raises(TooManyAttempts) as info:
        limiter.begin(username, address)
    return info.value.retry_after


# -- the window -----------------------------------------------------------------------------


def test_the_attempt_past_the_limit_waits_for_the_oldest_to_age_out() -> None:
    clock = Clock(START)
    window = Window(300, "tries", clock=clock)
    for _ in range(10):
        window.begin([(("k",), 10)])
        clock.now += 10  # attempts at 1000, 1010, ..., 1090
    with pytest.raises(TooManyAttempts) as info:
        window.begin([(("k",), 10)])
    assert info.value.retry_after == 200  # the first ages out at 1300; now is 1100
    assert info.value.what == "tries"

    clock.now = 1300.5
    window.begin([(("k",), 10)])  # one slot free again
    with pytest.raises(TooManyAttempts):
        window.begin([(("k",), 10)])


def test_any_key_at_its_limit_refuses_and_counts_nothing() -> None:
    window = Window(60, "tries", clock=Clock(START))
    for name in ("a", "b", "c"):
        window.begin([((name,), 3), (("shared",), 3)])
    with pytest.raises(TooManyAttempts):
        window.begin([(("d",), 3), (("shared",), 3)])
    assert len(window) == 4  # a, b, c and shared: the refused attempt recorded nothing for d


def test_an_attempt_counts_until_it_is_cancelled() -> None:
    window = Window(60, "tries", clock=Clock(START))
    first = window.begin([(("k",), 2)])
    second = window.begin([(("k",), 2)])
    with pytest.raises(TooManyAttempts):  # two in flight fill the limit
        window.begin([(("k",), 2)])
    first.cancel()
    second.cancel()
    assert len(window) == 0
    window.begin([(("k",), 2)])
    window.begin([(("k",), 2)]).cancel()
    window.begin([(("k",), 2)])
    with pytest.raises(TooManyAttempts):
        window.begin([(("k",), 2)])


def test_the_number_of_keys_is_bounded_least_recently_used_first() -> None:
    clock = Clock(START)
    window = Window(60, "tries", max_keys=3, clock=clock)
    for name in ("a", "b", "c", "d"):
        window.begin([((name,), 1)])
        clock.now += 1
    assert len(window) == 3
    window.begin([(("a",), 1)])  # "a" was evicted: allowed again
    with pytest.raises(TooManyAttempts):
        window.begin([(("d",), 1)])


def test_old_attempts_are_dropped() -> None:
    clock = Clock(START)
    window = Window(60, "tries", clock=clock)
    window.begin([(("a",), 5)])
    clock.now += 61
    window.begin([(("b",), 5)]).cancel()
    window.begin([(("a",), 5)]).cancel()
    assert len(window) == 0


def test_a_limit_of_zero_is_no_limit() -> None:
    window = Window(60, "tries", clock=Clock(START))
    for _ in range(100):
        window.begin([(("k",), 0)])
    assert len(window) == 0


# -- failed logins ----------------------------------------------------------------------------


def test_the_limits_come_from_the_settings() -> None:
    auth = AuthSettings(
        max_login_failures=3,
        max_login_failures_per_name=30,
        max_login_failures_per_address=40,
        login_failure_window=Duration(60),
    )
    limiter = LoginLimiter.from_settings(auth)
    assert (limiter.max_failures, limiter.per_name, limiter.per_address) == (3, 30, 40)
    assert limiter.failures.window == 60


def test_an_attacker_elsewhere_cannot_lock_the_owner_out() -> None:
    limiter = LoginLimiter(clock=Clock(START))
    for _ in range(10):
        fail(limiter, "alice", ATTACKER)
    assert 0 < refused(limiter, "alice", ATTACKER) <= 300  # even with the right password
    succeed(limiter, "alice", OWNER)  # never signed in before: only its own failures count
    succeed(limiter, "bob", ATTACKER)  # the address is far from its own ceiling


def test_the_owners_own_failures_lock_only_the_owners_address() -> None:
    limiter = LoginLimiter(clock=Clock(START))
    for _ in range(10):
        fail(limiter, "alice", OWNER)
    refused(limiter, "alice", OWNER)
    succeed(limiter, "alice", ELSEWHERE)


def test_the_per_name_ceiling_stops_guesses_from_many_addresses() -> None:
    clock = Clock(START)
    limiter = LoginLimiter(clock=clock)
    for i in range(100):
        fail(limiter, "alice", f"10.0.{i // 250}.{i % 250}")
        clock.now += 1  # failures at 1000 ... 1099
    assert refused(limiter, "alice", ELSEWHERE) == 200  # the first ages out at 1300
    succeed(limiter, "bob", ELSEWHERE)  # other names are not affected


def test_an_address_the_name_signed_in_from_passes_the_per_name_ceiling() -> None:
    clock = Clock(START)
    limiter = LoginLimiter(clock=clock)
    succeed(limiter, "alice", OWNER)
    clock.now += 3600  # an hour later, the guessing starts
    for i in range(100):
        fail(limiter, "alice", f"10.0.{i // 250}.{i % 250}")
    refused(limiter, "alice", ELSEWHERE)
    succeed(limiter, "alice", OWNER)
    for _ in range(10):  # from there only the strict limit for the pair applies
        fail(limiter, "alice", OWNER)
    refused(limiter, "alice", OWNER)


def test_a_remembered_address_is_forgotten_after_a_while_and_only_so_many_are_kept() -> None:
    clock = Clock(START)
    limiter = LoginLimiter(per_name=1, known_for=3600, max_known=2, clock=clock)
    succeed(limiter, "alice", OWNER)
    clock.now += 3599
    fail(limiter, "alice", ATTACKER)  # the name is at its ceiling
    limiter.begin("alice", OWNER).cancel()  # known: let through
    clock.now += 1
    assert not limiter.known("alice", OWNER)
    refused(limiter, "alice", OWNER)

    for name in ("a", "b", "c"):
        limiter.succeeded(name, OWNER)
    assert not limiter.known("a", OWNER)
    assert limiter.known("b", OWNER) and limiter.known("c", OWNER)


def test_the_per_address_ceiling_stops_trying_many_names() -> None:
    limiter = LoginLimiter(clock=Clock(START))
    for i in range(100):
        fail(limiter, f"guess{i}", ATTACKER)
    refused(limiter, "alice", ATTACKER)
    succeed(limiter, "alice", OWNER)


def test_successes_and_calls_not_answered_do_not_count() -> None:
    limiter = LoginLimiter(clock=Clock(START))
    for _ in range(20):
        succeed(limiter, "alice", OWNER)
        limiter.begin("alice", OWNER).cancel()  # the AuthService was unavailable
    assert len(limiter.failures) == 0


@pytest.mark.parametrize(
    ("zero", "attempts"),
    [
        ("max_failures", [("alice", OWNER)] * 50),
        ("per_name", [("alice", f"10.0.0.{i}") for i in range(150)]),
        ("per_address", [(f"guess{i}", OWNER) for i in range(150)]),
    ],
)
def test_each_limit_of_zero_is_no_limit(zero: str, attempts: list[tuple[str, str]]) -> None:
    """Attempts past that limit's default, within the others'."""
    limiter = LoginLimiter(clock=Clock(START))
    setattr(limiter, zero, 0)
    for username, address in attempts:
        fail(limiter, username, address)


# -- registrations ----------------------------------------------------------------------------


def test_registrations_are_limited_per_address() -> None:
    clock = Clock(START)
    limiter = RegistrationLimiter(3, 3600, clock=clock)
    for _ in range(3):
        limiter.begin(ATTACKER)
        clock.now += 60
    with pytest.raises(TooManyAttempts) as info:
        limiter.begin(ATTACKER)
    assert info.value.retry_after == 3600 - 180
    assert info.value.what == "registrations from this address"
    limiter.begin(OWNER)
    clock.now += 3600 - 180
    limiter.begin(ATTACKER)


def test_the_registration_limit_comes_from_the_settings() -> None:
    auth = AuthSettings(max_registrations=4, registration_window=Duration(120))
    limiter = RegistrationLimiter.from_settings(auth)
    assert (limiter.max_registrations, limiter.registrations.window) == (4, 120)
