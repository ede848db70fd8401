"""The figures a benchmark is judged by: a value, its goal, and whether it met it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

INFO = "(info)"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    value: float | None
    unit: str
    goal: str
    passed: bool | None  # None: no figures to judge by

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def at_least(name: str, value: float | None, limit: float, unit: str = "") -> Check:
    passed = None if value is None else value >= limit
    return Check(name, value, unit, f"≥ {limit:g}{unit}", passed)


def at_most(name: str, value: float | None, limit: float, unit: str = "") -> Check:
    passed = None if value is None else value <= limit
    return Check(name, value, unit, f"≤ {limit:g}{unit}", passed)


def info(name: str, value: float | None, unit: str = "") -> Check:
    """A figure reported without a goal."""
    return Check(name, value, unit, INFO, None)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def verdict(check: Check) -> str:
    if check.goal == INFO:
        return ""
    return {True: "PASS", False: "FAIL", None: "no data"}[check.passed]


def format_checks(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=10)
    rows = []
    for c in checks:
        value = "n/a" if c.value is None else f"{c.value:.3f}{c.unit}"
        rows.append(f"{c.name:<{width}}  {value:>14}  target {c.goal:<12} {verdict(c)}")
    return "\n".join(rows)
