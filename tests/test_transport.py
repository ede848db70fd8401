"""The transport seam: the proxy behaves the same over both clients (h1, the default, and
aiohttp's), and every backend failure reaches the client as the same JSON error."""

from __future__ import annotations

import asyncio
import gzip
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.datapath.aiohttp_transport import AiohttpTransport
from proxy.datapath.transport import Transport
from proxy.datapath.upstream import H1
from tests.conftest import Backend, config_dict, running

TRANSPORTS: dict[str, Transport] = {"h1": H1, "aiohttp": AiohttpTransport()}
pytestmark = pytest.mark.parametrize("transport", TRANSPORTS.values(), ids=TRANSPORTS.keys())


def closed_port() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


async def test_an_answer_passes_byte_for_byte_compressed_or_not(
        tmp_path: Path, backends: dict[str, Backend], transport: Transport) -> None:
    packed = gzip.compress(b'{"success": true}')

    async def zipped(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=packed + body, headers={"Content-Encoding": "gzip",
                                                         "Content-Type": "application/json"})

    backends["legacy"].handler = zipped
    data = config_dict(backends["legacy"].url, backends["next_gen"].url)
    async with running(tmp_path, data, transport=transport) as proxy, \
            aiohttp.ClientSession(auto_decompress=False) as http, \
            http.post(f"{proxy.url}/v1/tasks?x=1", data=b"hello") as response:
        assert response.status == 200
        assert await response.read() == packed + b"hello"
        assert response.headers["Content-Encoding"] == "gzip"
    assert backends["legacy"].seen[0].path_qs == "/v1/tasks?x=1"


async def test_the_backend_urls_own_path_goes_before_every_target(
        tmp_path: Path, backends: dict[str, Backend], transport: Transport) -> None:
    data = config_dict(backends["legacy"].url + "/base/", backends["next_gen"].url)
    async with running(tmp_path, data, transport=transport) as proxy, \
            aiohttp.ClientSession() as http, \
            http.get(f"{proxy.url}/v1/tasks?x=1") as response:
        assert response.status == 200
    assert backends["legacy"].seen[0].path_qs == "/base/v1/tasks?x=1"


async def test_a_backend_that_refuses_or_stalls_gets_a_json_502_or_504(
        tmp_path: Path, backends: dict[str, Backend], transport: Transport) -> None:
    async def stalled(request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("not reached")

    backends["next_gen"].handler = stalled
    data = config_dict(closed_port(), backends["next_gen"].url,
                       backends={"next_gen": {"timeout_s": 0.3}},
                       rollout={"phase": "progressive", "percentage": 0},
                       fallback={"enabled": False})
    async with running(tmp_path, data, transport=transport) as proxy, \
            aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/v1/tasks") as response:
            assert response.status == 502
            assert "connect_error" in (await response.json())["error"]
        async with http.get(f"{proxy.url}/v1/tasks", headers={"X-Next-Gen": "1"}) as response:
            assert response.status == 504
            assert "timeout" in (await response.json())["error"]


async def test_a_mirror_is_sent_and_compared(
        tmp_path: Path, backends: dict[str, Backend], transport: Transport) -> None:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "shadow"}, shadow={"sample": 1.0})
    async with running(tmp_path, data, transport=transport) as proxy, \
            aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/v1/tasks") as response:
            assert response.headers["X-Rollout-Backend"] == "legacy"
        await proxy.mirrors_settled()
        assert backends["next_gen"].seen[0].headers["X-Rollout-Shadow"] == "1"
        assert proxy.metric("rollout_shadow_comparisons_total", result="match") == 1
