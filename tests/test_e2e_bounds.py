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
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.events import MAX_LINE
from tests.conftest import Running, config_dict, deep_merge, running, write_config
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


# One SSE line: proxy.events.MAX_LINE ---------------------------------------------------------


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
