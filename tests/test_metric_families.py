"""The lean counter and histogram families: what Prometheus's parser reads back from them."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stox.metrics.families import CounterFamily, HistogramFamily


def scrape(registry: CollectorRegistry) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def test_a_counter_counts_each_series_and_one_without_labels_starts_at_zero() -> None:
    registry = CollectorRegistry()
    by_step = CounterFamily(registry, "t_dispatches_total", "doc", ("step",))
    runs = CounterFamily(registry, "t_runs_total", "doc")
    image = by_step.labels("image")
    image.inc()
    image.inc(2)
    assert by_step.labels("image") is image  # one series per label values
    by_step.labels("seo").inc()
    samples = scrape(registry)
    assert samples["t_dispatches_total"] == {(("step", "image"),): 3.0, (("step", "seo"),): 1.0}
    assert samples["t_runs_total"] == {(): 0.0}
    runs.labels().inc()
    assert scrape(registry)["t_runs_total"] == {(): 1.0}


def test_a_histogram_puts_a_value_on_a_bound_in_that_bound_and_counts_cumulatively() -> None:
    registry = CollectorRegistry()
    family = HistogramFamily(registry, "t_duration_seconds", "doc", ("op",), (0.1, 1.0))
    series = family.labels("get")
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        series.observe(value)
    samples = scrape(registry)
    buckets = samples["t_duration_seconds_bucket"]
    assert buckets == {
        (("le", "0.1"), ("op", "get")): 2.0,
        (("le", "1.0"), ("op", "get")): 4.0,
        (("le", "+Inf"), ("op", "get")): 5.0,
    }
    assert samples["t_duration_seconds_count"] == {(("op", "get"),): 5.0}
    assert samples["t_duration_seconds_sum"] == {(("op", "get"),): pytest.approx(8.65)}


def test_wrong_label_counts_bad_buckets_and_a_second_family_of_one_name_are_refused() -> None:
    registry = CollectorRegistry()
    family = CounterFamily(registry, "t_x_total", "doc", ("a", "b"))
    with pytest.raises(ValueError, match="takes labels"):
        family.labels("only-one")
    with pytest.raises(ValueError, match="ascending"):
        HistogramFamily(registry, "t_y_seconds", "doc", (), (1.0, 0.5))
    with pytest.raises(ValueError, match="Duplicated"):
        CounterFamily(registry, "t_x_total", "doc")
