"""The request path's own metrics: plain counters, made into Prometheus families when scraped.

Rule: the proxy is one event loop in one thread, so these need no lock; prometheus_client
takes a lock per observation, which cost about 8 % of throughput on the request path. With
--workers (multiprocess mode) Metrics keeps prometheus_client's objects instead, whose values
the workers share through files.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LABELS_BR = ["backend", "role"]


class Hist:
    """One histogram series: a count per bucket (the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running, result = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            result.append((floatToGoString(bound), float(running)))  # type: ignore[no-untyped-call]
        return result


class HotFamilies(Collector):
    def __init__(self, backends: Iterable[str], roles: Iterable[str],
                 classes: Iterable[str], buckets: tuple[float, ...],
                 comparisons: Iterable[str], trace_lines: Iterable[str]) -> None:
        pairs = [(b, r) for b in backends for r in roles]
        self.comparisons = dict.fromkeys(comparisons, 0)
        self.trace_lines = dict.fromkeys(trace_lines, 0)
        self.requests = {(b, r, c): 0 for b, r in pairs for c in classes}
        self.duration = {pair: Hist(buckets) for pair in pairs}
        self.ttfb = {pair: Hist(buckets) for pair in pairs}
        self.tokens = dict.fromkeys(pairs, 0.0)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("rollout_requests",
                                       "Answers by backend, role and status class",
                                       labels=["backend", "role", "code_class"])
        for labels, count in self.requests.items():
            requests.add_metric(list(labels), count)
        yield requests
        tokens = CounterMetricFamily("rollout_tokens", "Tokens the backends reported",
                                     labels=LABELS_BR)
        for pair, total in self.tokens.items():
            tokens.add_metric(list(pair), total)
        yield tokens
        yield histogram("rollout_request_duration_seconds", "Time to an answer's last byte",
                        self.duration)
        yield counters("rollout_shadow_comparisons", "Shadow comparisons by result", "result",
                       self.comparisons)
        yield counters("rollout_trace_lines", "Comparison trace lines", "result",
                       self.trace_lines)
        yield histogram("rollout_time_to_first_byte_seconds",
                        "Time to an answer's first body byte", self.ttfb)


def counters(name: str, documentation: str, label: str,
             counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family


def histogram(name: str, documentation: str,
              series: dict[tuple[str, str], Hist]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=LABELS_BR)
    for pair, hist in series.items():
        family.add_metric(list(pair), hist.cumulative(), sum_value=hist.total)
    return family
