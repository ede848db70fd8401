"""The request path's families in one process: plain counters, made into Prometheus families
when scraped.

Rule: the proxy is one event loop in one thread, so these need no lock; prometheus_client
takes a lock per observation, which cost about 8 % of throughput on the request path. The
rows come from families.py, the same table metrics.py builds prometheus_client objects from
with --workers; a series here has the same `inc`/`observe` as a prometheus_client child.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.telemetry.families import Family, Series


class Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Hist:
    """One histogram series: a count per bucket (the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # le: value <= bound
        self.total += amount

    def cumulative(self) -> list[tuple[str, float]]:
        running, result = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            result.append((floatToGoString(bound), float(running)))  # type: ignore[no-untyped-call]
        return result


class HotFamilies(Collector):
    """The hot families of one process, exposed on the registry they are registered with."""

    def __init__(self) -> None:
        self.counted: list[tuple[Family, dict[Series, Count]]] = []
        self.observed: list[tuple[Family, dict[Series, Hist]]] = []

    def counter(self, family: Family) -> dict[Series, Count]:
        assert family.kind == "counter", family.name
        series = {labels: Count() for labels in family.series}
        self.counted.append((family, series))
        return series

    def histogram(self, family: Family) -> dict[Series, Hist]:
        assert family.kind == "histogram", family.name
        series = {labels: Hist(family.buckets) for labels in family.series}
        self.observed.append((family, series))
        return series

    def collect(self) -> Iterator[Metric]:
        for family, counts in self.counted:
            counter = CounterMetricFamily(family.name, family.doc, labels=family.labels)
            for labels, count in counts.items():
                counter.add_metric(labels, count.value)
            yield counter
        for family, hists in self.observed:
            histogram = HistogramMetricFamily(family.name, family.doc, labels=family.labels)
            for labels, hist in hists.items():
                histogram.add_metric(labels, hist.cumulative(), sum_value=hist.total)
            yield histogram
