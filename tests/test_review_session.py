"""Review of 679a837..HEAD (the lean h1 client and its companions).

Each bug found in review has a test here (all fixed); the others pin behaviour verified
while reviewing. Real servers on 127.0.0.1, nothing of the HTTP stack mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.datapath import h1
from proxy.telemetry.trace import utc_stamp
from tests.conftest import Backend, config_dict, running, serve_app
from tests.test_shadow import settled_trace, shadow_config

pytestmark = pytest.mark.timeout(60)
WAIT = 5.0


@contextlib.asynccontextmanager
async def raw_backend(answer: bytes | None) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A backend that records each request head; answers `answer`, or never (None)."""
    heads: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                heads.append(await reader.readuntil(b"\r\n\r\n"))
                if answer is None:
                    await reader.read()  # silent until the peer leaves
                    return
                writer.write(answer)
                await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", heads
    finally:
        for writer in writers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


# Comparison ---------------------------------------------------------------------------------


async def test_number_turned_boolean_is_a_shape_mismatch(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async def answer_with(done: object) -> web.Response:
        return web.json_response({"success": True, "done": done})

    async def legacy(request: web.Request) -> web.StreamResponse:
        return await answer_with(1)

    async def next_gen(request: web.Request) -> web.StreamResponse:
        return await answer_with(True)

    backends["legacy"].handler, backends["next_gen"].handler = legacy, next_gen
    async with running(tmp_path, shadow_config(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.url}/v1/tasks", json={"q": 1}) as response:
            assert response.status == 200
        lines = await settled_trace(proxy)
        assert len(lines) == 1
        assert lines[0]["match"]["shape"] is False, lines[0]["match"]
        assert lines[0]["match"]["diff"] == ["done"]
        assert proxy.metric("rollout_shadow_comparisons_total", result="mismatch") == 1


async def test_identical_answers_match_and_trace_line_keeps_its_fields(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, shadow_config(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.url}/v1/tasks?x=1", json={"q": 1},
                             headers={"X-Request-Id": "rid-1"}) as response:
            assert response.status == 200
        lines = await settled_trace(proxy)
    assert len(lines) == 1
    line = lines[0]
    assert list(line) == ["execution_id", "ts", "method", "path", "old_system", "new_system",
                          "match"]
    assert line["execution_id"] == "rid-1" and line["path"] == "/v1/tasks"
    assert list(line["old_system"]) == ["status", "time_ms", "ttft_ms", "tokens", "success",
                                        "memory_mb", "bytes", "cost_usd"]
    assert line["match"]["result"] == "match", line["match"]


# Trace stamp --------------------------------------------------------------------------------


def test_trace_stamp_milliseconds_match_the_old_datetime_format() -> None:
    for now in (1700000000.001, 1700000000.123, 1700000000.29):
        old = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        assert utc_stamp(now) == old.replace("+00:00", "Z")


# Host and headers on the wire ---------------------------------------------------------------


async def test_configured_host_header_replaces_the_urls(tmp_path: Path,
                                                        backends: dict[str, Backend]) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
    async with raw_backend(answer) as (url, heads):
        data = config_dict(url, backends["next_gen"].url,
                           backends={"legacy": {"headers": {"Host": "legacy.internal"}}})
        async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http, \
                http.get(f"{proxy.url}/v1/x") as response:
            assert response.status == 200
    hosts = [line for line in heads[0].split(b"\r\n") if line.lower().startswith(b"host:")]
    assert hosts == [b"Host: legacy.internal"], heads[0]


async def test_request_head_keeps_order_duplicates_and_drops_connection_named(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
    async with raw_backend(answer) as (url, heads):
        data = config_dict(url + "/api", backends["next_gen"].url)
        headers = [("X-A", "1"), ("X-Secret-Hop", "s"), ("X-B", "2"), ("X-A", "3"),
                   ("Connection", "X-Secret-Hop")]
        async with running(tmp_path, data) as proxy, \
                aiohttp.ClientSession(skip_auto_headers={"User-Agent"}) as http, \
                http.get(f"{proxy.url}/v1/x?y=1", headers=headers) as response:
            assert response.status == 200
            assert await response.text() == "ok"
    lines = heads[0].split(b"\r\n")
    port = url.rsplit(":", 1)[1].encode()
    assert lines[0] == b"GET /api/v1/x?y=1 HTTP/1.1"
    assert lines[1] == b"Host: 127.0.0.1:" + port
    mine = [line for line in lines if line.startswith((b"X-A", b"X-B", b"X-Secret"))]
    assert mine == [b"X-A: 1", b"X-B: 2", b"X-A: 3"]
    assert not any(line.lower().startswith((b"connection", b"content-length"))
                   for line in lines)


async def test_response_headers_keep_duplicates_and_order(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async def cookies(request: web.Request) -> web.StreamResponse:
        response = web.Response(text="x")
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("X-Z", "z")
        response.headers.add("Set-Cookie", "b=2")
        return response

    backends["legacy"].handler = cookies
    data = config_dict(backends["legacy"].url, backends["next_gen"].url)
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http, \
            http.get(f"{proxy.url}/v1/x") as response:
        assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert response.headers["X-Z"] == "z"


# HTTPS backends ----------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_https_backend_answers_with_sni_and_host(
        tmp_path: Path, backends: dict[str, Backend], monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # make_pool's default context trusts it
    hosts: list[str] = []
    names: list[str | None] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        hosts.append(request.headers["Host"])
        return web.json_response({"tls": True})

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    tls.sni_callback = lambda _obj, name, _ctx: names.append(name)  # type: ignore[func-returns-value]
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        data = config_dict(f"https://localhost:{port}", backends["next_gen"].url)
        async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
            for _ in range(2):  # the second one over the kept-alive TLS connection
                async with http.get(f"{proxy.url}/v1/x") as response:
                    assert response.status == 200
                    assert await response.json() == {"tls": True}
    finally:
        await runner.cleanup()
    assert hosts == [f"localhost:{port}"] * 2
    assert names == ["localhost"]  # one handshake, with SNI: the connection was kept alive


# WebSocket pass-through ---------------------------------------------------------------------


async def test_websocket_handshake_to_a_silent_backend_times_out(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with raw_backend(None) as (url, _heads):
        data = config_dict(url, backends["next_gen"].url,
                           backends={"legacy": {"timeout_s": 0.5}})
        async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
            try:
                async with asyncio.timeout(WAIT):
                    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                        await http.ws_connect(f"{proxy.url}/v1/live")
                assert caught.value.status in (502, 504)
            finally:  # let the proxy's handler go before the proxy stops
                for pool in proxy.proxy.runtime.pools.values():
                    if pool.session is not None:
                        await pool.session.close()


# Pool slots ---------------------------------------------------------------------------------


async def test_slot_handed_over_as_the_wait_times_out_is_not_lost() -> None:
    async def hello(request: web.Request) -> web.StreamResponse:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    runner, url = await serve_app(app)
    port = int(url.rsplit(":", 1)[1])
    pool = h1.Pool("127.0.0.1", port, limit=1, connect_timeout_s=1, timeout_s=0.2)
    loop = asyncio.get_running_loop()
    try:
        first = await pool.request("GET", "/", {}, None)  # holds the only slot
        waiting = asyncio.create_task(pool.request("GET", "/", {}, None))
        await asyncio.sleep(0)  # one yield: the task runs up to its wait, with no I/O
        assert len(pool.waiters) == 1

        def stall() -> None:  # the loop stopped past both deadlines, as in a GC pause
            time.sleep(0.4)

        loop.call_later(0.05, first.close)  # the slot frees just before the wait's deadline
        loop.call_soon(stall)
        with contextlib.suppress(h1.WireError):
            (await waiting).release()
        assert pool.connecting == 0, "a held slot was never given back"
        async with asyncio.timeout(WAIT):
            answer = await pool.request("GET", "/", {}, None)
        assert await answer.read() == b"hello"
        answer.release()
    finally:
        await pool.close()
        await runner.cleanup()


async def test_limit_one_serves_requests_one_after_another_through_the_proxy(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       backends={"legacy": {"max_connections": 1}})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        async def one() -> int:
            async with http.get(f"{proxy.url}/v1/x") as response:
                await response.read()
                return response.status

        async with asyncio.timeout(WAIT):
            statuses = await asyncio.gather(*(one() for _ in range(20)))
        pool = proxy.proxy.runtime.pools["legacy"].client
        assert statuses == [200] * 20
        assert len(pool.open) <= 1 and pool.connecting == 0
