"""Distinct users per backend per UTC day (HyperLogLog sketches), adoption, support-ticket rates.

Rules:
1. A day is a UTC calendar day. Only the newest `days` calendar days are kept, counted back from
   the newest day seen (by add() or refresh()); older days are dropped.
2. Adoption is next_gen's distinct users over the distinct users of both backends: the union of
   the two sketches, never the sum (a user seen on both counts once); 4 places, 0.0 with none.
3. add() is the hot path: no I/O, nothing allocated beyond the sketch update. Today's sketches
   (or buffers) are cached with the day's bounds, so a call is one range check and one update.
   `now` is timezone-aware.
4. Sketches merge by union, which is idempotent: merging a persisted copy twice, or one that
   already holds our own users, counts nobody twice (the estimate may move within its error: a
   merged sketch is read with the composite estimator instead of the streaming one).
5. With Redis, every replica PFADDs into the same keys, `rollout:users:{day}:{backend}`, so the
   counts are shared. add() only buffers, in a bounded set per (day, backend): ids past the
   bound are dropped and counted. flush() sends the buffers (kept for the next try while Redis
   is down); refresh() reads the counts that the synchronous days() and today() return.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol, TypedDict

import redis.asyncio as aioredis
from datasketches import hll_sketch, hll_union, tgt_hll_type
from redis.exceptions import RedisError

from proxy.config.model import BACKENDS

log = logging.getLogger("rollout_proxy")
# 2^14 registers: a relative standard error of 0.8 %, so 2 % is 2.5 sigma; Redis uses as many.
LG_K = 14
HLL_TYPE = tgt_hll_type.HLL_8
KEY_PREFIX = "rollout:users"
MAX_PENDING = 50_000  # ids buffered per (day, backend) until the next flush
ONE_DAY = timedelta(days=1)
NEVER = datetime.min.replace(tzinfo=UTC)  # an empty range (NEVER <= now < NEVER): re-point


class DayCount(TypedDict):
    day: str  # e.g. "2026-11-25", UTC
    legacy: int
    next_gen: int
    adoption: float


class DistinctUsers(Protocol):
    """The two implementations: sketches in this process, or HyperLogLogs in Redis."""

    def add(self, backend: str, user: str, now: datetime) -> None: ...

    def days(self) -> list[DayCount]: ...

    def today(self, backend: str) -> int: ...

    async def flush(self) -> None: ...

    async def refresh(self, now: datetime) -> None: ...


def day_of(now: datetime) -> date:
    return now.astimezone(UTC).date()


def bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + ONE_DAY


def day_count(day: date, legacy: float, next_gen: float, both: float) -> DayCount:
    both = max(both, legacy, next_gen)  # estimator noise must never push adoption past 1
    adoption = round(next_gen / both, 4) if both else 0.0
    return {"day": day.isoformat(), "legacy": round(legacy), "next_gen": round(next_gen),
            "adoption": adoption}


def empty_sketch(lg_k: int) -> Any:
    return hll_sketch(lg_k, HLL_TYPE)


def decode(day: object, backend: object, text: object) -> tuple[date, Any] | None:
    """One persisted sketch, or None when it is unreadable."""
    if not isinstance(day, str) or backend not in BACKENDS or not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
        return date.fromisoformat(day), hll_sketch.deserialize(raw)
    except (ValueError, IndexError, RuntimeError):
        return None


class ActiveUsers:
    """Sketches in this process; the caller persists them with to_json() and merge()."""

    def __init__(self, days: int, *, lg_k: int = LG_K) -> None:
        self.keep, self.lg_k = days, lg_k
        self.sketches: dict[date, dict[str, Any]] = {}
        self.current: date | None = None  # the newest day seen
        self.settled: dict[date, DayCount] = {}  # counts of days add() is not pointed at
        self._start = self._end = NEVER
        self._hot: dict[str, Any] = {}
        self._hot_day: date | None = None

    @classmethod
    def from_json(cls, data: object, days: int) -> ActiveUsers:
        users = cls(days)
        users.merge(data)
        return users

    def add(self, backend: str, user: str, now: datetime) -> None:
        if not self._start <= now < self._end and not self._point(now):
            return
        self._hot[backend].update(user)  # an empty id is ignored by the sketch itself

    def _point(self, now: datetime) -> bool:
        """Point the cache at `now`'s day; False when that day is too old to keep."""
        day = day_of(now)
        self._see(day)
        if not self._kept(day):
            return False
        self.settled.pop(day, None)
        self._hot, self._hot_day = self._day(day), day
        self._start, self._end = bounds(day)
        return True

    def _kept(self, day: date) -> bool:
        return self.current is None or (self.current - day).days < self.keep

    def _see(self, day: date) -> None:
        if self.current is not None and day <= self.current:
            return
        self.current = day
        for old in [d for d in self.sketches if not self._kept(d)]:
            del self.sketches[old]
            self.settled.pop(old, None)
            if old == self._hot_day:
                self._start, self._end, self._hot_day = NEVER, NEVER, None

    def _day(self, day: date) -> dict[str, Any]:
        sketches = self.sketches.get(day)
        if sketches is None:
            sketches = self.sketches[day] = {b: empty_sketch(self.lg_k) for b in BACKENDS}
        return sketches

    async def flush(self) -> None:
        return None

    async def refresh(self, now: datetime) -> None:
        self._see(day_of(now))

    def days(self) -> list[DayCount]:
        rows = (self._count(day) for day in sorted(self.sketches, reverse=True))
        return [row.copy() for row in rows if row["legacy"] or row["next_gen"]]

    def _count(self, day: date) -> DayCount:
        cached = self.settled.get(day)
        if cached is not None:
            return cached
        legacy, next_gen = (self.sketches[day][b] for b in BACKENDS)
        union = hll_union(self.lg_k)
        union.update(legacy)
        union.update(next_gen)
        counted = day_count(day, float(legacy.get_estimate()), float(next_gen.get_estimate()),
                            float(union.get_estimate()))
        if day != self._hot_day:
            self.settled[day] = counted  # only a merge or a late add() changes it now
        return counted

    def today(self, backend: str) -> int:
        sketches = self.sketches.get(self.current) if self.current is not None else None
        return round(sketches[backend].get_estimate()) if sketches is not None else 0

    def to_json(self) -> dict[str, dict[str, str]]:
        return {day.isoformat(): {backend: base64.b64encode(sketch.serialize_compact()).decode()
                                  for backend, sketch in sketches.items()
                                  if not sketch.is_empty()}
                for day, sketches in sorted(self.sketches.items())}

    def merge(self, data: object) -> int:
        """Union a persisted copy (a to_json()) into these sketches; returns entries skipped."""
        skipped = 0
        for day, entries in (data.items() if isinstance(data, Mapping) else ()):
            if not isinstance(entries, Mapping):
                skipped += 1
                continue
            for backend, text in entries.items():
                decoded = decode(day, backend, text)
                if decoded is None:
                    skipped += 1
                    continue
                self._union(*decoded, backend)
        if skipped:
            log.warning(json.dumps({"event": "active_users_unreadable", "skipped": skipped}))
        return skipped

    def _union(self, day: date, sketch: Any, backend: str) -> None:
        self._see(day)
        if not self._kept(day):
            return
        sketches = self._day(day)  # the cached _hot is this same dict: add() sees the union
        union = hll_union(self.lg_k)
        union.update(sketches[backend])
        union.update(sketch)
        sketches[backend] = union.get_result(HLL_TYPE)
        self.settled.pop(day, None)


class RedisActiveUsers:
    """Redis HyperLogLogs that every replica shares; flush() and refresh() do the I/O."""

    def __init__(self, client: aioredis.Redis, days: int, *, max_pending: int = MAX_PENDING,
                 prefix: str = KEY_PREFIX) -> None:
        self.client, self.keep, self.max_pending, self.prefix = client, days, max_pending, prefix
        self.pending: dict[tuple[date, str], set[str]] = {}
        self.dropped = 0  # ids not counted: their buffer was full
        self.up = True
        self.current: date | None = None
        self.counts: list[DayCount] = []
        self.today_counts: dict[str, int] = {}
        self.settled: dict[date, DayCount] = {}  # days before yesterday, read once a day
        self._refreshed: date | None = None
        self._start = self._end = NEVER
        self._hot: dict[str, set[str]] = {}

    def key(self, day: date, backend: str) -> str:
        return f"{self.prefix}:{day.isoformat()}:{backend}"

    def add(self, backend: str, user: str, now: datetime) -> None:
        if not user or (not self._start <= now < self._end and not self._point(now)):
            return
        ids = self._hot[backend]
        if len(ids) < self.max_pending:
            ids.add(user)
        elif user not in ids:
            self.dropped += 1

    def _point(self, now: datetime) -> bool:
        day = day_of(now)
        if self.current is not None and (self.current - day).days >= self.keep:
            return False
        self.current = max(day, self.current or day)
        self._hot = {b: self.pending.setdefault((day, b), set()) for b in BACKENDS}
        self._start, self._end = bounds(day)
        return True

    async def flush(self) -> None:
        batch = {key: ids for key, ids in self.pending.items() if ids}
        self.pending = {}
        self._start = self._end = NEVER  # the next add() buffers into fresh sets
        if not batch:
            return
        ttl = int(timedelta(days=self.keep + 1).total_seconds())
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for (day, backend), ids in batch.items():
                    pipe.pfadd(self.key(day, backend), *ids)
                    pipe.expire(self.key(day, backend), ttl)
                await pipe.execute()
        except (RedisError, OSError):
            self._mark(False)
            self._restore(batch)
            return
        self._mark(True)

    def _restore(self, batch: dict[tuple[date, str], set[str]]) -> None:
        """Keep what Redis did not take for the next flush, within the bound."""
        for (day, backend), ids in batch.items():
            if self.current is not None and (self.current - day).days >= self.keep:
                continue
            ids |= self.pending.get((day, backend), set())
            while len(ids) > self.max_pending:
                ids.pop()
                self.dropped += 1
            self.pending[(day, backend)] = ids
        self._start = self._end = NEVER

    async def refresh(self, now: datetime) -> None:
        today = day_of(now)
        if today != self._refreshed:
            self.settled.clear()  # a new day: re-read every day once, late flushes included
        self._refreshed = today
        self.current = max(today, self.current or today)
        window = [today - timedelta(days=back) for back in range(self.keep)]
        wanted = [day for day in window if day not in self.settled]
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for day in wanted:
                    legacy, next_gen = (self.key(day, b) for b in BACKENDS)
                    pipe.pfcount(legacy)
                    pipe.pfcount(next_gen)
                    pipe.pfcount(legacy, next_gen)  # the union's count
                replies = await pipe.execute()
        except (RedisError, OSError):
            self._mark(False)
            return
        self._mark(True)
        fresh = {day: day_count(day, *(float(n) for n in replies[3 * i:3 * i + 3]))
                 for i, day in enumerate(wanted)}
        self.settled = {day: counted for day, counted in {**self.settled, **fresh}.items()
                        if 2 <= (today - day).days < self.keep}
        rows = [fresh.get(day) or self.settled[day] for day in window]
        self.counts = [row for row in rows if row["legacy"] or row["next_gen"]]
        self.today_counts = {"legacy": rows[0]["legacy"], "next_gen": rows[0]["next_gen"]}

    def days(self) -> list[DayCount]:
        return [row.copy() for row in self.counts]

    def today(self, backend: str) -> int:
        return self.today_counts.get(backend, 0)

    def _mark(self, up: bool) -> None:
        if up != self.up:
            log.warning(json.dumps({"event": "active_users_store", "backend": "redis", "up": up}))
        self.up = up


def ticket_rates(days: Sequence[Mapping[str, Any]],
                 complaints: Iterable[tuple[float, str]]) -> list[dict[str, Any]]:
    """Complaints per distinct user, per backend per UTC day (the rows of days()).

    Each row: {"day", "complaints": {backend: n}, backend: rate or None when it had no users,
    "baseline": legacy's rate, "ratio": next_gen's rate over the baseline, None when either is
    missing or the baseline is 0}.
    """
    counted: dict[tuple[str, str], int] = {}
    for at, backend in complaints:
        key = (datetime.fromtimestamp(at, UTC).date().isoformat(), backend)
        counted[key] = counted.get(key, 0) + 1
    return [day_rates(str(row["day"]), row, counted) for row in days]


def day_rates(day: str, users: Mapping[str, Any],
              counted: Mapping[tuple[str, str], int]) -> dict[str, Any]:
    complaints = {b: counted.get((day, b), 0) for b in BACKENDS}
    rates = {b: complaints[b] / users[b] if users.get(b) else None for b in BACKENDS}
    baseline, next_gen = rates["legacy"], rates["next_gen"]
    ratio = next_gen / baseline if baseline and next_gen is not None else None
    return {"day": day, "complaints": complaints,
            **{b: None if rate is None else round(rate, 6) for b, rate in rates.items()},
            "baseline": None if baseline is None else round(baseline, 6),
            "ratio": None if ratio is None else round(ratio, 4)}
