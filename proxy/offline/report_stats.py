"""Streaming figures over a comparison trace: what `report` measures, in bounded memory.

Rules:
1. Memory does not grow with the trace. Times, tokens and memory go to fixed log-scale
   buckets, examples to top-N heaps, prefixes and differing paths to capped sets, and
   the timeline to a capped number of buckets that widen as the trace spans more time.
2. A bad line is counted and the first one is named; it never stops the summary.
3. A target with no figures is `no data`: neither a pass nor a fail.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Literal

from proxy.offline.report_trace import Answer, Comparison, Line, epoch, parse_line, path_prefix

BUCKET_GROWTH: Final = 1.02  # each bucket 2 % wider than the one below: quantiles within 1 %
_LOG_GROWTH: Final = math.log(BUCKET_GROWTH)
_LOWEST_KEY: Final = math.floor(math.log(1e-6) / _LOG_GROWTH)
_HIGHEST_KEY: Final = math.ceil(math.log(1e10) / _LOG_GROWTH)
_ZERO_KEY: Final = _LOWEST_KEY - 1  # zero and below: a bucket of its own

TOP_N: Final = 10
MAX_PREFIXES: Final = 20
MAX_PATHS: Final = 500
MAX_TIME_BUCKETS: Final = 240
OTHER: Final = "other"
KINDS: Final = ("status", "success", "shape", "error")

TargetUnit = Literal["%", "x", "score"]  # a share, a ratio, a mean score out of 5


@dataclass(frozen=True, slots=True)
class Distribution:
    """A snapshot of a LogHistogram: exact count, total, low and high; bucketed quantiles."""

    count: int = 0
    total: float = 0.0
    low: float = 0.0
    high: float = 0.0
    buckets: tuple[tuple[int, int], ...] = ()  # (bucket key, count), ascending

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for key, n in self.buckets:
            if seen + n >= rank:
                # Spread the bucket's values evenly (on the log scale) across it, and clamp
                # to the exact extremes, so that a constant series comes out exact.
                return min(max(_within(key, (rank - seen - 0.5) / n), self.low), self.high)
            seen += n
        return self.high

    def bins(self) -> Iterator[tuple[float, float, int]]:
        """(lower bound, upper bound, count) of every non-empty bucket."""
        for key, n in self.buckets:
            if key == _ZERO_KEY:
                yield 0.0, 0.0, n
            else:
                yield BUCKET_GROWTH**key, BUCKET_GROWTH ** (key + 1), n


def _within(key: int, share: float) -> float:
    return 0.0 if key == _ZERO_KEY else float(BUCKET_GROWTH ** (key + share))


def _key(value: float) -> int:
    if value <= 0:
        return _ZERO_KEY
    key = math.floor(math.log(value) / _LOG_GROWTH)
    if key < _LOWEST_KEY:
        return _LOWEST_KEY
    return key if key < _HIGHEST_KEY else _HIGHEST_KEY


class LogHistogram:
    __slots__ = ("_counts", "_high", "_low", "_n", "_total")

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._n = 0
        self._total = 0.0
        self._low = math.inf
        self._high = -math.inf

    def add(self, value: float) -> None:
        # Called a dozen times per trace line: comparisons here beat min()/max() calls.
        self._n += 1
        self._total += value
        if value < self._low:
            self._low = value
        if value > self._high:
            self._high = value
        key = _key(value)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1

    def snapshot(self) -> Distribution:
        if not self._n:
            return Distribution()
        buckets = tuple(sorted(self._counts.items()))
        return Distribution(self._n, self._total, self._low, self._high, buckets)


@dataclass(frozen=True, slots=True)
class Target:
    key: str
    name: str
    measured: float | None
    threshold: float
    above: bool  # the target is measured > threshold (else measured < threshold)
    unit: TargetUnit
    comparisons: int  # how many figures the measure rests on: see `counts`
    basis: str
    counts: str = "comparisons"  # what `comparisons` counts: feedback scores, users, ...
    source: Literal["trace", "status"] = "trace"

    @property
    def verdict(self) -> Literal["PASS", "FAIL", "no data"]:
        if self.measured is None:
            return "no data"
        passed = self.measured > self.threshold if self.above else self.measured < self.threshold
        return "PASS" if passed else "FAIL"


@dataclass(frozen=True, slots=True)
class SideFigures:
    answers: int
    successes: int
    latency: Distribution  # time_ms of complete answers
    ttft: Distribution
    tokens: Distribution
    memory: Distribution
    cost: Distribution

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.answers if self.answers else None


class SideTally:
    __slots__ = ("answers", "cost", "latency", "memory", "successes", "tokens", "ttft")

    def __init__(self) -> None:
        self.answers = 0
        self.successes = 0
        self.latency = LogHistogram()
        self.ttft = LogHistogram()
        self.tokens = LogHistogram()
        self.memory = LogHistogram()
        self.cost = LogHistogram()

    def add(self, answer: Answer, complete: bool) -> None:
        self.answers += 1
        self.successes += answer.success
        if complete and answer.time_ms is not None:
            self.latency.add(answer.time_ms)
        if complete and answer.ttft_ms is not None:
            self.ttft.add(answer.ttft_ms)
        if answer.tokens is not None:
            self.tokens.add(answer.tokens)
        if answer.memory_mb is not None:
            self.memory.add(answer.memory_mb)
        if answer.cost_usd is not None:
            self.cost.add(answer.cost_usd)

    def figures(self) -> SideFigures:
        return SideFigures(
            self.answers, self.successes, self.latency.snapshot(), self.ttft.snapshot(),
            self.tokens.snapshot(), self.memory.snapshot(), self.cost.snapshot(),
        )


@dataclass(frozen=True, slots=True)
class Figures:
    """Everything measured over one group of comparisons: the trace, or one path prefix."""

    comparisons: int
    matches: int
    mismatches: int
    errors: int
    status: int  # comparisons whose status class differed
    success: int
    shape: int
    noisy: int  # comparisons where noise paths were left out
    old: SideFigures
    new: SideFigures
    targets: tuple[Target, ...]
    cost_saving: float | None = None  # 1 - mean next_gen cost / mean legacy cost, paired
    cost_pairs: int = 0  # comparisons with a cost on both sides

    def kind_counts(self) -> dict[str, int]:
        return {"status": self.status, "success": self.success, "shape": self.shape,
                "error": self.errors}

    def rate(self, count: int) -> float | None:
        return count / self.comparisons if self.comparisons else None


class PairedSums:
    """Sums over comparisons where both sides have the figure, so the means compare like with
    like."""

    __slots__ = ("n", "new", "old")

    def __init__(self) -> None:
        self.n = 0
        self.old = 0.0
        self.new = 0.0

    def add(self, old: float | None, new: float | None) -> None:
        if old is not None and new is not None:
            self.n += 1
            self.old += old
            self.new += new


class Tally:
    __slots__ = ("comparisons", "cost", "counts", "memory", "new", "old", "time_new",
                 "time_old", "tokens")

    def __init__(self) -> None:
        self.comparisons = 0
        self.counts = dict.fromkeys(("match", "mismatch", "error", "status", "success", "shape",
                                     "noisy"), 0)
        self.old = SideTally()
        self.new = SideTally()
        self.tokens = PairedSums()
        self.memory = PairedSums()
        self.cost = PairedSums()
        self.time_old = LogHistogram()
        self.time_new = LogHistogram()

    def add(self, c: Comparison) -> None:
        self.comparisons += 1
        counts = self.counts
        counts[c.result] += 1
        for kind in c.kinds:
            if kind != "error":
                counts[kind] += 1
        counts["noisy"] += bool(c.noise)
        complete = c.result != "error"
        self.old.add(c.old, complete=True)
        self.new.add(c.new, complete)
        # Money spent on an answer that never completed is still spent: errors count here.
        self.cost.add(c.old.cost_usd, c.new.cost_usd)
        if not complete:
            return
        self.tokens.add(c.old.tokens, c.new.tokens)
        self.memory.add(c.old.memory_mb, c.new.memory_mb)
        if c.old.time_ms is not None and c.new.time_ms is not None:
            self.time_old.add(c.old.time_ms)
            self.time_new.add(c.new.time_ms)

    def figures(self) -> Figures:
        counts = self.counts
        old, new = self.old.figures(), self.new.figures()
        return Figures(
            self.comparisons, counts["match"], counts["mismatch"], counts["error"],
            counts["status"], counts["success"], counts["shape"], counts["noisy"],
            old, new, self._targets(new), self._cost_saving(), self.cost.n,
        )

    def _cost_saving(self) -> float | None:
        cost = self.cost
        return 1 - cost.new / cost.old if cost.old > 0 else None

    def _targets(self, new: SideFigures) -> tuple[Target, ...]:
        tokens, memory = self.tokens, self.memory
        time_old, time_new = self.time_old.snapshot(), self.time_new.snapshot()
        old_median, new_median = time_old.quantile(0.5), time_new.quantile(0.5)
        return (
            Target("token_reduction", "token reduction, new vs old",
                   1 - tokens.new / tokens.old if tokens.old > 0 else None, 0.80, True, "%",
                   tokens.n, "1 - mean next_gen tokens / mean legacy tokens"),
            Target("speed", "speed improvement (old / new time)",
                   old_median / new_median if old_median and new_median else None, 5.0, True,
                   "x", time_old.count,
                   "median legacy time_ms / median next_gen time_ms"),
            Target("success_rate", "next_gen success rate", new.success_rate, 0.90, True, "%",
                   new.answers, "next_gen successes / comparisons (an error is a failure)"),
            Target("memory", "next_gen memory vs legacy",
                   memory.new / memory.old if memory.old > 0 else None, 0.50, False, "%",
                   memory.n, "mean next_gen memory_mb / mean legacy memory_mb"),
        )


@dataclass(frozen=True, slots=True)
class Example:
    """One of the worst mismatches of a kind, for an operator to look up by execution id."""

    kind: str
    score: float
    execution_id: str
    ts: str
    path: str
    old_status: int | None
    new_status: int | None
    detail: str


def _severity(kind: str, c: Comparison) -> float:
    if kind == "error":
        return c.new.time_ms or 0.0  # a long wait before failing hurts most
    if kind == "status":
        return abs((c.new.status or 0) // 100 - (c.old.status or 0) // 100)
    if kind == "success":
        return 2.0 if c.old.success else 1.0  # next_gen failing where legacy did not is worse
    return float(max(1, len(c.diff)))


def _detail(kind: str, c: Comparison) -> str:
    if kind == "error":
        return c.new.error or "no complete answer"
    if kind == "status":
        return f"legacy {c.old.status} → next_gen {c.new.status}"
    if kind == "success":
        return "next_gen failed, legacy succeeded" if c.old.success else (
            "next_gen succeeded, legacy failed")
    if not c.diff:
        return "JSON shape differs"
    more = f" (+{len(c.diff) - 3} more)" if len(c.diff) > 3 else ""
    return "differs at " + ", ".join(c.diff[:3]) + more


class WorstTally:
    """The TOP_N worst comparisons of each kind; on a tie the earliest stays."""

    __slots__ = ("_heaps", "_seq")

    def __init__(self) -> None:
        self._heaps: dict[str, list[tuple[float, int, Example]]] = {k: [] for k in KINDS}
        self._seq = 0

    def add(self, c: Comparison) -> None:
        self._seq += 1
        for kind in c.kinds:
            heap, score = self._heaps[kind], _severity(kind, c)
            if len(heap) >= TOP_N and (score, -self._seq) <= heap[0][:2]:
                continue
            entry = (score, -self._seq, Example(kind, score, c.execution_id, c.ts, c.path,
                                                c.old.status, c.new.status, _detail(kind, c)))
            if len(heap) < TOP_N:
                heapq.heappush(heap, entry)
            else:
                heapq.heapreplace(heap, entry)

    def examples(self) -> tuple[Example, ...]:
        return tuple(e for kind in KINDS for _, _, e in sorted(self._heaps[kind], reverse=True))


class CappedCounter:
    """Counts at most `cap` distinct keys; new keys beyond that are counted under OTHER."""

    __slots__ = ("_cap", "_counts")

    def __init__(self, cap: int = MAX_PATHS) -> None:
        self._cap = cap
        self._counts: dict[str, int] = {}

    def add(self, key: str) -> None:
        if key not in self._counts and len(self._counts) >= self._cap:
            key = OTHER
        self._counts[key] = self._counts.get(key, 0) + 1

    def most_common(self, n: int = TOP_N) -> tuple[tuple[str, int], ...]:
        return tuple(sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n])


@dataclass(frozen=True, slots=True)
class TimeBucket:
    start: float  # unix seconds
    comparisons: int
    old_successes: int
    new_successes: int
    mismatches: int
    errors: int


@dataclass(frozen=True, slots=True)
class Timeline:
    width_s: int
    buckets: tuple[TimeBucket, ...]
    undated: int  # comparisons whose ts could not be read


class TimelineTally:
    """Counts per time bucket; the width doubles whenever the buckets outgrow the cap."""

    __slots__ = ("_buckets", "_undated", "_width")

    def __init__(self) -> None:
        self._width = 60
        self._buckets: dict[int, list[int]] = {}
        self._undated = 0

    def add(self, c: Comparison) -> None:
        moment = epoch(c.ts)
        if moment is None:
            self._undated += 1
            return
        start = int(moment // self._width) * self._width
        row = self._buckets.get(start)
        if row is None:
            row = self._buckets[start] = [0, 0, 0, 0, 0]
        row[0] += 1
        row[1] += c.old.success
        row[2] += c.new.success
        row[3] += c.result == "mismatch"
        row[4] += c.result == "error"
        if len(self._buckets) > MAX_TIME_BUCKETS:
            self._widen()

    def _widen(self) -> None:
        while len(self._buckets) > MAX_TIME_BUCKETS:
            self._width *= 2
            merged: dict[int, list[int]] = {}
            for start, row in self._buckets.items():
                into = merged.setdefault(start // self._width * self._width, [0] * len(row))
                for i, n in enumerate(row):
                    into[i] += n
            self._buckets = merged

    def timeline(self) -> Timeline:
        rows = sorted(self._buckets.items())
        return Timeline(self._width, tuple(TimeBucket(float(s), *r) for s, r in rows),
                        self._undated)


@dataclass(frozen=True, slots=True)
class Summary:
    overall: Figures
    prefixes: tuple[tuple[str, Figures], ...]  # most comparisons first, OTHER last
    worst: tuple[Example, ...]  # grouped by kind, worst first
    diff_paths: tuple[tuple[str, int], ...]
    noise_paths: tuple[tuple[str, int], ...]
    timeline: Timeline
    lines: int  # non-blank lines read
    bad_lines: int
    first_bad: str | None  # "FILE:LINE: reason"
    sources: tuple[str, ...] = ()
    read_problems: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return any(t.verdict == "FAIL" for t in self.overall.targets)


class Summariser:
    """Feeds lines one at a time; `summary()` may be called at any point."""

    def __init__(self) -> None:
        self._overall = Tally()
        self._prefixes: dict[str, Tally] = {}
        self._worst = WorstTally()
        self._diff = CappedCounter()
        self._noise = CappedCounter()
        self._timeline = TimelineTally()
        self._lines = 0
        self._bad = 0
        self._first_bad: str | None = None

    def add(self, source: str, number: int, data: bytes) -> None:
        parsed = parse_line(data)
        if parsed is None:
            return
        self._lines += 1
        if isinstance(parsed, str):
            self._bad += 1
            if self._first_bad is None:
                self._first_bad = f"{source}:{number}: {parsed}"
            return
        self._overall.add(parsed)
        self._prefix_tally(parsed.path).add(parsed)
        self._timeline.add(parsed)
        if parsed.kinds:
            self._worst.add(parsed)
        for path in parsed.diff:
            self._diff.add(path)
        for path in parsed.noise:
            self._noise.add(path)

    def _prefix_tally(self, path: str) -> Tally:
        prefix = path_prefix(path)
        tally = self._prefixes.get(prefix)
        if tally is not None:
            return tally
        # The first MAX_PREFIXES prefixes seen get a row each; later ones share OTHER.
        if len(self._prefixes) >= MAX_PREFIXES:
            prefix = OTHER
        return self._prefixes.setdefault(prefix, Tally())

    def summary(self) -> Summary:
        prefixes = sorted(self._prefixes.items(),
                          key=lambda kv: (kv[0] == OTHER, -kv[1].comparisons, kv[0]))
        return Summary(
            overall=self._overall.figures(),
            prefixes=tuple((p, t.figures()) for p, t in prefixes),
            worst=self._worst.examples(),
            diff_paths=self._diff.most_common(),
            noise_paths=self._noise.most_common(),
            timeline=self._timeline.timeline(),
            lines=self._lines,
            bad_lines=self._bad,
            first_bad=self._first_bad,
        )


def summarise(lines: Iterable[Line]) -> Summary:
    summariser = Summariser()
    for source, number, data in lines:
        summariser.add(source, number, data)
    return summariser.summary()
