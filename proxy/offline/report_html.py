"""`report --html`: one self-contained page with the report's tables and SVG charts.

Rules:
1. Nothing is fetched when the page is viewed: no script, no font, no image, no link to a
   CDN. The charts are inline SVG drawn here, and the page's Content-Security-Policy
   forbids every load, so a slip would be blocked rather than leak a request.
2. Every string from the trace (paths, ids, error text) goes through html.escape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Final

from proxy.offline.report_format import (
    DAY_HEADER,
    cost_rows,
    day_rows,
    format_header,
    format_measured,
    format_threshold,
    format_value,
    path_rows,
    side_figures,
)
from proxy.offline.report_stats import KINDS, Distribution, Figures, Summary, Target, Timeline
from proxy.offline.report_status import ADOPTION, StatusFigures, all_targets
from proxy.offline.report_trace import epoch

WIDTH: Final = 560
HEIGHT: Final = 260
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 30, 40
BINS: Final = 48
LEGACY: Final = "#4e79a7"
NEXT_GEN: Final = "#f28e2b"
MISMATCH: Final = "#e15759"
ERROR: Final = "#8c4fa0"
GOAL: Final = "#8a94a6"
DAY_S: Final = 86400
PATH_SECTIONS: Final = ("diff-paths", "noise-paths")  # ids, in path_rows' order

CSS: Final = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;padding:0 16px;max-width:1180px;
color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
pre.facts{color:#4a5568;margin:0 0 12px;white-space:pre-wrap}
.targets{display:grid;grid-template-columns:repeat(4,1fr);gap:12px}
.target{border:1px solid #d9dee7;border-radius:8px;padding:10px 12px;border-left-width:6px}
.target b{display:block;font-size:24px}.target small{color:#4a5568}
.PASS{border-left-color:#2e9e5b}.FAIL{border-left-color:#d64545}.nodata{border-left-color:#a0a8b5}
.charts{display:grid;grid-template-columns:repeat(2,1fr);gap:16px}
svg{border:1px solid #e3e7ee;border-radius:6px;background:#fcfcfd;width:100%;height:auto}
svg text{font:11px system-ui,sans-serif;fill:#4a5568}svg .title{font-size:13px;fill:#1d2330}
table{border-collapse:collapse;font-size:13px}
td,th{padding:3px 10px;border-bottom:1px solid #e3e7ee}
th{text-align:left;background:#f4f6f9}td.n{text-align:right;font-variant-numeric:tabular-nums}
"""


@dataclass(frozen=True, slots=True)
class Scale:
    lo: float
    hi: float
    log: bool
    ticks: tuple[tuple[float, str], ...]

    def at(self, value: float, length: float) -> float:
        if self.log:
            lo, hi, value = math.log(self.lo), math.log(self.hi), math.log(max(value, self.lo))
        else:
            lo, hi = self.lo, self.hi
        return (value - lo) / (hi - lo) * length if hi > lo else length / 2


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    colour: str
    points: tuple[tuple[float, float], ...]
    fill: bool = False
    markers: bool = False  # a dot on every point: a series of one point is still seen


def _number_label(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:g}M"
    if value >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def log_scale(lo: float, hi: float) -> Scale:
    """1-2-5 ticks when the range spans less than three decades, powers of ten otherwise."""
    steps = (1.0, 2.0, 5.0) if hi / lo < 1000 else (1.0,)
    ticks = []
    for exponent in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for step in steps:
            value = step * 10.0**exponent
            if lo <= value <= hi:
                ticks.append((value, _number_label(value)))
    return Scale(lo, hi, True, tuple(ticks))


def share_scale(top: float) -> Scale:
    top = max(top, 0.01)
    step = next(s for s in (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5) if top / s <= 5)
    ticks = [(i * step, f"{i * step * 100:g} %") for i in range(int(top / step) + 2)]
    return Scale(0.0, ticks[-1][0], False, tuple(ticks))


def time_scale(start: float, end: float) -> Scale:
    end = max(end, start + 60)
    fmt = "%H:%M" if end - start <= 86400 else "%m-%d %H:%M"
    ticks = tuple((t, datetime.fromtimestamp(t, UTC).strftime(fmt))
                  for t in (start + (end - start) * i / 5 for i in range(6)))
    return Scale(start, end, False, ticks)


def _axes(x: Scale, y: Scale, width: float, height: float) -> list[str]:
    parts = []
    for value, label in y.ticks:
        py = TOP + height - y.at(value, height)
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + width}" y1="{py:.1f}" y2="{py:.1f}" '
                     f'stroke="#e3e7ee"/><text x="{LEFT - 6}" y="{py + 4:.1f}" '
                     f'text-anchor="end">{escape(label)}</text>')
    for i, (value, label) in enumerate(x.ticks):
        px = LEFT + x.at(value, width)
        # The outermost labels hang inwards so that they are not cut at the frame.
        anchor = "start" if i == 0 and px - LEFT < 20 else "end" if px > LEFT + width - 20 \
            else "middle"
        parts.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{TOP + height}" '
                     f'y2="{TOP + height + 4}" stroke="#8a94a6"/><text x="{px:.1f}" '
                     f'y="{TOP + height + 16}" text-anchor="{anchor}">{escape(label)}</text>')
    parts.append(f'<line x1="{LEFT}" x2="{LEFT + width}" y1="{TOP + height}" '
                 f'y2="{TOP + height}" stroke="#8a94a6"/>')
    return parts


def _path(series: Series, x: Scale, y: Scale, width: float, height: float) -> str:
    coords = [(LEFT + x.at(px, width), TOP + height - y.at(py, height))
              for px, py in series.points]
    d = " ".join(f"{'M' if i == 0 else 'L'}{cx:.1f},{cy:.1f}" for i, (cx, cy) in enumerate(coords))
    title = f"<title>{escape(series.name)}</title>"
    dots = "".join(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{series.colour}"/>'
                   for cx, cy in coords) if series.markers else ""
    if not series.fill:
        return (f'<path d="{d}" fill="none" stroke="{series.colour}" stroke-width="2">'
                f"{title}</path>{dots}")
    base = TOP + height
    area = f"M{coords[0][0]:.1f},{base} {d.replace('M', 'L', 1)} L{coords[-1][0]:.1f},{base} Z"
    return (f'<path d="{area}" fill="{series.colour}" fill-opacity="0.25" '
            f'stroke="{series.colour}" stroke-width="1.5">{title}</path>')


def chart(title: str, series: Sequence[Series], x: Scale, y: Scale, x_label: str) -> str:
    width, height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    drawn = [s for s in series if s.points]
    parts = [f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
             f'<text class="title" x="{LEFT}" y="18">{escape(title)}</text>']
    parts += _axes(x, y, width, height)
    parts += [_path(s, x, y, width, height) for s in drawn]
    for i, s in enumerate(drawn):
        lx = WIDTH - RIGHT - 90 * (len(drawn) - i)
        parts.append(f'<rect x="{lx}" y="9" width="12" height="10" fill="{s.colour}"/>'
                     f'<text x="{lx + 16}" y="18">{escape(s.name)}</text>')
    if not drawn:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no data</text>')
    parts.append(f'<text x="{LEFT + width / 2}" y="{HEIGHT - 6}" '
                 f'text-anchor="middle">{escape(x_label)}</text></svg>')
    return "".join(parts)


def _binned(d: Distribution, x: Scale) -> tuple[tuple[float, float], ...]:
    """The distribution's share per coarse bin, at the bin's log-middle."""
    if not d.count:
        return ()
    lo, hi = math.log(x.lo), math.log(x.hi)
    width = (hi - lo) / BINS or 1.0
    shares = [0.0] * BINS
    for lower, upper, n in d.bins():
        middle = math.log(max(math.sqrt(lower * upper), x.lo))
        shares[min(BINS - 1, max(0, int((middle - lo) / width)))] += n / d.count
    return tuple((math.exp(lo + (i + 0.5) * width), s) for i, s in enumerate(shares))


def distribution_chart(title: str, old: Distribution, new: Distribution, unit: str) -> str:
    present = [d for d in (old, new) if d.count and d.high > 0]
    if not present:
        return chart(title, [], Scale(1, 10, True, ()), Scale(0, 1, False, ()), unit)
    lo = max(min(d.low for d in present), min(d.high for d in present) / 1e6, 1e-6)
    hi = max(d.high for d in present)
    x = log_scale(lo, hi * 1.05 if hi > lo else lo * 10)
    series = [Series(name, colour, _binned(d, x), fill=True)
              for name, colour, d in (("legacy", LEGACY, old), ("next_gen", NEXT_GEN, new))]
    top = max((share for s in series for _, share in s.points), default=0.0)
    return chart(title, series, x, share_scale(top), f"{unit} (log scale); share of answers")


def timeline_chart(title: str, timeline: Timeline,
                   lines: Sequence[tuple[str, str, Callable[[int, int, int, int, int], int]]],
                   ) -> str:
    buckets = [b for b in timeline.buckets if b.comparisons]
    if not buckets:
        return chart(title, [], Scale(0, 1, False, ()), Scale(0, 1, False, ()), "time (UTC)")
    x = time_scale(buckets[0].start, buckets[-1].start + timeline.width_s)
    series = []
    for name, colour, count in lines:
        points = tuple((b.start + timeline.width_s / 2,
                        count(b.comparisons, b.old_successes, b.new_successes, b.mismatches,
                              b.errors) / b.comparisons) for b in buckets)
        series.append(Series(name, colour, points))
    top = max(share for s in series for _, share in s.points)
    y = Scale(0.0, 1.0, False, tuple((v / 4, f"{v * 25} %") for v in range(5))) \
        if top > 0.5 else share_scale(top)
    return chart(title, series, x, y, f"time (UTC), {timeline.width_s // 60} min buckets")


def day_scale(first: float, last: float) -> Scale:
    last = max(last, first + DAY_S)
    days = round((last - first) / DAY_S)
    step = max(1, math.ceil(days / 6))
    ticks = tuple((first + i * DAY_S, datetime.fromtimestamp(first + i * DAY_S, UTC)
                   .strftime("%m-%d")) for i in range(0, days + 1, step))
    return Scale(first, last, False, ticks)


def adoption_chart(status: StatusFigures) -> str:
    """next_gen's share of each day's distinct users, oldest day first, with the 80 % goal."""
    title = "Adoption per day (next_gen's share of users)"
    points = sorted((at, d.adoption) for d in status.days
                    if d.adoption is not None and (at := epoch(d.day)) is not None)
    y = Scale(0.0, 1.0, False, tuple((v / 4, f"{v * 25} %") for v in range(5)))
    if not points:
        return chart(title, [], Scale(0, 1, False, ()), y, "day (UTC)")
    x = day_scale(points[0][0], points[-1][0])
    goal = ((x.lo, ADOPTION), (x.hi, ADOPTION))
    series = [Series(f"goal {ADOPTION:.0%}", GOAL, goal),
              Series("adoption", NEXT_GEN, tuple(points), markers=True)]
    return chart(title, series, x, y, "day (UTC)")


def _charts(summary: Summary, status: StatusFigures | None) -> str:
    overall, timeline = summary.overall, summary.timeline
    charts = [
        distribution_chart("Latency (time_ms)", overall.old.latency, overall.new.latency, "ms"),
        distribution_chart("Tokens per request", overall.old.tokens, overall.new.tokens,
                           "tokens"),
        timeline_chart("Success rate over time", timeline, [
            ("legacy", LEGACY, lambda n, old, new, mis, err: old),
            ("next_gen", NEXT_GEN, lambda n, old, new, mis, err: new)]),
        timeline_chart("Mismatch and error rate", timeline, [
            ("mismatch", MISMATCH, lambda n, old, new, mis, err: mis),
            ("error", ERROR, lambda n, old, new, mis, err: err)]),
    ]
    if overall.old.ttft.count or overall.new.ttft.count:
        charts.append(distribution_chart("Time to first byte (ttft_ms)", overall.old.ttft,
                                         overall.new.ttft, "ms"))
    if status is not None:
        charts.append(adoption_chart(status))
    return '<div class="charts">' + "".join(charts) + "</div>"


def _target_card(t: Target) -> str:
    return (f'<div class="target {t.verdict.replace(" ", "")}"><small>{escape(t.name)}</small>'
            f"<b>{escape(format_measured(t))}</b>{escape(t.verdict)} · target "
            f"{escape(format_threshold(t))} · {t.comparisons:,} {escape(t.counts)}</div>")


def table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=n" if i >= numeric_from else ""}>{escape(c)}</td>'
                         for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _sides(figures: Figures) -> str:
    pairs = zip(side_figures(figures.old), side_figures(figures.new), strict=True)
    rows = [[a.label, format_value(a.unit, a.value), format_value(b.unit, b.value)]
            for a, b in pairs if a.value is not None or b.value is not None]
    return table(["", "legacy", "next_gen"], rows)


def _prefix_rows(summary: Summary) -> list[list[str]]:
    groups = [("all", summary.overall), *summary.prefixes]
    return [[name, f"{f.comparisons:,}", format_value("pct", f.rate(f.matches)),
             *(format_value("pct", f.rate(f.kind_counts()[k])) for k in KINDS),
             format_value("ms", f.old.latency.quantile(0.5)),
             format_value("ms", f.new.latency.quantile(0.5)),
             format_value("pct", f.new.success_rate)] for name, f in groups]


def _cost(summary: Summary, status: StatusFigures | None) -> list[str]:
    rows = [list(row) for row in cost_rows(summary, status)]
    return ["<h2>Cost</h2>", table(["figure", "value"], rows, numeric_from=2)] if rows else []


def _paths(summary: Summary) -> list[str]:
    """One section per path_rows table. Its first column says "JSON path": these are fields
    of the answers' bodies, not the request paths of the tables above."""
    parts = []
    for section, (label, share, rows) in zip(PATH_SECTIONS, path_rows(summary), strict=True):
        body = table(["JSON path", "comparisons", share], rows) if rows else "<p>none</p>"
        parts.append(f'<section id="{section}"><h2>{escape(label[0].upper() + label[1:])}'
                     f"</h2>{body}</section>")
    return parts


def _days(status: StatusFigures | None) -> list[str]:
    if status is None:
        return []
    rows = day_rows(status)
    return ["<h2>Active users and support tickets per day</h2>",
            table(DAY_HEADER, rows) if rows else "<p>none in the status</p>"]


def render_html(summary: Summary, status: StatusFigures | None = None) -> str:
    prefixes = table(["path prefix", "comparisons", "match", *(f"{k} mismatch" for k in KINDS),
                      "legacy p50 ms", "next_gen p50 ms", "next_gen success"],
                     _prefix_rows(summary))
    worst = table(["kind", "execution id", "ts", "path", "detail"],
                  [[e.kind, e.execution_id, e.ts, e.path, e.detail] for e in summary.worst],
                  numeric_from=5)
    cards = "".join(map(_target_card, all_targets(summary, status)))
    sections = [
        "<h1>rollout-proxy report</h1>",
        f'<pre class="facts">{escape(format_header(summary, status))}</pre>',
        f'<div class="targets">{cards}</div>',
        "<h2>Charts</h2>", _charts(summary, status),
        "<h2>Backends</h2>", _sides(summary.overall),
        *_cost(summary, status),
        *_days(status),
        "<h2>By path prefix</h2>", prefixes,
        "<h2>Worst mismatches</h2>", worst if summary.worst else "<p>none</p>",
        *_paths(summary),
    ]
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "style-src 'unsafe-inline'\">"
            "<meta name=\"viewport\" content=\"width=device-width\">"
            f"<title>rollout-proxy report</title><style>{CSS}</style></head><body>"
            + "\n".join(sections) + "</body></html>\n")
