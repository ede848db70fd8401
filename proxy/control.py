"""The control plane's actions and its loop: overrides, guards, schedule, hot reload.

Rules:
1. Every change is one structured log line, counted, and saved before it takes effect.
2. A guard is judged when an answer of next_gen is recorded (`answered`), when a complaint is
   counted, and on every tick (for windows that age). A trip with `action: rollback` sets a
   rollback override, saved with the trip in one write, that stays until a person calls
   set-percentage or reset: no flapping. With `action: alert` only the webhook is called, once
   per trip: the guard re-arms once a tick finds it back under its limit.
3. While a rollback is in force, promote is refused (409): a promote never undoes a guard.
4. A reload is parse, validate, swap one reference; a bad file changes nothing.
5. A change another process saved (a worker, a replica) is adopted within STATE_POLL_S.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC
from pathlib import Path
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, stop_after_attempt, wait_exponential

from proxy.config import Config, ConfigError, load_config
from proxy.guards import Verdict, judge
from proxy.runtime import Runtime
from proxy.state import Override, due_steps, next_phase, rolled_back

log = logging.getLogger("rollout_proxy")
MAX_COMPLAINTS = 10_000  # kept in the shared state: an hour's worth at most
STATE_POLL_S = 0.02  # how soon a trip (or any change) in one process reaches the others


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Controller:
    def __init__(self, runtime: Runtime, *, path: Path | None,
                 apply_config: Callable[[Config], None]) -> None:
        self.rt, self.path, self.apply_config = runtime, path, apply_config
        self.verdicts: list[Verdict] = []
        self.file_stamp = self._stamp()
        self.waiting_reason = ""
        runtime.on_guard_crossed = self.crossed

    # Actions (admin API and CLI) -----------------------------------------------------------

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

    def set_percentage(self, percentage: float, by: str, reason: str = "") -> None:
        if not 0 <= percentage <= 100:
            raise Refused(400, f"percentage must be between 0 and 100, got {percentage:g}")
        current = self.rt.stored.override
        phase = current.phase if current is not None and current.action != "rollback" else None
        if rolled_back(self.rt.stored):
            phase = "progressive"
        override = Override("percentage", phase, percentage, reason or "set-percentage", by,
                            self.rt.stamp())
        # Leaving a rollback re-arms its guards: a trip after this is a new one.
        tripped = () if rolled_back(self.rt.stored) else self.rt.stored.tripped
        self.rt.save(replace(self.rt.stored, override=override, tripped=tripped))
        self.change("percentage", by, reason=reason)

    def promote(self, by: str) -> str:
        stored = self.rt.stored
        if rolled_back(stored):
            assert stored.override is not None
            raise Refused(409, "a rollback is in force (" + stored.override.reason + "); "
                          "call reset first, then promote")
        schedule = self.rt.config.rollout.schedule
        if self.rt.applied < len(schedule):
            step = schedule[self.rt.applied]
            override = stored.override
            if override is not None and override.action == "percentage":
                override = None  # the step's own percentage is what promote asks for
            self.rt.save(replace(stored, promoted_through=step.at.isoformat(),
                                 override=override))
            self.rt.applied += 1
            self.change("promote", by, step=step.at.isoformat())
            return f"applied schedule step {step.at.isoformat()}"
        following = next_phase(self.rt.plan.phase)
        if following is None:
            raise Refused(409, "already in the last phase (sunset)")
        kept = stored.override.percentage if stored.override else None
        override = Override("promote", following, kept, f"promoted to {following}", by,
                            self.rt.stamp())
        self.rt.save(replace(stored, override=override))
        self.change("promote", by, phase=following)
        return f"promoted to phase {following}"

    def pause(self, by: str) -> None:
        stored = self.rt.stored  # a second pause keeps the first one's moment
        since = stored.paused_at if stored.paused and stored.paused_at else self.rt.stamp()
        self.rt.save(replace(stored, paused=True, paused_at=since))
        self.change("pause", by)

    def resume(self, by: str) -> None:
        self.rt.save(replace(self.rt.stored, paused=False, paused_at=None))
        self.change("resume", by)
        self.advance_schedule()

    def reset(self, by: str) -> None:
        self.rt.save(replace(self.rt.stored, override=None, tripped=()))
        self.change("reset", by)

    def complaint(self, backend: str) -> None:
        """Counted twice: in the last hour (the guard) and per UTC day (support tickets)."""
        stored, moment = self.rt.stored, self.rt.clock()
        now = moment.timestamp()
        kept = tuple(c for c in stored.complaints if c[0] > now - 3600)[-MAX_COMPLAINTS:]
        day = moment.astimezone(UTC).date().isoformat()
        per_day = dict(stored.tickets.get(day, {}))
        per_day[backend] = per_day.get(backend, 0) + 1
        days = sorted({**stored.tickets, day: per_day}.items())
        tickets = dict(days[-self.rt.config.telemetry.active_users_days:])
        self.rt.save(replace(stored, complaints=(*kept, (now, backend)), tickets=tickets))
        self.rt.metrics.complaints.labels(backend).inc()
        if backend == "next_gen":  # the complaint that crosses the limit trips it, now
            self.verdicts = self.judge()
            self.act_on(self.verdicts)

    def feedback(self, backend: str, score: int, migrated: bool | None) -> None:
        stored = self.rt.stored
        scores = dict(stored.feedback.get(backend, {}))
        scores[str(score)] = scores.get(str(score), 0) + 1
        migrations = dict(stored.migrations)
        if migrated is not None:
            result = "success" if migrated else "failure"
            migrations[result] = migrations.get(result, 0) + 1
            self.rt.metrics.migration_reports.labels(result).inc()
        self.rt.save(replace(stored, feedback={**stored.feedback, backend: scores},
                             migrations=migrations))
        self.rt.metrics.feedback.labels(backend, str(score)).inc()

    # The loop ------------------------------------------------------------------------------

    async def run(self, interval_s: float = 0.5) -> None:
        while True:
            await self.rt.sleep(interval_s)
            try:
                self.tick()
            except Exception:  # the loop must live on; the error is logged each time
                log.exception("control tick failed")

    async def watch_state(self) -> None:
        """Adopt other processes' changes (a guard's rollback above all) within STATE_POLL_S:
        a stat of the state file, or a look at what Redis's pub/sub brought."""
        while True:
            await asyncio.sleep(STATE_POLL_S)  # a polling period, not a wait for a condition
            try:
                self.sync_state()
            except Exception:
                log.exception("state sync failed")

    def crossed(self) -> None:
        """The answer of next_gen just recorded took an armed guard past its limit
        (guards.Windows.add said so): judge them all and act now, before the next request
        is routed. This is where a guard's rollback is made, as are the tick's."""
        self.verdicts = self.judge()
        self.act_on(self.verdicts)

    def tick(self) -> None:
        self.rt.now = self.rt.clock()
        self.rt.metrics.sessions_pinned.set(len(self.rt.pins))
        self.rt.metrics.sample_in_flight()
        self.check_reload()
        self.sync_state()
        if self.rt.stored.override is not None and self.rt.stored.override.ramp_s > 0:
            self.rt.refresh()  # a gradual rollback moves on every tick
        self.verdicts = self.judge()
        self.act_on(self.verdicts)
        self.advance_schedule()

    def sync_state(self) -> None:
        """Adopt a change another process made to the shared state (workers, replicas)."""
        fresh = self.rt.store.poll()
        if fresh is not None and fresh != self.rt.stored:
            self.rt.stored = fresh
            self.rt.refresh()
            self.advance_schedule()
            log.info(json.dumps({"event": "state_synced", "phase": self.rt.plan.phase,
                                 "percentage": self.rt.plan.percentage}))

    def _due(self) -> int:
        return due_steps(self.rt.config.rollout.schedule, self.rt.stored, self.rt.clock())

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

    def advance_schedule(self) -> None:
        due = self._due()
        if due <= self.rt.applied:
            stored = self.rt.stored
            thawed = due_steps(self.rt.config.rollout.schedule, replace(stored, paused=False),
                               self.rt.clock())
            self.waiting_reason = "paused" if stored.paused and thawed > due else ""
            return
        if rolled_back(self.rt.stored):
            self.waiting_reason = "a rollback is in force"
        elif self.rt.stored.paused:
            self.waiting_reason = "paused"
        elif any(v.state == "tripped" for v in self.verdicts):
            self.waiting_reason = "a guard is tripped"
        else:
            self.rt.applied = due
            self.waiting_reason = ""
            self.change("schedule", "schedule", step=due)

    # Hot reload ----------------------------------------------------------------------------

    def _stamp(self) -> tuple[float, int] | None:
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime, stat.st_size

    def check_reload(self) -> None:
        stamp = self._stamp()
        if stamp is not None and stamp != self.file_stamp:
            self.file_stamp = stamp
            self.reload()

    def reload(self) -> bool:
        if self.path is None:
            return False
        try:
            config = load_config(self.path)
        except ConfigError as exc:
            self.rt.metrics.reloads.labels("error").inc()
            log.error(json.dumps({"event": "config_refused", "path": str(self.path),
                                  "problems": [str(p) for p in exc.problems]}))
            return False
        if config.version == self.rt.config.version:
            return True
        self.apply_config(config)
        self.advance_schedule()  # due steps apply at once, if guards, pause and rollback allow
        self.rt.metrics.reloads.labels("success").inc()
        log.info(json.dumps({"event": "config_reloaded", "version": config.version}))
        return True

