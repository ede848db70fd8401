"""Several replicas sharing state through a real redis-server."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy.datapath.decide import bucket
from tests.conftest import (
    TOKEN,
    Backend,
    Process,
    config_dict,
    free_port,
    spawn_serve,
    wait_ready,
)

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (make test installs it)")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Redis:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ping = subprocess.run(["redis-cli", "-p", str(self.port), "ping"],
                                  capture_output=True, timeout=5, check=False)
            if ping.stdout.strip() == b"PONG":
                return
        raise TimeoutError("redis-server did not answer PING within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


async def status(http: aiohttp.ClientSession, replica: Process) -> dict[str, object]:
    async with http.get(f"{replica.admin}/admin/status") as response:
        result: dict[str, object] = await response.json()
        return result


async def replicas(tmp_path: Path, backends: dict[str, Backend], redis: Redis,
                   started: list[Process], count: int = 2) -> list[Process]:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "progressive", "percentage": 50},
                       shadow={"sample": 0.0},
                       state={"backend": "redis", "redis_url": redis.url})
    made = []
    for index in range(count):
        directory = tmp_path / f"replica-{index}"
        directory.mkdir(exist_ok=True)
        made.append(spawn_serve(directory, data))
    started.extend(made)
    for replica in made:
        await wait_ready(replica.admin)
    return made


async def eventually(check: Callable[[], Awaitable[bool]], within: float) -> float:
    """Seconds until `check()` holds; another process gives no event, so poll to a deadline."""
    start = time.monotonic()
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - no event crosses the process boundary
            await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_rollback_through_one_replica_reaches_the_other_within_a_second(
        tmp_path: Path, backends: dict[str, Backend], redis: Redis,
        serve_processes: list[Process]) -> None:
    first, second = await replicas(tmp_path, backends, redis, serve_processes)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{first.admin}/admin/rollback", headers=AUTH,
                             json={"reason": "replica test"}) as response:
            assert response.status == 200

        async def second_rolled_back() -> bool:
            return (await status(http, second))["phase"] == "legacy"

        assert await eventually(second_rolled_back, within=1.0) < 1.0
        user = next(u for u in (f"user-{n}" for n in range(1000)) if bucket("test", u) < 5000)
        async with http.get(f"{second.url}/v1/x", headers={"X-User-Id": user}) as response:
            assert response.headers["X-Rollout-Backend"] == "legacy"


async def test_redis_down_changes_nothing_for_users_and_replicas_catch_up(
        tmp_path: Path, backends: dict[str, Backend], redis: Redis,
        serve_processes: list[Process]) -> None:
    first, second = await replicas(tmp_path, backends, redis, serve_processes)
    redis.stop()
    async with aiohttp.ClientSession() as http:
        for replica in (first, second):
            async with http.get(f"{replica.url}/v1/x", headers={"X-User-Id": "u"}) as response:
                assert response.status == 200

        async def says_unreachable() -> bool:
            async with http.get(f"{first.admin}/readyz") as response:
                return response.status == 200 and "unreachable" in (await response.text())

        await eventually(says_unreachable, within=5)
        async with http.post(f"{first.admin}/admin/percentage", headers=AUTH,
                             json={"percentage": 7}) as response:
            assert response.status == 200  # taken locally, written when Redis returns
        redis.start()

        async def second_caught_up() -> bool:
            return (await status(http, second))["percentage"] == 7

        await eventually(second_caught_up, within=6)


async def test_state_survives_a_restart_of_every_replica(
        tmp_path: Path, backends: dict[str, Backend], redis: Redis,
        serve_processes: list[Process]) -> None:
    first, second = await replicas(tmp_path, backends, redis, serve_processes)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{second.admin}/admin/rollback", headers=AUTH,
                             json={"reason": "survives"}) as response:
            assert response.status == 200
        assert first.terminate() == 0
        assert second.terminate() == 0
        again = await replicas(tmp_path, backends, redis, serve_processes, count=1)
        shown = await status(http, again[0])
        assert shown["phase"] == "legacy"
        assert shown["reason"] == "survives"


async def test_two_replicas_assign_ten_thousand_users_identically(
        tmp_path: Path, backends: dict[str, Backend], redis: Redis,
        serve_processes: list[Process]) -> None:
    first, second = await replicas(tmp_path, backends, redis, serve_processes)
    users = [f"user-{n}" for n in range(10_000)]
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def served(replica: Process, user: str) -> str:
            async with http.get(f"{replica.url}/v1/x", headers={"X-User-Id": user}) as answer:
                return answer.headers["X-Rollout-Backend"]

        one, two = await asyncio.gather(asyncio.gather(*(served(first, u) for u in users)),
                                        asyncio.gather(*(served(second, u) for u in users)))
    assert one == two
    assert 4500 < one.count("next_gen") < 5500
