"""`make bench`: rollout-proxy against direct, nginx, haproxy and a minimal aiohttp proxy.

Interleaved rounds, the proxies pinned to core 0 and the load generator and backends to
core 1. `--scenario slow5000|soak|sse|flaky|guard|hostile` runs the other benchmarks instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

from load import checks, guard, hostile, procs, reference, rollout, scenarios, targets
from load.measure import Load, wrk_available
from load.output import Report, header, placement, skipped_text, tool_text
from load.procs import raise_fd_limit
from load.rounds import Plan, Summary, format_table, run_rounds, say, summarise

SCENARIOS = ("throughput", "slow5000", "soak", "sse", "flaky", "guard", "hostile")
ALL_TARGETS = ("direct", "legacy", "shadow", "progressive", "progressive-aiohttp", "nginx",
               "haproxy", "minimal")


def throughput_checks(rows: list[Summary],
                      rounds: Callable[[str], dict[int, float]]) -> list[checks.Check]:
    """The checks, from each target's median (`rows`) and its req/s round by round."""
    by = {s.name: s for s in rows}

    def rps(name: str) -> float | None:
        return by[name].rps if name in by else None

    added = by["progressive"].added_p50_ms if "progressive" in by else None
    return [
        checks.at_least("progressive / minimal proxy (req/s)",
                        checks.ratio(rps("progressive"), rps("minimal")), 1.0),
        checks.at_least("shadow / progressive (req/s)",
                        checks.ratio(rps("shadow"), rps("progressive")), 0.60),
        checks.at_most("added p50 at 1 connection, progressive over direct", added, 0.30, " ms"),
        checks.info("progressive over h1 / over aiohttp's client (req/s)",
                    checks.ratio(rps("progressive"), rps("progressive-aiohttp"))),
        *before_checks(rps, rounds, lambda name: by[name].cpu_us if name in by else None),
    ]


def paired_fall(now: dict[int, float], then: dict[int, float]) -> tuple[float, float] | None:
    """How far `now` fell from `then` (figures by round), in %, with the rounds paired: from
    the geometric mean of now / then in each round both have (what the machine did in a
    round moves both), and that figure's standard error, in %. None without two pairs, or
    with a round `then` is 0 in; a round `now` is 0 in is a fall of 100 %."""
    pairs = [(now[index], then[index]) for index in sorted(now.keys() & then.keys())]
    if len(pairs) < 2 or any(old <= 0 for _, old in pairs):
        return None
    if any(new <= 0 for new, _ in pairs):
        return 100.0, 0.0
    logs = [math.log(new / old) for new, old in pairs]
    error = statistics.stdev(logs) / math.sqrt(len(logs))
    return (1 - math.exp(statistics.fmean(logs))) * 100, error * 100


def per_round(rounds: Callable[[str], dict[int, float]], top: str, bottom: str
              ) -> dict[int, float]:
    """top / bottom in each round both were measured in."""
    tops, bottoms = rounds(top), rounds(bottom)
    return {index: tops[index] / bottoms[index] for index in tops.keys() & bottoms.keys()
            if bottoms[index]}


def before_checks(rps: Callable[[str], float | None],
                  rounds: Callable[[str], dict[int, float]],
                  cpu: Callable[[str], float | None]) -> list[checks.Check]:
    """With --before: both ratios for the other revision, from the same rounds (the same
    minimal proxy), and how far this revision's fell from them, the rounds paired (the
    bound: 3 %); and what each proxy's CPU time per answer was against the other
    revision's (a quieter figure)."""
    if rps("progressive@before") is None:
        return []
    found = [checks.info(f"{name}: CPU per answer, this / --before revision",
                         checks.ratio(cpu(name), cpu(f"{name}@before")))
             for name in ("progressive", "shadow")]
    for top, bottom in (("progressive", "minimal"), ("shadow", "progressive")):
        title = f"{top} / {bottom}"
        then_bottom = bottom if bottom == "minimal" else f"{bottom}@before"
        found.append(checks.info(f"{title}, the --before revision",
                                 checks.ratio(rps(f"{top}@before"), rps(then_bottom))))
        fall = paired_fall(per_round(rounds, top, bottom),
                           per_round(rounds, f"{top}@before", then_bottom))
        found.append(checks.at_most(f"{title}: fall from the --before revision",
                                    None if fall is None else fall[0], 3.0, " %"))
        found.append(checks.info(f"{title}: that fall's standard error",
                                 None if fall is None else fall[1], " %"))
    return found


async def _targets(children: procs.Children, wanted: set[str], workdir: Path,
                   skipped: targets.Skipped, nginx: bool,
                   overrides: list[tuple[str, Any]],
                   before: Path | None = None) -> list[targets.Target]:
    legacy = await targets.backend(children, "backend-legacy", nginx=nginx)
    next_gen = await targets.backend(children, "backend-next_gen", nginx=nginx)
    found = [targets.Target("direct", legacy.url, (), f"{legacy.note}, no proxy")]
    if wanted & {"legacy", "shadow", "progressive", "progressive-aiohttp"}:
        found += await targets.rollout_phases(children, legacy, next_gen, workdir, skipped,
                                              tuple(overrides), before)
        if before is not None:
            wanted = wanted | {"shadow@before", "progressive@before"}
    if wanted & {"nginx", "haproxy", "minimal"}:
        found += await targets.references(children, legacy, workdir, skipped)
    return [t for t in found if t.name in wanted]


async def throughput(args: argparse.Namespace, plan: Plan, workdir: Path) -> Report:
    skipped = targets.Skipped()
    nginx = reference.nginx_available() and not args.no_nginx_backend
    async with procs.Children(workdir / "logs") as children:
        found = await _targets(children, set(args.targets), workdir, skipped, nginx, args.set,
                               args.before)
        results = await run_rounds(found, plan, workdir)
    rows = summarise(found, results)
    verdicts = throughput_checks(
        rows, lambda name: results[name].rps() if name in results else {})
    engine = "nginx fixed JSON" if nginx else "load.backend fast (raw asyncio)"
    lines = [f"{plan.rounds} rounds, interleaved; each: {tool_text(plan.busy, plan.use_wrk)}",
             f"backends: two {engine} instances (legacy, next_gen)"]
    if plan.fresh:
        lines.append("rollout-proxy: new processes each round (--before)")
    if plan.single is not None:
        lines.append(f"latency at 1 connection: -c1 for {plan.single.duration_s:g} s per round;"
                     " added = its p50 minus direct's")
    text = "\n\n".join([header("rollout-proxy bench: throughput", lines), format_table(rows),
                        checks.format_checks(verdicts), *skipped_text(skipped)])
    data = {"scenario": "throughput", "placement": placement(),
            "tool": tool_text(plan.busy, plan.use_wrk),
            "rounds": plan.rounds, "targets": [s.to_json() for s in rows],
            "checks": [c.to_json() for c in verdicts], "skipped": skipped.reasons,
            "runs": {name: {"busy": [m.to_json() for m in r.busy],
                            "single": [m.to_json() for m in r.single],
                            "failures": r.failures, "rounds": r.rounds}
                     for name, r in results.items()}}
    return Report(text, data)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m load.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=SCENARIOS, default="throughput")
    parser.add_argument("--rounds", type=int, default=None,
                        help="default 3 (slow5000 and soak: 1)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per target per round (soak: the whole soak; default 5/600)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--latency-duration", type=float, default=3.0,
                        help="seconds of the 1-connection run per target per round (0: none)")
    parser.add_argument("--targets", type=lambda s: s.split(","), default=list(ALL_TARGETS),
                        help=f"comma-separated subset of {','.join(ALL_TARGETS)}")
    parser.add_argument("--phase", default="legacy", help="slow5000: the proxy's phase")
    parser.add_argument("--hostile-kinds", type=hostile.parse_kinds, default=hostile.KINDS,
                        metavar="KINDS", help="hostile: the answers next_gen gives in turn, "
                        f"a subset of {','.join(hostile.KINDS)}")
    parser.add_argument("--warmup", type=float, default=None,
                        help="soak: seconds before RSS must be flat (default 10 %% of the soak)")
    parser.add_argument("--set", type=rollout.parse_override, action="append", default=[],
                        metavar="KEY.PATH=VALUE",
                        help="override a key of the generated rollout-proxy config, e.g. "
                        "backends.legacy.max_connections=10000 (repeatable)")
    parser.add_argument("--before", type=Path, metavar="DIR",
                        help="a checkout of another revision (git worktree add DIR REV): its "
                        "shadow and progressive run in the same rounds, and the checks say "
                        "how far each ratio fell")
    parser.add_argument("--python-client", action="store_true",
                        help="use load.loadgen even when wrk is installed")
    parser.add_argument("--no-nginx-backend", action="store_true",
                        help="use load.backend even when nginx is installed")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs)")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    duration = args.duration or (600.0 if args.scenario == "soak" else 5.0)
    single = (Load(connections=1, duration_s=args.latency_duration)
              if args.latency_duration > 0 else None)
    rounds = args.rounds or (1 if args.scenario in ("slow5000", "soak") else 3)
    return Plan(rounds=max(1, rounds),
                busy=Load(connections=args.connections, duration_s=duration),
                single=single, use_wrk=wrk_available() and not args.python_client,
                fresh=args.before is not None)


RUNNERS: dict[str, Callable[[argparse.Namespace, Plan, Path], Awaitable[Report]]] = {
    "throughput": throughput,
    "slow5000": scenarios.slow5000,
    "soak": scenarios.soak,
    "sse": scenarios.sse,
    "flaky": scenarios.flaky,
    "guard": guard.guard,
    "hostile": hostile.hostile,
}


async def run(args: argparse.Namespace) -> Report:
    # SIGTERM cancels like Ctrl-C does, so every child is stopped on the way out.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    workdir = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    (workdir / "logs").mkdir()
    try:
        return await RUNNERS[args.scenario](args, make_plan(args), workdir)
    finally:
        if args.keep:
            say(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if procs.cores() >= 2:
        os.sched_setaffinity(0, {targets.LOAD_CPU})
    raise_fd_limit()  # children inherit it: wrk -c5000, the proxies
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            report = runner.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench interrupted; its processes are stopped", file=sys.stderr)
        return 130
    print(report.text)
    if args.json:
        Path(args.json).write_text(json.dumps(report.data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
