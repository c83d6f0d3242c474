"""How the benchmarks print their figures: percentiles, milliseconds, targets, counts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def millis(seconds: float | None) -> str:
    """One duration in ms, or "-" when there is none."""
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def ms_at(values: list[float], q: float) -> str:
    """The `q`th percentile of `values`, in ms."""
    return millis(percentile(values, q))


def ms(values: list[float]) -> str:
    """p50 and p99, in ms."""
    p50, p99 = percentile(values, 50), percentile(values, 99)
    if p50 is None or p99 is None:
        return "-"
    return f"p50 {millis(p50)}   p99 {millis(p99)}"


def ms_max(values: list[float]) -> str:
    """p50, p99 and the worst, in ms (the open loop's figures)."""
    if not values:
        return "-"
    return f"{ms(values)}   max {millis(max(values))}"


def within(values: list[float], limit_ms: float) -> bool | None:
    """Whether p99 is within `limit_ms`; None without figures."""
    p99 = percentile(values, 99)
    return None if p99 is None else p99 * 1000 <= limit_ms


def verdict(values: list[float], limit_ms: float) -> str:
    """The target next to a figure."""
    met = {True: "met", False: "not met", None: "no data"}[within(values, limit_ms)]
    return f"p99 <= {limit_ms:g} ms: {met}"


def counts(counter: Mapping[Any, int]) -> str:
    """`key: count, …` by key (errors by kind, closes by code), or "none"."""
    if not counter:
        return "none"
    return ", ".join(f"{key}: {count}" for key, count in sorted(counter.items(), key=str))
