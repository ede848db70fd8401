"""Agent-aware figures through the real proxy: streamed usage and TTFT, cost, the shadow
budget and noise learned from legacy's repeats, each agreeing in trace, /metrics and status."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.config.model import Extract, TelemetryConfig
from proxy.offline.report import read_trace
from proxy.offline.report_format import summary_json
from proxy.telemetry.observe import measure, tee_for
from tests.conftest import (
    Backend,
    Running,
    config_dict,
    metrics_samples,
    running,
    write_config,
)

pytestmark = pytest.mark.timeout(60)
WAIT = 10.0
SLACK_MS = 10.0  # the bound for TTFT and time, against what the backend really did
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def shadow_config(fakes: dict[str, Backend], **sections: Any) -> dict[str, Any]:
    shadow = {"sample": 1.0, **sections.pop("shadow", {})}
    return config_dict(fakes["legacy"].url, fakes["next_gen"].url,
                       rollout={"phase": "shadow"}, shadow=shadow, **sections)


async def settled_trace(proxy: Running) -> list[dict[str, Any]]:
    """Every mirror finished (none cancelled), every trace line on disk; the lines."""
    await proxy.mirrors_settled(WAIT)
    assert proxy.proxy.trace is not None
    await proxy.proxy.trace.flush()
    path = proxy.config.telemetry.trace_file
    assert path is not None
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def fetch(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, bytes]:
    async with asyncio.timeout(WAIT), http.get(url, **kwargs) as response:
        return response.status, await response.read()


async def admin_status(http: aiohttp.ClientSession, proxy: Running) -> dict[str, Any]:
    async with asyncio.timeout(WAIT), http.get(f"{proxy.admin}/admin/status") as response:
        assert response.status == 200
        document: dict[str, Any] = await response.json()
        return document


async def scraped(http: aiohttp.ClientSession, proxy: Running) -> dict[Any, float]:
    async with asyncio.timeout(WAIT), http.get(f"{proxy.admin}/metrics") as response:
        return metrics_samples(await response.text())


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# --- an OpenAI chat-completions style streaming backend ---------------------------------


def event(document: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


@dataclass
class Stream:
    """What the fake backend really did, on its own clock (seconds since it got the request)."""

    tokens: int
    first_ms: float  # X: the first event after this long
    last_ms: float  # Y: the usage event after this long, then [DONE] and the end
    between: asyncio.Event | None = None  # held after event 1 until the test sets it
    first_s: float | None = None
    end_s: float | None = None
    second_sent: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def sent(self) -> bytes:
        return b"".join(self.chunks())

    def chunks(self) -> list[bytes]:
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
                "model": "agent"}
        return [
            event({**base, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                        "finish_reason": None}]}),
            event({**base, "choices": [{"index": 0, "delta": {"content": "Booked"},
                                        "finish_reason": None}]}),
            event({**base, "choices": [{"index": 0, "delta": {"content": " 3 flights"},
                                        "finish_reason": "stop"}]}),
            event({**base, "choices": [], "usage": {
                "prompt_tokens": 34, "completion_tokens": self.tokens - 34,
                "total_tokens": self.tokens}}),
            b"data: [DONE]\n\n",
        ]

    async def handler(self, request: web.Request) -> web.StreamResponse:
        received = time.monotonic()
        first, *deltas, usage, done = self.chunks()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        await asyncio.sleep(self.first_ms / 1000)
        await response.write(first)
        self.first_s = time.monotonic() - received
        if self.between is not None:
            async with asyncio.timeout(WAIT):
                await self.between.wait()
        for delta in deltas:
            await response.write(delta)
            self.second_sent.set()
        await asyncio.sleep(max(0.0, self.last_ms / 1000 - (time.monotonic() - received)))
        await response.write(usage)
        await response.write(done)
        await response.write_eof()
        self.end_s = time.monotonic() - received
        return response


def assert_stream_measured(side: dict[str, Any], stream: Stream) -> None:
    assert stream.first_s is not None and stream.end_s is not None
    assert side["status"] == 200
    assert side["tokens"] == stream.tokens
    assert side["success"] is True
    assert side["bytes"] == len(stream.sent)
    assert side["ttft_ms"] == pytest.approx(stream.first_s * 1000, abs=SLACK_MS)
    assert side["ttft_ms"] >= stream.first_ms - 1  # X itself, whatever the scheduling slack
    assert side["time_ms"] == pytest.approx(stream.end_s * 1000, abs=SLACK_MS)
    assert side["time_ms"] >= stream.last_ms - 1


COST = {"legacy": {"usd_per_1k_tokens": 0.03}, "next_gen": {"usd_per_1k_tokens": 0.002}}


async def test_streamed_usage_and_ttft_agree_in_trace_metrics_status_and_report(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    old = Stream(tokens=12345, first_ms=120, last_ms=300)
    new = Stream(tokens=1234, first_ms=150, last_ms=350)
    backends["legacy"].handler, backends["next_gen"].handler = old.handler, new.handler
    data = shadow_config(backends, telemetry={"cost": COST})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        status, body = await fetch(http, f"{proxy.url}/v1/chat/completions")
        assert status == 200
        assert body == old.sent  # the client gets legacy's stream, byte for byte
        (line,) = await settled_trace(proxy)
        assert_stream_measured(line["old_system"], old)
        assert_stream_measured(line["new_system"], new)
        assert line["old_system"]["cost_usd"] == round(12345 / 1000 * 0.03, 8)
        assert line["new_system"]["cost_usd"] == round(1234 / 1000 * 0.002, 8)
        assert line["match"]["result"] == "match"

        scrape = await scraped(http, proxy)
        status_doc = await admin_status(http, proxy)
    for side, backend, role in ((line["old_system"], "legacy", "primary"),
                                (line["new_system"], "next_gen", "shadow")):
        labels = {"backend": backend, "role": role}
        assert sample(scrape, "rollout_tokens_total", **labels) == side["tokens"]
        assert sample(scrape, "rollout_time_to_first_byte_seconds_count", **labels) == 1
        assert sample(scrape, "rollout_time_to_first_byte_seconds_sum", **labels) == \
            pytest.approx(side["ttft_ms"] / 1000, abs=1e-6)
        assert sample(scrape, "rollout_request_duration_seconds_sum", **labels) == \
            pytest.approx(side["time_ms"] / 1000, abs=1e-6)
        assert sample(scrape, "rollout_cost_usd_total", **labels) == \
            pytest.approx(side["cost_usd"], rel=1e-9)
        figures = status_doc["backends"][backend]
        assert figures["mean_tokens"] == side["tokens"]
        # the guards read times from 2 % bins: within 1 % of the exact time
        assert figures["p50_ms"] == pytest.approx(side["time_ms"], rel=0.01)
        assert figures["mean_cost_usd"] == pytest.approx(side["cost_usd"], rel=1e-9)
    assert sample(scrape, "rollout_shadow_comparisons_total", result="match") == 1

    report = summary_json(read_trace(proxy.config.telemetry.trace_file))  # type: ignore[arg-type]
    assert report["legacy"]["tokens"]["mean"] == pytest.approx(12345, rel=0.01)
    assert report["next_gen"]["tokens"]["mean"] == pytest.approx(1234, rel=0.01)
    assert report["next_gen"]["ttft_ms"]["mean"] == \
        pytest.approx(line["new_system"]["ttft_ms"], rel=0.01)
    assert report["next_gen"]["cost_usd"]["total"] == pytest.approx(0.002468, rel=0.01)
    (reduction,) = (t for t in report["targets"] if t["key"] == "token_reduction")
    assert reduction["measured"] == pytest.approx(1 - 1234 / 12345, rel=0.01)


ROUTES = {  # how a request reaches the streaming backend as its primary
    "progressive_100": ("next_gen", {"phase": "progressive", "percentage": 100},
                        {"X-User-Id": "u-42"}),
    "opt_in_header": ("next_gen", {"phase": "progressive", "percentage": 0},
                      {"X-Next-Gen": "1"}),
    "shadow_legacy": ("legacy", {"phase": "shadow"}, {}),  # parsed for the comparison too
}


@pytest.mark.parametrize("how", list(ROUTES))
async def test_streamed_primary_reaches_client_event_by_event(
        tmp_path: Path, backends: dict[str, Backend], how: str) -> None:
    backend, rollout, headers = ROUTES[how]
    seen_first = asyncio.Event()
    streaming = Stream(tokens=1234, first_ms=150, last_ms=200, between=seen_first)
    backends[backend].handler = streaming.handler
    data = config_dict(backends["legacy"].url, backends["next_gen"].url, rollout=rollout,
                       shadow={"sample": 1.0})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http, \
            http.get(f"{proxy.url}/v1/chat/completions", headers=headers) as response:
        assert response.status == 200
        assert response.headers["X-Rollout-Backend"] == backend
        assert response.headers["Content-Type"] == "text/event-stream"
        async with asyncio.timeout(WAIT):
            first = await response.content.readuntil(b"\n\n")
        assert first == streaming.chunks()[0]
        assert not streaming.second_sent.is_set()  # event 1 came while event 2 was held
        seen_first.set()
        async with asyncio.timeout(WAIT):
            rest = await response.content.read()
        assert first + rest == streaming.sent
        lines = await settled_trace(proxy)
        labels = {"backend": backend, "role": "primary"}
        assert proxy.metric("rollout_tokens_total", **labels) == 1234
        assert proxy.metric("rollout_time_to_first_byte_seconds_count", **labels) == 1
        assert streaming.first_s is not None
        assert proxy.metric("rollout_time_to_first_byte_seconds_sum", **labels) == \
            pytest.approx(streaming.first_s, abs=SLACK_MS / 1000)
        assert proxy.metric("rollout_requests_total", code_class="2xx", **labels) == 1
    if backend == "next_gen":
        assert backends["legacy"].seen == [] and lines == []
    else:
        (line,) = lines
        assert line["old_system"]["tokens"] == 1234


async def test_cost_per_side_is_tokens_times_price(tmp_path: Path,
                                                    backends: dict[str, Backend]) -> None:
    data = shadow_config(backends, telemetry={"cost": COST})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        for i in range(3):
            assert (await fetch(http, f"{proxy.url}/v1/tasks/{i}"))[0] == 200
        lines = await settled_trace(proxy)
        status_doc = await admin_status(http, proxy)
        scrape = await scraped(http, proxy)
    assert len(lines) == 3
    for line in lines:
        assert (line["old_system"]["tokens"], line["new_system"]["tokens"]) == (12000, 1200)
        assert line["old_system"]["cost_usd"] == 0.36
        assert line["new_system"]["cost_usd"] == 0.0024
    assert sample(scrape, "rollout_cost_usd_total", backend="legacy", role="primary") == \
        pytest.approx(3 * 0.36, rel=1e-9)
    assert sample(scrape, "rollout_cost_usd_total", backend="next_gen", role="shadow") == \
        pytest.approx(3 * 0.0024, rel=1e-9)
    assert status_doc["backends"]["legacy"]["mean_cost_usd"] == 0.36
    assert status_doc["backends"]["next_gen"]["mean_cost_usd"] == 0.0024


async def test_many_mirrors_agree_with_ground_truth_everywhere(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    """Tokens vary per answer; each figure is checked against the sum the backends sent."""
    truth: list[int] = []

    async def varying(request: web.Request) -> web.StreamResponse:
        tokens = 1000 + 37 * len(truth)
        truth.append(tokens)
        return web.json_response({"result": "ok", "success": True,
                                  "usage": {"total_tokens": tokens}})

    backends["next_gen"].handler = varying
    data = shadow_config(backends, telemetry={"cost": COST})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        answers = await asyncio.gather(*(fetch(http, f"{proxy.url}/v1/tasks/{i}")
                                         for i in range(40)))
        assert [status for status, _ in answers] == [200] * 40
        lines = await settled_trace(proxy)
        scrape = await scraped(http, proxy)
        status_doc = await admin_status(http, proxy)
    n, total = len(truth), sum(truth)
    assert n == 40 and len(lines) == 40
    assert sorted(line["new_system"]["tokens"] for line in lines) == sorted(truth)
    assert sum(line["new_system"]["cost_usd"] for line in lines) == \
        pytest.approx(total / 1000 * 0.002, rel=1e-6)
    assert sample(scrape, "rollout_tokens_total", backend="next_gen", role="shadow") == total
    assert sample(scrape, "rollout_cost_usd_total", backend="next_gen", role="shadow") == \
        pytest.approx(total / 1000 * 0.002, rel=1e-9)
    assert sample(scrape, "rollout_tokens_total", backend="legacy", role="primary") == n * 12000
    figures = status_doc["backends"]["next_gen"]
    assert figures["requests"] == n
    assert figures["mean_tokens"] == pytest.approx(total / n, abs=1e-3)
    assert figures["mean_cost_usd"] == pytest.approx(total / n / 1000 * 0.002, rel=1e-6)
    report = summary_json(read_trace(proxy.config.telemetry.trace_file))  # type: ignore[arg-type]
    assert report["comparisons"] == n
    assert report["next_gen"]["tokens"]["mean"] == pytest.approx(total / n, rel=0.01)
    assert report["next_gen"]["tokens"]["total"] == pytest.approx(total, rel=0.01)
    assert report["next_gen"]["cost_usd"]["total"] == pytest.approx(total * 2e-6, rel=0.01)
    assert report["legacy"]["cost_usd"]["total"] == pytest.approx(n * 0.36, rel=0.01)
    (reduction,) = (t for t in report["targets"] if t["key"] == "token_reduction")
    assert reduction["measured"] == pytest.approx(1 - (total / n) / 12000, rel=0.01)


MIXED_CASE = "Text/Event-Stream"  # media types are case-insensitive (RFC 9110 8.3.1)


@pytest.mark.parametrize("content_type", ["text/event-stream; charset=utf-8", MIXED_CASE])
def test_event_stream_media_type_is_recognised(content_type: str) -> None:
    telemetry = TelemetryConfig(tokens=Extract("X-Tokens-Used", ("usage", "total_tokens")),
                                success=Extract(json=("success",)), memory=Extract(),
                                trace_file=None, trace_max_bytes=1024, trace_keep=0,
                                json_max_bytes=2**20)
    tee = tee_for(CIMultiDict({"Content-Type": content_type}), telemetry, compare=False)
    for chunk in Stream(tokens=1234, first_ms=0, last_ms=0).chunks():
        tee.feed(chunk)
    seen = measure(200, {}, tee.json(), started=0.0, first_byte=0.1, ended=0.5, size=tee.size,
                   telemetry=telemetry, backend="next_gen")
    assert seen.tokens == 1234
    assert (seen.ttft_ms, seen.time_ms) == (100.0, 500.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("cap", [3000, 3600])  # 3600: the spend reaches the cap exactly
async def test_budget_drops_exactly_the_mirrors_past_it_until_the_hour_passes(
        tmp_path: Path, backends: dict[str, Backend], cap: int) -> None:
    clock = Clock()
    next_gen = backends["next_gen"]  # answers 1200 tokens each
    data = shadow_config(backends, shadow={"budget": {"tokens_per_hour": cap}})
    async with running(tmp_path, data, monotonic=clock) as proxy, \
            aiohttp.ClientSession() as http:
        requests = itertools.count(1)

        async def one(at: float, mirrored: int, dropped: int) -> None:
            clock.now = at
            status, _ = await fetch(http, f"{proxy.url}/v1/tasks/{next(requests)}")
            assert status == 200
            await settled_trace(proxy)  # the mirror's spend is counted before the next
            assert len(next_gen.seen) == mirrored
            assert proxy.metric("rollout_shadow_comparisons_total", result="match") == mirrored
            assert proxy.metric("rollout_shadow_dropped_total", reason="budget") == dropped

        async def budget(used: float) -> None:
            shown = (await admin_status(http, proxy))["shadow"]["budget"]
            assert shown["tokens_per_hour"] == cap
            assert (shown["tokens_used"], shown["tokens_left"]) == (used, max(0, cap - used))

        await one(1000, 1, 0)  # 0 spent in the hour before
        await one(1100, 2, 0)  # 1200
        await one(1200, 3, 0)  # 2400: under the cap, so this third mirror still goes
        await budget(3600)
        await one(1300, 3, 1)  # 3600 >= cap: dropped
        await one(1300, 3, 2)
        await one(4599, 3, 3)  # the first spend is not yet an hour old
        await budget(3600)
        clock.now = 4600  # ... and now it is
        await budget(2400)
        await one(4600, 4, 3)
        await one(4600, 4, 4)
        await one(4700, 5, 4)  # the second spend has left the hour too
        await budget(3600)
        assert len(backends["legacy"].seen) == 9  # the client never noticed
        lines = await settled_trace(proxy)
        scrape = await scraped(http, proxy)
    assert len(lines) == 5
    assert sample(scrape, "rollout_shadow_dropped_total", reason="budget") == 4
    assert sample(scrape, "rollout_tokens_total", backend="next_gen", role="shadow") == 5 * 1200


async def test_usd_budget_counts_next_gen_cost(tmp_path: Path,
                                               backends: dict[str, Backend]) -> None:
    clock = Clock()
    data = shadow_config(backends, shadow={"budget": {"usd_per_hour": 0.005}},
                         telemetry={"cost": COST})
    async with running(tmp_path, data, monotonic=clock) as proxy, \
            aiohttp.ClientSession() as http:
        for i in range(1, 6):  # 0, 0.0024, 0.0048 spent before 1..3; 0.0072 before 4 and 5
            assert (await fetch(http, f"{proxy.url}/v1/tasks/{i}"))[0] == 200
            await settled_trace(proxy)
            assert len(backends["next_gen"].seen) == min(i, 3)
        budget = (await admin_status(http, proxy))["shadow"]["budget"]
    assert proxy.metric("rollout_shadow_dropped_total", reason="budget") == 2
    assert budget["usd_per_hour"] == 0.005
    assert (budget["usd_used"], budget["usd_left"]) == (0.0072, 0)
    assert budget["tokens_per_hour"] is None and budget["tokens_left"] is None


async def test_a_budget_a_reload_sets_binds_and_one_it_removes_lets_go(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = Clock()  # next_gen answers 1200 tokens each: a cap of 1000 allows one mirror
    async with running(tmp_path, shadow_config(backends), monotonic=clock) as proxy, \
            aiohttp.ClientSession() as http:

        async def mirrored(count: int) -> int:
            for _ in range(count):
                assert (await fetch(http, f"{proxy.url}/v1/tasks/{uuid.uuid4()}"))[0] == 200
                await settled_trace(proxy)
            return len(backends["next_gen"].seen)

        assert await mirrored(2) == 2  # no cap: every mirror goes
        write_config(tmp_path, shadow_config(backends,
                                             shadow={"budget": {"tokens_per_hour": 1000}}))
        assert proxy.proxy.control.reload()
        assert await mirrored(3) == 3  # what was spent uncapped is not counted: one goes
        assert proxy.metric("rollout_shadow_dropped_total", reason="budget") == 2
        write_config(tmp_path, shadow_config(backends))
        assert proxy.proxy.control.reload()
        assert await mirrored(2) == 5
        budget = (await admin_status(http, proxy))["shadow"]["budget"]
    assert budget["tokens_per_hour"] is None


def agent(result: list[str], counter: itertools.count[int]) -> Handler:
    """An agent answer whose id and created change every time; result is what `result` says."""
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"id": str(uuid.uuid4()), "created": next(counter),
                                  "result": result[0], "success": True})
    return handler


async def test_baseline_learns_noise_and_a_changed_result_is_a_mismatch(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    counter = itertools.count(1_700_000_000)
    new_result = ["3 flights found"]
    backends["legacy"].handler = agent(["3 flights found"], counter)
    backends["next_gen"].handler = agent(new_result, counter)
    data = shadow_config(backends, shadow={"compare": {"baseline_sample": 1.0}})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        status, body = await fetch(http, f"{proxy.url}/v1/tasks")
        assert status == 200 and json.loads(body)["result"] == "3 flights found"
        (first,) = await settled_trace(proxy)
        new_result[0] = "no flights found"
        assert (await fetch(http, f"{proxy.url}/v1/tasks"))[0] == 200
        lines = await settled_trace(proxy)
        status_doc = await admin_status(http, proxy)

    assert first["match"]["result"] == "match"
    assert {"id", "created"} <= set(first["match"]["noise"])
    assert first["match"]["diff"] == []
    second = lines[1]["match"]
    assert second["result"] == "mismatch"
    assert second["shape"] is True
    assert "result" in second["diff"]
    assert {"id", "created"} <= set(second["noise"])
    assert {"id", "created"}.isdisjoint(second["diff"])

    copies = [s for s in backends["legacy"].seen if s.headers.get("X-Rollout-Shadow") == "1"]
    assert len(backends["legacy"].seen) == 4 and len(copies) == 2  # a baseline copy each
    assert all(s.headers.get("X-Rollout-Shadow") == "1" for s in backends["next_gen"].seen)
    noise = status_doc["shadow"]["noise"]
    assert noise["samples"] == 2
    assert noise["paths"]["id"] == {"seen": 2, "differing": 2}
    assert noise["paths"]["created"] == {"seen": 2, "differing": 2}
    assert noise["paths"]["result"] == {"seen": 2, "differing": 0}
    assert proxy.metric("rollout_shadow_comparisons_total", result="match") == 1
    assert proxy.metric("rollout_shadow_comparisons_total", result="mismatch") == 1
    assert proxy.metric("rollout_requests_total", backend="legacy", role="shadow",
                        code_class="2xx") == 2
