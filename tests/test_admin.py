"""The admin API on a real listener: bearer-token rules, /admin/status, and the runtime changes
(rollback, set-percentage, promote, reset) as a client sees them on the proxy port."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.datapath.decide import bucket
from tests.conftest import (
    TOKEN,
    Backend,
    Running,
    WallClock,
    config_dict,
    deep_merge,
    parked,
    running,
)

SALT = "test"
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
MUTATING = {
    "rollback": {"reason": "unauthenticated attempt"},
    "promote": {},
    "percentage": {"percentage": 80},
    "pause": {},
    "resume": {},
    "reset": {},
    "complaints": {"user_id": "u-1", "text": "it broke"},
}
BAD_AUTHORIZATION = [
    None,
    "Bearer wrong-token",
    f"Bearer {TOKEN}x",
    TOKEN,  # no scheme
    f"Basic {TOKEN}",
    "Bearer ",
]


def user_in(low: int, high: int, salt: str = SALT) -> str:
    """A user id whose bucket is in [low, high)."""
    for index in range(100_000):
        user = f"user-{index}"
        if low <= bucket(salt, user) < high:
            return user
    raise AssertionError(f"no user with a bucket in [{low}, {high})")


def progressive(backends: dict[str, Backend], percentage: float = 50,
                **sections: Any) -> dict[str, Any]:
    base = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "progressive", "percentage": percentage},
                       shadow={"sample": 0.0})
    return deep_merge(base, sections)


async def call(http: aiohttp.ClientSession, proxy: Running, name: str,
               body: dict[str, Any] | None = None,
               authorization: str | None = f"Bearer {TOKEN}") -> tuple[int, dict[str, Any]]:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with http.post(f"{proxy.admin}/admin/{name}", json=body or {},
                         headers=headers) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def status(http: aiohttp.ClientSession, proxy: Running) -> dict[str, Any]:
    async with http.get(f"{proxy.admin}/admin/status") as response:
        assert response.status == 200
        document: dict[str, Any] = await response.json()
        return document


async def served_by(http: aiohttp.ClientSession, proxy: Running, user: str,
                    path: str = "/v1/tasks", **headers: str) -> str:
    async with http.get(f"{proxy.url}{path}", headers={"X-User-Id": user, **headers}) as r:
        await r.read()
        return r.headers["X-Rollout-Backend"]


def plan_of(document: dict[str, Any]) -> dict[str, Any]:
    return {key: document[key] for key in ("phase", "percentage", "paused", "override",
                                            "configured", "tripped", "schedule")}


# Authentication -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MUTATING))
async def test_mutating_call_without_valid_token_gets_401_and_changes_nothing(
        tmp_path: Path, backends: dict[str, Backend], name: str) -> None:
    data = progressive(backends, rollout={"schedule": [
        {"at": "2999-01-01T00:00:00Z", "percentage": 90}]})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        # An override and a pause in force, so that reset and resume would change something.
        assert (await call(http, proxy, "percentage", {"percentage": 20}))[0] == 200
        assert (await call(http, proxy, "pause"))[0] == 200
        state = proxy.config.state.path
        before, saved = plan_of(await status(http, proxy)), state.read_bytes()
        changes = proxy.metric("rollout_admin_changes_total", action=name)
        for authorization in BAD_AUTHORIZATION:
            code, answer = await call(http, proxy, name, MUTATING[name], authorization)
            assert code == 401, authorization
            assert "token" in answer["error"]
        assert plan_of(await status(http, proxy)) == before
        assert state.read_bytes() == saved
        assert proxy.metric("rollout_admin_changes_total", action=name) == changes
        assert proxy.proxy.runtime.stored.complaints == ()


async def test_a_valid_token_is_accepted_for_every_mutating_call(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, progressive(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        for name in ("rollback", "reset", "percentage", "pause", "resume", "complaints",
                     "promote"):
            code, answer = await call(http, proxy, name, MUTATING[name])
            assert (code, answer["ok"]) == (200, True), (name, answer)


@pytest.mark.parametrize("name", sorted(MUTATING))
async def test_mutating_call_with_no_token_configured_is_refused_403_naming_the_env_var(
        tmp_path: Path, backends: dict[str, Backend], name: str) -> None:
    async with running(tmp_path, progressive(backends), token=None) as proxy, \
            aiohttp.ClientSession() as http:
        before = plan_of(await status(http, proxy))
        for authorization in (f"Bearer {TOKEN}", None, "Bearer "):
            code, answer = await call(http, proxy, name, MUTATING[name], authorization)
            assert code == 403
            assert "ROLLOUT_TEST_TOKEN" in answer["error"]
        assert plan_of(await status(http, proxy)) == before
        assert not proxy.config.state.path.exists()


async def test_a_non_ascii_authorization_header_is_a_401(tmp_path: Path,
                                                         backends: dict[str, Backend]) -> None:
    async with running(tmp_path, progressive(backends)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.proxy.ports["admin"])
        body = b'{"reason": "x"}'
        writer.write(b"POST /admin/rollback HTTP/1.1\r\nHost: admin\r\n"
                     b"Authorization: Bearer \xff\xfe\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        assert proxy.proxy.runtime.stored.override is None
    head = answer.split(b"\r\n", 1)[0]
    assert head == b"HTTP/1.1 401 Unauthorized"
    assert b"application/json" in answer


async def test_read_only_endpoints_need_no_token(tmp_path: Path,
                                                 backends: dict[str, Backend]) -> None:
    async with running(tmp_path, progressive(backends), token=None) as proxy, \
            aiohttp.ClientSession() as http:
        for path in ("/healthz", "/readyz", "/metrics", "/admin/status"):
            async with http.get(f"{proxy.admin}{path}") as response:
                assert response.status == 200, path


async def test_admin_token_never_reaches_logs_nor_backends(
        tmp_path: Path, backends: dict[str, Backend], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    data = progressive(backends, 100)
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        for name, body in MUTATING.items():
            await call(http, proxy, name, body)
            await call(http, proxy, name, body, "Bearer wrong-token")
        await call(http, proxy, "reset")
        for index in range(4):
            await served_by(http, proxy, f"user-{index}")
        await served_by(http, proxy, "user-x", **{"X-Next-Gen": "0"})
        proxy.proxy.control.tick()
    assert backends["legacy"].seen and backends["next_gen"].seen
    assert TOKEN not in caplog.text
    for backend in backends.values():
        for seen in backend.seen:
            assert TOKEN not in repr(seen.headers) and TOKEN.encode() not in seen.body


async def test_bad_bodies_are_400_and_change_nothing(tmp_path: Path,
                                                     backends: dict[str, Backend]) -> None:
    async with running(tmp_path, progressive(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        before = plan_of(await status(http, proxy))
        for name, body in (("rollback", {}), ("rollback", {"reason": "  "}),
                           ("rollback", {"reason": "x", "percentage": 150}),
                           ("percentage", {}), ("percentage", {"percentage": -1}),
                           ("percentage", {"percentage": "50"}),
                           ("percentage", {"percentage": True}),
                           ("complaints", {"text": "no user"})):
            code, answer = await call(http, proxy, name, body)
            assert code == 400, (name, body, answer)
            assert answer["error"]
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        for raw in (b"{not json", b"[1, 2]"):
            async with http.post(f"{proxy.admin}/admin/rollback", data=raw,
                                 headers=headers) as response:
                assert response.status == 400
        assert plan_of(await status(http, proxy)) == before


async def test_rollback_over_infinity_is_refused_or_takes_effect(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = WallClock()
    async with running(tmp_path, progressive(backends), clock=clock, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.admin}/admin/rollback",
                             data='{"reason": "bad", "over_s": Infinity}',
                             headers={"Authorization": f"Bearer {TOKEN}",
                                      "Content-Type": "application/json"}) as response:
            code = response.status
        clock.advance(24 * 365)
        proxy.proxy.control.tick()
        assert code == 400 or proxy.proxy.runtime.plan.percentage < 50  # once a bug: 200, 50


# Status -----------------------------------------------------------------------------------------


async def test_status_reports_effective_plan_configured_plan_and_override(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, progressive(backends, 50)) as proxy, \
            aiohttp.ClientSession() as http:
        code, _ = await call(http, proxy, "percentage",
                             {"percentage": 30, "reason": "slow it down", "by": "alice"})
        assert code == 200
        document = await status(http, proxy)
    assert (document["phase"], document["percentage"]) == ("progressive", 30)
    assert document["configured"] == {"phase": "progressive", "percentage": 50}
    override = document["override"]
    assert (override["action"], override["percentage"], override["reason"], override["by"]) == (
        "percentage", 30, "slow it down", "alice")
    assert RFC3339.match(override["at"])
    assert document["reason"] == "slow it down"
    assert document["paused"] is False


async def test_status_carries_config_version_and_load_time(tmp_path: Path,
                                                           backends: dict[str, Backend]) -> None:
    async with running(tmp_path, progressive(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        document = await status(http, proxy)
        expected = hashlib.sha256(proxy.path.read_bytes()).hexdigest()[:12]
    assert document["config_version"] == expected
    assert RFC3339.match(document["config_loaded_at"]), document["config_loaded_at"]
    loaded = datetime.fromisoformat(document["config_loaded_at"])
    assert loaded.tzinfo is not None
    assert abs((datetime.now(loaded.tzinfo) - loaded).total_seconds()) < 60


async def test_status_window_figures_match_the_traffic_sent(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async def legacy(request: web.Request) -> web.Response:
        return web.json_response({"success": True}, headers={
            "X-Tokens-Used": "12000", "X-Memory-MB": "400"})

    async def next_gen(request: web.Request) -> web.Response:
        failing = request.path.startswith("/fail")
        return web.json_response({"success": not failing}, status=500 if failing else 200,
                                 headers={"X-Tokens-Used": "1200", "X-Memory-MB": "100"})

    backends["legacy"].handler, backends["next_gen"].handler = legacy, next_gen
    data = progressive(backends, 0, fallback={"enabled": False})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        for index in range(4):
            assert await served_by(http, proxy, f"old-{index}") == "legacy"
        for index in range(6):
            path = "/fail" if index < 2 else "/v1/tasks"
            assert await served_by(http, proxy, f"new-{index}", path,
                                   **{"X-Next-Gen": "1"}) == "next_gen"
        proxy.proxy.control.tick()
        document = await status(http, proxy)
    old, new = document["backends"]["legacy"], document["backends"]["next_gen"]
    assert (old["requests"], old["errors"], old["error_rate"]) == (4, 0, 0)
    assert (new["requests"], new["errors"], new["error_rate"]) == (6, 2, round(2 / 6, 4))
    assert (old["mean_tokens"], new["mean_tokens"]) == (12000, 1200)
    assert (old["mean_memory_mb"], new["mean_memory_mb"]) == (400, 100)
    for figures in (old, new):
        assert 0 <= figures["p50_ms"] <= figures["p95_ms"] < 5000
    assert {g["guard"] for g in document["guards"]} >= {
        "error_rate", "latency_degradation", "memory_spike", "max_tokens",
        "complaints_per_hour"}
    assert all(g["state"] in ("ok", "waiting", "off", "tripped") for g in document["guards"])
    assert document["circuit"] == {"next_gen": "closed"}


# Runtime changes as the proxy port shows them ------------------------------------------------


async def test_rollback_sends_next_gen_bucket_users_to_legacy(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    lucky = user_in(0, 5000)
    async with running(tmp_path, progressive(backends, 50)) as proxy, \
            aiohttp.ClientSession() as http:
        assert await served_by(http, proxy, lucky) == "next_gen"
        code, answer = await call(http, proxy, "rollback", {"reason": "errors up"})
        assert (code, answer["phase"]) == (200, "legacy")
        assert await served_by(http, proxy, lucky) == "legacy"
        assert await served_by(http, proxy, lucky, **{"X-Next-Gen": "1"}) == "legacy"
        document = await status(http, proxy)
        assert document["override"]["action"] == "rollback"
        assert document["reason"] == "errors up"
        assert proxy.metric("rollout_rollbacks_total", trigger="manual") == 1


async def test_rollback_to_a_percentage_keeps_only_that_cohort(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    stays, leaves = user_in(0, 1000), user_in(1000, 5000)
    async with running(tmp_path, progressive(backends, 50)) as proxy, \
            aiohttp.ClientSession() as http:
        assert [await served_by(http, proxy, u) for u in (stays, leaves)] == ["next_gen"] * 2
        code, answer = await call(http, proxy, "rollback", {"reason": "trim", "percentage": 10})
        assert (code, answer["phase"], answer["percentage"]) == (200, "progressive", 10)
        assert await served_by(http, proxy, stays) == "next_gen"
        assert await served_by(http, proxy, leaves) == "legacy"


async def test_set_percentage_moves_users_and_the_gauge(tmp_path: Path,
                                                        backends: dict[str, Backend]) -> None:
    late = user_in(9000, 10_000)
    async with running(tmp_path, progressive(backends, 10)) as proxy, \
            aiohttp.ClientSession() as http:
        assert await served_by(http, proxy, late) == "legacy"
        code, answer = await call(http, proxy, "percentage", {"percentage": 100})
        assert (code, answer["percentage"]) == (200, 100)
        assert await served_by(http, proxy, late) == "next_gen"
        assert proxy.metric("rollout_percentage") == 100


async def test_promote_is_refused_409_while_a_rollback_is_in_force(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, progressive(backends, 50)) as proxy, \
            aiohttp.ClientSession() as http:
        await call(http, proxy, "rollback", {"reason": "guard fired"})
        code, answer = await call(http, proxy, "promote")
        assert code == 409
        assert "reset" in answer["error"]
        document = await status(http, proxy)
        assert (document["phase"], document["override"]["action"]) == ("legacy", "rollback")


async def test_reset_drops_the_override_and_follows_the_yaml(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    lucky = user_in(0, 5000)
    async with running(tmp_path, progressive(backends, 50)) as proxy, \
            aiohttp.ClientSession() as http:
        await call(http, proxy, "rollback", {"reason": "errors up"})
        assert await served_by(http, proxy, lucky) == "legacy"
        code, answer = await call(http, proxy, "reset")
        assert (code, answer["phase"], answer["percentage"], answer["override"]) == (
            200, "progressive", 50, None)
        assert await served_by(http, proxy, lucky) == "next_gen"
        document = await status(http, proxy)
        assert (document["override"], document["reason"]) == (None, None)


async def test_promote_without_pending_steps_goes_to_the_next_phase(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    anyone = user_in(5000, 10_000)
    async with running(tmp_path, progressive(backends, 50)) as proxy, \
            aiohttp.ClientSession() as http:
        assert await served_by(http, proxy, anyone) == "legacy"
        code, answer = await call(http, proxy, "promote")
        assert (code, answer["phase"]) == (200, "default")
        assert await served_by(http, proxy, anyone) == "next_gen"
        assert (await call(http, proxy, "promote"))[1]["phase"] == "sunset"
        code, answer = await call(http, proxy, "promote")
        assert code == 409
        assert "sunset" in answer["error"]


async def test_promote_to_next_phase_keeps_the_percentage_set_at_runtime(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "opt_in", "percentage": 10})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        assert (await call(http, proxy, "percentage", {"percentage": 40}))[0] == 200
        code, answer = await call(http, proxy, "promote")
        assert (code, answer["phase"]) == (200, "progressive")
        assert answer["percentage"] == 40
