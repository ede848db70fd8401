"""The live proxy's shared objects: current config, rollout plan, pools, metrics, and the
operations the handler calls (decide, obtain, mirror, record).

Rule: the plan (phase, percentage) is recomputed only when something changes it, never per
request; handlers read `self.plan` once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from proxy import h1
from proxy.capture import Capture
from proxy.config import Config
from proxy.fallback import Breaker, RetryBudget, fallback_reason, retrying
from proxy.guards import Windows
from proxy.metrics import Metrics
from proxy.observe import Measurement, no_answer
from proxy.recent import Recent
from proxy.routing import Decision, Facts, Plan, decide, in_cohort, mirrorable
from proxy.sessions import Pins
from proxy.state import Store, Stored, due_steps, effective, now_rfc3339, rolled_back
from proxy.tasks import Tasks
from proxy.upstream import Pool, UpstreamError, make_pool, send

if TYPE_CHECKING:
    from proxy.shadow import Pairing

log = logging.getLogger("rollout_proxy")
SERVED_MAX = 100_000  # recent requests remembered for complaints and feedback
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Answer:
    backend: str
    role: str  # primary | fallback
    response: h1.Response
    started: float
    fallback_reason: str | None = None


class Runtime:
    def __init__(self, config: Config, *, metrics: Metrics, store: Store,
                 clock: Clock = utc_now, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self.config, self.metrics, self.store = config, metrics, store
        self.clock, self.monotonic, self.sleep = clock, monotonic, sleep
        self.tasks = Tasks()
        self.in_flight = 0
        metrics.track_in_flight(lambda: self.in_flight)
        self.now = clock()  # the wall clock, refreshed by the control loop: cheap per request
        self.draining = False
        self.idle = asyncio.Event()  # set when the last request in flight ends while draining
        self.pools: dict[str, Pool] = {}
        self.served = Recent(SERVED_MAX)  # request id -> backend, for complaints
        self.pins: Pins = Pins(config.routing.session_ttl_s, config.routing.session_max,
                               monotonic)
        self.stored = store.load()
        self.applied = due_steps(config.rollout.schedule, self.stored, clock())
        self.plan = Plan("legacy", 0.0, config.rollout.salt, config.shadow.sample)
        self.windows = Windows(config.guards.window_s, monotonic)
        fb = config.fallback
        self.breaker = Breaker(fb.circuit, monotonic)
        self.budget = RetryBudget(fb.budget_ratio, fb.budget_window_s, monotonic)
        self.shadow: Any = None  # proxy.shadow.Shadow, set by app
        self.users: Any = None  # proxy.users.ActiveUsers, set by app
        self.capture: Capture | None = None  # usage patterns, when telemetry.capture is set
        self.on_plan_change: list[Callable[[], None]] = []
        self.on_next_gen_answer: Callable[[], None] = lambda: None  # the guards judge it
        self.refresh()

    async def start(self) -> None:
        for name, backend in self.config.backends.items():
            self.pools[name] = make_pool(
                backend, max_head_bytes=self.config.limits.max_header_bytes)

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()

    # The plan ------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Recompute the effective plan after any change to config, schedule or override."""
        config = self.config
        phase, percentage = effective(config.rollout, self.stored, self.applied, self.clock())
        self.plan = Plan(phase, percentage, config.rollout.salt, config.shadow.sample,
                         config.routing.bucketing, rolled_back(self.stored))
        if phase == "default" and self.stored.default_since is None:
            self.save(replace(self.stored, default_since=time.time()))
        self.metrics.show_plan(phase, percentage, self.stored.paused)
        for callback in self.on_plan_change:
            callback()

    def save(self, stored: Stored) -> None:
        self.store.save(stored)
        self.stored = stored

    def decide(self, facts: Facts, config: Config, chance: Callable[[], float],
               pinned: str | None = None) -> Decision:
        decision = decide(facts, config.routing, self.plan, chance, pinned)
        if decision.mirror:
            why = mirrorable(facts.method, facts.path, config.shadow)
            if why is not None:
                self.metrics.shadow_skipped.labels(
                    "method" if why.startswith("method") else "excluded_path").inc()
                return replace(decision, mirror=False)
        return decision

    def deprecation_headers(self) -> list[tuple[str, str]]:
        rollout = self.config.rollout
        since = rollout.deprecation_date.timestamp() if rollout.deprecation_date else (
            self.stored.default_since or time.time())
        headers = [("Deprecation", f"@{int(since)}")]
        if rollout.sunset_date:
            sunset = max(rollout.sunset_date, datetime.fromtimestamp(since, UTC))
            headers.append(("Sunset", format_datetime(sunset, usegmt=True)))
        if rollout.migration_url:
            headers.append(("Link", f'<{rollout.migration_url}>; rel="deprecation"'))
        return headers

    # Forwarding ----------------------------------------------------------------------------

    async def obtain(self, decision: Decision, method: str, path_qs: str,
                     headers: CIMultiDict[str], body: bytes | None) -> Answer:
        """The primary's answer head, or legacy's when next_gen failed and fallback applies."""
        primary = decision.primary
        if (primary == "next_gen" and decision.fallback and self.config.fallback.enabled
                and not self.breaker.allow()):
            self.metrics.fallbacks.labels("circuit_open").inc()
            try:
                answer = await self.send("legacy", "fallback", method, path_qs, headers, body)
            except UpstreamError as exc:
                self.failed("legacy", "fallback", exc)
                raise
            answer.fallback_reason = "circuit_open"
            return answer
        self.budget.request()
        try:
            answer = await self.send(primary, "primary", method, path_qs, headers, body)
        except UpstreamError as exc:
            self.failed(primary, "primary", exc)
            reason = fallback_reason(self.config.fallback, exc, None) if decision.fallback \
                else None
            if reason is None:
                raise
            return await self.fall_back(reason, exc, method, path_qs, headers, body)
        if primary != "next_gen":
            return answer
        reason = fallback_reason(self.config.fallback, None, answer.response.status) \
            if decision.fallback else None
        self.breaker.record(answer.response.status < 500)
        if reason is None:
            return answer
        if not self.budget.allow():  # past the budget: next_gen's own answer, untouched
            self.metrics.fallbacks.labels("budget").inc()
            return answer
        answer.response.release()
        self.metrics_answered(answer, answer.response.status)
        error = UpstreamError("status", f"next_gen answered {answer.response.status}")
        return await self.fall_back(reason, error, method, path_qs, headers, body,
                                    budgeted=True)

    async def fall_back(self, reason: str, cause: UpstreamError, method: str, path_qs: str,
                        headers: CIMultiDict[str], body: bytes | None,
                        budgeted: bool = False) -> Answer:
        if not budgeted and not self.budget.allow():
            self.metrics.fallbacks.labels("budget").inc()
            raise cause
        self.metrics.fallbacks.labels(reason).inc()
        async for attempt in retrying(self.config.fallback.attempts, self.sleep):
            with attempt:
                try:
                    answer = await self.send("legacy", "fallback", method, path_qs, headers,
                                             body)
                except UpstreamError as exc:
                    self.failed("legacy", "fallback", exc)
                    raise
                answer.fallback_reason = reason
                return answer
        raise cause  # not reached: tenacity re-raises the last error

    async def send(self, backend: str, role: str, method: str, path_qs: str,
                   headers: CIMultiDict[str], body: bytes | None) -> Answer:
        started = self.monotonic()
        extra = self.config.backends[backend].headers
        if extra:  # feature flags and the like: replace the client's header of the same name
            headers = CIMultiDict(headers)
            for name, value in extra:
                headers[name] = value
        response = await send(self.pools[backend], method, path_qs, headers, body)
        return Answer(backend, role, response, started)

    def failed(self, backend: str, role: str, exc: UpstreamError) -> None:
        if backend == "next_gen":
            self.breaker.record(False)
        self.metrics.errored(backend, role, exc.kind)
        self.recorded(backend, no_answer(exc.kind))
        log.warning(json.dumps({"event": "upstream_error", "backend": backend, "role": role,
                                "kind": exc.kind, "detail": exc.detail}))

    def metrics_answered(self, answer: Answer, status: int) -> None:
        seconds = self.monotonic() - answer.started
        self.metrics.answered(answer.backend, answer.role, status, seconds, None, None)
        self.recorded(answer.backend, Measurement(status, seconds * 1000, None, 0, None,
                                                  status < 500, None))

    def record(self, answer: Answer, seen: Measurement) -> None:
        self.metrics.measured(answer.backend, answer.role, seen)
        self.recorded(answer.backend, seen)

    def recorded(self, backend: str, seen: Measurement) -> None:
        """Every answer a backend gave (primary, fallback, mirror) enters its window here;
        one of next_gen's is judged at once, so the answer that crosses a guard trips it."""
        self.windows.add(backend, seen)
        if backend == "next_gen":
            self.on_next_gen_answer()

    def backend_of_user(self, user: str) -> str:
        """The backend a request from this user (no opt header) would get now."""
        plan = self.plan
        if plan.phase in ("default", "sunset"):
            return "next_gen"
        if plan.phase == "progressive" and in_cohort(plan, user)[0]:
            return "next_gen"
        return "legacy"

    def mirror(self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes | None,
               rid: str) -> Pairing | None:
        if self.shadow is None:
            return None
        result: Pairing | None = self.shadow.mirror(method, path_qs, headers, body, rid)
        return result

    def stamp(self) -> str:
        return now_rfc3339(self.clock())
