"""Text and JSON renderings of a report summary, and of two side by side (`compare`).

Pure functions from a Summary to a string or a JSON-ready dict; the CLI only prints them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from proxy.offline.report_stats import KINDS, Distribution, Figures, SideFigures, Summary, Target
from proxy.offline.report_status import Budget, StatusFigures, all_targets, failed

TEXT_WORST_PER_KIND: Final = 5
TEXT_DAYS: Final = 14

Unit = Literal["count", "pct", "x", "ms", "tokens", "mb", "usd"]


@dataclass(frozen=True, slots=True)
class Figure:
    """One named number of one backend, as the text table and `compare` show it."""

    key: str
    label: str
    unit: Unit
    value: float | None


def side_figures(side: SideFigures) -> list[Figure]:
    latency, ttft = side.latency, side.ttft
    return [
        Figure("answers", "answers", "count", side.answers),
        Figure("success_rate", "success rate", "pct", side.success_rate),
        Figure("latency_p50_ms", "latency p50 (ms)", "ms", latency.quantile(0.5)),
        Figure("latency_p90_ms", "latency p90 (ms)", "ms", latency.quantile(0.9)),
        Figure("latency_p99_ms", "latency p99 (ms)", "ms", latency.quantile(0.99)),
        Figure("ttft_p50_ms", "time to first byte p50 (ms)", "ms", ttft.quantile(0.5)),
        Figure("ttft_p95_ms", "time to first byte p95 (ms)", "ms", ttft.quantile(0.95)),
        Figure("tokens_mean", "tokens mean", "tokens", side.tokens.mean),
        Figure("tokens_total", "tokens total", "tokens", _total(side.tokens)),
        Figure("memory_mean_mb", "memory mean (MB)", "mb", side.memory.mean),
        Figure("cost_total_usd", "cost total (USD)", "usd", _total(side.cost)),
        Figure("cost_mean_usd", "cost per request (USD)", "usd", side.cost.mean),
    ]


def _total(d: Distribution) -> float | None:
    return d.total if d.count else None


def format_value(unit: Unit, value: float | None) -> str:
    if value is None:
        return "-"
    if unit == "pct":
        return f"{value * 100:.1f} %"
    if unit == "x":
        return f"{value:.1f}x"
    if unit == "usd":
        return f"{value:,.2f}" if value >= 1 else f"{value:.4g}"
    if unit == "mb" or (unit == "ms" and value < 100):
        return f"{value:,.1f}"
    return f"{value:,.0f}"


def format_delta(unit: Unit, old: float | None, new: float | None) -> str:
    if old is None or new is None:
        return "-"
    if unit == "pct":
        return f"{(new - old) * 100:+.1f} pp"
    relative = f" ({(new - old) / old:+.0%})" if old else ""
    if unit in ("x", "usd"):
        return f"{new - old:+.3g}{'x' if unit == 'x' else ''}{relative}"
    return f"{new - old:+,.1f}{relative}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """The first `left` columns left-aligned, the others (figures) right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [c.ljust(w) if i < left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    return "\n".join(line(r) for r in [header, *rows])


# --- report ----------------------------------------------------------------------------


def format_measured(target: Target) -> str:
    if target.measured is None:
        return "no data"
    if target.unit == "score":
        return f"{target.measured:.2f} / 5"
    if target.measured == math.inf:
        return "∞x"  # next_gen has tickets where legacy has none
    return format_value("pct" if target.unit == "%" else "x", target.measured)


def format_threshold(target: Target) -> str:
    goal = target.threshold
    value = f"{goal * 100:g} %" if target.unit == "%" else f"{goal:g}x" if target.unit == "x" \
        else f"{goal:g}"
    return f"{'>' if target.above else '<'} {value}"


def format_targets(targets: Sequence[Target]) -> str:
    rows = [[t.name, format_measured(t), format_threshold(t), t.verdict, f"{t.comparisons:,}"]
            for t in targets]
    table = _table(["success target", "measured", "target", "result", "based on"], rows)
    notes = (f"  {t.key} ({t.comparisons:,} {t.counts}): {t.basis}" for t in targets)
    return "\n".join([table, *notes])


def format_sides(figures: Figures) -> str:
    pairs = zip(side_figures(figures.old), side_figures(figures.new), strict=True)
    rows = [[a.label, format_value(a.unit, a.value), format_value(b.unit, b.value)]
            for a, b in pairs if a.value is not None or b.value is not None]
    return _table(["backend", "legacy", "next_gen"], rows)


def format_results(figures: Figures) -> str:
    def pct(count: int) -> str:
        return format_value("pct", figures.rate(count))

    head = (f"comparisons: {figures.comparisons:,}  match {pct(figures.matches)}"
            f"  mismatch {pct(figures.mismatches)}  error {pct(figures.errors)}")
    kinds = "  ".join(f"{kind} {pct(n)} ({n:,})" for kind, n in figures.kind_counts().items())
    noisy = f"\nnoise paths left out in {figures.noisy:,} comparisons" if figures.noisy else ""
    return f"{head}\nmismatch rate by kind: {kinds}{noisy}"


def _target(figures: Figures, key: str) -> str:
    target = next(t for t in figures.targets if t.key == key)
    return "-" if target.measured is None else format_measured(target)


def format_prefixes(prefixes: Sequence[tuple[str, Figures]]) -> str:
    header = ["path prefix", "comparisons", "match", *KINDS, "p50 old", "p50 new", "p99 old",
              "p99 new", "tokens -", "speed", "ng ok"]
    rows = []
    for prefix, f in prefixes:
        kinds, old, new = f.kind_counts(), f.old.latency, f.new.latency
        rows.append([
            prefix, f"{f.comparisons:,}", format_value("pct", f.rate(f.matches)),
            *(format_value("pct", f.rate(kinds[k])) for k in KINDS),
            *(format_value("ms", d.quantile(q)) for q in (0.5, 0.99) for d in (old, new)),
            _target(f, "token_reduction"), _target(f, "speed"),
            format_value("pct", f.new.success_rate),
        ])
    note = "  mismatch kinds as rates; p50/p99 in ms; tokens -: token reduction; " \
        "ng ok: next_gen success rate"
    return _table(header, rows) + "\n" + note


def format_worst(summary: Summary) -> str:
    if not summary.worst:
        return "worst mismatches: none"
    shown: dict[str, int] = {}
    rows = []
    for e in summary.worst:
        # JSON and HTML carry all TOP_N of each kind; a terminal gets the first few.
        shown[e.kind] = shown.get(e.kind, 0) + 1
        if shown[e.kind] <= TEXT_WORST_PER_KIND:
            rows.append([e.kind, e.execution_id or "-", e.ts or "-", e.path, e.detail])
    return _table(["worst mismatch", "execution id", "ts", "path", "detail"], rows, left=5)


def _span(summary: Summary) -> str:
    buckets = summary.timeline.buckets
    if not buckets:
        return ""
    first = datetime.fromtimestamp(buckets[0].start, UTC)
    last = datetime.fromtimestamp(buckets[-1].start + summary.timeline.width_s, UTC)
    return f"from {first:%Y-%m-%d %H:%M} to {last:%Y-%m-%d %H:%M} UTC"


def _status_line(status: StatusFigures) -> str:
    plan = " ".join([f"phase {status.phase}" if status.phase else "",
                     f"at {status.percentage:g} %" if status.percentage is not None else ""])
    facts = [plan.strip(), f"config {status.config_version}" if status.config_version else ""]
    said = ", ".join(f for f in facts if f)
    return f"status: {status.source}" + (f" ({said})" if said else "")


def format_header(summary: Summary, status: StatusFigures | None = None) -> str:
    lines = [f"trace: {', '.join(summary.sources) or '-'}"]
    if status is not None:
        lines.append(_status_line(status))
    lines.append(f"{summary.overall.comparisons:,} comparisons in {summary.lines:,} lines")
    if summary.bad_lines:
        lines.append(f"bad lines skipped: {summary.bad_lines:,} (first: {summary.first_bad})")
    lines += [f"read problem: {p}" for p in summary.read_problems]
    return "\n".join([*lines, _span(summary)]).rstrip()


def path_rows(summary: Summary) -> list[tuple[str, str, list[list[str]]]]:
    """(label, share's column, rows): the top differing paths, as a share of mismatches, and
    the top noise paths, as a share of comparisons (noise is left out of matches too)."""
    overall = summary.overall

    def share(n: int, of: int) -> str:
        return format_value("pct", n / of if of else None)

    return [
        ("path that differs most", "of mismatches",
         [[p, f"{n:,}", share(n, overall.mismatches)] for p, n in summary.diff_paths]),
        ("noise path (left out of mismatch)", "of comparisons",
         [[p, f"{n:,}", share(n, overall.comparisons)] for p, n in summary.noise_paths]),
    ]


def format_paths(summary: Summary) -> str:
    return "\n\n".join(_table([label, "comparisons", share], rows)
                        for label, share, rows in path_rows(summary) if rows)


def _budget_text(unit: Unit, cap: float | None, used: float | None) -> str:
    if cap is None:
        return "no cap"
    spent = used or 0.0
    share = f" ({format_value('pct', spent / cap)})" if cap else ""
    return (f"{format_value(unit, spent)} of {format_value(unit, cap)} used{share}, "
            f"{format_value(unit, max(0.0, cap - spent))} left in the last hour")


def budget_rows(budget: Budget | None) -> list[tuple[str, str]]:
    if budget is None:
        return [("shadow budget", "not in the status (no shadow mirror running)")]
    if not budget.capped:
        return [("shadow budget", "no cap (shadow.budget is unset)")]
    return [("shadow budget, USD per hour",
             _budget_text("usd", budget.usd_per_hour, budget.usd_used)),
            ("shadow budget, tokens per hour",
             _budget_text("tokens", budget.tokens_per_hour, budget.tokens_used))]


def cost_rows(summary: Summary, status: StatusFigures | None) -> list[tuple[str, str]]:
    """The cost saving (when the trace has costs on both sides) and the budget's use."""
    overall, rows = summary.overall, []
    if overall.cost_pairs:
        rows.append(("cost saving, next_gen vs legacy",
                     f"{format_value('pct', overall.cost_saving)} (1 - mean next_gen cost / "
                     f"mean legacy cost; {overall.cost_pairs:,} comparisons with both costs)"))
    if status is not None:
        rows += budget_rows(status.budget)
    return rows


def format_cost(summary: Summary, status: StatusFigures | None) -> str:
    return "\n".join(f"{label}: {text}" for label, text in cost_rows(summary, status))


def day_rows(status: StatusFigures) -> list[list[str]]:
    def count(n: int | None) -> str:
        return "-" if n is None else f"{n:,}"

    return [[d.day, count(d.legacy), count(d.next_gen), format_value("pct", d.adoption),
             count(d.complaints_legacy), count(d.complaints_next_gen)] for d in status.days]


DAY_HEADER: Final = ("day (UTC)", "legacy users", "next_gen users", "adoption",
                     "legacy tickets", "next_gen tickets")


def format_days(status: StatusFigures | None) -> str:
    if status is None:
        return ""
    rows = day_rows(status)
    if not rows:
        return "active users: none in the status"
    more = len(rows) - TEXT_DAYS
    note = f"\n  ... {more:,} older days (--json or --html has them all)" if more > 0 else ""
    return _table(DAY_HEADER, rows[:TEXT_DAYS]) + note


def format_report(summary: Summary, status: StatusFigures | None = None) -> str:
    sections = [
        format_header(summary, status),
        format_targets(all_targets(summary, status)),
        format_sides(summary.overall),
        format_cost(summary, status),
        format_results(summary.overall),
        format_days(status),
        format_prefixes(summary.prefixes),
        format_worst(summary),
        format_paths(summary),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


# --- JSON ------------------------------------------------------------------------------


def _distribution_json(d: Distribution) -> dict[str, Any]:
    return {"count": d.count, "total": d.total, "mean": d.mean,
            "p50": d.quantile(0.5), "p90": d.quantile(0.9), "p95": d.quantile(0.95),
            "p99": d.quantile(0.99),
            "min": d.low if d.count else None, "max": d.high if d.count else None}


def _side_json(side: SideFigures) -> dict[str, Any]:
    return {"answers": side.answers, "successes": side.successes,
            "success_rate": side.success_rate,
            "latency_ms": _distribution_json(side.latency),
            "ttft_ms": _distribution_json(side.ttft),
            "tokens": _distribution_json(side.tokens),
            "memory_mb": _distribution_json(side.memory),
            "cost_usd": _distribution_json(side.cost)}


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def _target_json(t: Target) -> dict[str, Any]:
    # JSON has no infinity: a ticket ratio over a ticket-free legacy is null, its result FAIL.
    return {"key": t.key, "name": t.name, "measured": _finite(t.measured),
            "target": t.threshold, "comparison": ">" if t.above else "<", "unit": t.unit,
            "result": t.verdict, "comparisons": t.comparisons, "counts": t.counts,
            "source": t.source, "basis": t.basis}


def figures_json(f: Figures) -> dict[str, Any]:
    return {
        "comparisons": f.comparisons,
        "results": {"match": f.matches, "mismatch": f.mismatches, "error": f.errors},
        "mismatch_by_kind": {k: {"count": n, "rate": f.rate(n)}
                             for k, n in f.kind_counts().items()},
        "noisy": f.noisy,
        "targets": [_target_json(t) for t in f.targets],
        "cost": {"saving": f.cost_saving, "comparisons": f.cost_pairs},
        "legacy": _side_json(f.old),
        "next_gen": _side_json(f.new),
    }


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat().replace("+00:00", "Z")


def _timeline_json(summary: Summary) -> dict[str, Any]:
    def rate(n: int, of: int) -> float | None:
        return n / of if of else None

    buckets = [{"start": _iso(b.start), "comparisons": b.comparisons,
                "legacy_success_rate": rate(b.old_successes, b.comparisons),
                "next_gen_success_rate": rate(b.new_successes, b.comparisons),
                "mismatch_rate": rate(b.mismatches, b.comparisons),
                "error_rate": rate(b.errors, b.comparisons)}
               for b in summary.timeline.buckets]
    return {"bucket_s": summary.timeline.width_s, "undated": summary.timeline.undated,
            "buckets": buckets}


def status_json(status: StatusFigures) -> dict[str, Any]:
    budget = status.budget
    return {
        "source": status.source, "phase": status.phase, "percentage": status.percentage,
        "config_version": status.config_version,
        "budget": None if budget is None else {
            "tokens_per_hour": budget.tokens_per_hour, "tokens_used": budget.tokens_used,
            "usd_per_hour": budget.usd_per_hour, "usd_used": budget.usd_used},
        "users": [{"day": d.day, "legacy": d.legacy, "next_gen": d.next_gen,
                   "adoption": d.adoption, "complaints": {"legacy": d.complaints_legacy,
                                                          "next_gen": d.complaints_next_gen}}
                  for d in status.days],
    }


def summary_json(summary: Summary, status: StatusFigures | None = None) -> dict[str, Any]:
    overall = figures_json(summary.overall)
    overall["targets"] = [_target_json(t) for t in all_targets(summary, status)]
    return {
        "trace": list(summary.sources),
        "status": None if status is None else status_json(status),
        "lines": summary.lines,
        "bad_lines": summary.bad_lines,
        "first_bad_line": summary.first_bad,
        "read_problems": list(summary.read_problems),
        "passed": not failed(summary, status),
        **overall,
        "prefixes": {p: figures_json(f) for p, f in summary.prefixes},
        "worst": [{"kind": e.kind, "execution_id": e.execution_id, "ts": e.ts, "path": e.path,
                   "legacy_status": e.old_status, "next_gen_status": e.new_status,
                   "detail": e.detail} for e in summary.worst],
        "diff_paths": [{"path": p, "count": n} for p, n in summary.diff_paths],
        "noise_paths": [{"path": p, "count": n} for p, n in summary.noise_paths],
        "timeline": _timeline_json(summary),
    }


# --- compare ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One figure in two traces."""

    key: str
    label: str
    unit: Unit
    old: float | None
    new: float | None
    verdicts: str = ""  # "PASS → FAIL" for a target

    @property
    def delta(self) -> float | None:
        return None if self.old is None or self.new is None else self.new - self.old


def _overall_changes(old: Figures, new: Figures) -> list[Change]:
    changes = [Change("comparisons", "comparisons", "count", old.comparisons, new.comparisons)]
    for a, b in zip(old.targets, new.targets, strict=True):
        changes.append(Change(f"target.{a.key}", a.name, "pct" if a.unit == "%" else "x",
                              a.measured, b.measured, f"{a.verdict} → {b.verdict}"))
    changes.append(Change("cost_saving", "cost saving, new vs old", "pct", old.cost_saving,
                          new.cost_saving))
    changes.append(Change("match_rate", "match rate", "pct", old.rate(old.matches),
                          new.rate(new.matches)))
    old_kinds, new_kinds = old.kind_counts(), new.kind_counts()
    changes += [Change(f"{k}_mismatch_rate", f"{k} mismatch rate", "pct",
                       old.rate(old_kinds[k]), new.rate(new_kinds[k])) for k in KINDS]
    return changes


def compare_changes(old: Summary, new: Summary) -> list[Change]:
    """Every figure either trace has, in the order `compare` prints them."""
    changes = _overall_changes(old.overall, new.overall)
    sides = (("legacy", old.overall.old, new.overall.old),
             ("next_gen", old.overall.new, new.overall.new))
    for name, before, after in sides:
        pairs = zip(side_figures(before), side_figures(after), strict=True)
        changes += [Change(f"{name}.{a.key}", f"{name} {a.label}", a.unit, a.value, b.value)
                    for a, b in pairs]
    return [c for c in changes if c.old is not None or c.new is not None]


def format_compare(old: Summary, new: Summary) -> str:
    rows = [[c.label, format_value(c.unit, c.old), format_value(c.unit, c.new),
             format_delta(c.unit, c.old, c.new), c.verdicts]
            for c in compare_changes(old, new)]
    head = f"old: {', '.join(old.sources)}\nnew: {', '.join(new.sources)}"
    table = _table(["figure", "old", "new", "delta", "targets"], rows)
    return f"{head}\n\n{table}\n"


def compare_json(old: Summary, new: Summary) -> dict[str, Any]:
    return {
        "figures": [{"key": c.key, "label": c.label, "unit": c.unit, "old": c.old,
                     "new": c.new, "delta": c.delta, "targets": c.verdicts or None}
                    for c in compare_changes(old, new)],
        "old": summary_json(old),
        "new": summary_json(new),
    }
