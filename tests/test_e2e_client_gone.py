"""A client that hangs up mid-answer says nothing about the backend."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.conftest import Backend, Running, config_dict, running


async def counted(proxy: Running, name: str, within: float = 5.0, **labels: str) -> float:
    """The metric once it is non-zero; the proxy's relay gives no event to wait on."""
    async with asyncio.timeout(within):
        while not (value := proxy.metric(name, **labels)):  # noqa: ASYNC110 - no event here
            await asyncio.sleep(0.01)
    return value


async def test_client_leaving_mid_stream_is_no_backend_error_nor_mismatch(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    more = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: {\"n\": 1}\n\n")
        await more.wait()
        for n in range(2, 50):
            await response.write(b"data: {\"n\": %d}\n\n" % n)
        return response

    backends["legacy"].handler = stream
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "shadow"}, shadow={"sample": 1.0})
    async with running(tmp_path, data) as proxy:
        async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/v1/chat") as answer:
            assert (await answer.content.readline()).startswith(b"data:")
        more.set()  # the client is gone: the proxy's next writes fail
        assert await counted(proxy, "rollout_rejected_requests_total", reason="client_gone")
        assert await counted(proxy, "rollout_shadow_dropped_total", reason="client_gone")
        assert proxy.metric("rollout_requests_total", backend="legacy", role="primary",
                            code_class="error") == 0
        assert proxy.metric("rollout_shadow_comparisons_total", result="mismatch") == 0
