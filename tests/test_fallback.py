"""Fallback to legacy when next_gen fails: failure kinds, retries, the budget, the breaker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.config.model import CircuitConfig
from proxy.datapath.fallback import Breaker, RetryBudget
from tests.conftest import Backend, config_dict, dead_url, running

pytestmark = pytest.mark.timeout(60)
USER = {"X-User-Id": "user-7"}  # at percentage 100 every user is on next_gen
NEXT_GEN_ERROR = b'{"error": "next_gen is down"}'
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeSleep:
    """The `sleep` seam: a retry's backoff (under 0.25 s for the first retries: tenacity's
    random exponential wait from 0.05 s) is recorded and returns at once. Background loops
    sleep their intervals (0.5 s and up) through the same seam; those stay real sleeps, so
    they neither spin nor count."""

    BACKOFF_BELOW_S = 0.25

    def __init__(self) -> None:
        self.backoffs: list[float] = []

    async def __call__(self, delay: float) -> None:
        if delay >= self.BACKOFF_BELOW_S:
            await asyncio.sleep(delay)
            return
        self.backoffs.append(delay)


def fallback_config(fakes: dict[str, Backend], *, legacy: str | None = None,
                    next_gen: str | None = None, **sections: Any) -> dict[str, Any]:
    rollout = {"phase": "progressive", "percentage": 100, **sections.pop("rollout", {})}
    return config_dict(legacy or fakes["legacy"].url, next_gen or fakes["next_gen"].url,
                       rollout=rollout, **sections)


def answering(status: int, body: bytes = NEXT_GEN_ERROR, **headers: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type="application/json",
                            headers={k.replace("_", "-"): v for k, v in headers.items()})
    return handler


def stalling(release: asyncio.Event) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"late": True})
    return handler


async def ask(http: aiohttp.ClientSession, url: str, method: str = "GET",
              headers: dict[str, str] | None = None,
              **kwargs: Any) -> tuple[int, bytes, CIMultiDict[str]]:
    async with asyncio.timeout(10), http.request(
            method, url, headers={**USER, **(headers or {})}, **kwargs) as response:
        return response.status, await response.read(), CIMultiDict(response.headers)


def served_by_legacy_as_fallback(status: int, body: bytes, headers: CIMultiDict[str]) -> bool:
    return (status == 200 and headers.get("X-Rollout-Fallback") == "true"
            and headers["X-Rollout-Backend"] == "legacy"
            and json.loads(body)["backend"] == "legacy")


# Failure kinds ---------------------------------------------------------------------------------


async def test_next_gen_5xx_falls_back_to_legacy(tmp_path: Path,
                                                 backends: dict[str, Backend]) -> None:
    backends["next_gen"].handler = answering(500)
    async with running(tmp_path, fallback_config(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        answer = await ask(http, f"{proxy.url}/v1/tasks")
    assert served_by_legacy_as_fallback(*answer)
    assert len(backends["next_gen"].seen) == 1
    assert len(backends["legacy"].seen) == 1
    assert proxy.metric("rollout_fallbacks_total", reason="5xx") == 1
    assert proxy.metric("rollout_requests_total", backend="next_gen", role="primary",
                        code_class="5xx") == 1
    assert proxy.metric("rollout_requests_total", backend="legacy", role="fallback",
                        code_class="2xx") == 1


async def test_opt_in_header_makes_next_gen_primary_with_fallback(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    backends["next_gen"].handler = answering(503)
    data = fallback_config(backends, rollout={"phase": "opt_in", "percentage": 0})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        answer = await ask(http, f"{proxy.url}/v1/tasks", headers={"X-Next-Gen": "1"})
    assert served_by_legacy_as_fallback(*answer)
    assert proxy.metric("rollout_fallbacks_total", reason="5xx") == 1


async def test_refused_connection_falls_back_with_connect_error(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, fallback_config(backends, next_gen=dead_url())) as proxy, \
            aiohttp.ClientSession() as http:
        answer = await ask(http, f"{proxy.url}/v1/tasks")
    assert served_by_legacy_as_fallback(*answer)
    assert proxy.metric("rollout_fallbacks_total", reason="connect_error") == 1
    assert proxy.metric("rollout_requests_total", backend="next_gen", role="primary",
                        code_class="error") == 1


async def test_stall_past_timeout_falls_back_with_timeout(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    release = asyncio.Event()
    backends["next_gen"].handler = stalling(release)
    data = fallback_config(backends, backends={"next_gen": {"timeout_s": 0.5}})
    try:
        async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
            loop = asyncio.get_running_loop()
            started = loop.time()
            answer = await ask(http, f"{proxy.url}/v1/tasks")
            took = loop.time() - started
    finally:
        release.set()
    assert served_by_legacy_as_fallback(*answer)
    assert 0.5 <= took < 3
    assert proxy.metric("rollout_fallbacks_total", reason="timeout") == 1


async def test_explicit_status_in_fallback_on(tmp_path: Path,
                                              backends: dict[str, Backend]) -> None:
    backends["next_gen"].handler = answering(429, Retry_After="5")
    data = fallback_config(backends, fallback={"on": [429]})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        answer = await ask(http, f"{proxy.url}/v1/tasks")
        assert served_by_legacy_as_fallback(*answer)
        assert proxy.metric("rollout_fallbacks_total", reason="status") == 1
        # 5xx is not in `on` here: a 503 reaches the client as next_gen sent it.
        backends["next_gen"].handler = answering(503)
        status, body, headers = await ask(http, f"{proxy.url}/v1/tasks")
    assert (status, body) == (503, NEXT_GEN_ERROR)
    assert headers["X-Rollout-Backend"] == "next_gen"
    assert "X-Rollout-Fallback" not in headers
    assert len(backends["legacy"].seen) == 1


async def test_status_not_in_fallback_on_is_passed_through(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    backends["next_gen"].handler = answering(429, Retry_After="5")
    async with running(tmp_path, fallback_config(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        status, body, headers = await ask(http, f"{proxy.url}/v1/tasks")
    assert (status, body, headers["Retry-After"]) == (429, NEXT_GEN_ERROR, "5")
    assert backends["legacy"].seen == []


async def test_disabled_fallback_passes_the_5xx_through(tmp_path: Path,
                                                        backends: dict[str, Backend]) -> None:
    backends["next_gen"].handler = answering(500)
    data = fallback_config(backends, fallback={"enabled": False})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        status, body, headers = await ask(http, f"{proxy.url}/v1/tasks")
    assert (status, body) == (500, NEXT_GEN_ERROR)
    assert headers["X-Rollout-Backend"] == "next_gen"
    assert "X-Rollout-Fallback" not in headers
    assert backends["legacy"].seen == []
    assert proxy.metric("rollout_fallbacks_total", reason="5xx") == 0


async def test_disabled_fallback_never_sends_to_legacy_even_after_many_failures(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    backends["next_gen"].handler = answering(500)
    data = fallback_config(backends, fallback={"enabled": False})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        answers = [await ask(http, f"{proxy.url}/v1/tasks") for _ in range(10)]
    assert [status for status, _, _ in answers] == [500] * 10
    assert backends["legacy"].seen == []
    assert proxy.metric("rollout_fallbacks_total", reason="circuit_open") == 0


async def test_sunset_never_falls_back(tmp_path: Path, backends: dict[str, Backend]) -> None:
    backends["next_gen"].handler = answering(500)
    data = fallback_config(backends, rollout={"phase": "sunset"})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        answers = [await ask(http, f"{proxy.url}/v1/tasks") for _ in range(8)]
        refused = await ask(http, f"{proxy.url}/v1/tasks", headers={"X-Next-Gen": "0"})
    for status, body, headers in answers:
        assert (status, body) == (500, NEXT_GEN_ERROR)
        assert "X-Rollout-Fallback" not in headers
    assert refused[0] == 410
    assert backends["legacy"].seen == []
    assert proxy.metric("rollout_fallbacks_total", reason="5xx") == 0
    assert proxy.metric("rollout_fallbacks_total", reason="circuit_open") == 0


async def test_post_body_is_replayed_byte_identical(tmp_path: Path,
                                                    backends: dict[str, Backend]) -> None:
    backends["next_gen"].handler = answering(502)
    payload = os.urandom(200_000) + b"\r\n\r\n" + bytes(range(256))
    async with running(tmp_path, fallback_config(backends)) as proxy, \
            aiohttp.ClientSession() as http:
        answer = await ask(http, f"{proxy.url}/v1/tasks?x=1", "POST", data=payload,
                           headers={"Content-Type": "application/octet-stream",
                                    "X-Request-Id": "replay-1"})
    assert served_by_legacy_as_fallback(*answer)
    first, replay = backends["next_gen"].seen[0], backends["legacy"].seen[0]
    assert first.body == replay.body == payload
    assert first.method == replay.method == "POST"
    assert first.path_qs == replay.path_qs == "/v1/tasks?x=1"
    assert replay.headers["Content-Type"] == "application/octet-stream"
    assert answer[2]["X-Request-Id"] == "replay-1"


# Retries on legacy ----------------------------------------------------------------------------


class FlakyLegacy:
    """A raw HTTP server that hangs up on the first `failures` connections, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.bodies: list[bytes] = []
        self.connections = 0

    async def on_connect(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            self.bodies.append(await reader.readexactly(length))
            if self.connections > self.failures:
                body = json.dumps({"backend": "legacy", "success": True}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
        writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self.on_connect, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        finally:
            server.close()
            await server.wait_closed()


async def test_second_attempt_on_legacy_after_a_failed_one(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    backends["next_gen"].handler = answering(500)
    legacy, sleep = FlakyLegacy(failures=1), FakeSleep()
    async with legacy.serving() as legacy_url:
        data = fallback_config(backends, legacy=legacy_url, fallback={"attempts": 2})
        async with running(tmp_path, data, sleep=sleep) as proxy, \
                aiohttp.ClientSession() as http:
            answer = await ask(http, f"{proxy.url}/v1/tasks", "POST", data=b"once")
    assert served_by_legacy_as_fallback(*answer)
    assert legacy.bodies == [b"once", b"once"]
    assert len(sleep.backoffs) == 1
    assert 0 <= sleep.backoffs[0] <= 0.05
    assert proxy.metric("rollout_fallbacks_total", reason="5xx") == 1
    assert proxy.metric("rollout_requests_total", backend="legacy", role="fallback",
                        code_class="error") == 1
    assert proxy.metric("rollout_requests_total", backend="legacy", role="fallback",
                        code_class="2xx") == 1


async def test_one_attempt_on_legacy_by_default(tmp_path: Path,
                                                backends: dict[str, Backend]) -> None:
    backends["next_gen"].handler = answering(500)
    legacy, sleep = FlakyLegacy(failures=1), FakeSleep()
    async with legacy.serving() as legacy_url:
        data = fallback_config(backends, legacy=legacy_url)
        async with running(tmp_path, data, sleep=sleep) as proxy, \
                aiohttp.ClientSession() as http:
            status, body, _ = await ask(http, f"{proxy.url}/v1/tasks", "POST",
                                        data=b"once")
    assert status == 502
    assert json.loads(body)["error"]
    assert legacy.connections == 1
    assert sleep.backoffs == []


# The retry budget -----------------------------------------------------------------------------


async def test_retry_budget_caps_fallbacks(tmp_path: Path, backends: dict[str, Backend]) -> None:
    backends["next_gen"].handler = answering(500)
    data = fallback_config(backends, fallback={
        "budget_ratio": 0.2, "budget_window_s": 60,
        "circuit": {"consecutive_failures": 1000, "min_requests": 1000}})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        answers = [await ask(http, f"{proxy.url}/v1/tasks") for _ in range(40)]
    fell_back = [a for a in answers if served_by_legacy_as_fallback(*a)]
    refused = [a for a in answers if not served_by_legacy_as_fallback(*a)]
    assert 3 <= len(fell_back) <= 0.2 * 40
    assert proxy.metric("rollout_fallbacks_total", reason="5xx") == len(fell_back)
    assert proxy.metric("rollout_fallbacks_total", reason="budget") == len(refused)
    assert len(backends["legacy"].seen) == len(fell_back)
    assert len(backends["next_gen"].seen) == 40
    for status, _, headers in refused:
        assert status >= 500
        assert headers["X-Rollout-Backend"] == "next_gen"
        assert "X-Rollout-Fallback" not in headers


@pytest.mark.parametrize("status", [500, 429])
async def test_budget_refusal_passes_next_gens_own_answer(
        tmp_path: Path, backends: dict[str, Backend], status: int) -> None:
    backends["next_gen"].handler = answering(status, Retry_After="7")
    data = fallback_config(backends, fallback={
        "on": ["5xx", 429], "budget_ratio": 0.0,
        "circuit": {"consecutive_failures": 1000, "min_requests": 1000}})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        answers = [await ask(http, f"{proxy.url}/v1/tasks") for _ in range(4)]
    assert proxy.metric("rollout_fallbacks_total", reason="budget") == 1
    got, body, headers = answers[-1]  # the floor allows three, the fourth is refused
    assert (got, body, headers.get("Retry-After")) == (status, NEXT_GEN_ERROR, "7")


# The circuit breaker --------------------------------------------------------------------------


async def test_breaker_opens_half_opens_closes_and_reopens(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = FakeClock()
    next_gen, legacy = backends["next_gen"], backends["legacy"]
    next_gen.handler = answering(500)
    data = fallback_config(backends, fallback={
        "budget_ratio": 1.0,
        "circuit": {"consecutive_failures": 3, "cooldown_s": 30, "probes": 2,
                    "min_requests": 1000}})
    async with running(tmp_path, data, monotonic=clock) as proxy, \
            aiohttp.ClientSession() as http:
        url = f"{proxy.url}/v1/tasks"

        def state() -> float:
            return proxy.metric("rollout_circuit_state", backend="next_gen")

        assert state() == 0
        for _ in range(3):
            assert served_by_legacy_as_fallback(*await ask(http, url))
        assert state() == 1
        assert proxy.metric("rollout_fallbacks_total", reason="5xx") == 3

        # Open: straight to legacy, next_gen receives nothing.
        for _ in range(2):
            assert served_by_legacy_as_fallback(*await ask(http, url))
        clock.now += 29.9
        assert served_by_legacy_as_fallback(*await ask(http, url))
        assert len(next_gen.seen) == 3
        assert proxy.metric("rollout_fallbacks_total", reason="circuit_open") == 3

        # Cooldown over: a failed probe re-opens it for another cooldown.
        clock.now += 0.2
        assert served_by_legacy_as_fallback(*await ask(http, url))
        assert len(next_gen.seen) == 4
        assert state() == 1
        assert proxy.metric("rollout_fallbacks_total", reason="5xx") == 4
        clock.now += 29.9
        assert served_by_legacy_as_fallback(*await ask(http, url))
        assert len(next_gen.seen) == 4
        assert proxy.metric("rollout_fallbacks_total", reason="circuit_open") == 4

        # next_gen recovers: `probes` successes close it.
        next_gen.handler = None
        clock.now += 0.2
        status, _, headers = await ask(http, url)
        assert (status, headers["X-Rollout-Backend"]) == (200, "next_gen")
        assert "X-Rollout-Fallback" not in headers
        assert state() == 2
        status, _, headers = await ask(http, url)
        assert (status, headers["X-Rollout-Backend"]) == (200, "next_gen")
        assert state() == 0
        for _ in range(3):
            status, _, headers = await ask(http, url)
            assert (status, headers["X-Rollout-Backend"]) == (200, "next_gen")
    assert len(next_gen.seen) == 9
    assert len(legacy.seen) == 8


async def test_breaker_admits_only_probes_while_half_open(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock, release = FakeClock(), asyncio.Event()
    next_gen = backends["next_gen"]
    next_gen.handler = answering(500)
    data = fallback_config(backends, fallback={
        "budget_ratio": 1.0,
        "circuit": {"consecutive_failures": 1, "cooldown_s": 10, "probes": 2,
                    "min_requests": 1000}})
    async with running(tmp_path, data, monotonic=clock) as proxy, \
            aiohttp.ClientSession() as http:
        url = f"{proxy.url}/v1/tasks"
        await ask(http, url)
        assert proxy.metric("rollout_circuit_state", backend="next_gen") == 1
        clock.now += 10
        next_gen.handler = stalling(release)
        try:
            probes = [asyncio.ensure_future(ask(http, url)) for _ in range(2)]
            await next_gen.wait_for(3)
            assert proxy.metric("rollout_circuit_state", backend="next_gen") == 2
            assert served_by_legacy_as_fallback(*await ask(http, url))
            assert proxy.metric("rollout_fallbacks_total", reason="circuit_open") == 1
        finally:
            release.set()
        for status, _, headers in await asyncio.gather(*probes):
            assert (status, headers["X-Rollout-Backend"]) == (200, "next_gen")
    assert proxy.metric("rollout_circuit_state", backend="next_gen") == 0


def circuit(**overrides: float) -> CircuitConfig:
    values: dict[str, Any] = {"consecutive_failures": 3, "error_rate": 0.5, "window_s": 10,
                              "min_requests": 1000, "cooldown_s": 30, "probes": 2}
    return CircuitConfig(**{**values, **overrides})


def test_breaker_counts_consecutive_failures_only() -> None:
    clock, states = FakeClock(), []
    breaker = Breaker(circuit(), clock, states.append)
    for ok in (False, False, True, False, False):
        assert breaker.allow()
        breaker.record(ok)
    assert breaker.state == "closed"
    breaker.record(False)
    assert breaker.state == "open"
    assert states == ["open"]


def test_breaker_opens_on_error_rate_within_its_window() -> None:
    clock = FakeClock()
    breaker = Breaker(circuit(consecutive_failures=100, min_requests=4, error_rate=0.5), clock)
    for ok in (True, False, True, False):
        breaker.record(ok)
    assert breaker.state == "closed"  # 2 of 4 is not above 0.5
    clock.now += 11  # those four leave the window
    for ok in (False, True, False):
        breaker.record(ok)
    assert breaker.state == "closed"  # under min_requests again
    breaker.record(False)
    assert breaker.state == "open"  # 3 of 4


def test_breaker_cycle_on_a_fake_clock() -> None:
    clock, states = FakeClock(), []
    breaker = Breaker(circuit(consecutive_failures=1), clock, states.append)
    breaker.record(False)
    assert not breaker.allow()
    clock.now += 29.5
    assert not breaker.allow()
    breaker.record(True)  # an answer that started before the trip changes nothing
    assert breaker.state == "open"
    clock.now += 0.5
    assert breaker.allow() and breaker.allow()  # two probes
    assert breaker.state == "half_open"
    assert not breaker.allow()  # no third while both are out
    breaker.record(True)
    assert breaker.state == "half_open"
    breaker.record(False)  # a failed probe re-opens for a full cooldown
    assert breaker.state == "open"
    clock.now += 29.5
    assert not breaker.allow()
    clock.now += 0.5
    assert breaker.allow() and breaker.allow()
    breaker.record(True)
    breaker.record(True)
    assert breaker.state == "closed"
    assert breaker.allow() and breaker.allow() and breaker.allow()
    assert states == ["open", "half_open", "open", "half_open", "closed"]


def test_retry_budget_has_a_floor_then_a_ratio() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, 10, clock)
    for _ in range(5):
        budget.request()
    assert [budget.allow() for _ in range(4)] == [True, True, True, False]
    for _ in range(15):
        budget.request()
    assert budget.allow()  # 20 requests: 4 retries
    assert not budget.allow()


def test_retry_budget_window_slides() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, 10, clock)
    for _ in range(3):
        budget.request()
        assert budget.allow()
    budget.request()
    assert not budget.allow()
    clock.now += 12  # past the window (whatever its granularity)
    budget.request()
    assert budget.allow()


def test_retry_budget_memory_is_bounded_by_its_window() -> None:
    """A healthy proxy never falls back (allow() never runs): what request() keeps must still
    be bounded by the window, not grow with every request ever served."""
    clock = FakeClock()
    budget = RetryBudget(0.2, 10, clock)
    tracemalloc.start()
    try:
        for _ in range(100_000):
            clock.now += 1
            budget.request()
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < 200_000  # one float per request would be several megabytes


# Leaks ----------------------------------------------------------------------------------------


async def test_failing_requests_leak_no_tasks(tmp_path: Path,
                                              backends: dict[str, Backend]) -> None:
    """2,000 requests that all fail: half to a refusing next_gen (fallback disabled), half
    anonymous to a refusing legacy with a mirror to the refusing next_gen."""
    data = fallback_config(backends, legacy=dead_url(), next_gen=dead_url(),
                           shadow={"sample": 1.0}, fallback={
                               "enabled": False,
                               "circuit": {"consecutive_failures": 10**9,
                                           "min_requests": 10**9}})
    async with running(tmp_path, data) as proxy, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=20)) as http:
        rt = proxy.proxy.runtime

        async def worker(count: int, offset: int) -> None:
            for i in range(count):
                # An empty user id is anonymous: legacy serves it, a copy goes to next_gen.
                user = {"X-User-Id": f"u{offset + i}"} if i % 2 else {"X-User-Id": ""}
                async with http.get(f"{proxy.url}/v1/tasks", headers=user) as response:
                    assert response.status == 502
                    await response.read()

        async with asyncio.timeout(40):
            await asyncio.gather(*(worker(10, n * 10) for n in range(20)))
            await proxy.mirrors_settled(5)
            background, before = len(rt.tasks), len(asyncio.all_tasks())
            await asyncio.gather(*(worker(100, n * 100) for n in range(20)))
            await proxy.mirrors_settled(5)
        assert len(proxy.proxy.shadow.tasks) == 0
        assert proxy.proxy.shadow.in_flight == 0
        assert len(rt.tasks) == background
        assert rt.in_flight == 0
        assert len(asyncio.all_tasks()) <= before + 2
        assert proxy.metric("rollout_requests_total", backend="next_gen", role="primary",
                            code_class="error") == 1100
        assert proxy.metric("rollout_shadow_comparisons_total", result="error") == 1100
