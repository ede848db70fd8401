"""Usage-pattern capture: grouping, counting, bounds, redaction, atomic rewrites, restarts."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config.model import CaptureConfig
from proxy.datapath.capture import MAX_SHAPE, Capture, shape_of, template
from tests.conftest import serve_app

UUID = "3f2b8c1e-9a4d-4e6f-8b2a-1c5d7e9f0a3b"


def settings(tmp_path: Path, **changes: Any) -> CaptureConfig:
    base = CaptureConfig(file=tmp_path / "captures" / "patterns.jsonl", per_pattern=3,
                         max_body_bytes=65536,
                         redact=frozenset({"password", "token", "api_key", "secret"}),
                         max_patterns=10_000)
    return replace(base, **changes)


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_path(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {(line["method"], line["path"]): line for line in read_lines(path)}


def post(capture: Capture, path: str, document: Any, **headers: str) -> None:
    capture.observe("POST", path, {"Content-Type": "application/json", **headers},
                    json.dumps(document).encode(), "application/json")


@pytest.fixture
async def capturing(tmp_path: Path) -> AsyncIterator[tuple[Capture, str]]:
    """A real server whose handler feeds every request to a Capture, as the proxy does."""
    capture = Capture(settings(tmp_path))

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        capture.observe(request.method, request.raw_path, request.headers, body or None,
                        request.headers.get("Content-Type", ""))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner, url = await serve_app(app)
    yield capture, url
    await runner.cleanup()


def test_numeric_hex_and_uuid_segments_are_written_id() -> None:
    assert template("/v1/tasks/123") == "/v1/tasks/{id}"
    assert template(f"/v1/tasks/{UUID}/steps/7") == "/v1/tasks/{id}/steps/{id}"
    assert template("/v1/blobs/deadbeef01") == "/v1/blobs/{id}"
    assert template("/v1/blobs/abc123") == "/v1/blobs/abc123"  # hex, but under 8 digits
    assert template("/v2/tasks") == "/v2/tasks"


async def test_tasks_123_and_456_are_one_pattern_counted_twice(
        capturing: tuple[Capture, str]) -> None:
    capture, url = capturing
    async with aiohttp.ClientSession() as http:
        for path in ("/v1/tasks/123", "/v1/tasks/456", f"/v1/tasks/{UUID}",
                     "/v1/tasks/0a1b2c3d4e5f"):
            async with http.get(url + path) as response:
                assert response.status == 200
    await capture.close()
    lines = read_lines(capture.config.file)
    assert len(lines) == 1
    assert lines[0]["method"] == "GET" and lines[0]["path"] == "/v1/tasks/{id}"
    assert lines[0]["shape"] == "-" and lines[0]["count"] == 4
    assert [s["path"] for s in lines[0]["samples"]] == [
        "/v1/tasks/123", "/v1/tasks/456", f"/v1/tasks/{UUID}"]  # per_pattern 3


def test_json_shape_splits_patterns_values_do_not(tmp_path: Path) -> None:
    capture = Capture(settings(tmp_path))
    post(capture, "/v1/tasks", {"goal": "book a flight", "steps": [{"n": 1}]})
    post(capture, "/v1/tasks", {"goal": "buy milk", "steps": [{"n": 9}, {"n": 2}]})
    post(capture, "/v1/tasks", {"goal": "buy milk", "steps": [{"n": "x"}]})
    counts = sorted(p.count for p in capture.patterns.values())
    assert counts == [1, 2]
    assert shape_of({"b": 1, "a": [True, None]}) == '{"a":[boolean,null],"b":number}'


def test_samples_stop_at_per_pattern_while_counting_goes_on(tmp_path: Path) -> None:
    capture = Capture(settings(tmp_path, per_pattern=2))
    for n in range(50):
        post(capture, f"/v1/tasks/{n}", {"goal": f"task {n}"})
    [pattern] = capture.patterns.values()
    assert pattern.count == 50 and len(pattern.samples) == 2


def test_patterns_past_max_patterns_are_counted_as_dropped(tmp_path: Path) -> None:
    capture = Capture(settings(tmp_path, max_patterns=2))
    for path in ("/a", "/b", "/c", "/c", "/a"):
        capture.observe("GET", path, {}, None, "")
    assert set(k[1] for k in capture.patterns) == {"/a", "/b"}
    assert capture.patterns[("GET", "/a", "-")].count == 2
    assert capture.dropped_patterns == 2


def test_replayed_requests_are_not_captured(tmp_path: Path) -> None:
    capture = Capture(settings(tmp_path))
    capture.observe("GET", "/v1/tasks", {"X-Rollout-Replay": "1"}, None, "")
    assert capture.patterns == {}


async def test_captured_file_never_holds_a_secret(capturing: tuple[Capture, str]) -> None:
    capture, url = capturing
    document = {"user": "ann", "password": "pw-SECRET-1",
                "nested": {"deep": [{"Token": "tok-SECRET-2", "keep": "visible-value"}]},
                "items": [[{"api_key": "key-SECRET-3"}]], "secret": {"inner": "obj-SECRET-4"}}
    headers = {"Authorization": "Bearer auth-SECRET-5", "Cookie": "sid=cookie-SECRET-6",
               "X-API-KEY": "hdr-SECRET-7", "Proxy-Authorization": "Basic proxy-SECRET-8",
               "Connection": "keep-alive, X-Hop", "X-Hop": "hop-SECRET-9",
               "X-Client": "kept-header"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/tasks?token=query-SECRET-10&page=2", json=document,
                             headers=headers) as response:
            assert response.status == 200
        async with http.post(f"{url}/login", data={"user": "ann", "password": "form-SECRET-11"},
                             headers={"authorization": "token lower-SECRET-12"}) as response:
            assert response.status == 200
    await capture.close()
    text = capture.config.file.read_text()
    assert "SECRET" not in text
    assert "visible-value" in text and "kept-header" in text and "page=2" in text
    tasks = by_path(capture.config.file)[("POST", "/v1/tasks")]
    [sample] = tasks["samples"]
    assert sample["body"]["password"] == "[redacted]"
    assert sample["body"]["nested"]["deep"][0]["Token"] == "[redacted]"
    assert sample["body"]["items"][0][0]["api_key"] == "[redacted]"
    assert sample["body"]["secret"] == "[redacted]"
    assert {k.lower() for k in sample["headers"]}.isdisjoint(
        {"authorization", "cookie", "x-api-key", "proxy-authorization", "connection", "x-hop"})
    # The shape is the request's own: a redacted object is still an object in it.
    assert '"secret":{"inner":string}' in tasks["shape"]


def test_oversize_body_keeps_its_shape_but_not_its_values(tmp_path: Path) -> None:
    capture = Capture(settings(tmp_path, max_body_bytes=100))
    post(capture, "/v1/tasks", {"goal": "g" * 500, "ref": "value-KEPT-NOWHERE"})
    post(capture, "/v1/tasks", {"goal": "short", "ref": "r"})
    [pattern] = capture.patterns.values()
    assert pattern.count == 2
    first, second = (json.loads(s) for s in pattern.samples)
    assert first["body"] is None and first["truncated"] is True
    assert second["body"] == {"goal": "short", "ref": "r"}
    assert next(iter(capture.patterns))[2] == '{"goal":string,"ref":string}'
    assert "KEPT-NOWHERE" not in b"".join(pattern.samples).decode()


def test_a_huge_shape_is_bounded(tmp_path: Path) -> None:
    capture = Capture(settings(tmp_path, max_body_bytes=10))
    post(capture, "/bulk", {f"key{n}": n for n in range(5000)})
    [(_, _, shape)] = capture.patterns
    assert len(shape) <= MAX_SHAPE and "#" in shape


async def test_nothing_changed_means_no_rewrite(tmp_path: Path) -> None:
    capture = Capture(settings(tmp_path))
    await capture.load()
    capture.observe("GET", "/v1/tasks", {}, None, "")
    await capture.save()
    inode = capture.config.file.stat().st_ino
    await capture.save()
    assert capture.config.file.stat().st_ino == inode  # os.replace would have made a new one
    capture.observe("GET", "/v1/tasks", {}, None, "")
    await capture.save()
    assert capture.config.file.stat().st_ino != inode


async def test_run_rewrites_on_its_interval_and_close_writes_the_rest(tmp_path: Path) -> None:
    capture = Capture(settings(tmp_path))
    task = asyncio.create_task(capture.run(interval_s=0.01))
    capture.observe("GET", "/v1/tasks", {}, None, "")
    for _ in range(500):  # the first interval's write, within 5 s
        if capture.config.file.exists():
            break
        await asyncio.sleep(0.01)
    assert capture.config.file.exists()
    capture.observe("GET", "/v1/tasks", {}, None, "")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await capture.close()
    assert read_lines(capture.config.file)[0]["count"] == 2


async def test_rewrites_are_atomic_and_leave_no_temp_file(tmp_path: Path) -> None:
    capture = Capture(settings(tmp_path, per_pattern=1))
    await capture.load()
    stop = threading.Event()
    seen: list[int] = []
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                data = capture.config.file.read_bytes()
            except FileNotFoundError:
                continue
            if not data.endswith(b"\n"):
                problems.append("a file without its last newline")
            try:
                seen.append(len([json.loads(line) for line in data.splitlines()]))
            except ValueError:
                problems.append("a line cut in half")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for round_ in range(40):
            for n in range(25):  # a new pattern every time: each file is longer
                post(capture, f"/r{round_}/p{n}", {"pad": "x" * 2000})
            await capture.save()
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
    assert not problems and seen and seen == sorted(seen)
    assert os.listdir(capture.config.file.parent) == ["patterns.jsonl"]
    assert len(read_lines(capture.config.file)) == 1000


async def test_a_failed_write_keeps_the_old_file_and_no_temp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    capture = Capture(settings(tmp_path))
    await capture.load()
    capture.observe("GET", "/old", {}, None, "")
    await capture.save()
    before = capture.config.file.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    capture.observe("GET", "/new", {}, None, "")
    await capture.save()
    assert capture.failed_writes == 1 and capture.dirty
    assert capture.config.file.read_bytes() == before
    assert os.listdir(capture.config.file.parent) == ["patterns.jsonl"]
    monkeypatch.undo()
    await capture.close()
    assert ("GET", "/new") in by_path(capture.config.file)


async def test_counts_and_samples_carry_over_a_restart(tmp_path: Path) -> None:
    first = Capture(settings(tmp_path, per_pattern=2))
    post(first, "/v1/tasks", {"goal": "a"})
    first.observe("GET", "/v1/tasks/1", {}, None, "")
    await first.close()
    with first.config.file.open("a") as handle:
        handle.write("not json\n")
        handle.write('{"method": "GET", "path": "no-slash", "shape": "-", "count": 1}\n')
        handle.write('{"method": "GET", "path": "/legacy", "shape": "-", "count": 7, "samples": '
                     '[{"headers": {"Cookie": "old-SECRET", "Accept": "*/*"}, '
                     '"body": null, "path": "/legacy?password=old-SECRET"}]}\n')

    second = Capture(settings(tmp_path, per_pattern=2))
    post(second, "/v1/tasks", {"goal": "b"})  # before the load: merged, not lost
    await second.load()
    post(second, "/v1/tasks", {"goal": "c"})
    await second.close()
    lines = by_path(second.config.file)
    assert set(lines) == {("POST", "/v1/tasks"), ("GET", "/v1/tasks/{id}"), ("GET", "/legacy")}
    tasks = lines[("POST", "/v1/tasks")]
    assert tasks["count"] == 3 and len(tasks["samples"]) == 2
    assert lines[("GET", "/legacy")]["count"] == 7
    assert "SECRET" not in second.config.file.read_text()  # old samples meet today's rules


async def test_close_without_run_merges_the_file_first(tmp_path: Path) -> None:
    first = Capture(settings(tmp_path))
    first.observe("GET", "/a", {}, None, "")
    await first.close()
    second = Capture(settings(tmp_path))
    second.observe("GET", "/b", {}, None, "")
    await second.close()
    assert set(by_path(second.config.file)) == {("GET", "/a"), ("GET", "/b")}
