"""Rollout state: the YAML's plan plus a runtime override, persisted so it survives a restart.

Rules:
1. Effective phase and percentage = the YAML, then the schedule steps applied so far, then
   the override (rollback, percentage, promote) with who, why and when.
2. A step applies when due, not paused, no rollback in force, and every guard passes;
   steps already due at start (or reload) apply at once, the latest winning.
3. The state file is replaced atomically (write, fsync, rename): a crash never leaves half.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from proxy.config.model import PHASES, RolloutConfig, ScheduleStep, to_datetime


@dataclass(frozen=True, slots=True)
class Override:
    action: str  # rollback | percentage | promote
    phase: str | None
    percentage: float | None
    reason: str
    by: str
    at: str  # RFC 3339
    ramp_from: float | None = None  # a gradual rollback steps down from this percentage
    ramp_s: float = 0.0  # over this many seconds from `at`, to `percentage` then `phase`

    def ramp(self, now: datetime) -> tuple[float, float] | None:
        """(percentage now, fraction done) while a gradual rollback is under way, else None."""
        if self.ramp_from is None or self.ramp_s <= 0:
            return None
        started = to_datetime(self.at) or now
        done = (now - started).total_seconds() / self.ramp_s
        if done >= 1:
            return None
        target = self.percentage or 0.0
        done = max(0.0, done)
        return self.ramp_from + (target - self.ramp_from) * done, done


@dataclass(frozen=True, slots=True)
class Stored:
    """Everything that outlives the process."""

    override: Override | None = None
    paused: bool = False
    paused_at: str | None = None
    promoted_through: str | None = None  # schedule steps up to this `at` count as due
    default_since: float | None = None  # unix seconds `default` began (the Deprecation moment)
    tripped: tuple[str, ...] = field(default_factory=tuple)  # guards that fired, until reset
    complaints: tuple[tuple[float, str], ...] = field(default_factory=tuple)  # (unix s, backend)
    feedback: dict[str, dict[str, int]] = field(default_factory=dict)  # backend -> score -> n
    migrations: dict[str, int] = field(default_factory=dict)  # success|failure -> n
    tickets: dict[str, dict[str, int]] = field(default_factory=dict)  # UTC day -> backend -> n

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> Stored:
        override = data.get("override")
        return Stored(
            override=Override(**override) if isinstance(override, dict) else None,
            paused=bool(data.get("paused", False)), paused_at=data.get("paused_at"),
            promoted_through=data.get("promoted_through"),
            default_since=data.get("default_since"),
            tripped=tuple(data.get("tripped", ())),
            complaints=tuple((float(at), str(backend))
                             for at, backend in data.get("complaints", ())),
            feedback={str(b): {str(s): int(n) for s, n in scores.items()}
                      for b, scores in (data.get("feedback") or {}).items()},
            migrations={str(k): int(v) for k, v in (data.get("migrations") or {}).items()},
            tickets={str(d): {str(b): int(n) for b, n in per.items()}
                     for d, per in (data.get("tickets") or {}).items()},
        )


class Store(Protocol):
    """Where the state lives: a file now; a shared store (redis) can implement the same."""

    def load(self) -> Stored: ...

    def save(self, stored: Stored) -> None: ...

    def poll(self) -> Stored | None:
        """The state, if another process (a worker, a replica) changed it since we looked."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Held around read-change-write, so processes sharing the state lose no change."""


class FileStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.stamp: tuple[int, int] | None = None
        self.depth = 0  # locked() is re-entrant: a guard may trip inside an admin change

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_ino

    def load(self) -> Stored:
        self.stamp = self._stamp()
        try:
            return Stored.from_json(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return Stored()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"state file {self.path} is unreadable: {exc}") from exc

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive flock beside the state file (workers of one machine share it)."""
        if self.depth:  # this process holds it already (a second flock would wait forever)
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                fcntl.flock(lock, fcntl.LOCK_UN)

    def poll(self) -> Stored | None:
        if self._stamp() == self.stamp:
            return None
        try:
            return self.load()
        except ValueError:
            return None

    def save(self, stored: Stored) -> None:
        write_atomically(self.path, json.dumps(stored.to_json(), indent=2))
        self.stamp = self._stamp()


def write_atomically(path: Path, data: str | Iterable[bytes]) -> None:
    """Write, fsync, rename: a reader sees the old file or the new one, never half.
    `data` is the text, or its bytes in chunks (written as they come)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    chunks = [data.encode()] if isinstance(data, str) else data
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def now_rfc3339(now: datetime) -> str:
    return now.astimezone(UTC).isoformat().replace("+00:00", "Z")


def due_steps(schedule: tuple[ScheduleStep, ...], stored: Stored, now: datetime) -> int:
    """How many schedule steps are due: passed, or promoted through; a pause freezes time."""
    horizon = now
    if stored.paused and stored.paused_at:
        horizon = min(now, to_datetime(stored.paused_at) or now)
    promoted = to_datetime(stored.promoted_through) if stored.promoted_through else None
    count = 0
    for index, step in enumerate(schedule):
        if step.at <= horizon or (promoted is not None and step.at <= promoted):
            count = index + 1
    return count


def scheduled(rollout: RolloutConfig, applied: int) -> tuple[str, float]:
    phase, percentage = rollout.phase, rollout.percentage
    for step in rollout.schedule[:applied]:
        phase = step.phase or phase
        percentage = step.percentage if step.percentage is not None else percentage
    return phase, percentage


def effective(rollout: RolloutConfig, stored: Stored, applied: int,
              now: datetime | None = None) -> tuple[str, float]:
    phase, percentage = scheduled(rollout, applied)
    override = stored.override
    ramp = override.ramp(now or datetime.now(UTC)) if override is not None else None
    if ramp is not None:
        return "progressive", ramp[0]
    if override is not None:
        phase = override.phase or phase
        percentage = override.percentage if override.percentage is not None else percentage
        if override.ramp_s > 0 and override.percentage is None:
            percentage = 0.0  # a landed ramp ends at its target, not back at the YAML's
    return phase, percentage


def next_phase(phase: str) -> str | None:
    index = PHASES.index(phase)
    return PHASES[index + 1] if index + 1 < len(PHASES) else None


def rolled_back(stored: Stored) -> bool:
    return stored.override is not None and stored.override.action == "rollback"


def with_override(stored: Stored, override: Override | None) -> Stored:
    return replace(stored, override=override)
