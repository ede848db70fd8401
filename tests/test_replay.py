"""`rollout-proxy replay` against real backends on 127.0.0.1: verdicts, skips, JUnit, exit codes."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.config.model import CaptureConfig
from proxy.datapath.capture import Capture
from proxy.offline.replay import Progress, main
from tests.conftest import config_dict, dead_url, serve_app, write_config

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Agent:
    """A backend that answers tasks with fresh ids each time, and records what it got."""

    url: str = ""
    drop: str | None = None  # a key this backend leaves out of its answers
    status: int = 200
    seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append((request.method, request.path_qs, dict(request.headers), body))
        answer: dict[str, Any] = {"id": uuid.uuid4().hex, "status": "done", "success": True,
                                  "result": {"steps": 3, "summary": uuid.uuid4().hex}}
        if self.drop:
            answer["result"].pop(self.drop, None)
        return web.json_response(answer, status=self.status)


@pytest.fixture
async def agents() -> AsyncIterator[tuple[Agent, Agent]]:
    made = (Agent(), Agent())
    runners = []
    for agent in made:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", agent.handle)
        runner, agent.url = await serve_app(app)
        runners.append(runner)
    yield made
    for runner in runners:
        await runner.cleanup()


def pattern(method: str, path: str, *samples: dict[str, Any], count: int = 5,
            shape: str = '{"goal":string}') -> dict[str, Any]:
    return {"method": method, "path": path, "shape": shape, "count": count,
            "samples": list(samples)}


def sample(path: str, body: Any = None, **extra: Any) -> dict[str, Any]:
    return {"headers": {"Content-Type": "application/json", "X-Client": "web"}, "body": body,
            "path": path, **extra}


def write_patterns(tmp_path: Path, *patterns: dict[str, Any]) -> Path:
    path = tmp_path / "patterns.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in patterns))
    return path


async def replay(*argv: str | Path) -> int:
    """main() runs its own event loop: in a thread, while the backends serve on this one."""
    return await asyncio.to_thread(main, [str(a) for a in argv])


def tasks_file(tmp_path: Path) -> Path:
    return write_patterns(
        tmp_path,
        pattern("POST", "/v1/tasks", sample("/v1/tasks", {"goal": "book"}),
                sample("/v1/tasks", {"goal": "buy"})),
        pattern("GET", "/v1/tasks/{id}", sample("/v1/tasks/42"), shape="-", count=9))


async def test_only_values_differ_is_compatible(
        tmp_path: Path, agents: tuple[Agent, Agent], capsys: pytest.CaptureFixture[str]) -> None:
    legacy, next_gen = agents
    code = await replay(tasks_file(tmp_path), "--target", next_gen.url,
                        "--baseline", legacy.url)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "POST /v1/tasks" in out and "GET /v1/tasks/{id}" in out
    rows = out.splitlines()
    assert rows[1].endswith("  compatible") and rows[2].endswith("  compatible")
    assert rows[-1] == "2 patterns: 2 compatible, 0 incompatible, 0 error, 0 skipped"
    assert len(next_gen.seen) == 3 and len(legacy.seen) == 3
    sent = sorted((m, p, body) for m, p, _, body in next_gen.seen)
    assert sent == [("GET", "/v1/tasks/42", b""), ("POST", "/v1/tasks", b'{"goal":"book"}'),
                    ("POST", "/v1/tasks", b'{"goal":"buy"}')]


async def test_a_dropped_key_is_incompatible_and_exits_1(
        tmp_path: Path, agents: tuple[Agent, Agent], capsys: pytest.CaptureFixture[str]) -> None:
    legacy, next_gen = agents
    next_gen.drop = "summary"
    junit = tmp_path / "replay.xml"
    code = await replay(tasks_file(tmp_path), "--target", next_gen.url,
                        "--baseline", legacy.url, "--junit", junit)
    out = capsys.readouterr().out
    assert code == 1
    assert "incompatible: shape differs at result.summary" in out
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "2" and suite.get("failures") == "2"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["POST /v1/tasks", "GET /v1/tasks/{id}"]
    failure = cases[0].find("failure")
    assert failure is not None and "result.summary" in (failure.get("message") or "")


async def test_without_baseline_a_5xx_fails_and_a_complete_answer_passes(
        tmp_path: Path, agents: tuple[Agent, Agent], capsys: pytest.CaptureFixture[str]) -> None:
    _, next_gen = agents
    patterns = tasks_file(tmp_path)
    assert await replay(patterns, "--target", next_gen.url) == 0
    next_gen.status = 503
    assert await replay(patterns, "--target", next_gen.url) == 1
    assert "incompatible: target answered 503" in capsys.readouterr().out


async def test_an_unreachable_target_is_an_error(
        tmp_path: Path, agents: tuple[Agent, Agent], capsys: pytest.CaptureFixture[str]) -> None:
    legacy, _ = agents
    code = await replay(tasks_file(tmp_path), "--target", dead_url(), "--baseline", legacy.url)
    assert code == 1
    assert "error: target: connect_error" in capsys.readouterr().out


async def test_excluded_paths_and_methods_are_skipped_never_sent(
        tmp_path: Path, agents: tuple[Agent, Agent], capsys: pytest.CaptureFixture[str]) -> None:
    legacy, next_gen = agents
    config = write_config(tmp_path, config_dict(legacy.url, next_gen.url, shadow={
        "methods": ["GET", "POST"], "exclude_paths": ["/v1/payments"],
        "headers": {"X-Dry-Run": "1"}}))
    patterns = write_patterns(
        tmp_path,
        pattern("POST", "/v1/tasks", sample("/v1/tasks", {"goal": "book"})),
        pattern("POST", "/v1/payments/{id}", sample("/v1/payments/7", {"goal": "pay"})),
        pattern("DELETE", "/v1/tasks/{id}", sample("/v1/tasks/7"), shape="-"))
    junit = tmp_path / "replay.xml"
    code = await replay(patterns, "--target", next_gen.url, "--baseline", legacy.url,
                        "--config", config, "--junit", junit)
    out = capsys.readouterr().out
    assert code == 0
    assert "skipped: path under shadow.exclude_paths /v1/payments" in out
    assert "skipped: method DELETE is not in shadow.methods" in out
    assert [(m, p) for m, p, _, _ in next_gen.seen] == [("POST", "/v1/tasks")]
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == "3" and suite.get("skipped") == "2"
    assert len(suite.findall("testcase/skipped")) == 2 and not suite.findall(".//failure")


async def test_replay_header_and_shadow_headers_reach_both_backends(
        tmp_path: Path, agents: tuple[Agent, Agent]) -> None:
    legacy, next_gen = agents
    data = config_dict(legacy.url, next_gen.url, shadow={"headers": {"X-Dry-Run": "1"}})
    data["backends"]["next_gen"]["headers"] = {"X-Feature-Flags": "smart_caching"}
    config = write_config(tmp_path, data)
    code = await replay(tasks_file(tmp_path), "--target", next_gen.url,
                        "--baseline", legacy.url, "--config", config)
    assert code == 0
    for agent in agents:
        for _, _, headers, _ in agent.seen:
            assert headers["X-Rollout-Replay"] == "1" and headers["X-Dry-Run"] == "1"
            assert headers["X-Client"] == "web"  # the captured headers go too
    assert all(h.get("X-Feature-Flags") == "smart_caching" for _, _, h, _ in next_gen.seen)
    assert not any("X-Feature-Flags" in h for _, _, h, _ in legacy.seen)


async def test_ignored_paths_from_config_are_left_out_of_the_shape(
        tmp_path: Path, agents: tuple[Agent, Agent]) -> None:
    legacy, next_gen = agents
    next_gen.drop = "summary"
    config = write_config(tmp_path, config_dict(legacy.url, next_gen.url, shadow={
        "compare": {"ignore": ["result.summary"]}}))
    code = await replay(tasks_file(tmp_path), "--target", next_gen.url,
                        "--baseline", legacy.url, "--config", config)
    assert code == 0


async def test_a_sample_whose_body_was_not_kept_is_not_sent_and_said_so(
        tmp_path: Path, agents: tuple[Agent, Agent], capsys: pytest.CaptureFixture[str]) -> None:
    legacy, next_gen = agents
    patterns = write_patterns(
        tmp_path,
        pattern("POST", "/v1/tasks", sample("/v1/tasks", None, truncated=True),
                sample("/v1/tasks", {"goal": "book"})),
        pattern("POST", "/v1/upload", sample("/v1/upload", None, truncated=True)))
    code = await replay(patterns, "--target", next_gen.url, "--baseline", legacy.url)
    out = capsys.readouterr().out
    assert code == 0
    rows = {line.split()[1]: line for line in out.splitlines()[1:3]}
    assert "1/2" in rows["/v1/tasks"]
    assert "compatible: a sample not sent: body over max_body_bytes" in rows["/v1/tasks"]
    assert "skipped: a sample not sent: body over max_body_bytes" in rows["/v1/upload"]
    assert [p for _, p, _, _ in next_gen.seen] == ["/v1/tasks"]


async def test_a_bad_line_is_named_with_its_number_and_exits_2(
        tmp_path: Path, agents: tuple[Agent, Agent], capsys: pytest.CaptureFixture[str]) -> None:
    _, next_gen = agents
    patterns = tasks_file(tmp_path)
    with patterns.open("a") as handle:
        handle.write("\n{\"method\": \"GET\", \"path\": \"/x\", \"shape\": \"-\"}\n")
    assert await replay(patterns, "--target", next_gen.url) == 2
    assert "patterns.jsonl:4: count must be a whole number" in capsys.readouterr().err
    assert next_gen.seen == []  # nothing is sent when the input is bad

    patterns.write_text('{"method": "GET"\n')
    assert await replay(patterns, "--target", next_gen.url) == 2
    assert "patterns.jsonl:1: not JSON" in capsys.readouterr().err


async def test_missing_or_empty_input_and_bad_config_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert await replay(tmp_path / "none.jsonl", "--target", "http://127.0.0.1:1") == 2
    assert "none.jsonl: cannot read" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert await replay(empty, "--target", "http://127.0.0.1:1") == 2
    assert "holds no pattern" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("shadow: {sample: 7}\n")
    assert await replay(tasks_file(tmp_path), "--target", "http://127.0.0.1:1",
                        "--config", bad) == 2
    assert "shadow.sample" in capsys.readouterr().err
    assert await replay(empty, "--target", "ftp://x") == 2  # usage error


async def test_a_captured_file_replays_as_it_was_seen(
        tmp_path: Path, agents: tuple[Agent, Agent], capsys: pytest.CaptureFixture[str]) -> None:
    legacy, next_gen = agents
    capture = Capture(CaptureConfig(file=tmp_path / "patterns.jsonl", per_pattern=2,
                                    max_body_bytes=4096, redact=frozenset({"password"}),
                                    max_patterns=100))
    for n in (1, 2, 3):
        capture.observe("POST", f"/v1/tasks/{n}/run?page={n}",
                        {"Content-Type": "application/json", "Authorization": "Bearer t"},
                        json.dumps({"goal": "g", "password": "p"}).encode(), "application/json")
    await capture.close()
    code = await replay(capture.config.file, "--target", next_gen.url, "--baseline", legacy.url)
    assert code == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.split() == ["POST", "/v1/tasks/{id}/run", "2/2", "3", "compatible"]
    method, path, headers, body = next_gen.seen[0]
    assert (method, path) == ("POST", "/v1/tasks/1/run?page=1")
    assert json.loads(body) == {"goal": "g", "password": "[redacted]"}
    assert "Authorization" not in headers


def test_progress_bar_draws_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        bar = Progress(2, stream)
        bar.advance()
        bar.advance()
        bar.finish()
    assert "\r[" in terminal.getvalue() and "2/2 patterns" in terminal.getvalue()
    assert pipe.getvalue() == ""


async def test_concurrency_is_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    in_flight = peak = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    runner, url = await serve_app(app)
    try:
        patterns = write_patterns(tmp_path, *(
            pattern("GET", f"/p{n}", sample(f"/p{n}"), shape="-") for n in range(12)))
        assert await replay(patterns, "--target", url, "--concurrency", "3") == 0
    finally:
        await runner.cleanup()
    assert peak == 3
    assert "12 patterns: 12 compatible" in capsys.readouterr().out



async def test_a_compressed_answer_is_still_compared_by_shape(
        tmp_path: Path, agents: tuple[Agent, Agent], capsys: pytest.CaptureFixture[str]) -> None:
    legacy, _ = agents
    seen: list[dict[str, str]] = []

    async def gzipped(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        response = web.json_response({"id": "x", "status": "done", "success": True,
                                      "result": {"steps": 3, "padding": "p" * 2000}})
        response.enable_compression(web.ContentCoding.gzip)
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", gzipped)
    runner, url = await serve_app(app)
    try:
        patterns = write_patterns(tmp_path, pattern(
            "POST", "/v1/tasks", sample("/v1/tasks", {"goal": "g"}) | {
                "headers": {"Accept-Encoding": "br, zstd"}}))
        code = await replay(patterns, "--target", url, "--baseline", legacy.url)
    finally:
        await runner.cleanup()
    assert code == 1  # the gzip body was read: "summary" missing, "padding" extra
    assert "result.padding, result.summary" in capsys.readouterr().out
    assert "br" not in seen[0]["Accept-Encoding"]
    assert seen[0]["Content-Type"] == "application/json"  # put back for a JSON shape


async def test_a_text_body_goes_as_text_and_excluded_concrete_paths_stay_home(
        tmp_path: Path, agents: tuple[Agent, Agent]) -> None:
    legacy, next_gen = agents
    config = write_config(tmp_path, config_dict(legacy.url, next_gen.url, shadow={
        "exclude_paths": ["/v1/notes/666"]}))
    text = {"headers": {"Content-Type": "text/plain"}, "body": "hello there"}
    patterns = write_patterns(tmp_path, pattern(
        "POST", "/v1/notes/{id}", text | {"path": "/v1/notes/1"},
        text | {"path": "/v1/notes/666"}, shape="-"))
    assert await replay(patterns, "--target", next_gen.url, "--config", config) == 0
    [(_, path, headers, body)] = next_gen.seen
    assert (path, body, headers["Content-Type"]) == ("/v1/notes/1", b"hello there", "text/plain")
