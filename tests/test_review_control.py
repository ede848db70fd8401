"""Review reproductions: each xfail test pins a confirmed bug in the control plane."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from proxy.state.redis_store import RedisStore
from proxy.state.store import Override, Stored
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.observe import Measurement
from tests.conftest import (
    TOKEN,
    Backend,
    Monotonic,
    WallClock,
    config_dict,
    deep_merge,
    parked,
    running,
    write_config,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def at(hours: float) -> str:
    return (T0 + timedelta(hours=hours)).isoformat().replace("+00:00", "Z")











def error(status: int | None = 500) -> Measurement:
    return Measurement(status, 10.0, None, 0, None, False, None)


# Schedule and pause ----------------------------------------------------------------------------


async def test_second_pause_does_not_release_a_step_that_came_due_while_paused(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = WallClock()
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "progressive", "percentage": 10,
                                "schedule": [{"at": at(1), "percentage": 60}]},
                       shadow={"sample": 0.0})
    async with running(tmp_path, data, clock=clock, sleep=parked) as proxy:
        control, rt = proxy.proxy.control, proxy.proxy.runtime
        control.pause("ops")
        clock.advance(2)
        control.tick()
        assert (rt.plan.phase, rt.plan.percentage) == ("progressive", 10)
        control.pause("ops")  # pausing again (e.g. a retried CLI call) must change nothing
        control.tick()
        assert (rt.stored.paused, rt.plan.percentage) == (True, 10)
        # Any later edit of the YAML (here: a guard setting) re-counts the due steps.
        write_config(tmp_path, deep_merge(data, {"guards": {"window_s": 120}}))
        assert control.reload()
        assert rt.stored.paused
        assert rt.plan.percentage == 10  # bug: the held step is applied while paused: 60


# Guards ----------------------------------------------------------------------------------------


async def test_guard_tripped_in_legacy_phase_still_rolls_back_once_the_rollout_resumes(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    monotonic = Monotonic()
    base = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "progressive", "percentage": 50},
                       guards={"min_requests": 3, "error_rate": 0.1, "window_s": 60})
    legacy_yaml = deep_merge(base, {"rollout": {"phase": "legacy"}})
    async with running(tmp_path, legacy_yaml, monotonic=monotonic, sleep=parked) as proxy:
        control, rt = proxy.proxy.control, proxy.proxy.runtime
        for _ in range(5):
            rt.windows.add("next_gen", error())
        control.tick()  # phase legacy: nothing to roll back
        assert rt.plan.phase == "legacy"
        # The operator moves the YAML back to progressive; next_gen is still failing.
        write_config(tmp_path, base)
        assert control.reload()
        for _ in range(5):
            rt.windows.add("next_gen", error())
        control.tick()
        assert [v.state for v in control.verdicts if v.guard == "error_rate"] == ["tripped"]
        assert rt.plan.phase == "legacy"  # bug: stays progressive 50 % with the guard tripped


# Redis store -----------------------------------------------------------------------------------


class FakePipeline:
    def __init__(self, client: FakeRedis) -> None:
        self.client, self.ops = client, []  # type: ignore[var-annotated]

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    def set(self, key: str, value: str) -> None:
        self.ops.append((key, value))

    def publish(self, channel: str, value: str) -> None:
        return None

    async def execute(self) -> list[Any]:
        self.client.entered.set()
        await self.client.gate.wait()
        for key, value in self.ops:
            self.client.data[key] = value
        return [True, 0]


class FakeRedis:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.gate, self.entered = asyncio.Event(), asyncio.Event()

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)

    async def get(self, key: str) -> str | None:
        return self.data.get(key)

    async def aclose(self) -> None:
        return None


async def test_redis_change_saved_during_a_write_is_not_lost() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", Metrics(CollectorRegistry()))
    fake = FakeRedis()
    store.client = fake  # type: ignore[assignment]
    first = Stored(paused=True)
    second = Stored(paused=True, override=Override("rollback", "legacy", None, "guard",
                                                   "guard", "2030-01-01T00:00:00Z"))
    store.save(first)
    writing = asyncio.create_task(store.write())
    async with asyncio.timeout(2):
        await fake.entered.wait()
    store.save(second)  # e.g. a guard's rollback while the pause is being written
    fake.gate.set()
    async with asyncio.timeout(2):
        await writing
        await store.resync()  # the writer loop's next round
    assert store.poll() is None  # bug: the stale document comes back as "fresh"
    assert store.load() == second
    assert Stored.from_json(json.loads(fake.data["rollout:state"])) == second


async def test_reload_does_not_apply_a_step_held_by_a_tripped_guard(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock, monotonic = WallClock(), Monotonic()
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "progressive", "percentage": 10,
                                "schedule": [{"at": at(1), "percentage": 60}]},
                       shadow={"sample": 0.0},
                       guards={"min_requests": 3, "error_rate": 0.1, "action": "alert"})
    async with running(tmp_path, data, clock=clock, monotonic=monotonic,
                       sleep=parked) as proxy:
        control, rt = proxy.proxy.control, proxy.proxy.runtime
        for _ in range(5):
            rt.windows.add("next_gen", error())
        clock.advance(2)
        control.tick()
        assert (rt.plan.percentage, control.waiting_reason) == (10, "a guard is tripped")
        write_config(tmp_path, deep_merge(data, {"guards": {"webhook": None,
                                                            "latency_degradation": 0.5}}))
        assert control.reload()
        control.tick()
        assert control.waiting_reason == "a guard is tripped"
        assert rt.plan.percentage == 10  # bug: 60, the held step applied by the reload


# Routing ---------------------------------------------------------------------------------------


async def test_pinned_session_leaves_next_gen_when_the_yaml_phase_goes_back_to_legacy(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "progressive", "percentage": 100},
                       routing={"session": {"header": "X-Session-Id"}},
                       shadow={"sample": 0.0})
    async with running(tmp_path, data, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        headers = {"X-User-Id": "alice", "X-Session-Id": "s-1"}
        async with http.get(f"{proxy.url}/v1/tasks", headers=headers) as response:
            assert response.headers["X-Rollout-Backend"] == "next_gen"
        write_config(tmp_path, deep_merge(data, {"rollout": {"phase": "legacy"}}))
        assert proxy.proxy.control.reload()
        assert proxy.proxy.runtime.plan.phase == "legacy"
        async with http.get(f"{proxy.url}/v1/tasks", headers=headers) as response:
            assert response.headers["X-Rollout-Backend"] == "legacy"  # bug: next_gen


# Rollback --------------------------------------------------------------------------------------


async def test_rollback_to_a_percentage_from_shadow_puts_nobody_on_next_gen(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "shadow", "percentage": 0})
    async with running(tmp_path, data, sleep=parked) as proxy:
        control, rt = proxy.proxy.control, proxy.proxy.runtime
        control.rollback("shadow diffs look bad", "ops", percentage=5)
        assert rt.plan.phase in ("legacy", "shadow")  # bug: progressive, 5 % on next_gen


async def test_rollback_over_infinity_is_refused_or_takes_effect(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = WallClock()
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "progressive", "percentage": 50})
    async with running(tmp_path, data, clock=clock, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.admin}/admin/rollback",
                             data='{"reason": "bad", "over_s": Infinity}',
                             headers={"Authorization": f"Bearer {TOKEN}",
                                      "Content-Type": "application/json"}) as response:
            code = response.status
        clock.advance(24 * 365)
        proxy.proxy.control.tick()
        assert code == 400 or proxy.proxy.runtime.plan.percentage < 50  # bug: 200, still 50
