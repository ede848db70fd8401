"""The live proxy's shared objects: the live snapshot (config, plan, pools), the state,
metrics, windows, breaker and budget, and the operations the handler calls (obtain, record).

Rules:
1. The plan (phase, percentage) is recomputed only when something changes it, never per
   request; every change swaps `live` whole (proxy/datapath/live.py), and a handler reads it once.
2. What happens to an answer is planned by `fallback.plan`; `obtain` only carries it out.
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
from typing import Any

from multidict import CIMultiDict

from proxy.config.model import Config
from proxy.datapath import fallback, transport
from proxy.datapath.capture import Capture
from proxy.datapath.decide import Decision, Plan
from proxy.datapath.fallback import Breaker, RetryBudget, retrying
from proxy.datapath.live import Live, first, reloaded
from proxy.datapath.sessions import Pins
from proxy.datapath.transport import Meter, Transport
from proxy.datapath.upstream import H1, Pool, UpstreamError
from proxy.state.recent import Recent
from proxy.state.store import Store, Stored, due_steps, effective, now_rfc3339, rolled_back
from proxy.state.users import DistinctUsers
from proxy.tasks import Tasks
from proxy.telemetry.guards import Windows
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.observe import Measurement, measure, no_answer

log = logging.getLogger("rollout_proxy")
SERVED_MAX = 100_000  # recent requests remembered for complaints and feedback
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Answer:
    backend: str
    role: str  # primary | fallback
    response: transport.Answer
    started: float
    fallback_reason: str | None = None


class Runtime:
    def __init__(self, config: Config, *, metrics: Metrics, store: Store, users: DistinctUsers,
                 pins: Pins, capture: Capture | None = None, transport: Transport = H1,
                 mirror_share: Meter | None = None,
                 clock: Clock = utc_now,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self.metrics, self.store, self.users, self.pins = metrics, store, users, pins
        self.capture = capture  # usage patterns, when telemetry.capture is set
        self.clock, self.monotonic, self.sleep = clock, monotonic, sleep
        self.tasks = Tasks()
        self.in_flight = 0
        metrics.track_in_flight(lambda: self.in_flight)
        self.now = clock()  # the wall clock, refreshed by the control loop: cheap per request
        self.draining = False
        self.idle = asyncio.Event()  # set when the last request in flight ends while draining
        self.served = Recent(SERVED_MAX)  # request id -> backend, for complaints
        self.windows = Windows(config.guards.window_s, monotonic, config.guards)
        self._stored = store.load()
        self.applied = due_steps(config.rollout.schedule, self._stored, clock())
        self.transport = transport  # how backends are spoken to (proxy/datapath/transport.py)
        self.mirror_share = mirror_share  # what mirrors' reads may take of the loop
        self.live: Live = first(config, Plan("legacy", 0.0, config.rollout.salt,
                                             config.shadow.sample), transport, mirror_share)
        fb = config.fallback
        self.breaker = Breaker(fb.circuit, monotonic)
        self.budget = RetryBudget(fb.budget_ratio, fb.budget_window_s, monotonic)
        self.on_plan_change: list[Callable[[], None]] = []
        self.on_guard_crossed: Callable[[], None] = lambda: None  # the controller acts
        self.stored = self._stored
        self.refresh()

    # The snapshot's parts, for the control plane (a request reads `live` once instead).
    @property
    def config(self) -> Config:
        return self.live.config

    @property
    def plan(self) -> Plan:
        return self.live.plan

    @property
    def pools(self) -> dict[str, Pool]:
        return dict(self.live.pools)

    @property
    def stored(self) -> Stored:
        return self._stored

    @stored.setter
    def stored(self, stored: Stored) -> None:
        self._stored = stored
        self.windows.tripped = stored.tripped  # a tripped guard is judged no more per answer

    def reload(self, config: Config) -> None:
        """Swap in a validated config: one new snapshot; requests in flight keep theirs."""
        old = self.config
        self.live, retired = reloaded(self.live, config, self.transport, self.mirror_share)
        for pool, delay_s in retired:
            self.tasks.spawn(close_later(pool, delay_s), name="pool-retire")
        if config.guards.window_s != old.guards.window_s:
            self.windows = Windows(config.guards.window_s, self.monotonic, config.guards)
            self.windows.tripped = self.stored.tripped
        self.windows.guards = config.guards
        self.breaker.config = config.fallback.circuit
        self.budget.ratio = config.fallback.budget_ratio
        if self.capture is not None and config.telemetry.capture is not None:
            self.capture.config = config.telemetry.capture
        due = due_steps(config.rollout.schedule, self.stored, self.clock())
        self.applied = min(self.applied, due)  # the control loop applies the rest if allowed
        self.refresh()

    async def close(self) -> None:
        for pool in (*self.live.pools.values(), *self.live.mirror_pools.values()):
            await pool.close()

    # The plan ------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Recompute the effective plan after any change to config, schedule or override."""
        config = self.config
        phase, percentage = effective(config.rollout, self.stored, self.applied, self.clock())
        plan = Plan(phase, percentage, config.rollout.salt, config.shadow.sample,
                    config.routing.bucketing, rolled_back(self.stored))
        self.live = replace(self.live, plan=plan)
        if phase == "default" and self.stored.default_since is None:
            self.save(replace(self.stored, default_since=time.time()))
        self.metrics.show_plan(phase, percentage, self.stored.paused)
        for callback in self.on_plan_change:
            callback()

    def save(self, stored: Stored) -> None:
        self.store.save(stored)
        self.stored = stored

    def deprecation_headers(self, config: Config) -> list[tuple[str, str]]:
        rollout = config.rollout
        since = rollout.deprecation_date.timestamp() if rollout.deprecation_date else (
            self.stored.default_since or time.time())
        headers = [("Deprecation", f"@{int(since)}")]
        if rollout.sunset_date:
            sunset = max(rollout.sunset_date, datetime.fromtimestamp(since, UTC))
            headers.append(("Sunset", format_datetime(sunset, usegmt=True)))
        if rollout.migration_url:
            headers.append(("Link", f'<{rollout.migration_url}>; rel="deprecation"'))
        return headers

    # Forwarding: fallback.plan decides, this carries it out ---------------------------------

    async def obtain(self, live: Live, decision: Decision, method: str, path_qs: str,
                     headers: CIMultiDict[str], body: bytes | None) -> Answer:
        """The primary's answer head, or legacy's when next_gen failed and fallback applies."""
        config, primary = live.config.fallback, decision.primary
        step = fallback.before(decision, config, self.breaker, self.budget)
        if step.action == "legacy":  # the breaker is open: one try on legacy, not budgeted
            self.metrics.fallbacks.labels("circuit_open").inc()
            return await self.on_legacy(live, "circuit_open", 1, method, path_qs, headers,
                                        body)
        answer, error = None, None
        try:
            answer = await self.send(live, primary, "primary", method, path_qs, headers, body)
        except UpstreamError as exc:
            self.failed(primary, "primary", exc)
            error = exc
        step = fallback.plan(decision, config, error,
                             answer.response.status if answer is not None else None,
                             self.breaker, self.budget)
        if step.budget:
            self.metrics.fallbacks.labels("budget").inc()
        if step.action == "serve":
            assert answer is not None
            return answer
        if step.action == "fail":
            assert error is not None
            raise error
        assert step.reason is not None
        if answer is not None:  # next_gen answered, but not well enough to serve
            answer.response.release()
            self.unread(live, answer)
        self.metrics.fallbacks.labels(step.reason).inc()
        return await self.on_legacy(live, step.reason, config.attempts, method, path_qs,
                                    headers, body)

    async def on_legacy(self, live: Live, reason: str, attempts: int, method: str,
                        path_qs: str, headers: CIMultiDict[str], body: bytes | None) -> Answer:
        async for attempt in retrying(attempts, self.sleep):
            with attempt:
                try:
                    answer = await self.send(live, "legacy", "fallback", method, path_qs,
                                             headers, body)
                except UpstreamError as exc:
                    self.failed("legacy", "fallback", exc)
                    raise
                answer.fallback_reason = reason
                return answer
        raise AssertionError("not reached: tenacity re-raises the last error")

    async def send(self, live: Live, backend: str, role: str, method: str, path_qs: str,
                   headers: CIMultiDict[str], body: bytes | None) -> Answer:
        started = self.monotonic()
        extra = live.config.backends[backend].headers
        if extra:  # feature flags and the like: replace the client's header of the same name
            headers = CIMultiDict(headers)
            for name, value in extra:
                headers[name] = value
        # The pool's client is the transport seam: errors come named for the backend.
        response = await live.pools[backend].client.request(method, path_qs, headers, body)
        return Answer(backend, role, response, started)

    def failed(self, backend: str, role: str, exc: UpstreamError) -> None:
        self.metrics.errored(backend, role, exc.kind)
        self.recorded(backend, no_answer(exc.kind))
        log.warning(json.dumps({"event": "upstream_error", "backend": backend, "role": role,
                                "kind": exc.kind, "detail": exc.detail}))

    def unread(self, live: Live, answer: Answer) -> None:
        """An answer passed over unread (next_gen's, before a fallback): measured from its
        head alone, by the same function as every other answer."""
        response = answer.response
        self.record(answer, measure(response.status, response.headers, None,
                                    started=answer.started, first_byte=None,
                                    ended=self.monotonic(), size=0,
                                    telemetry=live.config.telemetry, backend=answer.backend))

    def record(self, answer: Answer, seen: Measurement) -> None:
        self.metrics.measured(answer.backend, answer.role, seen)
        self.recorded(answer.backend, seen)

    def recorded(self, backend: str, seen: Measurement) -> None:
        """Every answer a backend gave (primary, fallback, mirror) enters its window here;
        one of next_gen's is judged at once, so the answer that crosses a guard trips it."""
        if self.windows.add(backend, seen):  # next_gen's, past an armed guard's limit
            self.on_guard_crossed()

    def stamp(self) -> str:
        return now_rfc3339(self.clock())


async def close_later(pool: Pool, delay_s: float) -> None:
    """Close a retired pool once its requests had time to finish (at once on shutdown)."""
    try:
        await asyncio.sleep(delay_s)
    finally:
        await pool.close()
