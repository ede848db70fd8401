"""Rolling windows of what each backend answered, and the guards that judge them.

Rules (SPEC "Guard windows"):
1. A window counts every answer a backend gave in the last `window_s`, whatever its role.
2. Every next_gen 5xx and every answer it did not complete is a next_gen error.
3. A guard judges only once next_gen has `min_requests` answers; a guard that compares with
   legacy (latency, memory) also needs legacy to have that many.
4. One table of rules (`RULES`) serves both judges: `crossed()`, run when an answer of next_gen
   is recorded (the answer that crosses a threshold trips its guard), and `judge()`, run on the
   control loop's tick for the full verdicts (windows that age, complaints, /admin/status).
5. A window keeps running totals, so its figures cost the same at any rate: counts and sums are
   added as answers come and taken away as seconds leave; answer times go into a log histogram
   of 2 % bins (quantiles within 1 % of the exact ones), memory flat whatever the traffic.
Both judges are pure: figures and config in, verdicts out.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from proxy.config.model import BACKENDS, GuardsConfig
from proxy.telemetry.observe import Measurement


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


# The rules -----------------------------------------------------------------------------------


class Side(Protocol):
    """One backend's figures, as a `Figures` or read live from its `Window`."""

    @property
    def requests(self) -> int: ...
    @property
    def error_rate(self) -> float: ...
    @property
    def p50_ms(self) -> float | None: ...
    @property
    def p95_ms(self) -> float | None: ...
    @property
    def mean_tokens(self) -> float | None: ...
    @property
    def mean_memory_mb(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class Rule:
    guard: str  # also its key in GuardsConfig
    needs: str  # next_gen | both (min_requests each) | none (complaints: no window)
    value: Callable[[Side, Side, int], float | None]  # (next_gen, legacy, complaints)
    what: str


def ratio(a: float | None, b: float | None) -> float:
    if a is None or not b:
        return 0.0
    return a / b


def _slower(new: Side, old: Side, complaints: int) -> float | None:
    reference = old.p50_ms
    return ratio(new.p50_ms, reference) - 1 if reference else None


RULES = (
    Rule("error_rate", "next_gen", lambda new, old, c: new.error_rate, "next_gen error rate"),
    Rule("latency_degradation", "both", _slower, "next_gen p50 over legacy's"),
    Rule("memory_spike", "both", lambda new, old, c: ratio(new.mean_memory_mb,
                                                           old.mean_memory_mb),
         "next_gen memory over legacy's"),
    Rule("max_tokens", "next_gen", lambda new, old, c: new.mean_tokens, "mean next_gen tokens"),
    Rule("max_time_ms", "next_gen", lambda new, old, c: new.p95_ms, "next_gen p95 ms"),
    Rule("complaints_per_hour", "none", lambda new, old, c: float(c),
         "complaints about next_gen in the last hour"),
)


def enough(rule: Rule, need: int, new: Side, old: Side) -> bool:
    if rule.needs == "none":
        return True
    return new.requests >= need and (rule.needs == "next_gen" or old.requests >= need)


def crossed(config: GuardsConfig, new: Side, old: Side, armed: Callable[[str], bool]
            ) -> bool:
    """Whether an armed guard that judges answers is past its limit now: run on every answer
    of next_gen, so it reads only what each configured rule needs."""
    need = config.min_requests
    if new.requests < need:
        return False
    for rule in RULES:
        limit = getattr(config, rule.guard)
        if limit is None or rule.needs == "none" or not armed(rule.guard):
            continue
        if enough(rule, need, new, old):
            value = rule.value(new, old, 0)
            if value is not None and value > limit:
                return True
    return False


def judge(config: GuardsConfig, new: Side, old: Side, complaints_last_hour: int
          ) -> list[Verdict]:
    need = config.min_requests
    waiting = f"waiting for {need} answers in the window"
    verdicts = []
    for rule in RULES:
        limit: float | None = getattr(config, rule.guard)
        ready = enough(rule, need, new, old)
        value = rule.value(new, old, complaints_last_hour) if ready else None
        if limit is None:
            verdicts.append(Verdict(rule.guard, "off", value, None, "not configured"))
        elif not ready:
            verdicts.append(Verdict(rule.guard, "waiting", None, limit, waiting))
        elif value is None:
            verdicts.append(Verdict(rule.guard, "ok", None, limit, f"{rule.what}: no figures"))
        elif value > limit:
            verdicts.append(Verdict(rule.guard, "tripped", value, limit,
                                    f"{rule.what} {value:.3g} > {limit:g}"))
        else:
            verdicts.append(Verdict(rule.guard, "ok", value, limit,
                                    f"{rule.what} {value:.3g} <= {limit:g}"))
    return verdicts


# Windows -------------------------------------------------------------------------------------

MIN_MS = 0.01  # bin 0 holds every time up to this; bin i ends at MIN_MS * GROWTH ** i
GROWTH = 1.02
LOG_GROWTH = math.log(GROWTH)
NBINS = 1024  # the last bin starts past 1.7 hours
BLOCK_SHIFT = 5  # bins are summed in blocks of 32, so a quantile walks at most 64 counts
NBLOCKS = NBINS >> BLOCK_SHIFT


def bin_of(time_ms: float) -> int:
    if time_ms <= MIN_MS:
        return 0
    return min(NBINS - 1, int(math.log(time_ms / MIN_MS) / LOG_GROWTH) + 1)


def bin_value(index: int) -> float:
    """The geometric middle of the bin: within 1 % of every time it holds."""
    return MIN_MS if index == 0 else MIN_MS * GROWTH ** (index - 0.5)


class Tally:
    """Counts and sums of some answers (one second's, or a window's)."""

    __slots__ = ("cost", "costs", "errors", "memories", "memory", "n", "timed", "tokens",
                 "tokens_n")

    def __init__(self) -> None:
        self.n = self.errors = self.timed = self.tokens_n = self.memories = self.costs = 0
        self.tokens = self.memory = self.cost = 0.0

    def add(self, seen: Measurement) -> None:
        self.n += 1
        if seen.status is None or seen.status >= 500:
            self.errors += 1
        if seen.status is not None:
            self.timed += 1
        if seen.tokens is not None:
            self.tokens += seen.tokens
            self.tokens_n += 1
        if seen.memory_mb is not None:
            self.memory += seen.memory_mb
            self.memories += 1
        if seen.cost_usd is not None:
            self.cost += seen.cost_usd
            self.costs += 1

    def remove(self, other: Tally) -> None:
        self.n -= other.n
        self.errors -= other.errors
        self.timed -= other.timed
        self.tokens -= other.tokens
        self.tokens_n -= other.tokens_n
        self.memory -= other.memory
        self.memories -= other.memories
        self.cost -= other.cost
        self.costs -= other.costs


class Bucket:
    """One second of one backend's answers: its tally and its times' bins (only those used)."""

    __slots__ = ("bins", "second", "tally")

    def __init__(self, second: int) -> None:
        self.second = second
        self.tally = Tally()
        self.bins: dict[int, int] = {}


class Window:
    """One backend's last `window_s` seconds: per-second buckets and their running totals.
    Read as a `Side`: every figure is O(1) but the two quantiles (at most 64 steps)."""

    def __init__(self) -> None:
        self.buckets: deque[Bucket] = deque()
        self.total = Tally()
        self.bins = [0] * NBINS
        self.blocks = [0] * NBLOCKS

    def add(self, second: int, seen: Measurement) -> bool:
        """Count one answer; True when it opened a new second."""
        buckets, opened = self.buckets, False
        if not buckets or buckets[-1].second != second:
            buckets.append(Bucket(second))
            opened = True
        bucket = buckets[-1]
        bucket.tally.add(seen)
        self.total.add(seen)
        if seen.status is not None:
            index = bin_of(seen.time_ms)
            bucket.bins[index] = bucket.bins.get(index, 0) + 1
            self.bins[index] += 1
            self.blocks[index >> BLOCK_SHIFT] += 1
        return opened

    def prune(self, edge: float) -> None:
        """Forget the seconds that began before `edge`."""
        buckets = self.buckets
        while buckets and buckets[0].second < edge:
            gone = buckets.popleft()
            self.total.remove(gone.tally)
            for index, count in gone.bins.items():
                self.bins[index] -= count
                self.blocks[index >> BLOCK_SHIFT] -= count
        if not buckets:  # start again from exact zeros: no float left over from the sums
            self.total = Tally()

    def quantile(self, q: float) -> float | None:
        timed = self.total.timed
        if not timed:
            return None
        rank = min(timed - 1, int(q * timed))  # the answer at this rank, counting from 0
        seen = 0
        for block, count in enumerate(self.blocks):
            if seen + count > rank:
                index = block << BLOCK_SHIFT
                while True:
                    seen += self.bins[index]
                    if seen > rank:
                        return bin_value(index)
                    index += 1
            seen += count
        return bin_value(NBINS - 1)  # not reached: the blocks add up to `timed`

    @property
    def requests(self) -> int:
        return self.total.n

    @property
    def error_rate(self) -> float:
        total = self.total
        return total.errors / total.n if total.n else 0.0

    @property
    def p50_ms(self) -> float | None:
        return self.quantile(0.5)

    @property
    def p95_ms(self) -> float | None:
        return self.quantile(0.95)

    @property
    def mean_tokens(self) -> float | None:
        return ratio_of(self.total.tokens, self.total.tokens_n)

    @property
    def mean_memory_mb(self) -> float | None:
        return ratio_of(self.total.memory, self.total.memories)

    def figures(self) -> Figures:
        total = self.total
        return Figures(total.n, total.errors, self.error_rate, self.p50_ms, self.p95_ms,
                       self.mean_tokens, self.mean_memory_mb,
                       ratio_of(total.cost, total.costs))


class Windows:
    """Per-backend rolling windows, and the guards' config to judge next_gen's answers by.
    `tripped` names the guards that fired already (kept in step with the stored state)."""

    def __init__(self, window_s: float, monotonic: Callable[[], float],
                 guards: GuardsConfig | None = None) -> None:
        self.window_s, self.monotonic, self.guards = window_s, monotonic, guards
        self.entries: dict[str, Window] = {b: Window() for b in BACKENDS}
        self.tripped: tuple[str, ...] = ()

    def add(self, backend: str, seen: Measurement) -> bool:
        """Count one answer; True when it is next_gen's and takes an armed guard past its
        limit (the caller then judges them all and acts)."""
        now = self.monotonic()
        entries = self.entries
        if entries[backend].add(int(now), seen):
            self.prune(now)  # once a second: the totals never hold a second past the window
        if backend != "next_gen" or self.guards is None:
            return False
        tripped = self.tripped
        return crossed(self.guards, entries["next_gen"], entries["legacy"],
                       lambda guard: guard not in tripped)

    def prune(self, now: float | None = None) -> None:
        edge = (self.monotonic() if now is None else now) - self.window_s
        for window in self.entries.values():
            window.prune(edge)  # a second leaves once its start left the window

    def side(self, backend: str) -> Window:
        return self.entries[backend]

    def figures(self, backend: str) -> Figures:
        self.prune()
        return self.entries[backend].figures()

    def clear(self) -> None:
        for backend in self.entries:
            self.entries[backend] = Window()


def ratio_of(total: float, count: int) -> float | None:
    return total / count if count else None
