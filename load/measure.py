"""One measurement of a target: wrk when installed (far cheaper than a Python client), else
load.loadgen, each run as a child pinned to the load core."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from load.loadgen import USER_IDS
from load.memory import RssSampler, cpu_s
from load.procs import PYTHON, child_env, pinned

WRK_MARK = "WRK_JSON "

_WRK_USERS = """local counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, nil, {{["X-User-Id"] = "user-" .. (counter % {users})}})
end
"""

_WRK_STOP = """local seen = 0
response = function(status, headers, body)
  seen = seen + 1
  if seen >= {stop_after} then wrk.thread:stop() end
end
"""

_WRK_DONE = """done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('%s{"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, '
    .. '"read": %d, "write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, '
    .. '"p99_us": %d, "max_us": %d}\\n', "WRK_JSON ", summary.requests, summary.duration,
    summary.bytes, e.connect, e.read, e.write, e.status, e.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True, slots=True)
class Load:
    """What to send: `connections` at once for `duration_s`, optionally varying X-User-Id."""

    connections: int = 50
    duration_s: float = 5.0
    users: bool = True
    stop_after: int | None = None  # stop once this many answers came (wrk only)
    timeout_s: float = 30.0
    scenario: str = "get"  # load.loadgen scenario when wrk is not used
    burst: bool = False  # load.burst: one request per connection, all at once
    steady_ramp_s: float | None = None  # with burst: loop for duration_s, first sends spread


@dataclass(frozen=True, slots=True)
class Measurement:
    tool: str
    requests: int  # answers received, whatever their status
    errors: int  # answers with a 4xx/5xx status, plus requests that got no answer
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    error_kinds: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    cpu_us: float | None = None  # the measured processes' CPU time per answer

    @property
    def answered_ok(self) -> int:
        """Answers that were not 4xx/5xx (`requests` counts answers of any status)."""
        return self.requests - sum(n for k, n in self.error_kinds.items() if k.startswith("status"))

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_script(load: Load) -> str:
    parts = [_WRK_DONE]
    if load.users:
        parts.append(_WRK_USERS.format(users=USER_IDS))
    if load.stop_after is not None:
        parts.append(_WRK_STOP.format(stop_after=load.stop_after))
    return "\n".join(parts)


def parse_wrk(output: str) -> Measurement:
    """The figures of wrk's run, from the JSON line that our Lua `done` prints."""
    line = next((ln for ln in output.splitlines() if ln.startswith(WRK_MARK)), None)
    if line is None:
        raise ValueError(f"no {WRK_MARK.strip()} line in wrk's output:\n{output[-2000:]}")
    raw = json.loads(line[len(WRK_MARK):])
    kinds = {k: raw[k] for k in ("connect", "read", "write", "timeout", "status") if raw[k]}
    seconds = max(raw["duration_us"] / 1e6, 1e-9)
    return Measurement("wrk", raw["requests"], sum(kinds.values()),
                       round(raw["requests"] / seconds, 1), raw["p50_us"] / 1000,
                       raw["p90_us"] / 1000, raw["p99_us"] / 1000, raw["max_us"] / 1000, kinds)


def wrk_argv(url: str, load: Load, script: Path) -> list[str]:
    seconds = max(1, round(load.duration_s))
    return ["wrk", "-t1", f"-c{load.connections}", f"-d{seconds}s", "--latency",
            f"--timeout={max(1, round(load.timeout_s))}s", "-s", str(script), url]


def loadgen_argv(url: str, load: Load) -> list[str]:
    scenario = "users" if load.users and load.scenario == "get" else load.scenario
    requests = load.stop_after or 100_000_000
    return [PYTHON, "-m", "load.loadgen", url, "--scenario", scenario, "-c",
            str(load.connections), "-n", str(requests), "-d", str(load.duration_s),
            "--timeout", str(load.timeout_s), "--json", "--quiet"]


def parse_loadgen(output: str) -> Measurement:
    raw = json.loads(output.strip().splitlines()[-1])
    lat = raw["latency_ms"]
    kinds = {k: v for k, v in raw["errors"].items() if v}
    answers = raw["ok"] + sum(n for k, n in kinds.items() if k.startswith("status"))
    return Measurement("loadgen", answers, sum(kinds.values()), raw["rps"], lat["p50"],
                       lat["p90"], lat["p99"], lat["max"], kinds)


def burst_argv(url: str, load: Load) -> list[str]:
    steady = [] if load.steady_ramp_s is None else [
        "--steady", str(load.duration_s), "--ramp", str(load.steady_ramp_s)]
    return [PYTHON, "-m", "load.burst", url, "-n", str(load.connections), "--timeout",
            str(load.timeout_s), *steady, "--json"]


def parse_burst(output: str) -> Measurement:
    raw = json.loads(output.strip().splitlines()[-1])
    lat = raw["latency_ms"]
    kinds = {f"status_{code}": n for code, n in raw["statuses"].items() if int(code) >= 400}
    kinds.update(raw["errors"])
    seconds = max(lat["max"] / 1000, 1e-9)
    return Measurement("burst", raw["answers"], sum(kinds.values()),
                       round(raw["answers"] / seconds, 1), lat["p50"], lat["p90"], lat["p99"],
                       lat["max"], kinds)


def _command(url: str, load: Load, use_wrk: bool, workdir: Path,
             ) -> tuple[list[str], Callable[[str], Measurement]]:
    if load.burst:
        return burst_argv(url, load), parse_burst
    if use_wrk and wrk_available():
        script = workdir / f"wrk-{load.users}-{load.stop_after}.lua"
        script.write_text(wrk_script(load))
        return wrk_argv(url, load, script), parse_wrk
    return loadgen_argv(url, load), parse_loadgen


async def _run(argv: list[str], limit_s: float) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=child_env())
    try:
        out, _ = await asyncio.wait_for(process.communicate(), limit_s)
    except BaseException:  # the deadline, or the bench being stopped: never leave it running
        if process.returncode is None:
            process.kill()
        await asyncio.shield(process.wait())
        raise
    if process.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited with {process.returncode}: {out.decode()[-2000:]}")
    return out.decode(errors="replace")


async def measure(url: str, load: Load, *, workdir: Path, cpu: int | None = 1,
                  use_wrk: bool = True, pids: tuple[int, ...] = ()) -> Measurement:
    """Drive `url` with `load`; peak RSS of `pids` (and children) sampled meanwhile, and the
    CPU time they took per answer (quieter than req/s on a shared machine: it does not
    count the time another process held the core)."""
    limit_s = load.duration_s + load.timeout_s + 30
    argv, parse = _command(url, load, use_wrk, workdir)
    used = cpu_s(pids) if pids else None
    async with RssSampler(pids, interval_s=0.5) as rss:
        output = await _run(pinned(argv, cpu), limit_s)
    result = parse(output)
    extra: dict[str, float] = {}
    if used is not None and result.requests:
        extra["cpu_us"] = round((cpu_s(pids) - used) / result.requests * 1e6, 1)
    if rss.peak_mb is not None:
        extra["peak_rss_mb"] = round(rss.peak_mb, 1)
    return Measurement(**{**asdict(result), **extra}) if extra else result
