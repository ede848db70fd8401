"""Review of the data path: each test reproduces a confirmed bug (xfail, strict)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.telemetry.events import MAX_LINE, EventStream
from tests.conftest import Backend, config_dict, running
from tests.test_e2e_data_path import raw_exchange

WAIT = 5.0


@contextlib.asynccontextmanager
async def bystander() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A host the proxy must never talk to: records every request head it gets."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: 6\r\n\r\npwned!")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], heads
    finally:
        server.close()
        await server.wait_closed()


async def test_connect_target_cannot_send_the_request_to_another_host(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       backends={"legacy": {"headers": {"X-Backend-Secret": "s3cr3t"}}})
    async with bystander() as (port, heads), running(tmp_path, data) as proxy:
        raw = await raw_exchange(proxy.url, f"CONNECT @127.0.0.1:{port} HTTP/1.1\r\n"
                                 "Host: x\r\nConnection: close\r\n\r\n".encode())
    assert heads == [], heads  # today: the bystander got the request, secret header included
    assert raw.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")), raw[:80]


async def test_absolute_form_target_is_forwarded_as_its_path(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url)
    async with running(tmp_path, data) as proxy:
        raw = await raw_exchange(proxy.url, b"GET http://example.com/v1/x?y=1 HTTP/1.1\r\n"
                                 b"Host: example.com\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200"), raw[:80]
    assert [seen.path_qs for seen in backends["legacy"].seen] == ["/v1/x?y=1"]


async def test_websocket_backend_crash_is_not_a_normal_close(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async def crash(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        assert request.transport is not None
        request.transport.abort()  # the backend process dies mid-session
        return ws

    backends["legacy"].handler = crash
    data = config_dict(backends["legacy"].url, backends["next_gen"].url)
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http, \
            http.ws_connect(f"{proxy.url}/v1/live") as ws:
        await ws.send_str("go")
        async with asyncio.timeout(WAIT):
            message = await ws.receive()
    assert message.type == aiohttp.WSMsgType.CLOSE
    assert message.data != aiohttp.WSCloseCode.OK  # e.g. 1011 or 1014, never a clean 1000


def test_one_endless_event_keeps_memory_bounded() -> None:
    stream = EventStream((("usage", "total_tokens"),))
    line = b"data: " + b"x" * 1000 + b"\n"
    for _ in range(8_000):  # 8 MB of one event, as an SSE answer streams through the proxy
        stream.feed(line)
    held = stream.held
    assert held <= 2 * MAX_LINE, held


async def test_client_cannot_forge_the_shadow_marker(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url)
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http, \
            http.post(f"{proxy.url}/v1/tasks", json={"task": "pay"},
                      headers={"X-Rollout-Shadow": "1"}) as answer:
        assert answer.status == 200
    assert "X-Rollout-Shadow" not in backends["legacy"].seen[0].headers
