"""The control plane: schedule steps, pause and resume, promote through the schedule, hot
reload (file polling, the control loop itself, and SIGHUP on a real process), and rollbacks
called on the controller."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.datapath.decide import bucket
from tests.conftest import (
    TOKEN,
    Backend,
    Monotonic,
    Running,
    WallClock,
    config_dict,
    deep_merge,
    parked,
    running,
    spawn_serve,
    wait_ready,
    write_config,
)
from tests.test_guards import answer

SALT = "test"
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def at(hours: float) -> str:
    return (T0 + timedelta(hours=hours)).isoformat().replace("+00:00", "Z")











class Stepper:
    """The injected `sleep` for the loop: one tick per step(), observed, never guessed."""

    def __init__(self) -> None:
        self.go: asyncio.Queue[None] = asyncio.Queue()
        self.slept = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.slept.set()
        await self.go.get()

    async def step(self) -> None:
        async with asyncio.timeout(3):
            await self.slept.wait()  # the loop is asleep
            self.slept.clear()
            self.go.put_nowait(None)
            await self.slept.wait()  # it ticked once and sleeps again


def user_in(low: int, high: int) -> str:
    for index in range(100_000):
        user = f"user-{index}"
        if low <= bucket(SALT, user) < high:
            return user
    raise AssertionError("no such user")


def scheduled(backends: dict[str, Backend], steps: list[dict[str, Any]],
              **sections: Any) -> dict[str, Any]:
    base = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "progressive", "percentage": 10, "schedule": steps},
                       shadow={"sample": 0.0})
    return deep_merge(base, sections)


async def call(http: aiohttp.ClientSession, proxy: Running, name: str,
               body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{proxy.admin}/admin/{name}", json=body or {},
                         headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        return response.status, await response.json()


async def status(http: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with http.get(f"{admin}/admin/status") as response:
        assert response.status == 200
        document: dict[str, Any] = await response.json()
        return document


async def served_by(http: aiohttp.ClientSession, url: str, user: str, **headers: str) -> str:
    async with http.get(f"{url}/v1/tasks", headers={"X-User-Id": user, **headers}) as r:
        await r.read()
        return r.headers["X-Rollout-Backend"]


# Schedule ------------------------------------------------------------------------------------


async def test_schedule_steps_already_due_at_start_apply_at_once_latest_wins(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    steps = [{"at": at(-48), "percentage": 20}, {"at": at(-24), "percentage": 40},
             {"at": at(24), "percentage": 90}]
    async with running(tmp_path, scheduled(backends, steps), clock=WallClock(),
                       sleep=parked) as proxy, aiohttp.ClientSession() as http:
        document = await status(http, proxy.admin)
        assert (document["phase"], document["percentage"]) == ("progressive", 40)
        assert document["configured"]["percentage"] == 10
        assert document["schedule"]["applied"] == 2
        assert document["schedule"]["next"]["percentage"] == 90
        assert document["schedule"]["next"]["waiting"] == "not due yet"
        assert await served_by(http, proxy.url, user_in(3000, 4000)) == "next_gen"


async def test_a_step_applies_when_it_becomes_due(tmp_path: Path,
                                                  backends: dict[str, Backend]) -> None:
    clock = WallClock()
    late = user_in(5000, 6000)
    steps = [{"at": at(1), "phase": "progressive", "percentage": 60}]
    async with running(tmp_path, scheduled(backends, steps), clock=clock,
                       sleep=parked) as proxy, aiohttp.ClientSession() as http:
        proxy.proxy.control.tick()
        assert await served_by(http, proxy.url, late) == "legacy"
        clock.advance(2)
        proxy.proxy.control.tick()
        assert await served_by(http, proxy.url, late) == "next_gen"
        assert proxy.metric("rollout_percentage") == 60
        assert (await status(http, proxy.admin))["schedule"]["next"] is None


async def test_promote_applies_the_next_pending_step_then_the_next_phase(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    steps = [{"at": at(-1), "percentage": 20}, {"at": at(24), "percentage": 75},
             {"at": at(48), "percentage": 100}]
    late = user_in(5000, 7500)
    async with running(tmp_path, scheduled(backends, steps), clock=WallClock(),
                       sleep=parked) as proxy, aiohttp.ClientSession() as http:
        assert await served_by(http, proxy.url, late) == "legacy"
        code, answer = await call(http, proxy, "promote")
        assert (code, answer["phase"], answer["percentage"]) == (200, "progressive", 75)
        assert await served_by(http, proxy.url, late) == "next_gen"
        proxy.proxy.control.tick()  # the promoted step stays applied on the next tick
        assert (await status(http, proxy.admin))["percentage"] == 75
        assert (await call(http, proxy, "promote"))[1]["percentage"] == 100
        code, answer = await call(http, proxy, "promote")
        assert (code, answer["phase"]) == (200, "default")


async def test_pause_holds_a_step_that_becomes_due_and_resume_applies_the_latest(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = WallClock()
    steps = [{"at": at(1), "percentage": 30}, {"at": at(2), "percentage": 50},
             {"at": at(100), "percentage": 90}]
    async with running(tmp_path, scheduled(backends, steps), clock=clock,
                       sleep=parked) as proxy, aiohttp.ClientSession() as http:
        code, answer = await call(http, proxy, "pause")
        assert (code, answer["paused"]) == (200, True)
        assert proxy.metric("rollout_paused") == 1
        clock.advance(3)
        proxy.proxy.control.tick()
        document = await status(http, proxy.admin)
        assert (document["phase"], document["percentage"], document["paused"]) == (
            "progressive", 10, True)
        assert document["schedule"]["applied"] == 0
        code, answer = await call(http, proxy, "resume")
        assert (code, answer["paused"], answer["percentage"]) == (200, False, 50)
        assert proxy.metric("rollout_paused") == 0
        proxy.proxy.control.tick()
        assert (await status(http, proxy.admin))["percentage"] == 50


async def test_second_pause_does_not_release_a_step_that_came_due_while_paused(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = WallClock()
    data = scheduled(backends, [{"at": at(1), "percentage": 60}])
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
        assert rt.plan.percentage == 10  # once a bug: the held step applied while paused, 60


async def test_guards_still_act_while_paused(tmp_path: Path,
                                             backends: dict[str, Backend]) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"success": False}, status=500)

    backends["next_gen"].handler = broken
    data = scheduled(backends, [], rollout={"percentage": 100}, fallback={"enabled": False},
                     guards={"min_requests": 3, "error_rate": 0.1})
    async with running(tmp_path, data, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        await call(http, proxy, "pause")
        for index in range(3):
            await served_by(http, proxy.url, f"u-{index}")
        proxy.proxy.control.tick()
        document = await status(http, proxy.admin)
        assert (document["phase"], document["paused"]) == ("legacy", True)
        assert document["override"]["action"] == "rollback"


async def test_a_due_step_waits_while_a_guard_is_tripped_and_status_says_why(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"success": False}, status=500)

    backends["next_gen"].handler = broken
    clock, monotonic = WallClock(), Monotonic()
    steps = [{"at": at(1), "percentage": 60}]
    data = scheduled(backends, steps, rollout={"percentage": 100}, fallback={"enabled": False},
                     guards={"min_requests": 3, "error_rate": 0.1, "action": "alert",
                             "window_s": 60})
    async with running(tmp_path, data, clock=clock, monotonic=monotonic,
                       sleep=parked) as proxy, aiohttp.ClientSession() as http:
        for index in range(3):
            assert await served_by(http, proxy.url, f"u-{index}") == "next_gen"
        clock.advance(2)
        proxy.proxy.control.tick()
        document = await status(http, proxy.admin)
        assert document["percentage"] == 100
        assert document["schedule"]["next"]["waiting"] == "a guard is tripped"
        assert "error_rate" in [g["guard"] for g in document["guards"]
                                if g["state"] == "tripped"]
        monotonic.now += 61  # the errors leave the window: no guard is tripped any more
        proxy.proxy.control.tick()
        document = await status(http, proxy.admin)
        assert (document["percentage"], document["schedule"]["next"]) == (60, None)


async def test_a_due_step_waits_while_a_rollback_is_in_force(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = WallClock()
    steps = [{"at": at(1), "percentage": 60}]
    async with running(tmp_path, scheduled(backends, steps), clock=clock,
                       sleep=parked) as proxy, aiohttp.ClientSession() as http:
        await call(http, proxy, "rollback", {"reason": "hold on"})
        clock.advance(2)
        proxy.proxy.control.tick()
        document = await status(http, proxy.admin)
        assert (document["phase"], document["schedule"]["next"]["waiting"]) == (
            "legacy", "a rollback is in force")
        await call(http, proxy, "reset")
        proxy.proxy.control.tick()
        document = await status(http, proxy.admin)
        assert (document["phase"], document["percentage"]) == ("progressive", 60)


async def test_resume_does_not_apply_a_step_while_a_guard_is_tripped(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"success": False}, status=500)

    backends["next_gen"].handler = broken
    clock = WallClock()
    data = scheduled(backends, [{"at": at(1), "percentage": 60}],
                     rollout={"percentage": 100}, fallback={"enabled": False},
                     guards={"min_requests": 3, "error_rate": 0.1, "action": "alert"})
    async with running(tmp_path, data, clock=clock, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        await call(http, proxy, "pause")
        for index in range(3):
            await served_by(http, proxy.url, f"u-{index}")
        clock.advance(2)
        proxy.proxy.control.tick()
        await call(http, proxy, "resume")
        document = await status(http, proxy.admin)
        assert document["percentage"] == 100  # SPEC: a step applies when all guards pass


async def test_reload_does_not_apply_a_step_held_by_a_tripped_guard(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock, monotonic = WallClock(), Monotonic()
    data = scheduled(backends, [{"at": at(1), "percentage": 60}],
                     guards={"min_requests": 3, "error_rate": 0.1, "action": "alert"})
    async with running(tmp_path, data, clock=clock, monotonic=monotonic,
                       sleep=parked) as proxy:
        control, rt = proxy.proxy.control, proxy.proxy.runtime
        for _ in range(5):
            rt.windows.add("next_gen", answer(500))
        clock.advance(2)
        control.tick()
        assert (rt.plan.percentage, control.waiting_reason) == (10, "a guard is tripped")
        write_config(tmp_path, deep_merge(data, {"guards": {"webhook": None,
                                                            "latency_degradation": 0.5}}))
        assert control.reload()
        control.tick()
        assert control.waiting_reason == "a guard is tripped"
        assert rt.plan.percentage == 10  # once a bug: 60, the held step applied by the reload


# Hot reload ----------------------------------------------------------------------------------


async def test_edited_config_is_reloaded_and_new_requests_follow_it(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    late = user_in(8000, 9000)
    data = scheduled(backends, [])
    async with running(tmp_path, data, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        version = (await status(http, proxy.admin))["config_version"]
        assert await served_by(http, proxy.url, late) == "legacy"
        write_config(tmp_path, deep_merge(data, {"rollout": {"percentage": 95}}))
        proxy.proxy.control.tick()
        assert await served_by(http, proxy.url, late) == "next_gen"
        document = await status(http, proxy.admin)
        assert (document["percentage"], document["configured"]["percentage"]) == (95, 95)
        assert document["config_version"] != version
        assert proxy.metric("rollout_config_reloads_total", result="success") == 1
        assert proxy.metric("rollout_config_reloads_total", result="error") == 0


async def test_broken_edit_is_refused_and_the_last_good_config_keeps_serving(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    late = user_in(8000, 9000)
    data = scheduled(backends, [], rollout={"percentage": 95})
    async with running(tmp_path, data, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        version = (await status(http, proxy.admin))["config_version"]
        write_config(tmp_path, deep_merge(data, {"rollout": {"percentage": 150}}))
        proxy.proxy.control.tick()
        proxy.proxy.control.tick()  # the same bad file is refused once, not every tick
        assert proxy.metric("rollout_config_reloads_total", result="error") == 1
        assert proxy.metric("rollout_config_reloads_total", result="success") == 0
        document = await status(http, proxy.admin)
        assert (document["percentage"], document["config_version"]) == (95, version)
        assert await served_by(http, proxy.url, late) == "next_gen"
        write_config(tmp_path, deep_merge(data, {"rollout": {"percentage": 5}}))
        proxy.proxy.control.tick()
        assert proxy.metric("rollout_config_reloads_total", result="success") == 1
        assert await served_by(http, proxy.url, late) == "legacy"


async def test_the_control_loop_reloads_by_itself(tmp_path: Path,
                                                  backends: dict[str, Backend]) -> None:
    stepper = Stepper()
    data = scheduled(backends, [])
    async with running(tmp_path, data, sleep=stepper) as proxy, \
            aiohttp.ClientSession() as http:
        write_config(tmp_path, deep_merge(data, {"rollout": {"percentage": 70}}))
        await stepper.step()
        assert (await status(http, proxy.admin))["percentage"] == 70
        assert proxy.metric("rollout_config_reloads_total", result="success") == 1


async def wait_status(http: aiohttp.ClientSession, admin: str, key: str,
                      value: Any) -> dict[str, Any]:
    """Poll a separate process's status within a deadline (it gives no other signal)."""
    async with asyncio.timeout(5):
        while True:
            document = await status(http, admin)
            if document[key] == value:
                return document
            await asyncio.sleep(0.05)


async def test_sighup_reloads_a_real_process(tmp_path: Path, backends: dict[str, Backend],
                                             serve_processes: list[Any]) -> None:
    data = scheduled(backends, [], rollout={"percentage": 10})
    process = spawn_serve(tmp_path, data)
    serve_processes.append(process)
    await wait_ready(process.admin)
    # Same size, same mtime: the file poll cannot see this edit; only SIGHUP can.
    before = os.stat(process.path)
    write_config(tmp_path, deep_merge(process.data, {"rollout": {"percentage": 20}}))
    assert os.stat(process.path).st_size == before.st_size
    os.utime(process.path, ns=(before.st_atime_ns, before.st_mtime_ns))
    process.proc.send_signal(signal.SIGHUP)
    async with aiohttp.ClientSession() as http:
        document = await wait_status(http, process.admin, "percentage", 20)
        assert document["configured"]["percentage"] == 20
        async with http.get(f"{process.admin}/metrics") as response:
            text = await response.text()
        assert 'rollout_config_reloads_total{result="success"} 1.0' in text
        # A broken file on SIGHUP: refused, the process keeps serving the last good config.
        write_config(tmp_path, deep_merge(process.data, {"rollout": {"percentage": 150}}))
        process.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(5):
            while 'rollout_config_reloads_total{result="error"} 1.0' not in text:
                await asyncio.sleep(0.05)
                async with http.get(f"{process.admin}/metrics") as response:
                    text = await response.text()
        assert (await status(http, process.admin))["percentage"] == 20
        assert await served_by(http, process.url, "someone") in ("legacy", "next_gen")
    assert process.terminate() == 0


async def test_promote_applies_the_next_step_even_after_a_set_percentage(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    steps = [{"at": at(24), "percentage": 50}]
    async with running(tmp_path, scheduled(backends, steps), clock=WallClock(),
                       sleep=parked) as proxy, aiohttp.ClientSession() as http:
        assert (await call(http, proxy, "percentage", {"percentage": 20}))[0] == 200
        code, answer = await call(http, proxy, "promote")
        assert code == 200
        assert answer["percentage"] == 50


# Rollback ------------------------------------------------------------------------------------


async def test_rollback_to_a_percentage_from_shadow_puts_nobody_on_next_gen(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "shadow", "percentage": 0})
    async with running(tmp_path, data, sleep=parked) as proxy:
        control, rt = proxy.proxy.control, proxy.proxy.runtime
        control.rollback("shadow diffs look bad", "ops", percentage=5)
        assert rt.plan.phase in ("legacy", "shadow")  # once a bug: progressive, 5 % on next_gen
