"""End to end on the data path: real backends on 127.0.0.1, the real proxy in front of them.

Fault injection is done with small asyncio servers (truncating, stalling, garbage-speaking
backends) and raw sockets on the client side; nothing of our HTTP stack is mocked. Every wait
is bounded, and ordering is proven with events, not sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import mmh3
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from tests.conftest import Backend, config_dict, dead_url, running

WAIT = 5.0  # the bound on any single wait in this file
HOP_BY_HOP = ("Keep-Alive", "TE", "Proxy-Authorization", "Proxy-Authenticate", "Upgrade",
              "Trailer", "Proxy-Connection")

RawReply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# Helpers ------------------------------------------------------------------------------------


def legacy_config(backends: dict[str, Backend], **sections: Any) -> dict[str, Any]:
    return config_dict(backends["legacy"].url, backends["next_gen"].url, **sections)


def host_port(url: str) -> tuple[str, int]:
    parsed = URL(url)
    assert parsed.host is not None and parsed.port is not None
    return parsed.host, parsed.port


@contextlib.asynccontextmanager
async def raw_backend(reply: RawReply, heads: list[bytes] | None = None
                      ) -> AsyncIterator[str]:
    """A backend that speaks whatever bytes `reply` writes, after reading a request head
    (appended to `heads`, if given)."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            if heads is not None:
                heads.append(head)
            await reply(reader, writer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def plain_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A RawReply: a whole 200 answer, "ok"."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()


@contextlib.asynccontextmanager
async def raw_connection(url: str) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                           asyncio.StreamWriter]]:
    host, port = host_port(url)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def raw_exchange(url: str, data: bytes) -> bytes:
    """Send raw bytes to the proxy and read until it closes the connection."""
    async with raw_connection(url) as (reader, writer):
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(WAIT):
            return await reader.read()


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 answer framed by Content-Length: (head, body)."""
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return head, await reader.readexactly(length)


def assert_proxy_error(status: int, headers: CIMultiDictProxy[str], body: bytes,
                       expected: int) -> dict[str, Any]:
    assert status == expected, body
    assert headers["Content-Type"].startswith("application/json")
    document = json.loads(body)
    assert document["error"]
    assert document["request_id"] == headers["X-Request-Id"]
    return dict(document)


async def assert_failed_answer(response: aiohttp.ClientResponse, status: int) -> None:
    """An upstream that failed mid-answer: a JSON error when nothing had reached the client
    yet, else a cut connection (an incomplete payload); never a clean short answer."""
    assert response.headers["X-Rollout-Backend"] == "legacy"
    if response.status != 200:
        assert_proxy_error(response.status, response.headers, await response.read(), status)
        return
    with pytest.raises(aiohttp.ClientPayloadError):
        async with asyncio.timeout(WAIT):
            await response.read()


def bucket(salt: str, user: str) -> int:
    """The SPEC's formula, computed here independently of proxy.datapath.decide."""
    return int(mmh3.hash(f"{salt}:{user}", signed=False)) % 10000


def user_with_bucket(salt: str, wanted: Callable[[int], bool]) -> str:
    return next(f"user-{n}" for n in range(10_000) if wanted(bucket(salt, f"user-{n}")))


# Forwarding fidelity --------------------------------------------------------------------------


async def test_request_reaches_backend_unchanged_with_forwarding_headers(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    seen: dict[str, Any] = {}

    async def record(request: web.Request) -> web.Response:
        seen.update(method=request.method, raw_path=request.raw_path,
                    headers=request.headers.copy(), body=await request.read())
        return web.Response(text="ok")

    backends["legacy"].handler = record
    body = os.urandom(2**20)
    path_qs = ("/v1/a%2Fb/caf%C3%A9/%E2%9C%93;p=1%3B?z=9&a=2&a=1&q=%2B+x%20y&flag&u=%C3%A9"
               "&%2F=%3D")
    sent = [("Content-Type", "application/x-agent-bin"), ("User-Agent", "e2e-client/1"),
            ("Accept-Encoding", "br"), ("X-Custom", "Value With  Spaces"),
            ("X-Multi", "first"), ("X-Multi", "second"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
            ("Idempotency-Key", "idem-7f3a"), ("X-Request-Id", "client-rid-42"),
            ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
            ("Connection", "keep-alive, X-Hop-Named"), ("X-Hop-Named", "secret"),
            ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="), ("Proxy-Connection", "keep-alive")]
    async with running(tmp_path, legacy_config(backends)) as proxy, \
            aiohttp.ClientSession(auto_decompress=False) as http, \
            http.post(URL(proxy.url + path_qs, encoded=True), data=body,
                      headers=CIMultiDict(sent)) as response:
        assert response.status == 200
        assert response.headers["X-Rollout-Backend"] == "legacy"
        assert response.headers["X-Request-Id"] == "client-rid-42"
        assert await response.read() == b"ok"
        proxy_host = f"127.0.0.1:{host_port(proxy.url)[1]}"

    headers: CIMultiDictProxy[str] = seen["headers"]
    assert seen["method"] == "POST"
    assert seen["raw_path"] == path_qs
    assert hashlib.sha256(seen["body"]).digest() == hashlib.sha256(body).digest()
    for name in ("Content-Type", "User-Agent", "Accept-Encoding", "X-Custom", "traceparent",
                 "tracestate", "Idempotency-Key"):
        assert headers.getall(name) == [dict(sent)[name]], name
    assert headers.getall("X-Multi") == ["first", "second"]
    assert headers["X-Request-Id"] == "client-rid-42"
    assert headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert headers.getall("X-Forwarded-Proto") == ["http"]
    assert headers.getall("X-Forwarded-Host") == [proxy_host]
    assert headers.getall("Via") == ["1.1 rollout-proxy"]
    assert int(headers["Content-Length"]) == len(body)
    for name in ("X-Hop-Named", *HOP_BY_HOP):
        assert name not in headers, name
    assert "x-hop-named" not in headers.get("Connection", "").lower()


async def test_chunked_request_body_arrives_whole(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    pieces = [os.urandom(10_000), b"", os.urandom(70_000), os.urandom(1)]

    async def stream() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async with running(tmp_path, legacy_config(backends)) as proxy, \
            aiohttp.ClientSession() as http, \
            http.post(f"{proxy.url}/v1/upload", data=stream()) as response:
        assert response.status == 200
    assert backends["legacy"].seen[0].body == b"".join(pieces)


async def test_non_websocket_upgrade_is_served_as_plain_request(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    request = (b"GET /v1/tasks HTTP/1.1\r\nHost: proxy\r\n"
               b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
               b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
    async with running(tmp_path, legacy_config(backends)) as proxy, \
            raw_connection(proxy.url) as (reader, writer):
        writer.write(request)
        head, body = await read_answer(reader)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"X-Rollout-Backend: legacy" in head
    assert json.loads(body)["backend"] == "legacy"
    upstream = CIMultiDict(backends["legacy"].seen[0].headers)
    for name in ("Upgrade", "HTTP2-Settings"):
        assert name not in upstream, name
    assert "upgrade" not in upstream.get("Connection", "").lower()


async def test_absolute_form_target_is_forwarded_as_its_path(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url)
    async with running(tmp_path, data) as proxy:
        raw = await raw_exchange(proxy.url, b"GET http://example.com/v1/x?y=1 HTTP/1.1\r\n"
                                 b"Host: example.com\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200"), raw[:80]
    assert [seen.path_qs for seen in backends["legacy"].seen] == ["/v1/x?y=1"]


async def test_expect_100_continue_gets_continue_and_body_is_forwarded(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, legacy_config(backends)) as proxy, \
            raw_connection(proxy.url) as (reader, writer):
        writer.write(b"POST /v1/tasks HTTP/1.1\r\nHost: proxy\r\nContent-Length: 3\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        async with asyncio.timeout(2):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b"abc")
        head, _ = await read_answer(reader)
    assert head.startswith(b"HTTP/1.1 200")
    assert backends["legacy"].seen[0].body == b"abc"
    assert "Expect" not in CIMultiDict(backends["legacy"].seen[0].headers)


async def test_expect_100_continue_with_oversized_length_gets_413_at_once(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = legacy_config(backends, limits={"max_body_bytes": 1000})
    async with running(tmp_path, data) as proxy, raw_connection(proxy.url) as (reader, writer):
        writer.write(b"POST /v1/tasks HTTP/1.1\r\nHost: proxy\r\nContent-Length: 5000\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        head, body = await read_answer(reader)
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"]
    assert backends["legacy"].seen == []


async def test_request_id_is_generated_and_sent_upstream(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, legacy_config(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/one") as first:
            assert first.status == 200
            rid_one = first.headers["X-Request-Id"]
        too_long = "r" * 201  # not kept: a client id is bounded
        async with http.get(f"{proxy.url}/two", headers={"X-Request-Id": too_long}) as second:
            rid_two = second.headers["X-Request-Id"]
    assert rid_one and rid_two and rid_one != rid_two and rid_two != too_long
    upstream = [CIMultiDict(seen.headers) for seen in backends["legacy"].seen]
    assert [headers["X-Request-Id"] for headers in upstream] == [rid_one, rid_two]


async def test_configured_host_header_replaces_the_urls(tmp_path: Path,
                                                        backends: dict[str, Backend]) -> None:
    heads: list[bytes] = []
    async with raw_backend(plain_ok, heads) as url:
        data = config_dict(url, backends["next_gen"].url,
                           backends={"legacy": {"headers": {"Host": "legacy.internal"}}})
        async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http, \
                http.get(f"{proxy.url}/v1/x") as response:
            assert response.status == 200
    hosts = [line for line in heads[0].split(b"\r\n") if line.lower().startswith(b"host:")]
    assert hosts == [b"Host: legacy.internal"], heads[0]


async def test_request_head_keeps_order_duplicates_and_drops_connection_named(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    heads: list[bytes] = []
    async with raw_backend(plain_ok, heads) as url:
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


async def test_answer_reaches_client_unchanged_without_hop_headers(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    payload = os.urandom(70_000)

    async def answer(request: web.Request) -> web.Response:
        headers = CIMultiDict([
            ("Content-Type", "application/x-agent-bin"), ("X-Multi", "a"), ("X-Multi", "b"),
            ("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; HttpOnly"),
            ("ETag", '"v1"'), ("Cache-Control", "no-store"),
            ("Connection", "X-Backend-Hop"), ("X-Backend-Hop", "internal"),
            ("Keep-Alive", "timeout=7"), ("Proxy-Authenticate", "Basic realm=x"),
            ("Upgrade", "h2c"), ("Trailer", "X-Checksum")])
        return web.Response(status=203, reason="Agent Says Hi", body=payload, headers=headers)

    backends["legacy"].handler = answer
    async with running(tmp_path, legacy_config(backends)) as proxy, \
            aiohttp.ClientSession(auto_decompress=False) as http, \
            http.get(f"{proxy.url}/answer") as response:
        assert response.status == 203
        assert response.reason == "Agent Says Hi"
        assert await response.read() == payload
        headers = response.headers
    assert headers["Content-Length"] == str(len(payload))
    assert headers["Content-Type"] == "application/x-agent-bin"
    assert headers.getall("X-Multi") == ["a", "b"]
    assert headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]
    assert headers["ETag"] == '"v1"'
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Rollout-Backend"] == "legacy"
    assert "X-Request-Id" in headers
    for name in ("X-Backend-Hop", *HOP_BY_HOP):
        assert name not in headers, name
    assert "x-backend-hop" not in headers.get("Connection", "").lower()


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


@pytest.mark.parametrize("status", [204, 304, 404, 500, 503])
async def test_backend_status_and_body_pass_through(
        tmp_path: Path, backends: dict[str, Backend], status: int) -> None:
    body = b"" if status in (204, 304) else json.dumps({"status": status}).encode()

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body or None, headers={"X-From": "backend"})

    backends["legacy"].handler = answer
    connector = aiohttp.TCPConnector(limit=1)  # the same connection must stay usable
    async with running(tmp_path, legacy_config(backends)) as proxy, \
            aiohttp.ClientSession(connector=connector) as http:
        for _ in range(2):
            async with http.get(f"{proxy.url}/status") as response:
                assert response.status == status
                assert await response.read() == body
                assert response.headers["X-From"] == "backend"
                assert response.headers["X-Rollout-Backend"] == "legacy"


async def test_head_answer_keeps_content_length_without_body(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 5000)

    backends["legacy"].handler = answer
    connector = aiohttp.TCPConnector(limit=1)
    async with running(tmp_path, legacy_config(backends)) as proxy, \
            aiohttp.ClientSession(connector=connector) as http:
        async with http.head(f"{proxy.url}/doc") as head:
            assert head.status == 200
            assert head.headers["Content-Length"] == "5000"
            assert await head.read() == b""
        async with http.get(f"{proxy.url}/doc") as get:  # the connection was left clean
            assert await get.read() == b"x" * 5000


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_gzip_answer_stays_gzip_with_its_own_length(
        tmp_path: Path, backends: dict[str, Backend], chunked: bool) -> None:
    plain = json.dumps({"steps": ["click"] * 500, "success": True}).encode()
    compressed = gzip.compress(plain)
    assert len(compressed) < len(plain)

    async def answer(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json",
                   "Vary": "Accept-Encoding"}
        if not chunked:
            return web.Response(body=compressed, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(compressed[:10])
        await response.write(compressed[10:])
        await response.write_eof()
        return response

    backends["legacy"].handler = answer
    async with running(tmp_path, legacy_config(backends)) as proxy, \
            aiohttp.ClientSession(auto_decompress=False) as http, \
            http.get(f"{proxy.url}/gz", headers={"Accept-Encoding": "gzip"}) as response:
        raw = await response.read()
        headers = response.headers
    assert raw == compressed
    assert gzip.decompress(raw) == plain
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Vary"] == "Accept-Encoding"
    if chunked:
        assert headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in headers
    else:
        assert headers["Content-Length"] == str(len(compressed))
    assert CIMultiDict(backends["legacy"].seen[0].headers)["Accept-Encoding"] == "gzip"


def test_c_http_parser_is_in_use() -> None:
    from aiohttp import http_parser, web_protocol

    assert not os.environ.get("AIOHTTP_NO_EXTENSIONS")
    assert hasattr(http_parser, "HttpRequestParserC")
    assert http_parser.HttpRequestParser is http_parser.HttpRequestParserC
    assert http_parser.HttpRequestParser is not http_parser.HttpRequestParserPy
    assert http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser"
    # the server the proxy runs parses with the class it imported at import time
    assert web_protocol.HttpRequestParser is http_parser.HttpRequestParserC


# Streaming -----------------------------------------------------------------------------------


async def test_server_sent_event_reaches_client_before_the_next_is_sent(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    release = asyncio.Event()
    second_sent = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(b"id: 1\ndata: first step\n\n")
        async with asyncio.timeout(WAIT):
            await release.wait()
        await response.write(b"id: 2\ndata: second step\n\n")
        second_sent.set()
        await response.write_eof()
        return response

    backends["legacy"].handler = events
    async with running(tmp_path, legacy_config(backends)) as proxy, \
            aiohttp.ClientSession() as http, http.get(f"{proxy.url}/v1/events") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["X-Rollout-Backend"] == "legacy"
        async with asyncio.timeout(WAIT):
            first = await response.content.readuntil(b"\n\n")
        assert first == b"id: 1\ndata: first step\n\n"
        assert not second_sent.is_set()  # event 1 arrived while the backend still held event 2
        release.set()
        async with asyncio.timeout(WAIT):
            rest = await response.content.read()
        assert rest == b"id: 2\ndata: second step\n\n"


DRIP_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
             b"Content-Length: 10\r\n\r\n")


@pytest.mark.parametrize("phase", ["legacy", "shadow"])
async def test_small_answer_of_known_length_drips_through_byte_by_byte(
        tmp_path: Path, backends: dict[str, Backend], phase: str) -> None:
    """httpbin's /drip: a 10-byte answer, one byte at a time. Each byte is written only once
    the client has the one before, so a proxy that held the small body until it was whole
    would never finish."""
    received = [asyncio.Event() for _ in range(10)]

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(DRIP_HEAD)
        for index in range(10):
            writer.write(b"%d" % index)
            await writer.drain()
            async with asyncio.timeout(WAIT):
                await received[index].wait()

    async with raw_backend(drip) as url:
        data = config_dict(url, backends["next_gen"].url,
                           rollout={"phase": phase}, shadow={"sample": 1.0})
        async with running(tmp_path, data) as proxy, raw_connection(proxy.url) as (reader,
                                                                                   writer):
            started = time.monotonic()
            writer.write(b"GET /drip HTTP/1.1\r\nHost: proxy\r\n\r\n")
            async with asyncio.timeout(WAIT):
                head = await reader.readuntil(b"\r\n\r\n")
                body = b""
                for index in range(10):
                    body += await reader.readexactly(1)
                    if index == 0:
                        first_byte_s = time.monotonic() - started
                    received[index].set()
            if phase == "shadow":
                await proxy.mirrors_settled()
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 10\r\n" in head
    assert body == b"0123456789"
    assert first_byte_s < 1.0, first_byte_s  # it came at once, not after the last byte
    if phase == "shadow":
        assert len(backends["next_gen"].seen) == 1


async def test_large_chunked_answer_arrives_complete(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    chunk = hashlib.sha256(b"seed").digest() * (2**15)  # 1 MiB
    chunks = 20
    expected = hashlib.sha256()
    for index in range(chunks):
        expected.update(index.to_bytes(4, "big") + chunk[4:])

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for index in range(chunks):
            await response.write(index.to_bytes(4, "big") + chunk[4:])
        await response.write_eof()
        return response

    backends["legacy"].handler = big
    received, size = hashlib.sha256(), 0
    async with running(tmp_path, legacy_config(backends)) as proxy, \
            aiohttp.ClientSession() as http, http.get(f"{proxy.url}/big") as response:
        assert response.headers["Transfer-Encoding"] == "chunked"
        async with asyncio.timeout(15):
            async for piece in response.content.iter_any():
                received.update(piece)
                size += len(piece)
    assert size == chunks * len(chunk)
    assert received.digest() == expected.digest()


# HTTPS backends ------------------------------------------------------------------------------


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


# Phases through the proxy ---------------------------------------------------------------------


async def test_default_phase_marks_legacy_answers_deprecated(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    migration = "https://docs.example.com/next-gen/migrate"
    data = legacy_config(backends, rollout={
        "phase": "default", "deprecation_date": "2025-03-01", "sunset_date": "2025-04-01",
        "migration_url": migration})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/v1/tasks",
                            headers={"X-User-Id": "u1", "X-Next-Gen": "0"}) as opted_out:
            assert opted_out.status == 200
            legacy = opted_out.headers
        async with http.get(f"{proxy.url}/v1/tasks", headers={"X-User-Id": "u1"}) as default:
            assert default.status == 200
            next_gen = default.headers
    deprecation = int(datetime(2025, 3, 1, tzinfo=UTC).timestamp())
    assert legacy["X-Rollout-Backend"] == "legacy"
    assert legacy["Deprecation"] == f"@{deprecation}"
    assert legacy["Sunset"] == "Tue, 01 Apr 2025 00:00:00 GMT"
    assert legacy["Link"] == f'<{migration}>; rel="deprecation"'
    assert next_gen["X-Rollout-Backend"] == "next_gen"
    for name in ("Deprecation", "Sunset", "Link"):
        assert name not in next_gen


async def test_sunset_phase_answers_opt_out_with_410_naming_migration(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    migration = "https://docs.example.com/next-gen/migrate"
    data = legacy_config(backends, rollout={"phase": "sunset", "migration_url": migration})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.url}/v1/tasks", json={"task": "x"},
                             headers={"X-User-Id": "u1", "X-Next-Gen": "no"}) as gone:
            document = assert_proxy_error(gone.status, gone.headers, await gone.read(), 410)
        async with http.get(f"{proxy.url}/v1/tasks", headers={"X-User-Id": "u1"}) as served:
            assert served.status == 200
            assert served.headers["X-Rollout-Backend"] == "next_gen"
    assert migration in json.dumps(document)
    assert backends["legacy"].seen == []
    assert len(backends["next_gen"].seen) == 1


async def test_progressive_phase_routes_by_bucket(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    salt = "e2e-salt"
    inside = user_with_bucket(salt, lambda value: value < 3000)
    outside = user_with_bucket(salt, lambda value: value >= 3000)
    data = legacy_config(backends, rollout={"phase": "progressive", "percentage": 30,
                                            "salt": salt}, shadow={"sample": 0})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        served = {}
        for name, headers in (("inside", {"X-User-Id": inside}),
                              ("outside", {"X-User-Id": outside}),
                              ("opted_in", {"X-User-Id": outside, "X-Next-Gen": "1"}),
                              ("opted_out", {"X-User-Id": inside, "X-Next-Gen": "0"})):
            for _ in range(2):  # sticky: the same user gets the same backend again
                async with http.get(f"{proxy.url}/v1/tasks", headers=headers) as response:
                    assert response.status == 200
                    served.setdefault(name, set()).add(response.headers["X-Rollout-Backend"])
    assert served == {"inside": {"next_gen"}, "outside": {"legacy"},
                      "opted_in": {"next_gen"}, "opted_out": {"legacy"}}
    assert len(backends["next_gen"].seen) == 4
    assert len(backends["legacy"].seen) == 4


# Errors made by the proxy ---------------------------------------------------------------------


async def test_both_backends_down_gives_json_502(tmp_path: Path) -> None:
    data = config_dict(dead_url(), dead_url(),
                       rollout={"phase": "progressive", "percentage": 100})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/v1/tasks", headers={"X-User-Id": "u1"}) as response:
            assert_proxy_error(response.status, response.headers, await response.read(), 502)
            assert response.headers["X-Rollout-Backend"] in ("legacy", "next_gen")
        async with http.get(f"{proxy.url}/v1/tasks",
                            headers={"X-Request-Id": "rid-down"}) as anonymous:
            document = assert_proxy_error(anonymous.status, anonymous.headers,
                                          await anonymous.read(), 502)
            assert anonymous.headers["X-Rollout-Backend"] == "legacy"
    assert document["request_id"] == "rid-down"


async def test_upstream_timeout_gives_json_504(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    never = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response(text="too late")

    backends["legacy"].handler = stall
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       backends={"legacy": {"timeout_s": 0.5}})
    try:
        async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
            started = time.monotonic()
            async with asyncio.timeout(WAIT), http.get(f"{proxy.url}/slow") as response:
                assert_proxy_error(response.status, response.headers, await response.read(),
                                   504)
                assert response.headers["X-Rollout-Backend"] == "legacy"
            assert time.monotonic() - started >= 0.45
    finally:
        never.set()


@pytest.mark.parametrize("length", [1000, 2**20], ids=["small", "large"])
async def test_upstream_stalling_mid_answer_is_never_a_clean_short_answer(
        tmp_path: Path, backends: dict[str, Backend], length: int) -> None:
    never = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(length),
                                               "Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b"x" * (length // 10))
        await never.wait()
        return response

    backends["legacy"].handler = stall
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       backends={"legacy": {"timeout_s": 0.5}})
    try:
        async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http, \
                http.get(f"{proxy.url}/stall") as response:
            await assert_failed_answer(response, 504)
    finally:
        never.set()


async def test_body_over_limit_with_content_length_gets_413(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = legacy_config(backends, limits={"max_body_bytes": 1000})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.url}/v1/tasks", data=b"y" * 1000) as at_limit:
            assert at_limit.status == 200
        async with http.post(f"{proxy.url}/v1/tasks", data=b"z" * 1001) as over:
            assert_proxy_error(over.status, over.headers, await over.read(), 413)
    assert [len(seen.body) for seen in backends["legacy"].seen] == [1000]


async def test_chunked_body_streaming_past_limit_gets_413_before_it_ends(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = legacy_config(backends, limits={"max_body_bytes": 1000})
    async with running(tmp_path, data) as proxy, raw_connection(proxy.url) as (reader, writer):
        # 1200 bytes in two chunks, and no last chunk: the body never ends on its own
        writer.write(b"POST /v1/tasks HTTP/1.1\r\nHost: proxy\r\n"
                     b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
                     + b"258\r\n" + b"a" * 600 + b"\r\n" + b"258\r\n" + b"b" * 600 + b"\r\n")
        await writer.drain()
        head, body = await read_answer(reader)
    assert head.startswith(b"HTTP/1.1 413")
    assert b"application/json" in head
    assert b"Connection: close" in head
    assert json.loads(body)["error"]
    assert backends["legacy"].seen == [] and backends["next_gen"].seen == []


MALFORMED = {
    "bad_request_line": b"GARBAGE\r\n\r\n",
    "space_in_header_name": b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n",
    "invalid_header_bytes": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "control_byte_in_name": b"GET / HTTP/1.1\r\nHost: x\r\nX-\x01A: v\r\n\r\n",
    "unknown_method": b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad_version": b"GET / HTTP/9.Z\r\nHost: x\r\n\r\n",
    "content_length_and_chunked": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "duplicate_content_length": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                                 b"Content-Length: 2\r\n\r\nab"),
    "obs_fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\n\r\n",
    "bare_lf": b"GET / HTTP/1.1\nHost: x\n\n",
}


async def test_malformed_requests_get_400_and_never_reach_a_backend(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, legacy_config(backends)) as proxy:
        answers = {name: await raw_exchange(proxy.url, raw) for name, raw in MALFORMED.items()}
    # aiohttp answers a message it cannot parse as HTTP/1.0 (it does not know the version)
    assert {name: answer.split(b" ", 2)[1] for name, answer in answers.items()} == {
        name: b"400" for name in MALFORMED}
    assert backends["legacy"].seen == [] and backends["next_gen"].seen == []


async def test_malformed_request_400_is_json(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, legacy_config(backends)) as proxy:
        answer = await raw_exchange(proxy.url, MALFORMED["space_in_header_name"])
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400"
    assert b"application/json" in head.lower()
    assert set(json.loads(body)) >= {"error", "request_id"}


async def test_connect_target_cannot_send_the_request_to_another_host(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async def pwned(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: 6\r\n\r\npwned!")
        await writer.drain()

    heads: list[bytes] = []  # a host the proxy must never talk to records every head it gets
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       backends={"legacy": {"headers": {"X-Backend-Secret": "s3cr3t"}}})
    async with raw_backend(pwned, heads) as bystander, running(tmp_path, data) as proxy:
        port = host_port(bystander)[1]
        raw = await raw_exchange(proxy.url, f"CONNECT @127.0.0.1:{port} HTTP/1.1\r\n"
                                 "Host: x\r\nConnection: close\r\n\r\n".encode())
    assert heads == [], heads  # once a bug: the bystander got it, secret header included
    assert raw.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")), raw[:80]


TRUNCATED = {
    "content_length": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"t" * 100,
    "typed_content_length": (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n" + b"t" * 100),
    "large_content_length": (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000000\r\n\r\n" + b"t" * 100_000),
    "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"64\r\n" + b"t" * 100 + b"\r\n"),
    "chunked_mid_chunk": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"3e8\r\n" + b"t" * 100),
}


@pytest.mark.parametrize("answer", TRUNCATED.values(), ids=TRUNCATED.keys())
async def test_upstream_closing_mid_answer_is_never_a_clean_short_answer(
        tmp_path: Path, answer: bytes) -> None:
    async def truncate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()

    async with raw_backend(truncate) as url:
        data = config_dict(url, dead_url())
        async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http, \
                http.get(f"{proxy.url}/v1/tasks") as response:
            await assert_failed_answer(response, 502)


GARBAGE = {
    "not_http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "binary": bytes(range(256)) * 4,
    "bad_status": b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
    "bad_header": b"HTTP/1.1 200 OK\r\nContent Length: 2\r\n\r\nhi",
}


@pytest.mark.parametrize("close", [True, False], ids=["then_close", "then_hang"])
@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
async def test_backend_speaking_garbage_gives_json_502(
        tmp_path: Path, garbage: bytes, close: bool) -> None:
    hold = asyncio.Event()

    async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(garbage)
        await writer.drain()
        if not close:
            await hold.wait()

    try:
        async with raw_backend(babble) as url:
            data = config_dict(url, dead_url(), backends={"legacy": {"timeout_s": 2}})
            async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http, \
                    asyncio.timeout(WAIT), http.get(f"{proxy.url}/v1/tasks") as response:
                assert_proxy_error(response.status, response.headers, await response.read(),
                                   502)
                assert response.headers["X-Rollout-Backend"] == "legacy"
    finally:
        hold.set()


async def test_over_max_in_flight_gets_503_with_retry_after(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    release = asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        async with asyncio.timeout(WAIT):
            await release.wait()
        return web.Response(text="held")

    backends["legacy"].handler = hold
    data = legacy_config(backends, limits={"max_in_flight": 1})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        async def first() -> tuple[int, bytes]:
            async with http.get(f"{proxy.url}/hold") as response:
                return response.status, await response.read()

        task = asyncio.ensure_future(first())
        try:
            await backends["legacy"].wait_for(1)
            async with http.get(f"{proxy.url}/second") as refused:
                assert_proxy_error(refused.status, refused.headers, await refused.read(), 503)
                assert int(refused.headers["Retry-After"]) >= 1
        finally:
            release.set()
        async with asyncio.timeout(WAIT):
            assert await task == (200, b"held")
        async with http.get(f"{proxy.url}/third") as after:
            assert after.status == 200  # the slot was given back
    assert [seen.path_qs for seen in backends["legacy"].seen] == ["/hold", "/third"]


async def test_slow_request_head_is_cut_off_with_408(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = legacy_config(backends, limits={"header_timeout_s": 0.5})

    async def partial_head(url: str) -> bytes:
        async with raw_connection(url) as (reader, writer):
            writer.write(b"GET /slow HTTP/1.1\r\nHost: proxy\r\nX-Partial: ye")
            await writer.drain()
            async with asyncio.timeout(WAIT):
                return await reader.read()

    async def silent(url: str) -> bytes:
        async with raw_connection(url) as (reader, _), asyncio.timeout(WAIT):
            return await reader.read()

    async def kept_alive_then_partial(url: str) -> bytes:
        async with raw_connection(url) as (reader, writer):
            writer.write(b"GET /first HTTP/1.1\r\nHost: proxy\r\n\r\n")
            head, _ = await read_answer(reader)
            assert head.startswith(b"HTTP/1.1 200")
            writer.write(b"GET /second HTTP/1.1\r\nHost: pro")
            await writer.drain()
            async with asyncio.timeout(WAIT):
                return await reader.read()

    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        started = time.monotonic()
        cut = asyncio.gather(partial_head(proxy.url), silent(proxy.url),
                             kept_alive_then_partial(proxy.url))
        async with http.get(f"{proxy.url}/normal") as normal:  # another connection is served
            assert normal.status == 200
        answers = await cut
        elapsed = time.monotonic() - started
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert elapsed >= 0.45
    assert sorted(seen.path_qs for seen in backends["legacy"].seen) == ["/first", "/normal"]


# WebSocket ----------------------------------------------------------------------------------


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=("agent.v1",))
    await ws.prepare(request)
    async for message in ws:
        if message.type == aiohttp.WSMsgType.TEXT:
            await ws.send_str(f"echo:{message.data}")
        elif message.type == aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(message.data[::-1])
    return ws


def upgrade_answers() -> tuple[aiohttp.TraceConfig, list[CIMultiDictProxy[str]]]:
    """Record the headers of every answer head the client gets (the 101 included)."""
    seen: list[CIMultiDictProxy[str]] = []
    trace = aiohttp.TraceConfig()

    async def on_end(session: Any, context: Any, params: aiohttp.TraceRequestEndParams) -> None:
        seen.append(params.response.headers)

    trace.on_request_end.append(on_end)
    return trace, seen


async def test_websocket_frames_pass_both_ways(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    backends["legacy"].handler = ws_echo
    trace, answers = upgrade_answers()
    async with running(tmp_path, legacy_config(backends)) as proxy, \
            aiohttp.ClientSession(trace_configs=[trace]) as http, \
            http.ws_connect(f"{proxy.url}/v1/live") as ws:
        async with asyncio.timeout(WAIT):
            await ws.send_str("hello")
            assert await ws.receive_str() == "echo:hello"
            await ws.send_bytes(b"\x00\x01\x02")
            assert await ws.receive_bytes() == b"\x02\x01\x00"
    assert answers[0]["X-Rollout-Backend"] == "legacy"
    assert backends["legacy"].seen[0].path_qs == "/v1/live"


async def test_websocket_subprotocol_is_negotiated_through_the_proxy(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    backends["legacy"].handler = ws_echo
    async with running(tmp_path, legacy_config(backends)) as proxy, \
            aiohttp.ClientSession() as http, \
            http.ws_connect(f"{proxy.url}/v1/live", protocols=("agent.v1",)) as ws:
        assert ws.protocol == "agent.v1"


async def test_websocket_upgrade_carries_request_id_and_forwarding_headers(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    backends["legacy"].handler = ws_echo
    trace, answers = upgrade_answers()
    async with running(tmp_path, legacy_config(backends)) as proxy, \
            aiohttp.ClientSession(trace_configs=[trace]) as http, \
            http.ws_connect(f"{proxy.url}/v1/live", headers={"X-Request-Id": "ws-rid"}):
        pass
    upstream = CIMultiDict(backends["legacy"].seen[0].headers)
    assert upstream["X-Request-Id"] == "ws-rid"
    assert upstream["X-Forwarded-For"] == "127.0.0.1"
    assert upstream["Via"] == "1.1 rollout-proxy"
    assert answers[0]["X-Request-Id"] == "ws-rid"


async def test_websocket_to_dead_backend_gives_json_502_naming_backend(tmp_path: Path) -> None:
    data = config_dict(dead_url(), dead_url())
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{proxy.url}/v1/live")
    assert refused.value.status == 502
    assert refused.value.headers is not None
    assert refused.value.headers["X-Rollout-Backend"] == "legacy"


async def test_websocket_handshake_to_a_silent_backend_times_out(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # silent until the peer leaves

    async with raw_backend(silent) as url:
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


async def test_websocket_close_code_reaches_the_client(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async def close_with_policy(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        await ws.close(code=4001, message=b"quota exhausted")
        return ws

    backends["legacy"].handler = close_with_policy
    async with running(tmp_path, legacy_config(backends)) as proxy, \
            aiohttp.ClientSession() as http, http.ws_connect(f"{proxy.url}/v1/live") as ws:
        await ws.send_str("go")
        async with asyncio.timeout(WAIT):
            message = await ws.receive()
    assert message.type == aiohttp.WSMsgType.CLOSE
    assert (message.data, message.extra) == (4001, "quota exhausted")


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


async def test_user_from_the_json_body_routes_when_no_earlier_source_has_one(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    sources = [{"header": "X-User-Id"}, {"json": "user_id"}]
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "progressive", "percentage": 50, "salt": "test"},
                       routing={"user_id": sources}, shadow={"sample": 0.0})
    users = [f"user-{n}" for n in range(40)]
    want = {u: "next_gen" if mmh3.hash(f"test:{u}", signed=False) % 10000 < 5000 else "legacy"
            for u in users}
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        for user in users:
            async with http.post(f"{proxy.url}/v1/tasks", json={"user_id": user}) as answer:
                assert answer.headers["X-Rollout-Backend"] == want[user]
        # The header comes first in routing.user_id: it wins over the body.
        legacy_user = next(u for u in users if want[u] == "legacy")
        next_gen_user = next(u for u in users if want[u] == "next_gen")
        async with http.post(f"{proxy.url}/v1/tasks", json={"user_id": next_gen_user},
                             headers={"X-User-Id": legacy_user}) as answer:
            assert answer.headers["X-Rollout-Backend"] == "legacy"
        # A body that is not JSON is no user id, and no error.
        async with http.post(f"{proxy.url}/v1/tasks", data=b"{not json",
                             headers={"Content-Type": "application/json"}) as answer:
            assert answer.status == 200
            assert answer.headers["X-Rollout-Backend"] == "legacy"
