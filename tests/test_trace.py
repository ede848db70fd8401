"""The comparison trace writer: buffering, rotation, flush on close, and a complete trace after
SIGTERM of a real `rollout-proxy serve`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.telemetry import trace as trace_module
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.record import utc_stamp
from proxy.telemetry.trace import TraceWriter
from tests.conftest import Backend, Process, config_dict, spawn_serve, wait_ready

pytestmark = pytest.mark.timeout(60)


def writer(tmp_path: Path, *, max_bytes: int = 10**9, keep: int = 5,
           interval_s: float = 0.5) -> TraceWriter:
    return TraceWriter(tmp_path / "traces" / "comparisons.jsonl", max_bytes=max_bytes,
                       keep=keep, metrics=Metrics(CollectorRegistry()), interval_s=interval_s)


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def record(n: int) -> dict[str, Any]:
    return {"execution_id": f"id-{n:06d}", "n": n, "pad": "x" * 60}


def lines_metric(w: TraceWriter, result: str) -> float:
    value = w.metrics.registry.get_sample_value("rollout_trace_lines_total", {"result": result})
    return 0.0 if value is None else value


async def test_close_flushes_every_buffered_line(tmp_path: Path) -> None:
    w = writer(tmp_path)
    for n in range(5000):
        w.write(record(n))
    assert not w.path.exists()  # nothing touches the disk until a flush
    assert lines_metric(w, "written") == 0  # nor is counted as written
    await w.close()
    assert [line["n"] for line in lines_of(w.path)] == list(range(5000))
    assert lines_metric(w, "written") == 5000


async def test_close_after_the_background_loop_keeps_order_and_loses_nothing(
        tmp_path: Path) -> None:
    w = writer(tmp_path, interval_s=0.01)
    loop_task = asyncio.ensure_future(w.run())
    try:
        for n in range(3000):
            w.write(record(n))
            if n % 500 == 0:
                await asyncio.sleep(0)  # let the loop take a batch now and then
    finally:
        await w.close()
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
    assert [line["n"] for line in lines_of(w.path)] == list(range(3000))


async def test_close_waits_for_a_write_interrupted_by_cancellation(tmp_path: Path) -> None:
    w = writer(tmp_path, interval_s=0.01)
    entered, disk = threading.Event(), threading.Event()  # `disk`: a slow disk finishing
    real_append = w._append

    def slow_append(text: str) -> None:
        entered.set()
        disk.wait(5)
        real_append(text)

    w._append = slow_append  # type: ignore[method-assign]
    slow_disk = threading.Timer(0.3, disk.set)
    try:
        for n in range(10):
            w.write(record(n))
        loop_task = asyncio.ensure_future(w.run())
        assert await asyncio.to_thread(entered.wait, 5)
        loop_task.cancel()  # what app.stop() does (rt.tasks.wait(0)) before trace.close()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        slow_disk.start()
        await w.close()
        on_disk = len(lines_of(w.path))
    finally:
        disk.set()
        slow_disk.cancel()
    assert on_disk == 10


@pytest.mark.parametrize("keep", [0, 1, 3])
async def test_rotation_by_size_keeps_keep_files(tmp_path: Path, keep: int) -> None:
    w = writer(tmp_path, max_bytes=1000, keep=keep)
    size = len(json.dumps(record(0), separators=(",", ":"))) + 1
    total = 200
    for n in range(total):
        w.write(record(n))
        if n % 3 == 2:
            await w.flush()
    await w.close()
    names = sorted(p.name for p in w.path.parent.iterdir())
    assert names == ["comparisons.jsonl"] + [f"comparisons.jsonl.{i}" for i in
                                             range(1, keep + 1)]
    kept: list[int] = []
    for path in [w.path.with_name(f"comparisons.jsonl.{i}") for i in range(keep, 0, -1)] + [
            w.path]:
        assert path.stat().st_size <= 1000
        kept += [line["n"] for line in lines_of(path)]
    # Oldest file first, newest last: one unbroken run that ends with the last line.
    assert kept == list(range(total - len(kept), total))
    assert len(kept) > keep * (1000 // size // 2)


async def test_a_full_buffer_drops_and_counts_instead_of_blocking(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace_module, "MAX_BUFFERED", 50)
    w = writer(tmp_path)
    for n in range(60):
        w.write(record(n))
    assert lines_metric(w, "dropped") == 10
    await w.close()
    assert [line["n"] for line in lines_of(w.path)] == list(range(50))


async def test_long_lines_fill_the_buffer_by_bytes_before_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace_module, "MAX_BUFFERED_BYTES", 10_000)
    w = writer(tmp_path)
    long = {"pad": "p" * 3000}
    for n in range(5):
        w.write({"n": n, **long})
    assert lines_metric(w, "dropped") == 2
    assert w.buffered_bytes <= 10_000
    w.write({"n": 5})  # a short line still fits
    await w.close()
    assert w.buffered_bytes == 0
    assert [line["n"] for line in lines_of(w.path)] == [0, 1, 2, 5]


async def test_a_failing_disk_is_counted_not_raised(tmp_path: Path) -> None:
    (tmp_path / "traces").write_text("a file where the directory should be")
    w = writer(tmp_path)
    for n in range(3):
        w.write(record(n))
    await w.close()
    assert lines_metric(w, "error") == 3
    assert lines_metric(w, "written") == 0  # a lost line is not also counted as written


def test_trace_stamp_milliseconds_match_the_old_datetime_format() -> None:
    for now in (1700000000.001, 1700000000.123, 1700000000.29):
        old = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        assert utc_stamp(now) == old.replace("+00:00", "Z")


# A real process ------------------------------------------------------------------------------


async def wait_draining(http: aiohttp.ClientSession, admin: str) -> None:
    """Poll /readyz until the process says it is draining (the caller bounds the wait)."""
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{admin}/readyz") as response:
                if response.status == 503:
                    return
        await asyncio.sleep(0.02)


async def test_trace_is_complete_after_sigterm(tmp_path: Path, backends: dict[str, Backend],
                                               serve_processes: list[Process]) -> None:
    """Mirrors (and client requests) still in flight at SIGTERM all end up in the trace."""
    slow_legacy, slow_next_gen = asyncio.Event(), asyncio.Event()
    legacy, next_gen = backends["legacy"], backends["next_gen"]

    async def legacy_handler(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/v1/slow"):
            await slow_legacy.wait()
        return web.json_response({"success": True}, headers={"X-Tokens-Used": "12000"})

    async def next_gen_handler(request: web.Request) -> web.StreamResponse:
        await slow_next_gen.wait()
        return web.json_response({"success": True}, headers={"X-Tokens-Used": "1200"})

    legacy.handler, next_gen.handler = legacy_handler, next_gen_handler
    data = config_dict(legacy.url, next_gen.url, rollout={"phase": "shadow"},
                       shadow={"sample": 1.0}, limits={"drain_timeout_s": 10})
    process = spawn_serve(tmp_path, data)
    serve_processes.append(process)
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(30):
            await wait_ready(process.admin)

            async def ask(rid: str, path: str) -> int:
                async with http.get(f"{process.url}{path}",
                                    headers={"X-Request-Id": rid}) as response:
                    await response.read()
                    return response.status

            fast = [f"fast-{i}" for i in range(20)]
            assert [await ask(rid, "/v1/fast") for rid in fast] == [200] * 20
            slow = [f"slow-{i}" for i in range(10)]
            pending = [asyncio.ensure_future(ask(rid, "/v1/slow")) for rid in slow]
            await legacy.wait_for(30)
            await next_gen.wait_for(30)

            process.proc.send_signal(signal.SIGTERM)
            await wait_draining(http, process.admin)
            slow_legacy.set()
            assert await asyncio.gather(*pending) == [200] * 10
            slow_next_gen.set()
            code = await asyncio.to_thread(process.proc.wait, 20)
    finally:
        slow_legacy.set()
        slow_next_gen.set()
    assert code == 0, process.log.read_text()
    lines = lines_of(tmp_path / "traces" / "comparisons.jsonl")
    assert sorted(line["execution_id"] for line in lines) == sorted(fast + slow)
    for line in lines:
        assert line["match"]["result"] == "match"
        assert (line["old_system"]["tokens"], line["new_system"]["tokens"]) == (12000, 1200)
