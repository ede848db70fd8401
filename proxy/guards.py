"""Rolling windows of what each backend answered, and the guards that judge them.

Rules (SPEC "Guard windows"):
1. A window counts every answer a backend gave in the last `window_s`, whatever its role.
2. Every next_gen 5xx and every answer it did not complete is a next_gen error.
3. A guard judges only once next_gen has `min_requests` answers; a guard that compares with
   legacy (latency, memory) also needs legacy to have that many.
`judge()` is pure: figures and config in, verdicts out.
"""

from __future__ import annotations

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


class Windows:
    """Per-backend rolling windows; entries are (time, is_error, time_ms, tokens, memory,
    cost)."""

    def __init__(self, window_s: float, monotonic: Callable[[], float]) -> None:
        self.window_s, self.monotonic = window_s, monotonic
        self.entries: dict[str, deque[tuple[float, bool, float | None, float | None,
                                            float | None, float | None]]] = {
            b: deque() for b in BACKENDS}

    def add(self, backend: str, seen: Measurement) -> None:
        error = seen.status is None or seen.status >= 500
        time_ms = seen.time_ms if seen.status is not None else None
        self.entries[backend].append((self.monotonic(), error, time_ms, seen.tokens,
                                      seen.memory_mb, seen.cost_usd))

    def prune(self) -> None:
        edge = self.monotonic() - self.window_s
        for entries in self.entries.values():
            while entries and entries[0][0] < edge:
                entries.popleft()

    def figures(self, backend: str) -> Figures:
        self.prune()
        entries = self.entries[backend]
        total = len(entries)
        errors = sum(1 for e in entries if e[1])
        times = sorted(e[2] for e in entries if e[2] is not None)
        tokens = [e[3] for e in entries if e[3] is not None]
        memory = [e[4] for e in entries if e[4] is not None]
        cost = [e[5] for e in entries if e[5] is not None]
        return Figures(total, errors, errors / total if total else 0.0,
                       quantile(times, 0.5), quantile(times, 0.95), mean(tokens), mean(memory),
                       mean(cost))

    def clear(self) -> None:
        for entries in self.entries.values():
            entries.clear()


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
