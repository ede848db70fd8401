"""An aiohttp load generator: N workers loop over one scenario, bounded in requests and time.

    python -m load.loadgen URL --scenario get|post|users|sse|slow -c 50 -n 10000 -d 10 [--pid P]

No request starts after `--duration`; those still in flight then get `--grace` seconds to
finish, after which they are cancelled and reported as abandoned (never as errors).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import aiohttp
import uvloop

from load.memory import RssSampler
from load.procs import raise_fd_limit

ERROR_KINDS = ("status_5xx", "status_4xx", "connect", "timeout", "reset", "other")
USER_IDS = 10_000
POST_BODY = json.dumps({"task": "summarise", "input": "x" * 990}).encode()


@dataclass(frozen=True, slots=True)
class Scenario:
    method: str = "GET"
    body: bytes | None = None
    vary_user: bool = False
    stream: bool = False
    concurrency: int = 50
    timeout_s: float = 30.0


SCENARIOS = {
    "get": Scenario(),
    "post": Scenario(method="POST", body=POST_BODY),
    "users": Scenario(vary_user=True),
    "sse": Scenario(stream=True),
    "slow": Scenario(concurrency=5000, timeout_s=60.0),
}


@dataclass(frozen=True, slots=True)
class Result:
    scenario: str
    url: str
    concurrency: int
    elapsed_s: float
    requests: int
    ok: int
    abandoned: int
    errors: dict[str, int]
    rps: float
    latency_ms: dict[str, float]
    bytes: int
    events: int
    ttfb_p50_ms: float | None
    peak_rss_mb: float | None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def classify(exc: BaseException) -> str:
    """The error kind of a failed request (order matters: the classes overlap)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError
                  | aiohttp.ClientOSError | ConnectionError):
        return "reset"
    return "other"


def status_kind(status: int) -> str | None:
    if status >= 500:
        return "status_5xx"
    if status >= 400:
        return "status_4xx"
    return None


def percentiles(values: list[float]) -> dict[str, float]:
    """Nearest-rank p50/p90/p99/max, in the values' unit; zeros when there are none."""
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)
    last = len(ordered) - 1

    def rank(q: float) -> float:
        return ordered[min(last, max(0, int(q * len(ordered) + 0.5) - 1))]

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": ordered[last]}


def count_events(chunk: bytes, previous_last: int) -> int:
    """Event separators (blank lines) in a chunk, one straddling the previous chunk included."""
    straddle = 1 if previous_last == 0x0A and chunk[:1] == b"\n" else 0
    return chunk.count(b"\n\n") + straddle


@dataclass(slots=True)
class _Tally:
    started: float
    issued: int = 0
    completed: int = 0
    ok: int = 0
    bytes: int = 0
    events: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)


@dataclass(slots=True)
class _Plan:
    url: str
    scenario: Scenario
    requests: int
    stop_at: float
    user_ids: int


def _headers(plan: _Plan, ticket: int) -> dict[str, str]:
    headers = {}
    if plan.scenario.vary_user:
        headers["X-User-Id"] = f"user-{ticket % plan.user_ids}"
    if plan.scenario.body is not None:
        headers["Content-Type"] = "application/json"
    return headers


async def _read(resp: aiohttp.ClientResponse, tally: _Tally, start: float, stream: bool) -> None:
    if not stream:
        tally.bytes += len(await resp.read())
        return
    last, first = 0, True
    async for chunk in resp.content.iter_any():
        if first:
            tally.ttfb_ms.append((time.perf_counter() - start) * 1000)
            first = False
        tally.events += count_events(chunk, last)
        tally.bytes += len(chunk)
        last = chunk[-1]


async def _one(session: aiohttp.ClientSession, plan: _Plan, tally: _Tally, ticket: int) -> None:
    scenario = plan.scenario
    start = time.perf_counter()
    try:
        async with session.request(scenario.method, plan.url, data=scenario.body,
                                   headers=_headers(plan, ticket)) as resp:
            await _read(resp, tally, start, scenario.stream)
            status = resp.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        tally.completed += 1
        tally.errors[classify(exc)] += 1
        return
    tally.completed += 1
    tally.latencies_ms.append((time.perf_counter() - start) * 1000)
    kind = status_kind(status)
    if kind is None:
        tally.ok += 1
    else:
        tally.errors[kind] += 1


async def _worker(session: aiohttp.ClientSession, plan: _Plan, tally: _Tally) -> None:
    loop = asyncio.get_running_loop()
    while tally.issued < plan.requests and loop.time() < plan.stop_at:
        ticket = tally.issued
        tally.issued += 1
        await _one(session, plan, tally, ticket)


def progress_line(tally: _Tally, now: float) -> str:
    elapsed = max(now - tally.started, 1e-9)
    errors = sum(tally.errors.values())
    return (f"{elapsed:6.1f}s  {tally.completed} done  {tally.completed / elapsed:8.0f} req/s  "
            f"{errors} errors  {tally.issued - tally.completed} in flight")


async def _report_progress(tally: _Tally) -> None:
    tty = sys.stderr.isatty()
    interval = 0.5 if tty else 5.0
    while True:
        await asyncio.sleep(interval)
        line = progress_line(tally, asyncio.get_running_loop().time())
        sys.stderr.write(f"\r{line}\x1b[K" if tty else f"{line}\n")
        sys.stderr.flush()


async def _drive(session: aiohttp.ClientSession, plan: _Plan, tally: _Tally, concurrency: int,
                 grace_s: float) -> None:
    workers = [asyncio.create_task(_worker(session, plan, tally)) for _ in range(concurrency)]
    loop = asyncio.get_running_loop()
    deadline = plan.stop_at + grace_s
    _, pending = await asyncio.wait(workers, timeout=max(0.0, deadline - loop.time()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _result(name: str, plan: _Plan, tally: _Tally, concurrency: int, elapsed: float,
            peak_rss_mb: float | None) -> Result:
    errors = {kind: tally.errors.get(kind, 0) for kind in ERROR_KINDS}
    ttfb = percentiles(tally.ttfb_ms)["p50"] if tally.ttfb_ms else None
    return Result(name, plan.url, concurrency, round(elapsed, 3), tally.completed, tally.ok,
                  tally.issued - tally.completed, errors, round(tally.completed / elapsed, 1),
                  {k: round(v, 3) for k, v in percentiles(tally.latencies_ms).items()},
                  tally.bytes, tally.events, ttfb, peak_rss_mb)


async def run(url: str, scenario: str, concurrency: int, requests: int, duration: float, *,
              timeout_s: float | None = None, grace_s: float = 5.0, pids: tuple[int, ...] = (),
              progress: bool = False, user_ids: int = USER_IDS) -> Result:
    """Send at most `requests` requests over at most `duration` seconds with N workers."""
    spec = SCENARIOS[scenario]
    raise_fd_limit(concurrency + 1024)
    loop = asyncio.get_running_loop()
    started = loop.time()
    plan = _Plan(url, spec, requests, started + duration, user_ids)
    tally = _Tally(started)
    timeout = aiohttp.ClientTimeout(total=timeout_s or spec.timeout_s)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     auto_decompress=False) as session, RssSampler(pids) as rss:
        reporter = asyncio.create_task(_report_progress(tally)) if progress else None
        try:
            await _drive(session, plan, tally, concurrency, grace_s)
        finally:
            if reporter is not None:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
                sys.stderr.write("\n" if sys.stderr.isatty() else "")
        elapsed = max(loop.time() - started, 1e-9)
    return _result(scenario, plan, tally, concurrency, elapsed, rss.peak_mb)


def format_result(result: Result) -> str:
    lat = result.latency_ms
    errors = ", ".join(f"{k} {v}" for k, v in result.errors.items() if v) or "none"
    lines = [
        f"{result.scenario} {result.url}  concurrency {result.concurrency}",
        f"  {result.requests} requests in {result.elapsed_s:.2f} s: {result.rps:.1f} req/s "
        f"({result.ok} ok, {result.abandoned} abandoned)",
        f"  latency ms  p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  "
        f"max {lat['max']:.2f}",
        f"  errors: {errors}",
        f"  received {result.bytes} bytes" + (f", {result.events} events" if result.events else ""),
    ]
    if result.ttfb_p50_ms is not None:
        lines.append(f"  time to first byte p50 {result.ttfb_p50_ms:.2f} ms")
    if result.peak_rss_mb is not None:
        lines.append(f"  peak RSS of --pid processes: {result.peak_rss_mb:.1f} MB")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m load.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="get")
    parser.add_argument("-c", "--concurrency", type=int, help="workers (scenario's default)")
    parser.add_argument("-n", "--requests", type=int, default=1_000_000, help="at most this many")
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="at most this long (s)")
    parser.add_argument("--timeout", type=float, help="per request, seconds (scenario's default)")
    parser.add_argument("--grace", type=float, default=5.0, help="for in-flight at the end (s)")
    parser.add_argument("--pid", type=int, action="append", default=[],
                        help="report the peak RSS of this process and its children (repeatable)")
    parser.add_argument("--users", type=int, default=USER_IDS, help="users scenario: distinct ids")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    concurrency = args.concurrency or SCENARIOS[args.scenario].concurrency
    coro = run(args.url, args.scenario, concurrency, args.requests, args.duration,
               timeout_s=args.timeout, grace_s=args.grace, pids=tuple(args.pid),
               progress=not args.quiet, user_ids=args.users)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(coro)
    print(json.dumps(result.to_json()) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
