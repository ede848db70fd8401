"""Interleaved measurement rounds over several targets, and their summary table."""

from __future__ import annotations

import asyncio
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from load.measure import Load, Measurement, measure
from load.targets import LOAD_CPU, Target


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: int = 3
    busy: Load = field(default_factory=Load)
    single: Load | None = field(default_factory=lambda: Load(connections=1, duration_s=3.0))
    use_wrk: bool = True
    pause_s: float = 0.5
    # Each round with new rollout-proxy processes: one process of the same code can cost a
    # few % more per answer than another for its whole life, which more rounds of the same
    # processes never average out (bench --before).
    fresh: bool = False


@dataclass(slots=True)
class Runs:
    """What one target measured: one busy run and maybe one single-connection run per round."""

    busy: list[Measurement] = field(default_factory=list)
    single: list[Measurement] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # the round of each busy run

    def rps(self) -> dict[int, float]:
        """req/s by round, for the rounds it was measured in."""
        return {index: m.rps for index, m in zip(self.rounds, self.busy, strict=True)}


@dataclass(frozen=True, slots=True)
class Summary:
    name: str
    note: str
    rps: float
    rps_min: float
    rps_max: float
    ratio: float | None
    p50_ms: float
    p99_ms: float
    single_p50_ms: float | None
    added_p50_ms: float | None
    errors: int
    peak_rss_mb: float | None
    cpu_us: float | None = None  # the target's own CPU time per answer (median of rounds)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _order(targets: list[Target], round_index: int) -> list[Target]:
    """Rotated each round, so no target always runs first; every other round run backwards
    too, so no target always follows the same one (shadow always ran just before
    progressive, and shadow@before before progressive@before)."""
    shift = (round_index // 2) % len(targets)
    order = targets[shift:] + targets[:shift]
    return order[::-1] if round_index % 2 else order


async def _measure_one(target: Target, plan: Plan, runs: Runs, workdir: Path,
                       index: int) -> None:
    try:
        busy = await measure(target.url, plan.busy, workdir=workdir, cpu=LOAD_CPU,
                             use_wrk=plan.use_wrk, pids=target.pids)
        runs.busy.append(busy)
        runs.rounds.append(index)
        line = (f"{busy.rps:9.0f} req/s  p50 {busy.p50_ms:7.2f} ms  p99 {busy.p99_ms:7.2f} ms"
                f"  errors {busy.errors}")
        if plan.single is not None:
            await asyncio.sleep(plan.pause_s)
            single = await measure(target.url, plan.single, workdir=workdir, cpu=LOAD_CPU,
                                   use_wrk=plan.use_wrk)
            runs.single.append(single)
            line += f"  1-conn p50 {single.p50_ms:.3f} ms"
        say(f"  {target.name:<19} {line}")
    except (RuntimeError, ValueError, TimeoutError, OSError) as exc:
        runs.failures.append(str(exc))
        say(f"  {target.name:<19} FAILED: {str(exc)[:300]}")


async def run_rounds(targets: list[Target], plan: Plan, workdir: Path) -> dict[str, Runs]:
    results = {target.name: Runs() for target in targets}
    for index in range(plan.rounds):
        say(f"round {index + 1}/{plan.rounds}")
        if plan.fresh and index:
            targets = [await t.restart() if t.restart else t for t in targets]
        for target in _order(targets, index):
            await _measure_one(target, plan, results[target.name], workdir, index)
            await asyncio.sleep(plan.pause_s)
    return results


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(targets: list[Target], results: dict[str, Runs],
              baseline: str | None = "direct") -> list[Summary]:
    medians = {name: _median([m.rps for m in runs.busy]) for name, runs in results.items()}
    base_rps = medians.get(baseline) if baseline else None
    base_single = _median([m.p50_ms for m in results[baseline].single]) if (
        baseline in results) else None
    summaries = []
    for target in targets:
        runs = results[target.name]
        if not runs.busy:
            continue
        rps = [m.rps for m in runs.busy]
        single = _median([m.p50_ms for m in runs.single])
        peaks = [m.peak_rss_mb for m in runs.busy if m.peak_rss_mb is not None]
        cpu = _median([m.cpu_us for m in runs.busy if m.cpu_us is not None])
        summaries.append(Summary(
            target.name, target.note, statistics.median(rps), min(rps), max(rps),
            statistics.median(rps) / base_rps if base_rps else None,
            statistics.median([m.p50_ms for m in runs.busy]),
            statistics.median([m.p99_ms for m in runs.busy]),
            single,
            single - base_single if single is not None and base_single is not None else None,
            sum(m.errors for m in runs.busy),
            max(peaks) if peaks else None, cpu))
    return summaries


def _cell(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(summaries: list[Summary], baseline: str = "direct") -> str:
    head = (f"{'target':<19} {'req/s':>9} {'min–max':>15} {'×' + baseline:>9} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'1-conn p50':>10} {'added':>7} {'errors':>6} {'RSS MB':>7} "
            f"{'CPU us':>7}  what")
    rows = [head, "-" * len(head)]
    for s in summaries:
        spread = f"{s.rps_min:.0f}–{s.rps_max:.0f}"
        rows.append(
            f"{s.name:<19} {s.rps:>9.0f} {spread:>15} {_cell(s.ratio, '.2f'):>9} "
            f"{s.p50_ms:>8.2f} {s.p99_ms:>8.2f} {_cell(s.single_p50_ms, '.3f'):>10} "
            f"{_cell(s.added_p50_ms, '+.3f'):>7} {s.errors:>6} {_cell(s.peak_rss_mb, '.0f'):>7}"
            f" {_cell(s.cpu_us, '.1f'):>7}  {s.note}")
    return "\n".join(rows)
