"""The benchmarks beside throughput: slow5000, soak, sse and flaky (see load.bench)."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from load import backend, checks, reference, rollout, targets
from load.measure import Load, Measurement, measure
from load.memory import RssSampler
from load.output import Report, header, skipped_text, tool_text
from load.procs import Children, StartError
from load.rollout import Setup
from load.rounds import Plan, format_table, run_rounds, say, summarise

SLOW_DELAY_S = 2.0
SLOW_REQUESTS = 5000
SLOW_STEADY_S = 12.0
SOAK_SHADOW_TIMEOUT_S = 10.0


COUNTERS = ("rollout_fallbacks_total", "rollout_shadow_dropped_total",
            "rollout_shadow_comparisons_total", "rollout_requests_total")


def _setup(args: argparse.Namespace, phase: str, legacy: targets.Target,
           next_gen: targets.Target, **options: Any) -> Setup:
    return Setup(phase, legacy.url, next_gen.url, overrides=tuple(args.set), **options)


async def counters(found: list[targets.Target]) -> str:
    """The proxies' own counts of fallbacks, mirrors and answers, non-zero ones only."""
    parts = []
    for target in found:
        if target.admin_url is not None:
            lines = await rollout.metrics(target.admin_url, COUNTERS)
            parts.append(f"{target.name}:\n" + "\n".join(f"  {line}" for line in lines))
    return "proxy counters (from /metrics):\n" + "\n".join(parts) if parts else ""


async def _proxy(children: Children, name: str, setup: Setup, workdir: Path,
                 skipped: targets.Skipped) -> list[targets.Target]:
    try:
        return [await targets.rollout_proxy(children, name, setup, workdir)]
    except (OSError, StartError) as exc:
        skipped.reasons[name] = f"rollout-proxy did not start: {exc}"
        return []


def _row(name: str, m: Measurement) -> str:
    rss = "n/a" if m.peak_rss_mb is None else f"{m.peak_rss_mb:.0f}"
    return (f"{name:<10} {m.requests:>8} {m.answered_ok:>8} {m.errors:>7} {m.p50_ms:>9.0f} "
            f"{m.p99_ms:>9.0f} {m.max_ms:>9.0f} {rss:>8}")


def _slow_table(results: dict[str, Measurement]) -> str:
    head = (f"{'target':<10} {'answers':>8} {'2xx':>8} {'errors':>7} {'p50 ms':>9} "
            f"{'p99 ms':>9} {'max ms':>9} {'RSS MB':>8}")
    return "\n".join([head, "-" * len(head), *(_row(n, m) for n, m in results.items())])


def slow_checks(proxy: Measurement | None, direct: Measurement | None,
                burst: Measurement | None, burst_direct: Measurement | None,
                ) -> list[checks.Check]:
    """Judged on the steady run (5,000 in flight all the time); the burst (5,000 written in
    the same instant) is reported beside it: there even direct's p99 is over 2.1 s here."""
    if proxy is None:
        failed = served = rss = p99 = None
    else:
        served, rss, p99 = proxy.answered_ok, proxy.peak_rss_mb, proxy.p99_ms / 1000
        failed = proxy.requests - proxy.answered_ok + proxy.errors
    rss = max((m.peak_rss_mb for m in (proxy, burst) if m and m.peak_rss_mb), default=rss)
    added = p99 - direct.p99_ms / 1000 if p99 is not None and direct is not None else None
    burst_p99 = burst.p99_ms / 1000 if burst is not None else None
    burst_added = burst_p99 - burst_direct.p99_ms / 1000 \
        if burst_p99 is not None and burst_direct is not None else None
    return [checks.at_least("steady: answers (2xx)", served, 1),
            checks.at_most("steady: requests not answered 2xx", failed, 0),
            checks.at_most("steady: p99", p99, 2.1, " s"),
            checks.info("steady: p99 over direct's", added, " s"),
            checks.at_least(f"burst: answered 2xx, of {SLOW_REQUESTS}",
                            burst.answered_ok if burst else None, SLOW_REQUESTS),
            checks.info("burst: p99", burst_p99, " s"),
            checks.info("burst: p99 over direct's (client shares a core with the backends)",
                        burst_added, " s"),
            checks.at_most("proxy peak RSS (either run)", rss, 300, " MB")]


async def slow5000(args: argparse.Namespace, plan: Plan, workdir: Path) -> Report:
    """5,000 requests in flight, each held 2 s by a slow backend: served, RSS, p99. Steady
    (each connection sends again when its answer ends) and as one burst."""
    steady = Load(connections=SLOW_REQUESTS, duration_s=SLOW_STEADY_S, users=False,
                  timeout_s=30, burst=True, steady_ramp_s=SLOW_DELAY_S)
    burst = replace(steady, duration_s=SLOW_DELAY_S, steady_ramp_s=None)
    skipped = targets.Skipped()
    results: dict[str, Measurement] = {}
    bursts: dict[str, Measurement] = {}
    percentage = 50.0 if args.phase == "progressive" else 0.0
    async with Children(workdir / "logs") as children:
        delay = ("--delay", str(SLOW_DELAY_S))
        legacy = await targets.backend(children, "slow-legacy", "slow", extra=delay)
        next_gen = await targets.backend(children, "slow-next_gen", "slow", extra=delay)
        found = [replace(legacy, name="direct", pids=())]
        setup = _setup(args, args.phase, legacy, next_gen, percentage=percentage)
        found += await _proxy(children, "proxy", setup, workdir, skipped)
        found.append(await targets.minimal_proxy(children, legacy))
        for target in found:
            say(f"  {target.name}: {SLOW_REQUESTS} in flight for {SLOW_STEADY_S:g} s")
            results[target.name] = await measure(target.url, steady, workdir=workdir,
                                                 use_wrk=plan.use_wrk, pids=target.pids)
            say(f"  {target.name}: {SLOW_REQUESTS} requests at once")
            bursts[target.name] = await measure(target.url, burst, workdir=workdir,
                                                use_wrk=plan.use_wrk, pids=target.pids)
        proxy_counters = await counters(found)
    verdicts = slow_checks(results.get("proxy"), results.get("direct"), bursts.get("proxy"),
                           bursts.get("direct"))
    tool = (f"load.burst, {SLOW_REQUESTS} connections opened first (not timed); latency from "
            "a request's write to its answer's last byte. steady: each connection sends again "
            f"as its answer ends, for {SLOW_STEADY_S:g} s, first sends spread over "
            f"{SLOW_DELAY_S:g} s; burst: one request on each, all written at once")
    lines = [f"backends: load.backend slow ({SLOW_DELAY_S:g} s per answer) x2; "
             f"proxy phase {args.phase}", f"load: {tool}"]
    text = "\n\n".join([header("rollout-proxy bench: slow5000", lines),
                        "steady\n" + _slow_table(results), "burst\n" + _slow_table(bursts),
                        checks.format_checks(verdicts), proxy_counters, *skipped_text(skipped)])
    data = {"scenario": "slow5000", "phase": args.phase, "tool": tool,
            "results": {n: m.to_json() for n, m in results.items()},
            "bursts": {n: m.to_json() for n, m in bursts.items()},
            "checks": [c.to_json() for c in verdicts], "skipped": skipped.reasons}
    return Report(text, data)


def flatness(samples: list[tuple[float, int]], warmup: float = 0.1) -> dict[str, float] | None:
    """RSS after a warm-up share of the run: baseline (median of the next 10 % of the run),
    min, max and the largest deviation from the baseline in %."""
    if len(samples) < 4:
        return None
    start, end = samples[0][0], samples[-1][0]
    settled = start + (end - start) * warmup
    after = [kb for t, kb in samples if t >= settled]
    window = [kb for t, kb in samples if settled <= t <= settled + (end - start) * 0.1]
    baseline = statistics.median(window or after[:1])
    worst = max(abs(kb - baseline) for kb in after)
    return {"start_mb": samples[0][1] / 1024, "baseline_mb": baseline / 1024,
            "min_mb": min(after) / 1024, "max_mb": max(after) / 1024,
            "end_mb": samples[-1][1] / 1024, "deviation_pct": 100 * worst / baseline}


def timeline(samples: list[tuple[float, int]], points: int = 11) -> str:
    if not samples:
        return "no samples"
    start, end = samples[0][0], samples[-1][0]
    marks = []
    for i in range(points):
        at = start + (end - start) * i / (points - 1)
        t, kb = min(samples, key=lambda s: abs(s[0] - at))
        marks.append(f"{t - start:.0f}s {kb / 1024:.0f}")
    return "RSS MB over time: " + ", ".join(marks)


async def soak(args: argparse.Namespace, plan: Plan, workdir: Path) -> Report:
    """Shadow against a next_gen that never answers, for a long while: is RSS flat?"""
    skipped, load = targets.Skipped(), plan.busy
    sampler: RssSampler | None = None
    result: Measurement | None = None
    proxy_counters = ""
    async with Children(workdir / "logs") as children:
        legacy = await targets.backend(children, "legacy", nginx=reference.nginx_available())
        stalled = await targets.backend(children, "next_gen-stalled", "stall")
        setup = _setup(args, "shadow", legacy, stalled, sample=1.0,
                       shadow_timeout_s=SOAK_SHADOW_TIMEOUT_S)
        found = await _proxy(children, "proxy", setup, workdir, skipped)
        if found:
            say(f"  soaking for {load.duration_s:g} s")
            async with RssSampler(found[0].pids, interval_s=max(1.0, load.duration_s / 600)) as s:
                result = await measure(found[0].url, load, workdir=workdir, use_wrk=plan.use_wrk)
            sampler = s
            proxy_counters = await counters(found)
    warmup = min(0.9, args.warmup / load.duration_s) if args.warmup else 0.1
    flat = flatness(sampler.samples, warmup) if sampler else None
    deviation = flat["deviation_pct"] if flat else None
    verdicts = [checks.at_most("RSS deviation after warm-up", deviation, 10, " %")]
    lines = [f"load: {tool_text(load, plan.use_wrk)}",
             f"proxy: shadow, sample 1.0, next_gen stalled (never answers), shadow.timeout_s "
             f"{SOAK_SHADOW_TIMEOUT_S:g}; warm-up: first {warmup:.0%} of the run"]
    parts = [header("rollout-proxy bench: soak", lines)]
    if result is not None and sampler is not None and flat is not None:
        parts.append(f"{result.rps:.0f} req/s, {result.errors} errors, p99 {result.p99_ms:.1f} ms"
                     f"\n{timeline(sampler.samples)}\n" + ", ".join(
                         f"{k} {v:.1f}" for k, v in flat.items()))
    text = "\n\n".join([*parts, checks.format_checks(verdicts), proxy_counters,
                        *skipped_text(skipped)])
    data = {"scenario": "soak", "result": result and result.to_json(), "flatness": flat,
            "samples": sampler.samples if sampler else [],
            "checks": [c.to_json() for c in verdicts], "skipped": skipped.reasons}
    return Report(text, data)


async def _pair_report(title: str, lines: list[str], found: list[targets.Target],
                       plan: Plan, workdir: Path, names: tuple[str, str],
                       skipped: targets.Skipped) -> tuple[str, dict[str, object], list[
                           checks.Check]]:
    results = await run_rounds(found, replace(plan, single=None), workdir)
    rows = summarise(found, results, baseline=names[0])
    by = {s.name: s for s in rows}
    a, b = by.get(names[0]), by.get(names[1])
    rps = checks.ratio(b.rps, a.rps) if a and b else None
    p99 = checks.ratio(b.p99_ms, a.p99_ms) if a and b else None
    verdicts = [checks.info(f"{names[1]} / {names[0]} req/s", rps),
                checks.info(f"{names[1]} / {names[0]} p99", p99)]
    lines = [f"{plan.rounds} rounds, interleaved; each: {tool_text(plan.busy, plan.use_wrk)}",
             *lines]
    text = "\n\n".join([header(title, lines), format_table(rows, baseline=names[0]),
                        checks.format_checks(verdicts), await counters(found),
                        *skipped_text(skipped)])
    data: dict[str, object] = {"targets": [s.to_json() for s in rows],
                               "checks": [c.to_json() for c in verdicts],
                               "skipped": skipped.reasons}
    return text, data, verdicts


async def sse(args: argparse.Namespace, plan: Plan, workdir: Path) -> Report:
    """Shadow with event-stream answers against shadow with plain JSON of the same size."""
    skipped, size = targets.Skipped(), backend.sse_body_size()
    async with Children(workdir / "logs") as children:
        sized = ("--body-bytes", str(size))
        json_l = await targets.backend(children, "json-legacy", extra=sized)
        json_n = await targets.backend(children, "json-next_gen", extra=sized)
        sse_l = await targets.backend(children, "sse-legacy", "sse")
        sse_n = await targets.backend(children, "sse-next_gen", "sse")
        found = await _proxy(children, "json", _setup(args, "shadow", json_l, json_n,
                                                      sample=1.0), workdir, skipped)
        found += await _proxy(children, "sse", _setup(args, "shadow", sse_l, sse_n, sample=1.0),
                              workdir, skipped)
        lines = [f"backends: load.backend, {size}-byte answers: JSON (Content-Length) or an "
                 "event stream of 12 events (chunked); proxy: shadow, sample 1.0"]
        text, data, _ = await _pair_report("rollout-proxy bench: sse", lines, found, plan,
                                           workdir, ("json", "sse"), skipped)
    return Report(text, {"scenario": "sse", "body_bytes": size, **data})


async def flaky(args: argparse.Namespace, plan: Plan, workdir: Path) -> Report:
    """Progressive 50 % with next_gen failing 30 % of its answers, against a healthy one."""
    skipped = targets.Skipped()
    async with Children(workdir / "logs") as children:
        legacy = await targets.backend(children, "legacy")
        healthy = await targets.backend(children, "next_gen-healthy")
        failing = await targets.backend(children, "next_gen-flaky", "flaky")
        found = await _proxy(children, "healthy", _setup(args, "progressive", legacy, healthy,
                                                         percentage=50), workdir, skipped)
        found += await _proxy(children, "flaky", _setup(args, "progressive", legacy, failing,
                                                        percentage=50), workdir, skipped)
        lines = ["backends: load.backend fast; next_gen flaky answers 30 % 500s; proxy: "
                 "progressive 50 %, no mirroring, fallback on 5xx (errors: what clients saw)"]
        text, data, _ = await _pair_report("rollout-proxy bench: flaky", lines, found, plan,
                                           workdir, ("healthy", "flaky"), skipped)
    return Report(text, {"scenario": "flaky", **data})
