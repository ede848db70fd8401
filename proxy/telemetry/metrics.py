"""Every Prometheus metric of the proxy, in one place, on a registry passed in.

Rule: no label ever holds a user id, a request id or a raw path; label values come from
small fixed sets (backends, roles, code classes, reasons, phases).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from proxy.config.model import BACKENDS, PHASES
from proxy.telemetry.hotmetrics import HotFamilies
from proxy.telemetry.observe import Measurement

ROLES = ("primary", "shadow", "fallback")
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "error")
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)
MB = 2**20
MEMORY_BUCKETS = tuple(mb * MB for mb in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192))
COMPARISON_RESULTS = ("match", "mismatch", "error")
TRACE_RESULTS = ("written", "dropped", "error")
CIRCUIT_STATES = {"closed": 0, "open": 1, "half_open": 2}
REFUSED_ANSWERS = ("head_too_large",)  # the error kinds of answers cut for passing a bound


def code_class(status: int | None) -> str:
    if status is None or not 100 <= status <= 599:
        return "error"
    return CODE_CLASSES[status // 100 - 1]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None,
                 multiprocess_dir: str | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        r = self.registry
        # The request path's six families: lock-free counters in one process, or
        # prometheus_client's file-backed values shared by --workers.
        self.hot: HotFamilies | None = None
        if multiprocess_dir is None:
            self.hot = HotFamilies(BACKENDS, ROLES, CODE_CLASSES, LATENCY_BUCKETS,
                                   COMPARISON_RESULTS, TRACE_RESULTS)
            r.register(self.hot)
        else:
            self.comparisons = Counter("rollout_shadow_comparisons",
                                       "Shadow comparisons by result", ["result"], registry=r)
            self.trace_lines = Counter("rollout_trace_lines", "Comparison trace lines",
                                       ["result"], registry=r)
            for result in COMPARISON_RESULTS:
                self.comparisons.labels(result)
            self.trace_lines.labels("written")
            self.requests = Counter("rollout_requests",
                                    "Answers by backend, role and status class",
                                    ["backend", "role", "code_class"], registry=r)
            self.duration = Histogram("rollout_request_duration_seconds",
                                      "Time to an answer's last byte", ["backend", "role"],
                                      buckets=LATENCY_BUCKETS, registry=r)
            self.tokens = Counter("rollout_tokens", "Tokens the backends reported",
                                  ["backend", "role"], registry=r)
            self.ttfb = Histogram("rollout_time_to_first_byte_seconds",
                                  "Time to an answer's first body byte", ["backend", "role"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.cost = Counter("rollout_cost_usd", "What the backends' reported tokens cost, USD",
                            ["backend", "role"], registry=r)
        self.memory = Histogram("rollout_memory_bytes", "Memory the backends reported",
                                ["backend", "role"], buckets=MEMORY_BUCKETS, registry=r)
        self.shadow_dropped = Counter("rollout_shadow_dropped", "Mirrors not sent or not finished",
                                      ["reason"], registry=r)
        self.shadow_skipped = Counter("rollout_shadow_skipped",
                                      "Requests never mirrored by the side-effect rules",
                                      ["reason"], registry=r)
        self.shadow_in_flight = Gauge("rollout_shadow_in_flight", "Mirrors running now",
                                      multiprocess_mode="livesum",
                                      registry=r)
        self.shadow_held = Gauge("rollout_shadow_held_bytes",
                                 "Bytes of answers parked until their shadow comparison",
                                 multiprocess_mode="livesum", registry=r)
        self.fallbacks = Counter("rollout_fallbacks", "Requests legacy answered for next_gen",
                                 ["reason"], registry=r)
        latest: Final = "mostrecent"  # with --workers, a gauge every worker sets alike
        self.percentage = Gauge("rollout_percentage", "Effective rollout percentage",
                                multiprocess_mode=latest, registry=r)
        self.phase = Gauge("rollout_phase", "1 for the effective phase", ["phase"],
                           multiprocess_mode=latest, registry=r)
        self.paused = Gauge("rollout_paused", "1 while the schedule is paused",
                            multiprocess_mode=latest, registry=r)
        self.rollbacks = Counter("rollout_rollbacks", "Rollbacks by trigger", ["trigger"],
                                 registry=r)
        self.reloads = Counter("rollout_config_reloads", "Config reloads by result", ["result"],
                               registry=r)
        self.circuit = Gauge("rollout_circuit_state", "0 closed, 1 open, 2 half_open",
                             ["backend"], multiprocess_mode=latest, registry=r)
        self.guard_state = Gauge("rollout_guard_state", "1 when a guard is tripped", ["guard"],
                                 multiprocess_mode=latest, registry=r)
        self.admin_changes = Counter("rollout_admin_changes", "Runtime changes by action",
                                     ["action"], registry=r)
        self.sessions_pinned = Gauge("rollout_sessions_pinned", "Sessions pinned to a backend",
                                     multiprocess_mode="livesum", registry=r)
        self.feedback = Counter("rollout_feedback", "Feedback scores by backend",
                                ["backend", "score"], registry=r)
        self.migration_reports = Counter("rollout_migration_reports",
                                         "Users' migration reports", ["result"], registry=r)
        self.active_users = Gauge("rollout_active_users", "Distinct users today (UTC)",
                                  ["backend"], multiprocess_mode=latest, registry=r)
        self.complaints = Counter("rollout_complaints", "Complaints by the backend they concern",
                                  ["backend"], registry=r)
        self.in_flight = Gauge("rollout_in_flight_requests", "Client requests being served",
                               multiprocess_mode="livesum",
                               registry=r)
        self.rejected = Counter("rollout_rejected_requests", "Requests the proxy refused itself",
                                ["reason"], registry=r)
        self.rejected_answers = Counter("rollout_rejected_answers",
                                        "Backend answers the proxy cut for passing a bound",
                                        ["backend", "role", "reason"], registry=r)
        self.state_store_up = Gauge("rollout_state_store_up",
                                    "1 while the shared state store is reachable",
                                    multiprocess_mode=latest, registry=r)
        self.state_store_up.set(1)
        self._sources: list[tuple[Gauge, Callable[[], float]]] = []
        self._children: dict[tuple[str, str, str], Counter] = {}
        self._durations: dict[tuple[str, str], Histogram] = {}
        self._tokens: dict[tuple[str, str], Counter] = {}
        self._ttfb: dict[tuple[str, str], Histogram] = {}
        self._init_series()

    def _init_series(self) -> None:
        # Series that exist from the start, so dashboards and alerts see zeros, not gaps.
        for backend in BACKENDS:
            self.circuit.labels(backend).set(0)
            for role in ROLES:
                for reason in REFUSED_ANSWERS:
                    self.rejected_answers.labels(backend, role, reason)
                if self.hot is not None:
                    continue
                self._durations[(backend, role)] = self.duration.labels(backend, role)
                self._tokens[(backend, role)] = self.tokens.labels(backend, role)
                self._ttfb[(backend, role)] = self.ttfb.labels(backend, role)
                for klass in CODE_CLASSES:
                    self._children[(backend, role, klass)] = self.requests.labels(
                        backend, role, klass)
        for reason in ("overload", "shutdown", "budget", "held_bytes"):
            self.shadow_dropped.labels(reason)
        for phase in PHASES:
            self.phase.labels(phase).set(0)

    def answered(self, backend: str, role: str, status: int | None, seconds: float,
                 tokens: float | None, memory_mb: float | None) -> None:
        hot = self.hot
        if hot is not None:
            hot.requests[(backend, role, code_class(status))] += 1
            hot.duration[(backend, role)].observe(seconds)
            if tokens:
                hot.tokens[(backend, role)] += tokens
        else:
            self._children[(backend, role, code_class(status))].inc()
            self._durations[(backend, role)].observe(seconds)
            if tokens:
                self._tokens[(backend, role)].inc(tokens)
        if memory_mb is not None:
            self.memory.labels(backend, role).observe(memory_mb * MB)

    def measured(self, backend: str, role: str, seen: Measurement) -> None:
        self.answered(backend, role, seen.status, seen.time_ms / 1000, seen.tokens,
                      seen.memory_mb)
        if seen.ttft_ms is not None:
            if self.hot is not None:
                self.hot.ttfb[(backend, role)].observe(seen.ttft_ms / 1000)
            else:
                self._ttfb[(backend, role)].observe(seen.ttft_ms / 1000)
        if seen.cost_usd:
            self.cost.labels(backend, role).inc(seen.cost_usd)
        if seen.error is not None and seen.error in REFUSED_ANSWERS:
            self.rejected_answers.labels(backend, role, seen.error).inc()

    def errored(self, backend: str, role: str, kind: str | None = None) -> None:
        """A backend gave no answer at all (refused, reset, timed out before its head, or a
        head past its bound: `kind`)."""
        if self.hot is not None:
            self.hot.requests[(backend, role, "error")] += 1
        else:
            self._children[(backend, role, "error")].inc()
        if kind in REFUSED_ANSWERS:
            self.rejected_answers.labels(backend, role, kind).inc()

    def show_plan(self, phase: str, percentage: float, paused: bool) -> None:
        for name in PHASES:
            self.phase.labels(name).set(1 if name == phase else 0)
        self.percentage.set(percentage)
        self.paused.set(1 if paused else 0)

    def track_in_flight(self, count: Callable[[], float], gauge: Gauge | None = None) -> None:
        """Read an in-flight count when scraped (one process), not on every request; with
        --workers each worker sets its own on the control loop's tick."""
        gauge = self.in_flight if gauge is None else gauge
        if self.multiprocess_dir is None:
            gauge.set_function(count)
        else:
            self._sources.append((gauge, count))

    def sample_in_flight(self) -> None:
        for gauge, count in self._sources:
            gauge.set(count())

    def compared(self, result: str) -> None:
        """One shadow comparison."""
        if self.hot is not None:
            self.hot.comparisons[result] += 1
        else:
            self.comparisons.labels(result).inc()

    def traced(self, result: str, lines: int = 1) -> None:
        """Trace lines written (buffered), dropped (buffer full) or lost (write failed)."""
        if self.hot is not None:
            self.hot.trace_lines[result] += lines
        else:
            self.trace_lines.labels(result).inc(lines)

    def exposition(self) -> bytes:
        """The text for /metrics: this process's, or the sum of every worker's (--workers)."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
