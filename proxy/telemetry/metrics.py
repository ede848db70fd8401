"""Every Prometheus metric of the proxy on a registry passed in, built from families.py.

1. One table (families.py) names every family. In one process the request path's six are
   plain counters here (Count, Hist), made into Prometheus families when scraped
   (HotFamilies): the proxy is one event loop in one thread, so they need no lock, and
   prometheus_client's lock per observation cost about 8 % of throughput. With --workers
   every family is a prometheus_client object whose values the workers share through files.
   Both kinds of series have the same `inc` / `observe`, so no method asks which mode it is.
2. `_created` series are off (a counter's start time is noise on a dashboard): set when the
   first Metrics is made, not at import.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.metrics import disable_created_metrics
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.config.model import PHASES
from proxy.telemetry import families as f
from proxy.telemetry.families import CODE_CLASSES, MB, REFUSED_ANSWERS, Family, Series
from proxy.telemetry.observe import Measurement

CIRCUIT_STATES = {"closed": 0, "open": 1, "half_open": 2}


class Counting(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Observing(Protocol):
    def observe(self, amount: float) -> None: ...


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

    def counts(self, family: Family) -> dict[Series, Counting]:
        assert family.kind == "counter", family.name
        series = {labels: Count() for labels in family.series}
        self.counted.append((family, series))
        return dict(series)

    def observes(self, family: Family) -> dict[Series, Observing]:
        assert family.kind == "histogram", family.name
        series = {labels: Hist(family.buckets) for labels in family.series}
        self.observed.append((family, series))
        return dict(series)

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


def code_class(status: int | None) -> str:
    if status is None or not 100 <= status <= 599:
        return "error"
    return CODE_CLASSES[status // 100 - 1]


def counter(family: Family, registry: CollectorRegistry) -> Counter:
    assert family.kind == "counter", family.name
    made = Counter(family.name, family.doc, family.labels, registry=registry)
    for labels in family.series:
        made.labels(*labels)
    return made


def gauge(family: Family, registry: CollectorRegistry) -> Gauge:
    assert family.kind == "gauge", family.name
    made = Gauge(family.name, family.doc, family.labels, registry=registry,
                 multiprocess_mode=family.mode)
    for labels in family.series:
        made.labels(*labels).set(0)  # set: a "mostrecent" gauge shows only what was set
    return made


def histogram(family: Family, registry: CollectorRegistry) -> Histogram:
    assert family.kind == "histogram", family.name
    made = Histogram(family.name, family.doc, family.labels, registry=registry,
                     buckets=family.buckets)
    for labels in family.series:
        made.labels(*labels)
    return made


class Hot(Protocol):
    """Where the request path's six families live: HotFamilies (one process) or
    SharedFamilies (--workers)."""

    def counts(self, family: Family) -> dict[Series, Counting]: ...

    def observes(self, family: Family) -> dict[Series, Observing]: ...


class SharedFamilies:
    """prometheus_client's own objects: with --workers their values are shared through files."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def counts(self, family: Family) -> dict[Series, Counting]:
        made = counter(family, self.registry)
        return {labels: made.labels(*labels) for labels in family.series}

    def observes(self, family: Family) -> dict[Series, Observing]:
        made = histogram(family, self.registry)
        return {labels: made.labels(*labels) for labels in family.series}


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None,
                 multiprocess_dir: str | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        hot: Hot = SharedFamilies(r) if multiprocess_dir is not None else HotFamilies()
        if isinstance(hot, HotFamilies):
            r.register(hot)
        counts, observes = hot.counts, hot.observes
        self._requests = counts(f.REQUESTS)
        self._durations = observes(f.DURATION)
        self._ttfb = observes(f.TTFB)
        self._tokens = counts(f.TOKENS)
        self._comparisons = counts(f.COMPARISONS)
        self._trace_lines = counts(f.TRACE_LINES)
        self.cost = counter(f.COST, r)
        self.memory = histogram(f.MEMORY, r)
        self.rejected_answers = counter(f.REJECTED_ANSWERS, r)
        self.rejected = counter(f.REJECTED, r)
        self.fallbacks = counter(f.FALLBACKS, r)
        self.in_flight = gauge(f.IN_FLIGHT, r)
        self.shadow_dropped = counter(f.SHADOW_DROPPED, r)
        self.shadow_skipped = counter(f.SHADOW_SKIPPED, r)
        self.shadow_in_flight = gauge(f.SHADOW_IN_FLIGHT, r)
        self.shadow_held = gauge(f.SHADOW_HELD, r)
        self.percentage = gauge(f.PERCENTAGE, r)
        self.phase = gauge(f.PHASE, r)
        self.paused = gauge(f.PAUSED, r)
        self.rollbacks = counter(f.ROLLBACKS, r)
        self.reloads = counter(f.RELOADS, r)
        self.circuit = gauge(f.CIRCUIT, r)
        self.guard_state = gauge(f.GUARD_STATE, r)
        self.admin_changes = counter(f.ADMIN_CHANGES, r)
        self.state_store_up = gauge(f.STATE_STORE_UP, r)
        self.sessions_pinned = gauge(f.SESSIONS_PINNED, r)
        self.feedback = counter(f.FEEDBACK, r)
        self.migration_reports = counter(f.MIGRATION_REPORTS, r)
        self.active_users = gauge(f.ACTIVE_USERS, r)
        self.complaints = counter(f.COMPLAINTS, r)
        self.state_store_up.set(1)
        self._sources: list[tuple[Gauge, Callable[[], float]]] = []

    def answered(self, backend: str, role: str, status: int | None, seconds: float,
                 tokens: float | None, memory_mb: float | None) -> None:
        self._requests[(backend, role, code_class(status))].inc()
        self._durations[(backend, role)].observe(seconds)
        if tokens:
            self._tokens[(backend, role)].inc(tokens)
        if memory_mb is not None:
            self.memory.labels(backend, role).observe(memory_mb * MB)

    def measured(self, backend: str, role: str, seen: Measurement) -> None:
        self.answered(backend, role, seen.status, seen.time_ms / 1000, seen.tokens,
                      seen.memory_mb)
        if seen.ttft_ms is not None:
            self._ttfb[(backend, role)].observe(seen.ttft_ms / 1000)
        if seen.cost_usd:
            self.cost.labels(backend, role).inc(seen.cost_usd)
        if seen.error is not None and seen.error in REFUSED_ANSWERS:
            self.rejected_answers.labels(backend, role, seen.error).inc()

    def errored(self, backend: str, role: str, kind: str | None = None) -> None:
        """A backend gave no answer at all (refused, reset, timed out before its head, or a
        head past its bound: `kind`)."""
        self._requests[(backend, role, "error")].inc()
        if kind in REFUSED_ANSWERS:
            self.rejected_answers.labels(backend, role, kind).inc()

    def show_plan(self, phase: str, percentage: float, paused: bool) -> None:
        for name in PHASES:
            self.phase.labels(name).set(1 if name == phase else 0)
        self.percentage.set(percentage)
        self.paused.set(1 if paused else 0)

    def track_in_flight(self, count: Callable[[], float], shown: Gauge | None = None) -> None:
        """Read an in-flight count when scraped (one process), not on every request; with
        --workers each worker sets its own on the control loop's tick."""
        shown = self.in_flight if shown is None else shown
        if self.multiprocess_dir is None:
            shown.set_function(count)
        else:
            self._sources.append((shown, count))

    def sample_in_flight(self) -> None:
        for gauge, count in self._sources:
            gauge.set(count())

    def compared(self, result: str) -> None:
        """One shadow comparison."""
        self._comparisons[(result,)].inc()

    def traced(self, result: str, lines: int = 1) -> None:
        """Trace lines written (on disk), dropped (buffer full) or lost (write failed)."""
        self._trace_lines[(result,)].inc(lines)

    def exposition(self) -> bytes:
        """The text for /metrics: this process's, or the sum of every worker's (--workers)."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
