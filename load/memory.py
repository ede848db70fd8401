"""Resident memory of processes and their children, read from /proc."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
MAX_SAMPLES = 100_000
FAMILY_EVERY = 16


def rss_kb(pid: int) -> int:
    """VmRSS of one process in kB; 0 when it is gone or unreadable."""
    try:
        status = (PROC / str(pid) / "status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (stat(5) field 3 on), None when gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    return stat[stat.rfind(")") + 2 :].split()


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (the kernel here has no /proc/PID/task/*/children)."""
    parents = {}
    for entry in os.scandir(PROC):
        if entry.name.isdigit() and (fields := _stat(entry.name)) is not None:
            parents[int(entry.name)] = int(fields[1])
    return parents


def family(pids: Iterable[int]) -> set[int]:
    """The given processes and all their descendants."""
    roots = set(pids)
    parents = _parents()
    found = set(roots)
    for _ in range(32):  # depth bound: a process tree is never this deep here
        more = {pid for pid, ppid in parents.items() if ppid in found and pid not in found}
        if not more:
            break
        found |= more
    return found


def cpu_s(pids: Iterable[int]) -> float:
    """CPU seconds (user and system) the given processes and their descendants have used."""
    total = 0
    for pid in family(pids):
        if (fields := _stat(pid)) is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (stat(5) fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def total_rss_kb(pids: Iterable[int]) -> int:
    return sum(rss_kb(pid) for pid in family(pids))


@dataclass(slots=True)
class RssSampler:
    """Samples the summed RSS of `pids` (children included) every `interval_s`."""

    pids: tuple[int, ...]
    interval_s: float = 0.25
    samples: list[tuple[float, int]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _family: set[int] = field(default_factory=set)

    @property
    def peak_mb(self) -> float | None:
        if not self.samples:
            return None
        return max(kb for _, kb in self.samples) / 1024

    def sample(self) -> None:
        if len(self.samples) >= MAX_SAMPLES:
            return
        # Scanning /proc for children costs more than reading a few status files: do it rarely.
        if len(self.samples) % FAMILY_EVERY == 0:
            self._family = family(self.pids)
        self.samples.append((time.monotonic(), sum(rss_kb(pid) for pid in self._family)))

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    async def __aenter__(self) -> RssSampler:
        if self.pids:
            self._task = asyncio.create_task(self._loop(), name="rss-sampler")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.sample()
