"""Where a rollback is made: by a person (`rollback`, admin API and CLI) or by a guard
(`crossed`, when next_gen's answer takes a guard past its limit; `act_on`, on every tick and
complaint). The Controller (proxy/control/controller.py) is built on this.

Rules:
1. Every change is one structured log line, counted, and saved before it takes effect.
2. A guard is judged when an answer of next_gen is recorded (`crossed`), when a complaint is
   counted, and on every tick (for windows that age). A trip with `action: rollback` sets a
   rollback override, saved with the trip in one write, that stays until a person calls
   set-percentage or reset: no flapping. With `action: alert` only the webhook is called, once
   per trip: the guard re-arms once a tick finds it back under its limit.
3. A trip is saved under the state lock, after adopting what another process saved: two
   workers crossing together roll back once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, stop_after_attempt, wait_exponential

from proxy.datapath.runtime import Runtime
from proxy.state.store import Override, rolled_back
from proxy.telemetry.guards import Verdict, judge

log = logging.getLogger("rollout_proxy")


class Rollbacks:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.verdicts: list[Verdict] = []
        runtime.on_guard_crossed = self.crossed

    def sync_state(self) -> None:
        """Adopt what another process saved (the Controller's)."""
        raise NotImplementedError

    def change(self, action: str, by: str, **fields: Any) -> None:
        self.rt.refresh()
        self.rt.metrics.admin_changes.labels(action).inc()
        log.info(json.dumps({"event": "rollout_change", "action": action, "by": by,
                             "phase": self.rt.plan.phase, "percentage": self.rt.plan.percentage,
                             **fields}))

    def rollback(self, reason: str, by: str, percentage: float | None = None,
                 trigger: str = "manual", over_s: float | None = None,
                 tripped: tuple[str, ...] = ()) -> None:
        """Roll back now, or step the percentage down over `over_s` (manual ones only:
        a guard's rollback is always immediate). A second rollback cancels a ramp.
        A guard's rollback is saved with the guards it trips: one write."""
        plan = self.rt.plan
        current = 100.0 if plan.phase in ("default", "sunset") else (
            plan.percentage if plan.phase == "progressive" else 0.0)
        if percentage is not None:  # a rollback never puts more users on next_gen
            percentage = min(percentage, current)
        phase = "legacy" if not percentage else "progressive"
        if over_s is None:
            over_s = self.rt.config.rollout.rollback_over_s if trigger == "manual" else 0.0
        plan = self.rt.plan
        start = 100.0 if plan.phase in ("default", "sunset") else plan.percentage
        if plan.phase in ("legacy", "shadow", "opt_in"):
            over_s = 0.0  # nobody is on next_gen by percentage: nothing to ramp
        ramp_from = start if over_s > 0 and start > (percentage or 0.0) else None
        override = Override("rollback", phase, percentage, reason, by, self.rt.stamp(),
                            ramp_from=ramp_from, ramp_s=over_s if ramp_from is not None else 0.0)
        self.rt.save(replace(self.rt.stored, override=override,
                             tripped=(*self.rt.stored.tripped, *tripped)))
        self.rt.metrics.rollbacks.labels(trigger).inc()
        self.change("rollback", by, reason=reason, trigger=trigger)

    def crossed(self) -> None:
        """The answer of next_gen just recorded took an armed guard past its limit
        (guards.Windows.add said so): judge them all and act now, before the next request
        is routed. This is where a guard's rollback is made, as are the tick's."""
        self.verdicts = self.judge()
        self.act_on(self.verdicts)

    def complaints_last_hour(self) -> int:
        edge = self.rt.clock().timestamp() - 3600
        return sum(1 for at, backend in self.rt.stored.complaints
                   if at > edge and backend == "next_gen")

    def judge(self) -> list[Verdict]:
        windows = self.rt.windows
        verdicts = judge(self.rt.config.guards, windows.figures("next_gen"),
                         windows.figures("legacy"), self.complaints_last_hour())
        for verdict in verdicts:
            self.rt.metrics.guard_state.labels(verdict.guard).set(verdict.state == "tripped")
        return verdicts

    def act_on(self, verdicts: list[Verdict]) -> None:
        guards = self.rt.config.guards
        if guards.action == "alert":
            self.rearm(verdicts)
        tripped = [v for v in verdicts if v.state == "tripped"]
        if not [v for v in tripped if v.guard not in self.rt.stored.tripped]:
            return
        if guards.action == "rollback" and self.rt.plan.phase == "legacy":
            return  # nothing to roll back now: stay armed for when the rollout resumes
        with self.rt.store.locked():  # another worker may have tripped it first
            self.sync_state()
            fresh = [v for v in tripped if v.guard not in self.rt.stored.tripped]
            if not fresh:
                return
            names = tuple(v.guard for v in fresh)
            first = fresh[0]
            if guards.action == "rollback" and self.rt.plan.phase != "legacy":
                self.rollback(f"guard {first.guard}: {first.detail}", "guard",
                              trigger=first.guard, tripped=names)
            else:
                self.rt.save(replace(self.rt.stored, tripped=(*self.rt.stored.tripped, *names)))
        for verdict in fresh:
            self.rt.metrics.guard_state.labels(verdict.guard).set(1)
            log.warning(json.dumps({"event": "guard_tripped", **verdict.as_json(),
                                    "action": guards.action}))
        if guards.webhook:
            self.rt.tasks.spawn(self.notify(guards.webhook, fresh), name="webhook")

    def rearm(self, verdicts: list[Verdict]) -> None:
        """`action: alert`: a guard back under its limit (or waiting) may alert again."""
        stored = self.rt.stored
        calm = {v.guard for v in verdicts if v.state != "tripped"} & set(stored.tripped)
        if calm and not rolled_back(stored):
            self.rt.save(replace(stored, tripped=tuple(g for g in stored.tripped
                                                       if g not in calm)))

    async def notify(self, url: str, verdicts: list[Verdict]) -> None:
        body = {"event": "rollout_guard_tripped", "action": self.rt.config.guards.action,
                "phase": self.rt.plan.phase, "percentage": self.rt.plan.percentage,
                "at": self.rt.stamp(), "guards": [v.as_json() for v in verdicts]}
        try:
            async for attempt in AsyncRetrying(stop=stop_after_attempt(5), reraise=True,
                                               wait=wait_exponential(0.5, max=10),
                                               sleep=self.rt.sleep):
                with attempt:
                    async with aiohttp.ClientSession(
                            timeout=aiohttp.ClientTimeout(total=10)) as http, \
                            http.post(url, json=body) as response:
                        response.raise_for_status()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.error(json.dumps({"event": "webhook_failed", "error": str(exc)}))
