"""Rollout state: the pure plan arithmetic, the file store (round trip, atomic replace), the
redis store's writer, and a runtime override that survives a restart of the real process."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from proxy.config.model import RolloutConfig, ScheduleStep
from proxy.state.redis_store import RedisStore
from proxy.state.store import (
    FileStore,
    Override,
    Stored,
    due_steps,
    effective,
    next_phase,
    rolled_back,
)
from proxy.telemetry.metrics import Metrics
from tests.conftest import TOKEN, Backend, Process, config_dict, spawn_serve, wait_ready

T0 = datetime(2030, 1, 1, tzinfo=UTC)
STEPS = (ScheduleStep(T0 + timedelta(hours=1), "progressive", 10),
         ScheduleStep(T0 + timedelta(hours=2), None, 25),
         ScheduleStep(T0 + timedelta(hours=3), "default", None))
ROLLOUT = RolloutConfig(phase="shadow", percentage=0, salt="s", sunset_date=None,
                        deprecation_date=None, migration_url=None, schedule=STEPS)
FULL = Stored(
    override=Override("rollback", "progressive", 5.0, "errors up", "guard",
                      "2030-01-01T00:00:00Z"),
    paused=True, paused_at="2030-01-01T00:30:00Z", promoted_through="2030-01-01T02:00:00+00:00",
    default_since=1_900_000_000.5, tripped=("error_rate", "max_tokens"),
    complaints=((1_900_000_000.0, "next_gen"),),
)


def hours(count: float) -> datetime:
    return T0 + timedelta(hours=count)


# Pure arithmetic -----------------------------------------------------------------------------


def test_due_steps_counts_passed_steps() -> None:
    assert [due_steps(STEPS, Stored(), hours(h)) for h in (0, 1, 1.5, 2, 10)] == [0, 1, 1, 2, 3]


def test_a_pause_freezes_the_schedule_at_the_moment_it_began() -> None:
    paused = Stored(paused=True, paused_at="2030-01-01T01:30:00Z")
    assert due_steps(STEPS, paused, hours(10)) == 1


def test_promoted_through_counts_steps_as_due() -> None:
    promoted = Stored(promoted_through=hours(2).isoformat())
    assert due_steps(STEPS, promoted, hours(0)) == 2


def test_effective_plan_is_yaml_then_steps_then_override() -> None:
    assert effective(ROLLOUT, Stored(), 0) == ("shadow", 0)
    assert effective(ROLLOUT, Stored(), 2) == ("progressive", 25)
    assert effective(ROLLOUT, Stored(), 3) == ("default", 25)
    rollback = Stored(override=Override("rollback", "legacy", None, "r", "b", "t"))
    assert effective(ROLLOUT, rollback, 2) == ("legacy", 25)
    percentage = Stored(override=Override("percentage", None, 60, "r", "b", "t"))
    assert effective(ROLLOUT, percentage, 2) == ("progressive", 60)


def test_next_phase_follows_the_table_and_stops_at_sunset() -> None:
    assert [next_phase(p) for p in ("legacy", "shadow", "opt_in", "progressive", "default",
                                    "sunset")] == [
        "shadow", "opt_in", "progressive", "default", "sunset", None]


def test_only_a_rollback_override_counts_as_rolled_back() -> None:
    assert rolled_back(FULL)
    assert not rolled_back(Stored())
    assert not rolled_back(Stored(override=Override("percentage", None, 5, "r", "b", "t")))


# The file store ------------------------------------------------------------------------------


def test_file_store_round_trip(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "state" / "rollout-state.json")
    assert store.load() == Stored()  # no file yet: the empty state
    store.save(FULL)
    assert FileStore(store.path).load() == FULL
    assert json.loads(store.path.read_text())["override"]["reason"] == "errors up"


def test_file_store_save_leaves_no_temp_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "rollout-state.json")
    for index in range(20):
        store.save(Stored(paused=index % 2 == 0))
    assert [p.name for p in tmp_path.iterdir()] == ["rollout-state.json"]


def test_file_store_replaces_the_file_rather_than_rewriting_it(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "rollout-state.json")
    store.save(Stored())
    with store.path.open() as old:  # a reader that opened the old file
        store.save(FULL)
        assert Stored.from_json(json.loads(old.read())) == Stored()  # never half the new one
    assert store.load() == FULL


def test_a_failed_save_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "rollout-state.json")
    store.save(FULL)
    unserialisable: Any = object()
    with pytest.raises(TypeError):
        store.save(Stored(default_since=unserialisable))
    assert [p.name for p in tmp_path.iterdir()] == ["rollout-state.json"]
    assert store.load() == FULL


def test_an_unreadable_state_file_is_reported_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "rollout-state.json"
    path.write_text("{half")
    with pytest.raises(ValueError, match=r"rollout-state\.json"):
        FileStore(path).load()


# The redis store -----------------------------------------------------------------------------
# A stand-in for redis.asyncio's client, so a test can hold a write half-way.


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
    assert store.poll() is None  # once a bug: the stale document came back as "fresh"
    assert store.load() == second
    assert Stored.from_json(json.loads(fake.data["rollout:state"])) == second


# Restart of a real process ------------------------------------------------------------------


async def status(http: aiohttp.ClientSession, process: Process) -> dict[str, Any]:
    async with http.get(f"{process.admin}/admin/status") as response:
        assert response.status == 200
        document: dict[str, Any] = await response.json()
        return document


async def test_a_rollback_and_a_pause_survive_a_restart(
        tmp_path: Path, backends: dict[str, Backend], serve_processes: list[Process]) -> None:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "progressive", "percentage": 100},
                       shadow={"sample": 0.0})
    first = spawn_serve(tmp_path, data)
    serve_processes.append(first)
    await wait_ready(first.admin)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{first.url}/v1/tasks", headers={"X-User-Id": "u"}) as response:
            assert response.headers["X-Rollout-Backend"] == "next_gen"
        async with http.post(f"{first.admin}/admin/rollback", headers=auth,
                             json={"reason": "latency regression"}) as response:
            assert response.status == 200
        async with http.post(f"{first.admin}/admin/pause", headers=auth) as response:
            assert response.status == 200
        assert first.terminate() == 0
        state_dir = tmp_path / "state"
        # The state file and the active-user sketches beside it (with their lock files);
        # no temp file left behind.
        names = sorted(p.name for p in state_dir.iterdir() if not p.name.endswith(".lock"))
        assert names == ["rollout-state.json", "rollout-state.users.json"]

        second = spawn_serve(tmp_path, data)
        serve_processes.append(second)
        await wait_ready(second.admin)
        document = await status(http, second)
        assert (document["phase"], document["paused"]) == ("legacy", True)
        assert document["override"]["action"] == "rollback"
        assert document["reason"] == "latency regression"
        assert document["configured"] == {"phase": "progressive", "percentage": 100}
        async with http.get(f"{second.url}/v1/tasks", headers={"X-User-Id": "u"}) as response:
            assert response.headers["X-Rollout-Backend"] == "legacy"
    assert second.terminate() == 0
