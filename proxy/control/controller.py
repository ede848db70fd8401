"""The control plane's actions and its loop: overrides, schedule, hot reload; rollbacks and
guards' trips are proxy/control/rollback.py's.

Rules:
1. Every change is one structured log line, counted, and saved before it takes effect.
2. The tick (every 0.5 s) judges the guards for windows that age, moves a gradual rollback,
   applies due schedule steps and picks up an edited YAML.
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

from proxy.config.loading import load_config
from proxy.config.model import Config, ConfigError
from proxy.control.rollback import Rollbacks
from proxy.datapath.runtime import Runtime
from proxy.state.store import Override, due_steps, next_phase, rolled_back

log = logging.getLogger("rollout_proxy")
MAX_COMPLAINTS = 10_000  # kept in the shared state: an hour's worth at most
STATE_POLL_S = 0.02  # how soon a trip (or any change) in one process reaches the others


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Controller(Rollbacks):
    """Every change to the rollout but a rollback's (proxy/control/rollback.py): set-percentage,
    promote, pause, resume, reset, complaints and feedback, the schedule, the reload, and
    the loop that ticks them."""

    def __init__(self, runtime: Runtime, *, path: Path | None,
                 apply_config: Callable[[Config], None]) -> None:
        super().__init__(runtime)
        self.path, self.apply_config = path, apply_config
        self.file_stamp = self._stamp()
        self.waiting_reason = ""

    # Actions (admin API and CLI) -----------------------------------------------------------

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

