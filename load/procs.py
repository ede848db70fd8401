"""Child processes of the benchmark: started pinned to a core, waited for, stopped for sure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp

PYTHON = sys.executable
# Taken at import: the benchmark later pins itself to one core, which its children inherit.
ALLOWED_CPUS = tuple(sorted(os.sched_getaffinity(0)))
# `load` is not an installed package: children find it through PYTHONPATH, wherever they run.
REPO_ROOT = str(Path(__file__).resolve().parent.parent)


class StartError(RuntimeError):
    """A child did not come up; the message ends with the tail of its log."""


@dataclass(slots=True)
class Child:
    name: str
    process: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def cores() -> int:
    return len(ALLOWED_CPUS)


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    """argv run on one core with taskset, when there is a core to spare and taskset exists."""
    if cpu is None or cores() < 2 or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", str(cpu), *argv]


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise the soft open-files limit towards `wanted` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _open_log(path: Path) -> IO[bytes]:
    return path.open("wb")


async def start(name: str, argv: list[str], logdir: Path, *, cpu: int | None = None,
                env: dict[str, str] | None = None) -> Child:
    log = logdir / f"{name}.log"
    with _open_log(log) as out:
        process = await asyncio.create_subprocess_exec(
            *pinned(argv, cpu), stdin=asyncio.subprocess.DEVNULL, stdout=out,
            stderr=asyncio.subprocess.STDOUT, env=child_env(env), start_new_session=True)
    return Child(name, process, log)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    own = (extra or {}).get("PYTHONPATH", "")  # first: a child run from another checkout
    paths = [*filter(None, own.split(os.pathsep)), REPO_ROOT,
             *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _refuse_if_exited(child: Child) -> None:
    if child.process.returncode is not None:
        raise StartError(f"{child.name} exited with {child.process.returncode}:\n"
                         f"{child.log_tail()}")


async def _port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def wait_port(child: Child, port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _refuse_if_exited(child)
        if await _port_open(port):
            return
        await asyncio.sleep(0.05)
    raise StartError(f"{child.name}: port {port} not open after {timeout_s} s\n{child.log_tail()}")


async def _status(session: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


async def wait_http(child: Child, url: str, timeout_s: float = 30.0) -> None:
    """Poll `url` until it answers 200, the child exits, or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            _refuse_if_exited(child)
            if await _status(session, url) == 200:
                return
            await asyncio.sleep(0.1)
    raise StartError(f"{child.name}: {url} not 200 after {timeout_s} s\n{child.log_tail()}")


async def stop(child: Child, timeout_s: float = 15.0) -> int:
    """SIGTERM, wait up to timeout_s, then SIGKILL its whole process group."""
    if child.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(child.process.wait(), timeout_s)
        except TimeoutError:
            print(f"{child.name} ignored SIGTERM for {timeout_s} s: killed", file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    return await child.process.wait()


class Children:
    """Every child started in a benchmark, stopped in reverse order on exit."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._children: list[Child] = []

    async def start(self, name: str, argv: list[str], *, cpu: int | None = None,
                    env: dict[str, str] | None = None) -> Child:
        child = await start(name, argv, self.logdir, cpu=cpu, env=env)
        self._children.append(child)
        return child

    async def stop(self, child: Child) -> int:
        if child in self._children:
            self._children.remove(child)
        return await stop(child)

    async def __aenter__(self) -> Children:
        return self

    async def __aexit__(self, *exc: object) -> None:
        while self._children:
            await stop(self._children.pop())
