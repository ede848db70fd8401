"""Shadow mirroring against real servers: the client never waits for, or sees, next_gen."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.datapath.shadow import UNFINISHED, Pairing
from proxy.telemetry.observe import Measurement
from tests.conftest import Backend, Running, config_dict, dead_url, running, write_config

pytestmark = pytest.mark.timeout(60)
HUGE = 50 * 2**20


def shadow_config(fakes: dict[str, Backend], next_gen: str | None = None,
                  **sections: Any) -> dict[str, Any]:
    shadow = {"sample": 1.0, **sections.pop("shadow", {})}
    return config_dict(fakes["legacy"].url, next_gen or fakes["next_gen"].url,
                       rollout={"phase": "shadow"}, shadow=shadow, **sections)


async def settled_trace(proxy: Running) -> list[dict[str, Any]]:
    """Every mirror finished (none cancelled), every trace line on disk; the lines."""
    await proxy.mirrors_settled()
    assert proxy.proxy.trace is not None
    await proxy.proxy.trace.flush()
    path = proxy.config.telemetry.trace_file
    assert path is not None
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def stalling(release: asyncio.Event) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"late": True})
    return handler


@contextlib.asynccontextmanager
async def raw_server(reply: bytes | None) -> AsyncIterator[str]:
    """A TCP server that reads a request head, writes `reply` (None: nothing), and hangs up."""
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            if reply is not None:
                writer.write(reply)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def get(http: aiohttp.ClientSession, url: str,
              **kwargs: Any) -> tuple[int, bytes, dict[str, str]]:
    async with http.get(url, **kwargs) as response:
        return response.status, await response.read(), dict(response.headers)


async def test_stalled_shadow_never_delays_client(tmp_path: Path,
                                                  backends: dict[str, Backend]) -> None:
    release = asyncio.Event()
    backends["next_gen"].handler = stalling(release)
    data = shadow_config(backends, shadow={"timeout_s": 300})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        try:
            async with asyncio.timeout(10):  # next_gen would take 300 s
                answers = await asyncio.gather(
                    *(get(http, f"{proxy.url}/v1/tasks/{i}") for i in range(200)))
            assert len(answers) == 200
            for status, body, headers in answers:
                assert status == 200
                assert headers["X-Rollout-Backend"] == "legacy"
                assert json.loads(body)["backend"] == "legacy"
            await backends["next_gen"].wait_for(200)
            assert proxy.metric("rollout_shadow_in_flight") == 200
            assert proxy.metric("rollout_requests_total", backend="next_gen", role="shadow",
                                code_class="2xx") == 0
        finally:
            release.set()
        lines = await settled_trace(proxy)
    assert len(lines) == 200
    assert proxy.metric("rollout_shadow_in_flight") == 0


async def test_overload_drops_mirrors_instead_of_queueing(tmp_path: Path,
                                                          backends: dict[str, Backend]) -> None:
    release = asyncio.Event()
    backends["next_gen"].handler = stalling(release)
    data = shadow_config(backends, shadow={"max_in_flight": 2})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        try:
            async with asyncio.timeout(5):
                for i in range(5):
                    status, _, _ = await get(http, f"{proxy.url}/v1/tasks/{i}")
                    assert status == 200
            await backends["next_gen"].wait_for(2)
            assert proxy.metric("rollout_shadow_dropped_total", reason="overload") == 3
            assert proxy.metric("rollout_shadow_in_flight") == 2
        finally:
            release.set()
        assert len(await settled_trace(proxy)) == 2
        assert len(backends["next_gen"].seen) == 2  # the dropped three were never sent later
        # Capacity is back once the stalled mirrors are done.
        status, _, _ = await get(http, f"{proxy.url}/v1/tasks/again")
        await backends["next_gen"].wait_for(3)
        assert proxy.metric("rollout_shadow_dropped_total", reason="overload") == 3


async def closes_after_head(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json",
                                           "Content-Length": "1000"})
    await response.prepare(request)
    await response.write(b'{"partial": ')
    assert request.transport is not None
    request.transport.abort()
    return response


async def huge_answer(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = HUGE
    await response.prepare(request)
    chunk = b"x" * 2**20
    for _ in range(HUGE // len(chunk)):
        await response.write(chunk)
    await response.write_eof()
    return response


async def server_error(request: web.Request) -> web.StreamResponse:
    return web.json_response({"error": "boom"}, status=500)


@pytest.mark.parametrize(("misbehaviour", "result", "status", "size", "error"), [
    ("500", "mismatch", 500, None, None),
    ("garbage", "error", None, None, "bad_response"),
    ("hang_up", "error", None, None, "reset"),
    ("truncated", "error", None, None, "truncated"),
    ("50MB", "mismatch", 200, HUGE, None),
])
async def test_misbehaving_next_gen_never_changes_the_client_answer(
        tmp_path: Path, backends: dict[str, Backend], misbehaviour: str, result: str,
        status: int | None, size: int | None, error: str | None) -> None:
    handlers = {"500": server_error, "truncated": closes_after_head, "50MB": huge_answer}
    raw = {"garbage": b"\x00\xffTHIS IS NOT HTTP\r\n\r\n", "hang_up": None}
    async with contextlib.AsyncExitStack() as stack:
        next_gen = None
        if misbehaviour in raw:
            next_gen = await stack.enter_async_context(raw_server(raw[misbehaviour]))
        else:
            backends["next_gen"].handler = handlers[misbehaviour]
        proxy = await stack.enter_async_context(
            running(tmp_path, shadow_config(backends, next_gen)))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        async with asyncio.timeout(20):
            answers = [await get(http, f"{proxy.url}/v1/tasks?n={i}",
                                 headers={"X-Request-Id": f"rid-{i}"}) for i in range(3)]
            lines = await settled_trace(proxy)
    for status_got, body, headers in answers:
        assert status_got == 200
        assert headers["X-Rollout-Backend"] == "legacy"
        assert "X-Rollout-Fallback" not in headers
        assert json.loads(body) == {"backend": "legacy", "success": True,
                                    "usage": {"total_tokens": 12000}}
    assert sorted(line["execution_id"] for line in lines) == ["rid-0", "rid-1", "rid-2"]
    for line in lines:
        assert line["match"]["result"] == result
        assert line["new_system"]["status"] == status
        assert line["old_system"]["status"] == 200
        if size is not None:
            assert line["new_system"]["bytes"] == size
        assert line["new_system"].get("error") == error
        if status is None:
            assert line["new_system"]["success"] is False
    assert proxy.metric("rollout_shadow_comparisons_total", result=result) == 3


@pytest.mark.parametrize("chunked", [False, True])
async def test_post_body_reaches_both_backends_byte_identical(
        tmp_path: Path, backends: dict[str, Backend], chunked: bool) -> None:
    payload = os.urandom(300_000) + b"\r\n0\r\n\r\n" + bytes(range(256))

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 65_000):
            yield payload[start:start + 65_000]

    async with running(tmp_path, shadow_config(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.url}/v1/upload", data=pieces() if chunked else payload,
                             headers={"Content-Type": "application/octet-stream"}) as response:
            assert response.status == 200
            assert response.headers["X-Rollout-Backend"] == "legacy"
        await backends["next_gen"].wait_for(1)
    assert backends["legacy"].seen[0].body == payload
    assert backends["next_gen"].seen[0].body == payload


async def test_body_over_one_mebibyte_reaches_both_backends(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    payload = os.urandom(3 * 2**20)
    async with running(tmp_path, shadow_config(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.url}/v1/upload", data=io.BytesIO(payload)) as response:
            assert response.status == 200
        await backends["next_gen"].wait_for(1)
    assert backends["legacy"].seen[0].body == backends["next_gen"].seen[0].body == payload


async def test_mirrored_copy_is_the_same_request_marked_as_shadow(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    headers = {"X-User-Id": "u-1", "Authorization": "Bearer abc", "X-Custom": "one, two",
               "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
               "Content-Type": "application/json", "X-Request-Id": "copy-1"}
    async with running(tmp_path, shadow_config(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.url}/v1/tasks/7?a=1&b=%20x&a=2", data=b'{"k": 1}',
                             headers=headers) as response:
            assert response.status == 200
        await backends["next_gen"].wait_for(1)
    primary, copy = backends["legacy"].seen[0], backends["next_gen"].seen[0]
    assert copy.method == primary.method == "POST"
    assert copy.path_qs == primary.path_qs == "/v1/tasks/7?a=1&b=%20x&a=2"
    assert copy.body == primary.body == b'{"k": 1}'
    assert copy.headers.pop("X-Rollout-Shadow") == "1"
    assert "X-Rollout-Shadow" not in primary.headers
    copy.headers.pop("Host")
    primary.headers.pop("Host")
    assert copy.headers == primary.headers
    sent = CIMultiDict(copy.headers)
    for name, value in headers.items():
        assert sent[name] == value


async def test_client_cannot_forge_the_shadow_marker(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url)
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http, \
            http.post(f"{proxy.url}/v1/tasks", json={"task": "pay"},
                      headers={"X-Rollout-Shadow": "1"}) as answer:
        assert answer.status == 200
    assert "X-Rollout-Shadow" not in backends["legacy"].seen[0].headers


async def test_trace_line_per_mirrored_request(tmp_path: Path,
                                               backends: dict[str, Backend]) -> None:
    secret_user, secret_body = "user-secret-4242", "body-secret-prompt"
    legacy_body = json.dumps({"success": True, "answer": "legacy says " + secret_body,
                              "usage": {"total_tokens": 12000}}).encode()
    next_gen_body = json.dumps({"success": True, "answer": "short",
                                "usage": {"total_tokens": 1200}}).encode()

    def answering(body: bytes, tokens: int) -> Callable[[web.Request],
                                                        Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(body=body, content_type="application/json",
                                headers={"X-Tokens-Used": str(tokens)})
        return handler

    backends["legacy"].handler = answering(legacy_body, 12000)
    backends["next_gen"].handler = answering(next_gen_body, 1200)
    async with running(tmp_path, shadow_config(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        ids = []
        for i in range(4):
            headers = {"X-User-Id": secret_user, "Cookie": f"user_id={secret_user}"}
            if i % 2 == 0:
                headers["X-Request-Id"] = f"given-{i}"
            async with http.post(f"{proxy.url}/v1/tasks?user_id={secret_user}",
                                 json={"user_id": secret_user, "prompt": secret_body},
                                 headers=headers) as response:
                assert await response.read() == legacy_body
                ids.append(response.headers["X-Request-Id"])
        lines = await settled_trace(proxy)
        text = proxy.config.telemetry.trace_file.read_text()  # type: ignore[union-attr]
    assert ids[0] == "given-0" and ids[2] == "given-2"
    assert sorted(line["execution_id"] for line in lines) == sorted(ids)
    for line in lines:
        assert line["method"] == "POST"
        assert line["path"] == "/v1/tasks"
        assert line["ts"].endswith("Z")
        old, new = line["old_system"], line["new_system"]
        assert (old["status"], old["tokens"], old["success"], old["bytes"]) == (
            200, 12000, True, len(legacy_body))
        assert (new["status"], new["tokens"], new["success"], new["bytes"]) == (
            200, 1200, True, len(next_gen_body))
        assert old["time_ms"] >= 0 and new["time_ms"] >= 0
        assert {key: line["match"][key] for key in ("result", "status", "success", "shape",
                                                    "diff")} == {
            "result": "match", "status": True, "success": True, "shape": True, "diff": []}
    assert secret_user not in text
    assert secret_body not in text
    assert proxy.metric("rollout_shadow_comparisons_total", result="match") == 4
    assert proxy.metric("rollout_shadow_comparisons_total", result="mismatch") == 0
    assert proxy.metric("rollout_requests_total", backend="next_gen", role="shadow",
                        code_class="2xx") == 4
    assert proxy.metric("rollout_requests_total", backend="legacy", role="primary",
                        code_class="2xx") == 4
    assert proxy.metric("rollout_tokens_total", backend="next_gen", role="shadow") == 4 * 1200


async def test_figures_from_json_body_and_memory_header(tmp_path: Path,
                                                        backends: dict[str, Backend]) -> None:
    """Tokens from usage.total_tokens when X-Tokens-Used is absent; success from the body's
    `success` (a 200 that says it failed); memory from X-Memory-MB."""
    def answering(tokens: int, success: bool, memory: str) -> Callable[
            [web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.json_response({"success": success, "usage": {"total_tokens": tokens}},
                                     headers={"X-Memory-MB": memory})
        return handler

    backends["legacy"].handler = answering(12000, True, "512")
    backends["next_gen"].handler = answering(1200, False, "128.5")
    async with running(tmp_path, shadow_config(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        status, _, _ = await get(http, f"{proxy.url}/v1/tasks", headers={"X-Request-Id": "m"})
        assert status == 200
        (line,) = await settled_trace(proxy)
    assert line["old_system"]["tokens"] == 12000
    assert line["new_system"]["tokens"] == 1200
    assert line["old_system"]["memory_mb"] == 512
    assert line["new_system"]["memory_mb"] == 128.5
    assert line["old_system"]["success"] is True
    assert line["new_system"]["success"] is False
    assert line["match"]["result"] == "mismatch"
    assert line["match"]["success"] is False
    assert proxy.metric("rollout_shadow_comparisons_total", result="mismatch") == 1
    assert proxy.metric("rollout_tokens_total", backend="next_gen", role="shadow") == 1200


async def test_trace_bytes_are_the_encoded_body(tmp_path: Path,
                                                backends: dict[str, Backend]) -> None:
    document = json.dumps({"success": True, "text": "agent " * 2000}).encode()
    compressed = gzip.compress(document)

    async def gzipped(request: web.Request) -> web.StreamResponse:
        return web.Response(body=compressed, headers={
            "Content-Type": "application/json", "Content-Encoding": "gzip",
            "X-Tokens-Used": "12000"})

    backends["legacy"].handler = gzipped
    async with running(tmp_path, shadow_config(backends)) as proxy, \
            aiohttp.ClientSession(auto_decompress=False) as http:
        status, body, headers = await get(http, f"{proxy.url}/v1/tasks")
        (line,) = await settled_trace(proxy)
    assert (status, body, headers["Content-Encoding"]) == (200, compressed, "gzip")
    assert line["old_system"]["bytes"] == len(compressed)
    assert line["old_system"]["tokens"] == 12000


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


async def retired_pools_closed() -> None:
    """Let the pools a reload retired close (they wait out the old timeout_s, kept short)."""
    retiring = [t for t in asyncio.all_tasks() if t.get_name() == "pool-retire"]
    if retiring:
        await asyncio.wait(retiring, timeout=5)


async def test_reload_moves_mirrors_to_the_new_next_gen(tmp_path: Path,
                                                        backends: dict[str, Backend]) -> None:
    short = {"next_gen": {"timeout_s": 0.1}}
    async with running(tmp_path, shadow_config(backends, dead_url(), backends=short)) as proxy, \
            aiohttp.ClientSession() as http:
        write_config(tmp_path, shadow_config(backends, backends=short))
        assert proxy.proxy.control.reload()
        await retired_pools_closed()
        assert proxy.proxy.runtime.config.backends["next_gen"].url == backends["next_gen"].url
        status, _, _ = await get(http, f"{proxy.url}/v1/tasks", headers={"X-Request-Id": "r"})
        (line,) = await settled_trace(proxy)
    assert status == 200
    assert line["new_system"]["status"] == 200
    assert len(backends["next_gen"].seen) == 1


async def test_stop_closes_pools_a_reload_retired(tmp_path: Path,
                                                  backends: dict[str, Backend]) -> None:
    async with running(tmp_path, shadow_config(backends, dead_url())) as proxy:
        retired = proxy.proxy.runtime.pools["next_gen"]
        write_config(tmp_path, shadow_config(backends))
        assert proxy.proxy.control.reload()
    try:
        assert retired.closed
    finally:
        await retired.close()


DEEP_JSON = b"[" * 100_000 + b"]" * 100_000  # valid JSON, nested past the parser's recursion


async def deep_json(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    await response.write(DEEP_JSON)
    await response.write_eof()
    return response


@pytest.mark.parametrize("side", ["legacy", "next_gen"])
async def test_deeply_nested_json_answer_is_measured_without_failing(
        tmp_path: Path, backends: dict[str, Backend], side: str) -> None:
    backends[side].handler = deep_json
    async with running(tmp_path, shadow_config(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        status, body, _ = await get(http, f"{proxy.url}/v1/tasks")
        assert status == 200
        if side == "legacy":
            assert body == DEEP_JSON
        lines = await settled_trace(proxy)
    assert len(lines) == 1


async def test_shadow_timeout_is_an_error_the_client_never_sees(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    release = asyncio.Event()
    backends["next_gen"].handler = stalling(release)
    data = shadow_config(backends, shadow={"timeout_s": 0.3})
    try:
        async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
            async with asyncio.timeout(5):
                status, _, _ = await get(http, f"{proxy.url}/v1/tasks")
            (line,) = await settled_trace(proxy)
    finally:
        release.set()
    assert status == 200
    assert line["new_system"]["error"] == "timeout"
    assert line["match"]["result"] == "error"
    assert proxy.metric("rollout_shadow_comparisons_total", result="error") == 1
    assert proxy.metric("rollout_requests_total", backend="next_gen", role="shadow",
                        code_class="error") == 1


async def test_legacy_failure_still_compares(tmp_path: Path,
                                             backends: dict[str, Backend]) -> None:
    """legacy refused: the client gets the proxy's 502, the mirror still ends in the trace."""
    async with running(tmp_path, config_dict(
            "http://127.0.0.1:1", backends["next_gen"].url, rollout={"phase": "shadow"},
            shadow={"sample": 1.0})) as proxy, aiohttp.ClientSession() as http:
        status, body, _ = await get(http, f"{proxy.url}/v1/tasks",
                                    headers={"X-Request-Id": "lf"})
        (line,) = await settled_trace(proxy)
    assert status == 502
    assert json.loads(body)["request_id"] == "lf"
    assert line["execution_id"] == "lf"
    assert line["old_system"]["status"] is None
    assert line["new_system"]["status"] == 200


async def test_a_mirror_done_before_legacy_answers_is_compared_when_legacy_does(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    """The mirror ends first and frees its in-flight slot at once; the comparison is made
    when legacy's answer ends, and it is the same trace line as in the other order."""
    release = asyncio.Event()
    backends["legacy"].handler = stalling(release)
    async with running(tmp_path, shadow_config(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        shadow = proxy.proxy.shadow
        answer = asyncio.ensure_future(get(http, f"{proxy.url}/v1/tasks",
                                           headers={"X-Request-Id": "first-mirror"}))
        try:
            await backends["next_gen"].wait_for(1)
            await proxy.mirrors_settled(5)  # the mirror ended while legacy still thinks
            assert shadow.in_flight == 0
            assert proxy.metric("rollout_shadow_in_flight") == 0
            assert proxy.metric("rollout_shadow_comparisons_total", result="match") == 0
            assert proxy.metric("rollout_shadow_comparisons_total", result="mismatch") == 0
        finally:
            release.set()
        status, body, _ = await answer
        (line,) = await settled_trace(proxy)
    assert (status, json.loads(body)) == (200, {"late": True})
    assert line["execution_id"] == "first-mirror"
    assert line["old_system"]["status"] == 200 and line["new_system"]["status"] == 200
    assert line["match"]["result"] == "mismatch"  # {"late"} against next_gen's own keys
    assert line["match"]["diff"] == ["backend", "late", "success", "usage"]
    assert proxy.metric("rollout_shadow_comparisons_total", result="mismatch") == 1



def padded_json(size: int) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"success": True, "pad": "p" * size})
    return handler


@pytest.mark.parametrize("first", ["mirror", "primary"])
async def test_answers_parked_for_a_comparison_stay_within_max_held_bytes(
        tmp_path: Path, backends: dict[str, Backend], first: str) -> None:
    """Four requests whose first half (a 60 KB JSON answer) must wait for the other: one
    fits shadow.max_held_bytes (100 KB) and is compared; the other three comparisons are
    dropped and counted, while every client gets its answer."""
    release = asyncio.Event()
    early, late = ("next_gen", "legacy") if first == "mirror" else ("legacy", "next_gen")
    backends[early].handler = padded_json(60_000)
    backends[late].handler = stalling(release)
    data = shadow_config(backends, shadow={"max_held_bytes": 100_000})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        shadow = proxy.proxy.shadow
        answers = asyncio.gather(*[get(http, f"{proxy.url}/v1/tasks") for _ in range(4)])
        try:
            await backends[late].wait_for(4)
            if first == "mirror":
                await proxy.mirrors_settled(5)  # each mirror parked its answer, or could not
            else:
                statuses = [status for status, _, _ in await answers]
            assert proxy.metric("rollout_shadow_dropped_total", reason="held_bytes") == 3
            assert 60_000 < shadow.held_bytes <= 100_000
            assert proxy.metric("rollout_shadow_held_bytes") == shadow.held_bytes
        finally:
            release.set()
        if first == "mirror":
            statuses = [status for status, _, _ in await answers]
        await proxy.mirrors_settled()
    assert statuses == [200] * 4
    assert proxy.metric("rollout_shadow_dropped_total", reason="held_bytes") == 3
    compared = sum(proxy.metric("rollout_shadow_comparisons_total", result=r)
                   for r in ("match", "mismatch", "error"))
    assert compared == 1
    assert shadow.held_bytes == 0
    assert proxy.metric("rollout_requests_total", backend="next_gen", role="shadow",
                        code_class="2xx") == 4  # every answer measured all the same


def test_the_primary_reports_once_and_the_second_side_compares() -> None:
    """Pairing's rule, pure: the first report counts; whoever comes second concludes."""
    concluded: list[Any] = []

    class Recorder:
        def conclude(self, pairing: Pairing) -> None:
            concluded.append(pairing.primary)

    mirror_first = Pairing(Recorder(), None, "GET", "/", "r1", False)  # type: ignore[arg-type]
    mirror_first.answers = [(Measurement(200, 1.0, None, 0, None, True, None), None)]
    mirror_first.report(None)  # the client left
    mirror_first.report(UNFINISHED)  # a later report changes nothing
    primary_first = Pairing(Recorder(), None, "GET", "/", "r2", False)  # type: ignore[arg-type]
    primary_first.report(UNFINISHED)  # no answers yet: the mirror will conclude
    assert concluded == [None]
    assert primary_first.primary is UNFINISHED
