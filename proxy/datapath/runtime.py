"""The live proxy's shared objects: the live snapshot (config, plan, pools), the state,
metrics, windows, breaker and budget, the forwarder (fallback.py) and `record`, where every
measured answer goes.

Rules:
1. The plan (phase, percentage) is recomputed only when something changes it, never per
   request; every change swaps `live` whole (proxy/datapath/live.py), and a handler reads it once.
2. What happens to an answer is planned by `fallback.plan`; `Forwarder.obtain` only carries
   it out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from proxy.config.model import Config
from proxy.datapath.capture import Capture
from proxy.datapath.decide import Plan
from proxy.datapath.fallback import Breaker, Forwarder, RetryBudget
from proxy.datapath.live import Live, first, reloaded
from proxy.datapath.sessions import Pins
from proxy.datapath.transport import Meter, Transport
from proxy.datapath.upstream import H1, Pool
from proxy.state.recent import Recent
from proxy.state.store import Store, Stored, due_steps, effective, now_rfc3339, rolled_back
from proxy.state.users import DistinctUsers
from proxy.tasks import Tasks
from proxy.telemetry.guards import Windows
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.observe import Measurement

SERVED_MAX = 100_000  # recent requests remembered for complaints and feedback
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


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
        self.forwarder = Forwarder(self.breaker, self.budget, metrics, record=self.record,
                                   recorded=self.recorded, monotonic=monotonic, sleep=sleep)
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

    def record(self, backend: str, role: str, seen: Measurement) -> None:
        """A measured answer (primary, fallback, or mirror: `role`): to the metrics and the
        windows."""
        self.metrics.measured(backend, role, seen)
        self.recorded(backend, seen)

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
