"""The live snapshot: a request finishes under the config it started with, whatever a reload
changes meanwhile (SPEC: a reload never changes a request in flight)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.conftest import Backend, config_dict, deep_merge, running, write_config


async def parked(seconds: float) -> None:
    await asyncio.Event().wait()


async def test_a_reload_landing_mid_request_changes_neither_its_fallback_nor_its_measuring(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow_failure(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response({"success": False}, status=500)

    backends["next_gen"].handler = slow_failure
    backends["legacy"].tokens = 100
    before = config_dict(backends["legacy"].url, backends["next_gen"].url,
                         rollout={"phase": "progressive", "percentage": 100},
                         fallback={"enabled": True, "on": ["5xx"]},
                         telemetry={"tokens": {"header": "X-Tokens-Used"}})
    after = deep_merge(before, {"fallback": {"enabled": False},
                                "telemetry": {"tokens": {"header": "X-Other-Tokens"}}})
    async with running(tmp_path, before, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:

        async def ask(user: str) -> tuple[int, str, str | None]:
            async with http.get(f"{proxy.url}/v1/tasks", headers={"X-User-Id": user}) as r:
                await r.read()
                return r.status, r.headers["X-Rollout-Backend"], r.headers.get(
                    "X-Rollout-Fallback")

        in_flight = asyncio.ensure_future(ask("u-1"))
        async with asyncio.timeout(5):
            await arrived.wait()
        write_config(tmp_path, after)
        assert proxy.proxy.control.reload()
        assert not proxy.proxy.runtime.config.fallback.enabled  # the reload took
        release.set()
        async with asyncio.timeout(5):
            answer = await in_flight
        # Finished under the config it started with: next_gen's 500 fell back to legacy,
        # and legacy's tokens were read from the header that config names.
        assert answer == (200, "legacy", "true")
        assert proxy.metric("rollout_tokens_total", backend="legacy", role="fallback") == 100
        # The next request is the new config's: no fallback, next_gen's 500 reaches the client.
        assert await ask("u-2") == (500, "next_gen", None)
