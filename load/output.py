"""What every benchmark prints around its figures: setup, placement, what was skipped."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

from load import procs
from load.measure import Load
from load.targets import LOAD_CPU, PROXY_CPU, Skipped


@dataclass(frozen=True, slots=True)
class Report:
    text: str
    data: dict[str, Any]


def placement() -> str:
    if procs.cores() < 2 or shutil.which("taskset") is None:
        return "not pinned (needs 2 cores and taskset)"
    return (f"proxies on core {PROXY_CPU} (taskset -c {PROXY_CPU}); load generator, backends "
            f"and this script on core {LOAD_CPU} (taskset -c {LOAD_CPU})")


def tool_text(load: Load, use_wrk: bool) -> str:
    users = ", X-User-Id over 10,000 ids" if load.users else ""
    if use_wrk:
        return f"wrk -t1 -c{load.connections} -d{load.duration_s:g}s{users}"
    return f"load.loadgen (aiohttp) -c {load.connections} -d {load.duration_s:g}{users}"


def header(title: str, lines: list[str]) -> str:
    return "\n".join([title, f"  placement: {placement()}", *(f"  {line}" for line in lines)])


def _shortened(reason: str, tail: int = 5) -> str:
    """The first line (what failed) and the last few (why, at the end of a traceback)."""
    lines = [line[:200] for line in reason.strip().splitlines()]
    if len(lines) <= tail + 1:
        return "\n    ".join(lines)
    return "\n    ".join([lines[0], "...", *lines[-tail:]])


def skipped_text(skipped: Skipped) -> list[str]:
    if not skipped.reasons:
        return []
    return ["not measured:\n" + "\n".join(
        f"  {name}: {_shortened(reason)}" for name, reason in skipped.reasons.items())]
