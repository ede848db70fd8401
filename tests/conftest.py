"""Shared harness: real aiohttp backends on 127.0.0.1 and the real proxy in front of them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import Proxy, build, start, stop
from proxy.config.loading import load_config
from proxy.config.model import Config

ROOT = Path(__file__).resolve().parent.parent
EXE = str(ROOT / ".venv" / "bin" / "rollout-proxy")
TOKEN = "test-token-0123456789"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Backend:
    """A fake agent backend that records every request it got."""

    name: str
    tokens: int = 100
    handler: Handler | None = None
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        self.arrived.set()
        if self.handler is not None:
            return await self.handler(request)
        return web.json_response(
            {"backend": self.name, "success": True, "usage": {"total_tokens": self.tokens}},
            headers={"X-Tokens-Used": str(self.tokens)})

    async def wait_for(self, count: int, within: float = 5.0) -> None:
        """Wait until `count` requests arrived (an event, never a sleep)."""
        async with asyncio.timeout(within):
            while len(self.seen) < count:
                self.arrived.clear()
                await self.arrived.wait()


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handle_signals=False)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
async def backends() -> AsyncIterator[dict[str, Backend]]:
    made = {"legacy": Backend("legacy", 12000), "next_gen": Backend("next_gen", 1200)}
    for backend in made.values():
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{tail:.*}", backend.handle)
        backend.runner, backend.url = await serve_app(app)
    yield made
    for backend in made.values():
        assert backend.runner is not None
        await backend.runner.cleanup()


START = datetime(2030, 1, 1, tzinfo=UTC)


class WallClock:
    """The injected `clock`: a timezone-aware datetime the test moves by hand."""

    def __init__(self, start: datetime = START) -> None:
        self.start = self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, hours: float) -> None:
        self.now += timedelta(hours=hours)

    def at(self, seconds: float) -> None:
        self.now = self.start + timedelta(seconds=seconds)


class Monotonic:
    """The injected `monotonic` clock: seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


async def parked(seconds: float) -> None:
    """The injected `sleep`: the control loop never wakes on its own; tests call tick()."""
    await asyncio.Event().wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dead_url() -> str:
    """A URL where nothing listens: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_merge(merged[key], value) if both else value
    return merged


def config_dict(legacy: str, next_gen: str, **sections: Any) -> dict[str, Any]:
    """A minimal valid config on port 0 (the OS picks), merged with `sections`."""
    base: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token_env": "ROLLOUT_TEST_TOKEN"},
        "backends": {"legacy": {"url": legacy, "timeout_s": 5},
                     "next_gen": {"url": next_gen, "timeout_s": 5}},
        "rollout": {"phase": "legacy", "percentage": 0, "salt": "test"},
        "guards": {"min_requests": 1_000_000},
        "telemetry": {"trace_file": "traces/comparisons.jsonl"},
    }
    return deep_merge(base, sections)


def write_config(directory: Path, data: dict[str, Any]) -> Path:
    path = directory / "routing.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class Running:
    proxy: Proxy
    config: Config
    path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.ports['proxy']}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.proxy.ports['admin']}"

    @property
    def registry(self) -> CollectorRegistry:
        return self.proxy.runtime.metrics.registry

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def mirrors_settled(self, within: float = 10.0) -> None:
        """Every mirror so far has ended, and was compared if its primary had answered. A
        mirror holds its in-flight slot until then, whether it was sent on an idle
        connection or as a task (Shadow.drained); TimeoutError past `within`."""
        shadow = self.proxy.shadow
        async with asyncio.timeout(within):
            await shadow.drained.wait()
        assert len(shadow.tasks) == 0


@contextlib.asynccontextmanager
async def running(tmp_path: Path, data: dict[str, Any], *,
                  token: str | None = TOKEN, **clocks: Any) -> AsyncIterator[Running]:
    """The real proxy, in this process, in front of the given backends."""
    path = write_config(tmp_path, data)
    config = load_config(path)
    proxy = build(config, registry=CollectorRegistry(), token=lambda: token, **clocks)
    await start(proxy)
    try:
        yield Running(proxy, config, path)
    finally:
        if proxy.runners:
            await stop(proxy)


def metrics_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@dataclass
class Process:
    """`rollout-proxy serve` as a real process (for signals and restarts)."""

    proc: subprocess.Popen[bytes]
    path: Path
    data: dict[str, Any]
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.data['listen']}"

    @property
    def admin(self) -> str:
        return f"http://{self.data['admin']['listen']}"

    def terminate(self, timeout: float = 35) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def spawn_serve(tmp_path: Path, data: dict[str, Any], env: dict[str, str] | None = None
                ) -> Process:
    data = deep_merge(data, {"listen": f"127.0.0.1:{free_port()}",
                             "admin": {"listen": f"127.0.0.1:{free_port()}"}})
    path = write_config(tmp_path, data)
    log = tmp_path / "serve.log"
    full_env = {**os.environ, "ROLLOUT_TEST_TOKEN": TOKEN, **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen([EXE, "serve", "--config", str(path)], stdout=out,
                                stderr=subprocess.STDOUT, env=full_env, cwd=tmp_path)
    return Process(proc, path, data, log)


async def wait_ready(admin_url: str, within: float = 10.0) -> None:
    """Poll /readyz until 200, within a deadline (the process gives no other signal)."""
    import aiohttp

    async with aiohttp.ClientSession() as http, asyncio.timeout(within):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{admin_url}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)


@pytest.fixture
def serve_processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


def python() -> str:
    return sys.executable
