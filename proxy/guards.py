"""Rolling windows of what each backend answered, and the guards that judge them.

Rules (SPEC "Guard windows"):
1. A window counts every answer a backend gave in the last `window_s`, whatever its role.
2. Every next_gen 5xx and every answer it did not complete is a next_gen error.
3. A guard judges only once next_gen has `min_requests` answers; a guard that compares with
   legacy (latency, memory) also needs legacy to have that many.
`judge()` is pure: figures and config in, verdicts out.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from proxy.config import BACKENDS, GuardsConfig
from proxy.observe import Measurement


@dataclass(frozen=True, slots=True)
class Figures:
    requests: int
    errors: int
    error_rate: float
    p50_ms: float | None
    p95_ms: float | None
    mean_tokens: float | None
    mean_memory_mb: float | None
    mean_cost_usd: float | None = None

    def as_json(self) -> dict[str, float | int | None]:
        return {"requests": self.requests, "errors": self.errors,
                "error_rate": round(self.error_rate, 4), "p50_ms": rounded(self.p50_ms),
                "p95_ms": rounded(self.p95_ms), "mean_tokens": rounded(self.mean_tokens),
                "mean_memory_mb": rounded(self.mean_memory_mb),
                "mean_cost_usd": None if self.mean_cost_usd is None
                else round(self.mean_cost_usd, 8)}


@dataclass(frozen=True, slots=True)
class Verdict:
    guard: str
    state: str  # ok | tripped | waiting | off
    value: float | None
    limit: float | None
    detail: str

    def as_json(self) -> dict[str, object]:
        return {"guard": self.guard, "state": self.state, "value": rounded(self.value),
                "limit": self.limit, "detail": self.detail}


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class Bucket:
    """One second of one backend's answers: exact counts and sums, and at most
    RESERVOIR answer times (a uniform sample), so memory stays flat at any rate."""

    __slots__ = ("cost", "costs", "errors", "memories", "memory", "n", "second", "seen_times",
                 "times", "tokens", "tokens_n")

    def __init__(self, second: int) -> None:
        self.second = second
        self.n = self.errors = self.tokens_n = self.memories = self.costs = self.seen_times = 0
        self.tokens = self.memory = self.cost = 0.0
        self.times: list[float] = []


RESERVOIR = 200


class Windows:
    """Per-backend rolling windows of per-second buckets."""

    def __init__(self, window_s: float, monotonic: Callable[[], float]) -> None:
        self.window_s, self.monotonic = window_s, monotonic
        self.entries: dict[str, deque[Bucket]] = {b: deque() for b in BACKENDS}
        self.rng = random.Random()

    def add(self, backend: str, seen: Measurement) -> None:
        second = int(self.monotonic())
        buckets = self.entries[backend]
        if not buckets or buckets[-1].second != second:
            buckets.append(Bucket(second))
            if len(buckets) > self.window_s + 2:
                self.prune()
        bucket = buckets[-1]
        bucket.n += 1
        if seen.status is None or seen.status >= 500:
            bucket.errors += 1
        if seen.status is not None:
            bucket.seen_times += 1
            if len(bucket.times) < RESERVOIR:
                bucket.times.append(seen.time_ms)
            elif (slot := int(self.rng.random() * bucket.seen_times)) < RESERVOIR:
                bucket.times[slot] = seen.time_ms
        if seen.tokens is not None:
            bucket.tokens += seen.tokens
            bucket.tokens_n += 1
        if seen.memory_mb is not None:
            bucket.memory += seen.memory_mb
            bucket.memories += 1
        if seen.cost_usd is not None:
            bucket.cost += seen.cost_usd
            bucket.costs += 1

    def prune(self) -> None:
        edge = self.monotonic() - self.window_s
        for buckets in self.entries.values():
            while buckets and buckets[0].second < edge:  # its start left the window
                buckets.popleft()

    def figures(self, backend: str) -> Figures:
        self.prune()
        buckets = self.entries[backend]
        total = sum(b.n for b in buckets)
        errors = sum(b.errors for b in buckets)
        times = sorted(t for b in buckets for t in b.times)
        return Figures(total, errors, errors / total if total else 0.0,
                       quantile(times, 0.5), quantile(times, 0.95),
                       ratio_of(sum(b.tokens for b in buckets), sum(b.tokens_n for b in buckets)),
                       ratio_of(sum(b.memory for b in buckets), sum(b.memories for b in buckets)),
                       ratio_of(sum(b.cost for b in buckets), sum(b.costs for b in buckets)))

    def clear(self) -> None:
        for buckets in self.entries.values():
            buckets.clear()


def ratio_of(total: float, count: int) -> float | None:
    return total / count if count else None


def quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def judge(config: GuardsConfig, new: Figures, old: Figures,
          complaints_last_hour: int) -> list[Verdict]:
    need = config.min_requests
    enough_new = new.requests >= need
    enough_both = enough_new and old.requests >= need
    waiting = f"waiting for {need} answers in the window"
    verdicts = [
        _limit("error_rate", config.error_rate, new.error_rate if enough_new else None,
               enough_new, waiting, "next_gen error rate"),
        _limit("latency_degradation", config.latency_degradation,
               ratio(new.p50_ms, old.p50_ms) - 1 if enough_both and old.p50_ms else None,
               enough_both, waiting, "next_gen p50 over legacy's"),
        _limit("memory_spike", config.memory_spike,
               ratio(new.mean_memory_mb, old.mean_memory_mb) if enough_both else None,
               enough_both, waiting, "next_gen memory over legacy's"),
        _limit("max_tokens", config.max_tokens, new.mean_tokens if enough_new else None,
               enough_new, waiting, "mean next_gen tokens"),
        _limit("max_time_ms", config.max_time_ms, new.p95_ms if enough_new else None,
               enough_new, waiting, "next_gen p95 ms"),
        _limit("complaints_per_hour", config.complaints_per_hour, float(complaints_last_hour),
               True, "", "complaints about next_gen in the last hour"),
    ]
    return verdicts


def ratio(a: float | None, b: float | None) -> float:
    if a is None or not b:
        return 0.0
    return a / b


def _limit(guard: str, limit: float | None, value: float | None, enough: bool, waiting: str,
           what: str) -> Verdict:
    if limit is None:
        return Verdict(guard, "off", value, None, "not configured")
    if not enough:
        return Verdict(guard, "waiting", None, limit, waiting)
    if value is None:
        return Verdict(guard, "ok", None, limit, f"{what}: no figures")
    if value > limit:
        return Verdict(guard, "tripped", value, limit, f"{what} {value:.3g} > {limit:g}")
    return Verdict(guard, "ok", value, limit, f"{what} {value:.3g} <= {limit:g}")
