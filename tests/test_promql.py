"""scripts/promql.py, the PromQL subset the dashboard's picture is drawn with: known series,
exposed by prometheus_client as a gateway exposes its own, give Prometheus's numbers."""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def promql() -> Iterator[Any]:
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("promql")
    finally:
        sys.path.remove(str(SCRIPTS))


def scrape_every_second(
    promql: Any, seconds: int, step: Callable[[int], None], registry: CollectorRegistry
) -> Any:
    """Scrapes at t = 0, 1, … `seconds` of `registry`, `step(t)` run before each."""
    scrapes = promql.Scrapes()
    for t in range(seconds + 1):
        step(t)
        scrapes.add(float(t), generate_latest(registry).decode(), {"instance": "gw:8080"})
    return scrapes


def value_at(promql: Any, scrapes: Any, expr: str, t: float) -> dict[tuple[Any, ...], float]:
    return dict(promql.Evaluator(scrapes).at(promql.parse(expr), t))


def test_rate_of_a_steady_counter_is_its_slope(promql: Any) -> None:
    registry = CollectorRegistry()
    started = Counter("stox_workflows_started", "", ["pipeline"], registry=registry)
    scrapes = scrape_every_second(promql, 60, lambda t: started.labels("default").inc(2), registry)
    rate = value_at(promql, scrapes, "rate(stox_workflows_started_total[10s])", 60)
    assert rate == {
        (("instance", "gw:8080"), ("pipeline", "default")): pytest.approx(2.0)
    }  # extrapolated over the window's first second, as Prometheus does; the name is dropped


def test_rate_adds_back_a_counter_reset_and_extrapolates_by_prometheus_rules(
    promql: Any,
) -> None:
    scrapes = promql.Scrapes()
    for t, value in [(0, 10), (1, 11), (2, 12), (3, 0), (4, 1)]:
        scrapes.add(float(t), f"# TYPE c counter\nc_total {value}\n", {})
    # increase 1 + 1 + 0 (the reset: 12 down to 0) + 1 = 3 over the 4 s sampled; the window
    # (-1, 4] starts 1 s before the first sample, under 1.1 x the 1 s interval, so the rate
    # extrapolates to it: 3 x 5/4 over 5 s
    assert value_at(promql, scrapes, "rate(c_total[5s])", 4) == {(): pytest.approx(0.75)}
    # a window far wider than the samples extrapolates half an interval past its first sample
    assert value_at(promql, scrapes, "rate(c_total[1m])", 4) == {
        (): pytest.approx(3 * 4.5 / 4 / 60)
    }
    # one sample in the window: no rate
    assert value_at(promql, scrapes, "rate(c_total[1s])", 4) == {}


def test_sum_by_groups_and_ratios_match_label_sets(promql: Any) -> None:
    registry = CollectorRegistry()
    completed = Counter("stox_workflows_completed", "", ["pipeline", "shop"], registry=registry)
    failed = Counter("stox_workflows_failed", "", ["pipeline"], registry=registry)

    def step(_: int) -> None:
        completed.labels("a", "x").inc(3)
        completed.labels("a", "y").inc(1)
        completed.labels("b", "x").inc(1)
        failed.labels("a").inc(1)

    scrapes = scrape_every_second(promql, 30, step, registry)
    by_pipeline = value_at(
        promql, scrapes, "sum by (pipeline) (rate(stox_workflows_completed_total[10s]))", 30
    )
    assert by_pipeline == {
        (("pipeline", "a"),): pytest.approx(4.0),
        (("pipeline", "b"),): pytest.approx(1.0),
    }
    ok = "sum by (pipeline) (rate(stox_workflows_completed_total[10s]))"
    bad = "sum by (pipeline) (rate(stox_workflows_failed_total[10s]))"
    # b has no failures: no series to match on the right, so no ratio (as in Prometheus)
    assert value_at(promql, scrapes, f"{ok} / ({ok} + {bad})", 30) == {
        (("pipeline", "a"),): pytest.approx(0.8)
    }
    total = value_at(promql, scrapes, "sum(rate(stox_workflows_completed_total[10s]))", 30)
    assert total == {(): pytest.approx(5.0)}


def test_or_vector_fills_a_missing_numerator(promql: Any) -> None:
    registry = CollectorRegistry()
    requests = Counter("requests", "", ["status_class"], registry=registry)
    scrapes = scrape_every_second(promql, 20, lambda t: requests.labels("2xx").inc(10), registry)
    five = 'sum(rate(requests_total{status_class="5xx"}[10s]))'
    assert value_at(promql, scrapes, five, 20) == {}
    ratio = f"({five} or vector(0)) / sum(rate(requests_total[10s]))"
    assert value_at(promql, scrapes, ratio, 20) == {(): 0.0}


def test_histogram_quantile_interpolates_within_the_bucket(promql: Any) -> None:
    registry = CollectorRegistry()
    duration = Histogram(
        "stox_step_duration_seconds", "", ["step"], buckets=(0.1, 0.5, 1.0), registry=registry
    )

    def step(_: int) -> None:  # each second: 10 in (0, 0.1], 20 in (0.1, 0.5], 10 in (0.5, 1]
        for value, times in ((0.05, 10), (0.3, 20), (0.7, 10)):
            for _ in range(times):
                duration.labels("seo").observe(value)

    scrapes = scrape_every_second(promql, 30, step, registry)

    def quantile(q: float) -> float:
        expr = (
            f"histogram_quantile({q}, sum by (le, step) "
            "(rate(stox_step_duration_seconds_bucket[10s])))"
        )
        result = value_at(promql, scrapes, expr, 30)
        assert list(result) == [(("step", "seo"),)]
        return next(iter(result.values()))

    assert quantile(0.5) == pytest.approx(0.3)  # rank 20 of 40: halfway through (0.1, 0.5]
    assert quantile(0.99) == pytest.approx(0.98)  # rank 39.6: 9.6 of 10 through (0.5, 1]
    assert quantile(0.2) == pytest.approx(0.08)  # the lowest bucket starts at 0


def test_histogram_quantile_in_the_inf_bucket_and_with_no_observations(promql: Any) -> None:
    registry = CollectorRegistry()
    slow = Histogram("slow_seconds", "", buckets=(0.1,), registry=registry)
    idle = Histogram("idle_seconds", "", buckets=(0.1,), registry=registry)
    scrapes = scrape_every_second(promql, 20, lambda t: slow.observe(5), registry)
    by_le = "sum by (le) (rate({}_bucket[10s]))"
    inf = value_at(promql, scrapes, f"histogram_quantile(0.5, {by_le.format('slow_seconds')})", 20)
    assert inf == {(): 0.1}  # the highest finite bound
    none = value_at(promql, scrapes, f"histogram_quantile(0.5, {by_le.format('idle_seconds')})", 20)
    assert math.isnan(none[()])  # Grafana draws a gap
    del idle


def test_a_series_missing_from_the_last_scrape_is_stale(promql: Any) -> None:
    registry = CollectorRegistry()
    open_sockets = Gauge("stox_websocket_connections", "", ["instance"], registry=registry)
    scrapes = promql.Scrapes()
    open_sockets.labels("a").set(3)
    scrapes.add(0.0, generate_latest(registry).decode(), {})
    open_sockets.remove("a")
    open_sockets.labels("b").set(1)
    scrapes.add(1.0, generate_latest(registry).decode(), {})
    expr = "sum by (instance) (stox_websocket_connections)"
    assert value_at(promql, scrapes, expr, 0) == {(("instance", "a"),): 3.0}
    assert value_at(promql, scrapes, expr, 1) == {(("instance", "b"),): 1.0}


def test_variables_and_what_is_not_implemented_fail_loudly(promql: Any) -> None:
    expr = 'rate(x_total{instance=~"$instance"}[$__rate_interval])'
    assert promql.substitute(expr, {"instance": ".*", "__rate_interval": "15s"}) == (
        'rate(x_total{instance=~".*"}[15s])'
    )
    with pytest.raises(promql.PromQLError, match=r"\$instance"):
        promql.substitute(expr, {"__rate_interval": "15s"})
    for unsupported in (
        "increase(x_total[1m])",
        "avg(x)",
        "sum without (a) (x)",
        "x offset 5m",
        "a / on (b) c",
        "x[5m]",
    ):
        with pytest.raises(promql.PromQLError):
            promql.Evaluator(promql.Scrapes()).at(promql.parse(unsupported), 0.0)
