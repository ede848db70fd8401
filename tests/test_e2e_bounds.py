"""Every buffer on the data path has a bound (README "Bounds"): hostile backends and clients
on raw sockets write exactly the bytes that would grow one, the real proxy in front. Past a
bound the answer is clear (a JSON error, a cut, a skipped measurement) and memory stays flat.

RSS and the event loop's lag are watched from the test's own process, which is the proxy's:
the margins are wide (a hostile stream would add tens of MiB), so a loaded machine does not
make them flake.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.telemetry import trace as trace_module
from proxy.telemetry.events import MAX_LINE
from tests.conftest import (
    Backend,
    Running,
    config_dict,
    deep_merge,
    running,
    serve_app,
    write_config,
)
from tests.test_e2e_data_path import WAIT, assert_proxy_error, raw_backend

pytestmark = pytest.mark.timeout(60)
MiB = 2**20
ENDLESS = 64 * MiB  # what a hostile backend writes at most, if nobody stops it first
FLAT = 24 * MiB  # RSS growth allowed while a bound holds (the unbounded case adds >= 64)


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@dataclass
class Watch:
    """Peak RSS growth and the longest event-loop stall while it runs."""

    start_rss: int
    peak_rss: int = 0
    lag_s: float = 0.0

    @property
    def grew(self) -> int:
        return self.peak_rss - self.start_rss


@contextlib.asynccontextmanager
async def watching(every_s: float = 0.005) -> AsyncIterator[Watch]:
    watch = Watch(rss())
    watch.peak_rss = watch.start_rss
    stop = asyncio.Event()

    async def tick() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            due = loop.time() + every_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)  # a stop, or the next sample
            watch.lag_s = max(watch.lag_s, loop.time() - due)
            watch.peak_rss = max(watch.peak_rss, rss())

    task = asyncio.ensure_future(tick())
    try:
        yield watch
    finally:
        stop.set()
        await task
        watch.peak_rss = max(watch.peak_rss, rss())


Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]


def endless(start: bytes, piece: bytes, sent: list[int]) -> Reply:
    """`start`, then `piece` again and again until the proxy hangs up (or ENDLESS bytes)."""
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        try:
            writer.write(start)
            while total < ENDLESS:
                writer.write(piece)
                total += len(piece)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            sent.append(total)
    return reply


JSON_OK = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n"
           b'{"success":true}')


async def json_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(JSON_OK)
    await writer.drain()


async def get(proxy: Running, path: str = "/v1/tasks",
              **headers: str) -> tuple[int, Any, bytes, float]:
    async with aiohttp.ClientSession() as http, asyncio.timeout(WAIT):
        started = time.monotonic()
        async with http.get(f"{proxy.url}{path}",
                            headers={k.replace("_", "-"): v for k, v in headers.items()}
                            ) as response:
            body = await response.read()
            return response.status, response.headers, body, time.monotonic() - started


# The answer head: limits.max_header_bytes, h1.MAX_HEADER_LINES ------------------------------

HOSTILE_HEADS = {
    "endless_header_lines": (b"HTTP/1.1 200 OK\r\n", b"X-A: " + b"a" * 1000 + b"\r\n"),
    "header_value_of_mebibytes": (b"HTTP/1.1 200 OK\r\nX-A: ", b"a" * 4096),
}


@pytest.mark.parametrize("start, piece", HOSTILE_HEADS.values(), ids=HOSTILE_HEADS.keys())
async def test_an_answer_head_that_never_ends_gets_a_json_502_at_once_and_memory_stays_flat(
        tmp_path: Path, start: bytes, piece: bytes) -> None:
    sent: list[int] = []
    async with raw_backend(endless(start, piece, sent)) as legacy, \
            raw_backend(json_ok) as next_gen:
        data = config_dict(legacy, next_gen)  # timeout_s 5: the head is cut long before
        async with running(tmp_path, data) as proxy, watching() as watch:
            status, headers, body, took = await get(proxy)
    error = assert_proxy_error(status, headers, body, 502)
    assert "max_header_bytes" in error["error"]
    assert headers["X-Rollout-Backend"] == "legacy"
    assert took < 2.0, took  # not at timeout_s
    assert proxy.metric("rollout_rejected_answers_total", backend="legacy", role="primary",
                        reason="head_too_large") >= 1
    assert watch.grew < FLAT, watch
    assert sent and sent[0] < 16 * MiB, sent  # the proxy hung up; it did not keep reading


async def test_a_mirror_whose_head_never_ends_is_cut_counted_and_the_client_never_waits(
        tmp_path: Path) -> None:
    sent: list[int] = []
    start, piece = HOSTILE_HEADS["endless_header_lines"]
    async with raw_backend(json_ok) as legacy, \
            raw_backend(endless(start, piece, sent)) as next_gen:
        data = config_dict(legacy, next_gen, rollout={"phase": "shadow"},
                           shadow={"sample": 1.0, "timeout_s": 5})
        async with running(tmp_path, data) as proxy, watching() as watch:
            status, _, body, took = await get(proxy)
            await proxy.mirrors_settled()
    assert (status, body) == (200, b'{"success":true}')
    assert took < 1.0, took
    assert proxy.metric("rollout_rejected_answers_total", backend="next_gen", role="shadow",
                        reason="head_too_large") == 1
    assert proxy.metric("rollout_shadow_comparisons_total", result="error") == 1
    assert watch.grew < FLAT, watch
    assert sent and sent[0] < 16 * MiB, sent


async def test_next_gen_whose_head_never_ends_falls_back_to_legacy_as_a_5xx(
        tmp_path: Path) -> None:
    sent: list[int] = []
    start, piece = HOSTILE_HEADS["header_value_of_mebibytes"]
    async with raw_backend(json_ok) as legacy, \
            raw_backend(endless(start, piece, sent)) as next_gen:
        data = config_dict(legacy, next_gen, rollout={"phase": "progressive",
                                                      "percentage": 100})
        async with running(tmp_path, data) as proxy:
            status, headers, body, took = await get(proxy, X_User_Id="alice")
    assert (status, body) == (200, b'{"success":true}')
    assert headers["X-Rollout-Backend"] == "legacy"
    assert headers["X-Rollout-Fallback"] == "true"
    assert took < 2.0, took
    assert proxy.metric("rollout_rejected_answers_total", backend="next_gen", role="primary",
                        reason="head_too_large") == 1
    assert proxy.metric("rollout_fallbacks_total", reason="5xx") == 1


async def test_a_lower_max_header_bytes_applies_to_answers_after_a_reload(
        tmp_path: Path) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Pad: " + b"p" * 3000 + b"\r\n"

    async def padded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()

    async with raw_backend(padded) as legacy, raw_backend(json_ok) as next_gen:
        data = config_dict(legacy, next_gen)
        async with running(tmp_path, data) as proxy:
            assert (await get(proxy))[0] == 200
            write_config(tmp_path, deep_merge(data, {"limits": {"max_header_bytes": 2048}}))
            assert proxy.proxy.control.reload()
            assert (await get(proxy))[0] == 502


# One SSE line: proxy.telemetry.events.MAX_LINE ---------------------------------------------


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
USAGE = b'data: {"usage": {"total_tokens": 77}}\n\n'


def sse_pieces(line_bytes: int, lines: int, long_lines: bool, piece: int = 1024) -> list[bytes]:
    """`lines` data lines of `line_bytes` each, or (long_lines False) the same bytes as
    lines of one piece each; then a usage event; cut in `piece`-byte pieces."""
    text = b""
    for _ in range(lines):
        line = b"data: " + b"x" * (line_bytes - 8) + b"\n\n"
        if not long_lines:
            line = b"".join(line[i:i + piece - 1] + b"\n"
                            for i in range(0, len(line), piece - 1))
        text += line
    return [text[i:i + piece] for i in range(0, len(text), piece)] + [USAGE]


def sse(pieces: list[bytes]) -> Reply:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        for piece in pieces:
            writer.write(chunk(piece))
            await writer.drain()
            await asyncio.sleep(0)  # one loop turn: the proxy reads each piece on its own
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    return reply


async def mirror_loop_seconds(tmp_path: Path, pieces: list[bytes]) -> float:
    """The process's CPU time (one thread: the loop's) from a request until its mirror,
    answered with `pieces` by next_gen, was measured; its tokens must be the usage's."""
    async with raw_backend(json_ok) as legacy, raw_backend(sse(pieces)) as next_gen:
        data = config_dict(legacy, next_gen, rollout={"phase": "shadow"},
                           shadow={"sample": 1.0})
        async with running(tmp_path, data) as proxy:
            started = time.process_time()
            assert (await get(proxy))[0] == 200
            await proxy.mirrors_settled(30)
            spent = time.process_time() - started
            assert proxy.metric("rollout_tokens_total", backend="next_gen",
                                role="shadow") == 77
    return spent


async def test_one_mebibyte_sse_lines_in_one_kib_pieces_cost_what_short_lines_do(
        tmp_path: Path) -> None:
    """next_gen in shadow streams lines of MAX_LINE in 1 KiB pieces: measuring them costs
    the loop what the same bytes as short lines do (rescanning the open line on every
    piece made it 2.4 times as much), and the usage event after them is still measured."""
    long = sse_pieces(MAX_LINE, 4, long_lines=True)
    short = sse_pieces(MAX_LINE, 4, long_lines=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    best_short = min([await mirror_loop_seconds(tmp_path / "a", short) for _ in range(2)])
    best_long = min([await mirror_loop_seconds(tmp_path / "b", long) for _ in range(2)])
    assert best_long < 1.7 * best_short + 0.02, (best_long, best_short)


async def test_an_sse_line_past_max_line_reaches_the_client_whole_and_is_not_kept(
        tmp_path: Path) -> None:
    pieces = sse_pieces(3 * MAX_LINE, 2, long_lines=True, piece=64 * 1024)
    async with raw_backend(sse(pieces)) as legacy, raw_backend(json_ok) as next_gen:
        data = config_dict(legacy, next_gen)
        async with running(tmp_path, data) as proxy, watching() as watch:
            status, _, body, _ = await get(proxy, "/v1/stream")
    assert status == 200 and body == b"".join(pieces)  # every byte, unchanged
    # tokens come from the usage event after the lines too long to measure
    assert proxy.metric("rollout_tokens_total", backend="legacy", role="primary") == 77
    # the body (6 MiB) is held by the client here; the parser kept none of it
    assert watch.grew < len(body) + FLAT, watch


# The request: aiohttp's head limits, limits.max_body_bytes -----------------------------------


async def endless_request(proxy: Running, start: bytes, piece: bytes) -> tuple[bytes, int]:
    """A client writing `start`, then `piece` again and again (at most ENDLESS bytes) while
    it reads what the proxy answers: (the answer, how many bytes it had sent by then)."""
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    sent = 0

    async def write() -> None:
        nonlocal sent
        with contextlib.suppress(ConnectionError):
            writer.write(start)
            while sent < ENDLESS:
                writer.write(piece)
                sent += len(piece)
                await writer.drain()

    writing = asyncio.ensure_future(write())
    try:
        async with asyncio.timeout(WAIT):
            answer = await reader.read(65536)
    finally:
        writing.cancel()
        writer.close()
    return answer, sent


REQUEST_HEADS = {
    "header_value_of_mebibytes": (b"GET / HTTP/1.1\r\nHost: proxy\r\nX-A: ", b"a" * 4096),
    "endless_header_lines": (b"GET / HTTP/1.1\r\nHost: proxy\r\n",
                             b"X-A: " + b"a" * 100 + b"\r\n"),
    "endless_request_line": (b"GET /", b"a" * 4096),
}


@pytest.mark.parametrize("start, piece", REQUEST_HEADS.values(), ids=REQUEST_HEADS.keys())
async def test_a_request_head_past_aiohttps_limits_gets_a_json_400_and_memory_stays_flat(
        tmp_path: Path, start: bytes, piece: bytes) -> None:
    async with raw_backend(json_ok) as legacy, running(tmp_path, config_dict(legacy, legacy)
                                                       ) as proxy, watching() as watch:
        answer, sent = await endless_request(proxy, start, piece)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] in (b"400", b"431"), head
    assert b"application/json" in head.lower() and json.loads(body)["error"]
    assert sent < 16 * MiB, sent
    assert watch.grew < FLAT, watch


async def test_an_endless_request_body_gets_413_and_memory_stays_flat(tmp_path: Path) -> None:
    chunked = b"POST /v1/tasks HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with raw_backend(json_ok) as legacy:
        data = config_dict(legacy, legacy, limits={"max_body_bytes": MiB})
        async with running(tmp_path, data) as proxy, watching() as watch:
            answer, sent = await endless_request(proxy, chunked, chunk(b"b" * 65536))
    # The answer comes at the bound. aiohttp then reads and drops what the client still
    # sends for up to its lingering_time (10 s) before it closes, so the 413 can be read.
    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]
    assert sent < 16 * MiB, sent
    assert watch.grew < FLAT, watch


# The answer's body: h1.HIGH_WATER, telemetry.json_max_bytes ----------------------------------


async def test_a_client_that_reads_nothing_holds_the_backend_not_the_proxys_memory(
        tmp_path: Path) -> None:
    progress = asyncio.Event()
    sent: list[int] = []

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % ENDLESS)
        total = 0
        with contextlib.suppress(ConnectionError):
            while total < ENDLESS:
                writer.write(b"f" * 65536)
                await writer.drain()
                total += 65536
                progress.set()
        sent.append(total)

    async with raw_backend(flood) as legacy, running(tmp_path, config_dict(legacy, legacy)
                                                     ) as proxy, watching() as watch:
        host, port = proxy.url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /big HTTP/1.1\r\nHost: proxy\r\n\r\n")
        try:
            async with asyncio.timeout(20):  # until the backend can write no more
                while True:
                    progress.clear()
                    try:
                        await asyncio.wait_for(progress.wait(), 0.5)
                    except TimeoutError:
                        break
            grew = watch.grew
        finally:
            writer.close()
    assert not sent or sent[0] < ENDLESS  # it was held back
    assert grew < FLAT, watch


async def test_a_json_answer_past_json_max_bytes_passes_whole_and_is_not_kept(
        tmp_path: Path) -> None:
    """A 40 MiB JSON answer, from legacy and next_gen in shadow: the client gets every byte,
    neither copy is kept to be parsed (its figures are not read), memory stays flat."""
    size = 40 * MiB

    async def big_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % size)
        writer.write(b'{"pad": "')
        left = size - len(b'{"pad": "') - len(b'", "usage": {"total_tokens": 5}}')
        while left > 0:
            writer.write(b"p" * min(left, 65536))
            left -= 65536
            await writer.drain()
        writer.write(b'", "usage": {"total_tokens": 5}}')
        await writer.drain()

    async with raw_backend(big_json) as legacy, raw_backend(big_json) as next_gen:
        data = config_dict(legacy, next_gen, rollout={"phase": "shadow"},
                           shadow={"sample": 1.0}, telemetry={"json_max_bytes": MiB})
        async with running(tmp_path, data) as proxy, watching() as watch, \
                aiohttp.ClientSession() as http:
            received = 0
            async with asyncio.timeout(20), http.get(f"{proxy.url}/v1/tasks") as response:
                async for piece in response.content.iter_any():
                    received += len(piece)
            await proxy.mirrors_settled()
    assert received == size
    assert proxy.metric("rollout_tokens_total", backend="legacy", role="primary") == 0
    assert proxy.metric("rollout_tokens_total", backend="next_gen", role="shadow") == 0
    assert watch.grew < FLAT, watch


# A WebSocket message: aiohttp's max_msg_size (4 MiB) ------------------------------------------


async def test_a_websocket_message_past_max_msg_size_ends_the_session_not_normally(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async def huge(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        await ws.receive()
        with contextlib.suppress(ConnectionError):
            await ws.send_bytes(b"w" * (5 * MiB))
            await ws.receive()
        return ws

    backends["legacy"].handler = huge
    data = config_dict(backends["legacy"].url, backends["next_gen"].url)
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http, \
            http.ws_connect(f"{proxy.url}/v1/live", max_msg_size=0) as ws:
        await ws.send_str("go")
        async with asyncio.timeout(WAIT):
            message = await ws.receive()
    assert message.type == aiohttp.WSMsgType.CLOSE
    assert message.data != aiohttp.WSCloseCode.OK


# Answers parked for a comparison: shadow.max_held_bytes --------------------------------------


def json_answer(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


@dataclass
class Gate:
    """A legacy that holds every request until `release`; `arrived` counts them."""

    release: asyncio.Event
    arrived: int = 0
    came: asyncio.Event = field(default_factory=asyncio.Event)

    async def reply(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.arrived += 1
        self.came.set()
        await self.release.wait()
        writer.write(JSON_OK)
        await writer.drain()

    async def reply_after(self, writer: asyncio.StreamWriter, rest: bytes) -> None:
        """Count this answer as begun, and write `rest` once released."""
        self.arrived += 1
        self.came.set()
        await self.release.wait()
        writer.write(rest)
        await writer.drain()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while self.arrived < count:
                self.came.clear()
                await self.came.wait()


async def test_mirror_answers_parked_for_a_slow_legacy_stay_within_max_held_bytes(
        tmp_path: Path) -> None:
    """64 mirrors of a 900 KB JSON answer end while legacy still holds its requests: only
    what fits shadow.max_held_bytes (4 MiB) is parked for the comparison (57 MB otherwise),
    the rest are dropped and counted; every client gets legacy's answer."""
    gate = Gate(asyncio.Event())
    big = json_answer(json.dumps({"success": True, "pad": "p" * 900_000}).encode())

    async def big_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(big)
        await writer.drain()

    async with raw_backend(gate.reply) as legacy, raw_backend(big_json) as next_gen:
        data = config_dict(legacy, next_gen, rollout={"phase": "shadow"},
                           shadow={"sample": 1.0, "max_held_bytes": 4 * MiB})
        async with running(tmp_path, data) as proxy:
            shadow = proxy.proxy.shadow
            answers: list[asyncio.Future[tuple[int, Any, bytes, float]]] = []
            try:
                async with watching() as watch:
                    for count in range(1, 65):  # one at a time: what stays is what is parked
                        answers.append(asyncio.ensure_future(get(proxy)))
                        await gate.wait_for(count)
                        await proxy.mirrors_settled()
                held = shadow.held_bytes
            finally:
                gate.release.set()
            statuses = [status for status, *_ in await asyncio.gather(*answers)]
            await proxy.mirrors_settled()
    assert statuses == [200] * 64
    assert 3 * 900_000 < held <= 4 * MiB
    assert proxy.metric("rollout_shadow_dropped_total", reason="held_bytes") == 64 - 4
    assert shadow.held_bytes == 0
    assert watch.grew < FLAT, watch


async def test_mirrors_open_event_stream_lines_stay_within_max_held_bytes(
        tmp_path: Path) -> None:
    """32 mirrors read event streams whose first line is 900 KB, all open at once: what the
    measurements keep of them stays within shadow.max_held_bytes (2 MiB; 28 MB otherwise).
    A mirror past it is still measured, its comparison dropped and counted; the rest are
    compared, and the bound is free again once they end."""
    mirrors, cap = 32, 2 * MiB
    gate = Gate(asyncio.Event())
    line = b"data: " + b"x" * 900_000

    async def open_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        for start in range(0, len(line), 64 * 1024):
            writer.write(chunk(line[start:start + 64 * 1024]))
            await writer.drain()
        await gate.reply_after(writer, chunk(b"\n\n" + USAGE) + b"0\r\n\r\n")

    async with raw_backend(json_ok) as legacy, raw_backend(open_line) as next_gen:
        data = config_dict(legacy, next_gen, rollout={"phase": "shadow"},
                           shadow={"sample": 1.0, "max_held_bytes": cap, "max_in_flight": 64})
        async with running(tmp_path, data) as proxy:
            shadow, peak = proxy.proxy.shadow, [0]
            take = shadow.take

            def watched(size: int) -> bool:  # the level after every take: its peak
                taken = take(size)
                peak[0] = max(peak[0], shadow.held_bytes)
                return taken
            shadow.take = watched  # type: ignore[method-assign]
            statuses = [(await get(proxy))[0] for _ in range(mirrors)]
            await gate.wait_for(mirrors)  # every stream has its long line open
            gate.release.set()
            await proxy.mirrors_settled(30)
    assert statuses == [200] * mirrors  # the clients had legacy's answers long before
    assert 900_000 < peak[0] <= cap, peak
    dropped = proxy.metric("rollout_shadow_dropped_total", reason="held_bytes")
    compared = sum(proxy.metric("rollout_shadow_comparisons_total", result=result)
                   for result in ("match", "mismatch", "error"))
    assert dropped >= mirrors - 2 * cap // 900_000 and dropped + compared == mirrors
    assert proxy.metric("rollout_requests_total", backend="next_gen", role="shadow",
                        code_class="2xx") == mirrors  # every one measured
    assert shadow.held_bytes == 0


async def test_a_mirror_past_its_share_of_the_loop_is_cut_and_never_counted_against_next_gen(
        tmp_path: Path) -> None:
    """next_gen streams short events without end: while a client waits, the mirrors reading
    them are cut once they have taken their shadow.max_loop_share (here 1 %), counted as
    "overload"; a cut is neither an error of next_gen's (guards, requests) nor a comparison,
    and the clients get legacy's answers."""
    sent: list[int] = []
    events = chunk(b"data: x\n\n" * 100)
    gate, answered = Gate(asyncio.Event()), []

    async def first_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if answered:  # the second request waits: a client in flight while mirrors stream
            await gate.reply_after(writer, JSON_OK)
            return
        answered.append(True)
        await json_ok(reader, writer)

    async with raw_backend(first_at_once) as legacy, \
            raw_backend(endless(SSE_HEAD, events, sent)) as next_gen:
        data = config_dict(legacy, next_gen, rollout={"phase": "shadow"},
                           shadow={"sample": 1.0, "max_loop_share": 0.01, "timeout_s": 30})
        async with running(tmp_path, data) as proxy, watching() as watch:
            first = await get(proxy)
            second = asyncio.ensure_future(get(proxy))
            await gate.wait_for(1)
            await proxy.mirrors_settled(20)  # both mirrors cut while the second client waits
            gate.release.set()
            status, _, body, _ = await second
            await proxy.mirrors_settled()
    assert (first[0], first[2], status, body) == (200, b'{"success":true}') * 2
    assert proxy.metric("rollout_shadow_dropped_total", reason="overload") == 2
    assert len(sent) == 2 and max(sent) < ENDLESS, sent  # the proxy hung up on both
    for code_class in ("2xx", "5xx", "error"):
        assert proxy.metric("rollout_requests_total", backend="next_gen", role="shadow",
                            code_class=code_class) == 0
    assert sum(proxy.metric("rollout_shadow_comparisons_total", result=result)
               for result in ("match", "mismatch", "error")) == 0
    assert watch.grew < FLAT, watch


# Capture samples: telemetry.capture.max_patterns, per_pattern, max_body_bytes ----------------


async def test_capture_keeps_max_patterns_of_per_pattern_samples_and_memory_stays_flat(
        tmp_path: Path) -> None:
    """1,000 POSTs of 60 KB JSON over 500 patterns (60 MB if all were kept): 10 patterns of
    at most 3 samples are kept, the others counted as dropped; a body past max_body_bytes
    keeps its shape only. Every request is forwarded whole."""
    capture = {"file": "captures/patterns.jsonl", "per_pattern": 3, "max_patterns": 10,
               "max_body_bytes": 65536}
    body = json.dumps({"prompt": "q" * 60_000}).encode()
    sizes: list[int] = []  # what legacy got; it keeps no body

    async def legacy(request: web.Request) -> web.Response:
        sizes.append(len(await request.read()))
        return web.json_response({"success": True})

    app = web.Application(client_max_size=MiB)
    app.router.add_post("/{tail:.*}", legacy)
    runner, legacy_url = await serve_app(app)
    try:
        data = config_dict(legacy_url, legacy_url, telemetry={"capture": capture})
        async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
            url = proxy.url

            async def post(path: str, payload: bytes) -> int:
                async with http.post(f"{url}{path}", data=payload,
                                     headers={"Content-Type": "application/json"}) as answer:
                    await answer.read()
                    return answer.status

            async with asyncio.timeout(30):
                large = b'{"prompt": "' + b"q" * 100_000 + b'"}'
                assert await post("/v1/tasks/first", large) == 200
                async with watching() as watch:
                    for start in range(0, 1000, 50):  # 50 at a time
                        statuses = await asyncio.gather(*(post(f"/v1/tasks/p{n % 500}", body)
                                                          for n in range(start, start + 50)))
                        assert statuses == [200] * 50
            kept = proxy.proxy.runtime.capture
            assert kept is not None
            patterns = dict(kept.patterns)
            dropped = kept.dropped_patterns
    finally:
        await runner.cleanup()
    assert len(patterns) == 10
    assert all(len(p.samples) <= 3 for p in patterns.values())
    assert sum(map(len, (s for p in patterns.values() for s in p.samples))) <= 10 * 3 * 65536
    assert dropped == 1001 - sum(p.count for p in patterns.values())
    first = json.loads(next(p for k, p in patterns.items() if k[1] == "/v1/tasks/first"
                            ).samples[0])
    assert (first["body"], first["truncated"]) == (None, True)
    assert sizes == [len(large)] + [len(body)] * 1000
    assert watch.grew < FLAT, watch


# The trace queue: proxy.trace.MAX_BUFFERED, MAX_BUFFERED_BYTES -------------------------------


class Disk:
    """The trace file as a FIFO: nobody reads it (the writer's thread waits to open it, as
    on a stalled disk) until `read()`, which then drains it from the loop, counting lines."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        self.path, self.lines, self.fd = path, 0, -1

    def read(self) -> None:
        if self.fd >= 0:
            return
        # Read and write ends both: the writer can open it, and it never reads as ended.
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        asyncio.get_running_loop().add_reader(self.fd, self._drain)

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.fd, MiB):
                self.lines += data.count(b"\n")

    def close(self) -> None:
        if self.fd >= 0:
            asyncio.get_running_loop().remove_reader(self.fd)
            self._drain()
            os.close(self.fd)


async def test_a_stalled_trace_disk_drops_long_lines_past_the_buffer_and_memory_stays_flat(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """next_gen in shadow answers JSON of 20 keys of 50 KB: each comparison's trace line
    (its diff) is 1 MB, and the disk takes none. Lines past the buffer's bytes (here 4 MiB)
    are dropped and counted (64 MB otherwise); clients never wait; once the disk reads
    again, every line kept is written."""
    monkeypatch.setattr(trace_module, "MAX_BUFFERED_BYTES", 4 * MiB)
    disk = Disk(tmp_path / "traces" / "comparisons.jsonl")
    keys = json.dumps({f"k{n:02d}" + "k" * 50_000: 1 for n in range(20)}).encode()

    async def long_keys(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json_answer(keys))
        await writer.drain()

    try:
        async with raw_backend(json_ok) as legacy, raw_backend(long_keys) as next_gen:
            data = config_dict(legacy, next_gen, rollout={"phase": "shadow"},
                               shadow={"sample": 1.0})
            async with running(tmp_path, data) as proxy:
                trace = proxy.proxy.trace
                assert trace is not None
                try:
                    async with watching() as watch:
                        answers = [await get(proxy) for _ in range(64)]
                        await proxy.mirrors_settled()
                    buffered = trace.buffered_bytes
                finally:
                    disk.read()  # before the proxy stops: close() writes what it kept
    finally:
        disk.close()
    assert all(status == 200 and took < 1.0 for status, _, _, took in answers), answers
    written = proxy.metric("rollout_trace_lines_total", result="written")
    dropped = proxy.metric("rollout_trace_lines_total", result="dropped")
    assert buffered <= 4 * MiB
    assert written <= 8 and written + dropped == 64, (written, dropped)
    assert disk.lines == written
    assert watch.grew < FLAT, watch
