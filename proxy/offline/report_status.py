"""What a proxy's `/admin/status` adds to `report`: the plan's user targets and the budget's use.

Rules:
1. Pure and defensive: a section that is missing, null or of the wrong type is no figure, its
   target shows `no data`, and reading a status document never raises.
2. Support tickets are summed over the kept days before dividing (complaints over distinct
   users, per backend), so a quiet day weighs less than a busy one.
3. Adoption is the newest day's, by its `day` (the proxy lists days newest first anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from proxy.offline.report_stats import Summary, Target, TargetUnit

SATISFACTION: Final = 4.0  # next_gen's mean score, out of 5
MIGRATION: Final = 0.95
TICKETS: Final = 2.0  # next_gen's ticket rate over legacy's
ADOPTION: Final = 0.80


@dataclass(frozen=True, slots=True)
class Day:
    """One kept UTC day of `status.users`."""

    day: str
    legacy: int | None  # distinct users
    next_gen: int | None
    adoption: float | None  # 0..1
    complaints_legacy: int | None
    complaints_next_gen: int | None


@dataclass(frozen=True, slots=True)
class Budget:
    """`status.shadow.budget`: the mirrors' spend cap per sliding hour, and its use."""

    tokens_per_hour: float | None
    tokens_used: float | None
    usd_per_hour: float | None
    usd_used: float | None

    @property
    def capped(self) -> bool:
        return self.tokens_per_hour is not None or self.usd_per_hour is not None


@dataclass(frozen=True, slots=True)
class StatusFigures:
    source: str  # the URL or file read
    phase: str | None
    percentage: float | None
    config_version: str | None
    targets: tuple[Target, ...]
    budget: Budget | None  # None: the status has no budget (no shadow mirror)
    days: tuple[Day, ...]  # newest first

    @property
    def failed(self) -> bool:
        return any(t.verdict == "FAIL" for t in self.targets)


def all_targets(summary: Summary, status: StatusFigures | None) -> tuple[Target, ...]:
    return summary.overall.targets + (status.targets if status is not None else ())


def failed(summary: Summary, status: StatusFigures | None) -> bool:
    return any(t.verdict == "FAIL" for t in all_targets(summary, status))


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def _count(value: object) -> int | None:
    number = _number(value)
    return None if number is None else round(number)


def _section(document: object, key: str) -> dict[str, Any]:
    value = document.get(key) if isinstance(document, dict) else None
    return value if isinstance(value, dict) else {}


def read_status(document: object, source: str) -> StatusFigures:
    """The figures of a /admin/status JSON document (any JSON value: a wrong one has none)."""
    top = document if isinstance(document, dict) else {}
    feedback = _section(top, "feedback")
    days = _days(top.get("users"))
    phase, version = top.get("phase"), top.get("config_version")
    return StatusFigures(
        source=source,
        phase=phase if isinstance(phase, str) else None,
        percentage=_number(top.get("percentage")),
        config_version=version if isinstance(version, str) else None,
        targets=(_satisfaction(_section(feedback, "next_gen")),
                 _migration(_section(feedback, "migration")),
                 _tickets(days), _adoption(days)),
        budget=_budget(_section(top, "shadow").get("budget")),
        days=days,
    )


def _days(rows: object) -> tuple[Day, ...]:
    if not isinstance(rows, list):
        return ()
    days = []
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("day"), str):
            continue
        adoption = _number(row.get("adoption"))
        complaints = _section(_section(row, "tickets"), "complaints")
        days.append(Day(row["day"], _count(row.get("legacy")), _count(row.get("next_gen")),
                        None if adoption is None else min(adoption, 1.0),
                        _count(complaints.get("legacy")), _count(complaints.get("next_gen"))))
    return tuple(sorted(days, key=lambda d: d.day, reverse=True))


def _budget(value: object) -> Budget | None:
    if not isinstance(value, dict):
        return None
    return Budget(*(_number(value.get(k)) for k in ("tokens_per_hour", "tokens_used",
                                                    "usd_per_hour", "usd_used")))


def _target(key: str, name: str, measured: float | None, threshold: float, above: bool,
            unit: TargetUnit, count: int, counts: str, basis: str) -> Target:
    return Target(key, name, measured, threshold, above, unit, count, basis, counts, "status")


def _satisfaction(next_gen: dict[str, Any]) -> Target:
    count = _count(next_gen.get("count")) or 0
    mean = _number(next_gen.get("mean_score"))
    return _target("user_satisfaction", "user satisfaction (next_gen)", mean, SATISFACTION,
                   True, "score", count, "feedback scores",
                   "next_gen's mean feedback score, 1 to 5 (status.feedback.next_gen)")


def _migration(migration: dict[str, Any]) -> Target:
    success, failure = _count(migration.get("success")) or 0, _count(migration.get("failure")) or 0
    rate = _number(migration.get("success_rate"))
    if rate is None and success + failure:
        rate = success / (success + failure)
    return _target("migration_success", "migration success", rate, MIGRATION, True, "%",
                   success + failure, "migration reports",
                   "reports of a successful migration / all migration reports "
                   "(status.feedback.migration)")


def _tickets(days: tuple[Day, ...]) -> Target:
    counted = [d for d in days if d.complaints_legacy is not None
               and d.complaints_next_gen is not None]
    users = [sum(d.legacy or 0 for d in counted), sum(d.next_gen or 0 for d in counted)]
    complaints = [sum(d.complaints_legacy or 0 for d in counted),
                  sum(d.complaints_next_gen or 0 for d in counted)]
    basis = "next_gen's complaints per distinct user / legacy's, summed over the kept days"
    if not (users[0] and users[1]):
        return _target("support_tickets", "support tickets vs legacy", None, TICKETS, False,
                       "x", sum(users), "user-days", basis + " (status.users)")
    legacy, next_gen = complaints[0] / users[0], complaints[1] / users[1]
    # No next_gen ticket passes whatever legacy's rate; some against a ticket-free legacy fail.
    ratio = 0.0 if next_gen == 0 else next_gen / legacy if legacy else math.inf
    basis = (f"next_gen's complaints per distinct user / legacy's, summed over {len(counted)} "
             f"kept days: next_gen {complaints[1]:,} / {users[1]:,}, legacy {complaints[0]:,} "
             f"/ {users[0]:,}")
    return _target("support_tickets", "support tickets vs legacy", ratio, TICKETS, False, "x",
                   sum(users), "user-days", basis)


def _adoption(days: tuple[Day, ...]) -> Target:
    latest = days[0] if days else None
    if latest is None or latest.adoption is None:
        return _target("adoption", "adoption (latest day)", None, ADOPTION, True, "%", 0,
                       "users",
                       "next_gen's share of the newest day's distinct users (status.users)")
    users = (latest.legacy or 0) + (latest.next_gen or 0)
    return _target("adoption", "adoption (latest day)", latest.adoption, ADOPTION, True, "%",
                   users, "users",
                   f"next_gen's share of the distinct users on {latest.day} (UTC), the newest "
                   f"of {len(days)} kept days; users: legacy's + next_gen's that day")
