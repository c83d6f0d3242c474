"""Counters and histograms cheap enough for the hot path, read by prometheus-client at scrape.

prometheus-client's own `Counter.inc` and `Histogram.observe` take a lock and check their
state on every call (about 0.3 and 0.7 µs here); the gateway calls them some forty times per
workflow, all on its one IOLoop thread, where no lock is needed. Here a counter is one float
attribute and a histogram a list of per-bucket counts (made cumulative when scraped). Each
family is a `Collector` in the gateway's registry, so the exposition (names, `_total`,
`le` buckets, the text format) is still prometheus-client's.

Not thread-safe, by design: every call comes from the IOLoop, and so does every scrape.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


class Count:
    """One series of a counter."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Buckets:
    """One series of a histogram: `counts[i]` observations in bucket i (not cumulative; the
    last is +Inf), and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bucket `le=b` holds the values <= b: the first bound not below the value
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Family(Collector):
    def __init__(
        self, registry: CollectorRegistry, name: str, doc: str, labelnames: Sequence[str]
    ) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        registry.register(self)

    def _check(self, values: tuple[str, ...]) -> None:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")


class CounterFamily(_Family):
    """A counter (`name` ends in `_total`) whose series are made by `labels(...)`, once each."""

    def __init__(
        self, registry: CollectorRegistry, name: str, doc: str, labelnames: Sequence[str] = ()
    ) -> None:
        self.series: dict[tuple[str, ...], Count] = {}
        super().__init__(registry, name, doc, labelnames)
        if not self.labelnames:  # a counter without labels shows 0 before its first count
            self.labels()

    def labels(self, *values: str) -> Count:
        series = self.series.get(values)
        if series is None:
            self._check(values)
            series = self.series[values] = Count()
        return series

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, series in self.series.items():
            family.add_metric(values, series.value)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.doc, labels=self.labelnames)


class HistogramFamily(_Family):
    """A histogram with fixed `buckets` (upper bounds, ascending; +Inf is added)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        doc: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"{name}: buckets must be ascending and distinct")
        les: list[str] = [floatToGoString(b) for b in self.bounds]  # type: ignore[no-untyped-call]
        self._les = [*les, "+Inf"]
        self.series: dict[tuple[str, ...], Buckets] = {}
        super().__init__(registry, name, doc, labelnames)

    def labels(self, *values: str) -> Buckets:
        series = self.series.get(values)
        if series is None:
            self._check(values)
            series = self.series[values] = Buckets(self.bounds)
        return series

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, series in self.series.items():
            cumulative, total = [], 0
            for le, count in zip(self._les, series.counts, strict=True):
                total += count
                cumulative.append((le, float(total)))
            family.add_metric(list(values), cumulative, series.sum)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
