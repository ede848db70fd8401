"""`--scenario guard`: the blast radius of a next_gen that turns to 100 % 5xx at full load.

rollout-proxy runs `progressive` 50 % with the error-rate guard (`action: rollback`) and no
fallback, so every next_gen 5xx reaches a client. next_gen runs in this process (a raw
asyncio backend, load.backend's protocol) so that it can turn at a known moment and log
every answer it gave. The threshold is crossed by the first next_gen answer after which
next_gen's error rate over all its answers so far is above `guards.error_rate` with at least
`guards.min_requests` answers (the window is longer than the run, so nothing ages out): the
proxy's own rule, replayed over next_gen's log. Reported: next_gen's answers after that one,
the requests it received once the rollback was in force, and the time from the crossing
answer to the rollback (`override.at` in /admin/status; one wall clock on one machine).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from load import checks, targets
from load.backend import Answers, BackendProtocol, Options, Step
from load.measure import measure
from load.output import Report, header, skipped_text, tool_text
from load.procs import Children, StartError, free_port
from load.rollout import Setup
from load.rounds import Plan, say
from load.wire import Request

HEALTHY_S = 2.0  # next_gen answers well this long under load, then turns
MIN_REQUESTS = 50
ERROR_RATE = 0.05
GUARDS = {"window_s": 3600, "min_requests": MIN_REQUESTS, "error_rate": ERROR_RATE,
          "latency_degradation": None, "memory_spike": None, "max_tokens": None,
          "max_time_ms": None, "complaints_per_hour": None, "action": "rollback"}


class TurningAnswers(Answers):
    """load.backend's answers, all 500s once turned; every answer logged (when, status)."""

    def __init__(self) -> None:
        super().__init__(Options("fast"))
        self.turned = False
        self.log: list[tuple[float, int]] = []

    def steps(self, request: Request) -> list[Step] | None:
        head, body = self._failed if self.turned else self._ok
        self.log.append((time.time(), 500 if self.turned else 200))
        return [(0.0, head + body)]


@dataclass(frozen=True, slots=True)
class BlastRadius:
    answers: int  # next_gen's answers in the whole run
    crossing: int | None  # index of the answer that crossed the threshold
    after_crossing: int | None  # next_gen answers after that one (in flight, then routed)
    after_rollback: int | None  # requests next_gen received once the rollback was in force
    to_rollback_ms: float | None

    def to_json(self) -> dict[str, object]:
        return {"answers": self.answers, "crossing": self.crossing,
                "after_crossing": self.after_crossing, "after_rollback": self.after_rollback,
                "to_rollback_ms": self.to_rollback_ms}


def crossing(log: list[tuple[float, int]], min_requests: int, error_rate: float) -> int | None:
    """The index of the answer that makes the error rate cross: the proxy's rule, replayed."""
    errors = 0
    for index, (_, status) in enumerate(log):
        errors += status >= 500
        answers = index + 1
        if answers >= min_requests and errors > error_rate * answers:
            return index
    return None


def blast_radius(log: list[tuple[float, int]], rolled_back_at: float | None) -> BlastRadius:
    index = crossing(log, MIN_REQUESTS, ERROR_RATE)
    if index is None:
        return BlastRadius(len(log), None, None, None, None)
    crossed_at = log[index][0]
    after_rollback = None if rolled_back_at is None else sum(
        1 for at, _ in log if at > rolled_back_at)
    to_rollback = None if rolled_back_at is None else (rolled_back_at - crossed_at) * 1000
    return BlastRadius(len(log), index, len(log) - index - 1, after_rollback, to_rollback)


async def rollback_moment(admin_url: str) -> tuple[float | None, str]:
    """When the proxy's rollback override was set (unix seconds), and its reason."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
            http.get(f"{admin_url}/admin/status") as response:
        status: dict[str, Any] = await response.json()
    override = status.get("override") or {}
    if override.get("action") != "rollback":
        return None, ""
    at = datetime.fromisoformat(str(override["at"]).replace("Z", "+00:00"))
    return at.timestamp(), str(override.get("reason", ""))


async def serve_next_gen(answers: TurningAnswers) -> tuple[asyncio.Server, str]:
    port = free_port()
    server = await asyncio.get_running_loop().create_server(
        lambda: BackendProtocol(answers), "127.0.0.1", port, backlog=4096, reuse_address=True)
    return server, f"http://127.0.0.1:{port}/"


async def turn_after(answers: TurningAnswers, seconds: float) -> None:
    await asyncio.sleep(seconds)  # a load shape, not a wait for a condition
    answers.turned = True


def guard_checks(radius: BlastRadius | None, connections: int) -> list[checks.Check]:
    """Past the crossing answer, next_gen may still answer what was already in flight (at
    most one request per client connection, since each waits for its answer) and nothing
    routed after it."""
    if radius is None:
        return []
    return [checks.at_most("next_gen requests after the rollback was in force",
                           radius.after_rollback, 0),
            checks.at_most("crossing to rollback", radius.to_rollback_ms, 10, " ms"),
            checks.at_most("next_gen answers after the crossing one (in flight at it)",
                           radius.after_crossing, connections),
            checks.info("next_gen answers in the run", radius.answers)]


async def guard(args: argparse.Namespace, plan: Plan, workdir: Path) -> Report:
    """Progressive 50 % at full load; next_gen turns to 100 % 5xx: how far does it reach?"""
    skipped, load = targets.Skipped(), replace(plan.busy, duration_s=max(plan.busy.duration_s,
                                                                         HEALTHY_S + 2))
    answers = TurningAnswers()
    server, next_gen_url = await serve_next_gen(answers)
    radius, reason, seen = None, "", None
    overrides = (*((f"guards.{k}", v) for k, v in GUARDS.items()),
                 ("fallback.enabled", False), *args.set)
    try:
        async with Children(workdir / "logs") as children:
            legacy = await targets.backend(children, "legacy")
            setup = Setup("progressive", legacy.url, next_gen_url, percentage=50,
                          overrides=tuple(overrides))
            try:
                proxy = await targets.rollout_proxy(children, "proxy", setup, workdir)
            except (OSError, StartError) as exc:
                skipped.reasons["proxy"] = f"rollout-proxy did not start: {exc}"
            else:
                say(f"  load for {load.duration_s:g} s; next_gen turns after {HEALTHY_S:g} s")
                turning = asyncio.create_task(turn_after(answers, HEALTHY_S))
                seen = await measure(proxy.url, load, workdir=workdir, use_wrk=plan.use_wrk)
                await turning
                assert proxy.admin_url is not None
                rolled_back_at, reason = await rollback_moment(proxy.admin_url)
                radius = blast_radius(answers.log, rolled_back_at)
    finally:
        server.close()
    verdicts = guard_checks(radius, load.connections)
    lines = [f"load: {tool_text(load, plan.use_wrk)}",
             f"proxy: progressive 50 %, fallback off, guards.error_rate {ERROR_RATE:g}, "
             f"min_requests {MIN_REQUESTS}, action rollback; next_gen (in this process) "
             f"answers 200 for {HEALTHY_S:g} s, then 500"]
    parts = [header("rollout-proxy bench: guard", lines)]
    if seen is not None:
        parts.append(f"client: {seen.requests} answers, {seen.errors} errors, "
                     f"{seen.rps:.0f} req/s; rollback reason: {reason or '(none)'}")
    text = "\n\n".join([*parts, checks.format_checks(verdicts), *skipped_text(skipped)])
    data = {"scenario": "guard", "radius": radius and radius.to_json(),
            "client": seen and seen.to_json(), "reason": reason,
            "checks": [c.to_json() for c in verdicts], "skipped": skipped.reasons}
    return Report(text, data)
