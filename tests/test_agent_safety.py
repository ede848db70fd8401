"""The agent-aware safety features (issue 11), on the real proxy in front of real backends:
side-effect rules for mirrors, session pinning (in memory and shared through Redis), the
gradual rollback on an injected wall clock, Unleash cohorts checked against the published
client specification's vectors, and complaints tied to the request they concern."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import mmh3
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict
from yarl import URL

from proxy.datapath.decide import Plan, bucket, in_cohort, unleash_value
from proxy.offline.cli import parse_duration, parser
from tests.conftest import (
    EXE,
    TOKEN,
    Backend,
    Monotonic,
    Process,
    Running,
    Seen,
    WallClock,
    config_dict,
    deep_merge,
    parked,
    running,
    spawn_serve,
    wait_ready,
    write_config,
)
from tests.test_e2e_redis import Redis

AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
SALT = "test"
NEEDS_REDIS = pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="redis-server is not installed (make test installs it)")











def urls(backends: dict[str, Backend]) -> tuple[str, str]:
    return backends["legacy"].url, backends["next_gen"].url


def progressive(backends: dict[str, Backend], percentage: float, **sections: Any
                ) -> dict[str, Any]:
    base = config_dict(*urls(backends), rollout={"phase": "progressive",
                                                 "percentage": percentage},
                       shadow={"sample": 0.0})
    return deep_merge(base, sections)


def user_with(predicate: Any, salt: str = SALT) -> str:
    for index in range(100_000):
        user = f"user-{index}"
        if predicate(bucket(salt, user)):
            return user
    raise AssertionError("no such user")


async def hit(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None,
              path: str = "/v1/tasks", method: str = "GET",
              body: bytes | None = None) -> tuple[str, str]:
    """(backend that answered, X-Request-Id of the answer)."""
    target = URL(url + path, encoded=True)  # sent as written: no client-side normalisation
    async with http.request(method, target, headers=headers or {}, data=body) as answer:
        await answer.read()
        assert answer.status < 500, answer.status
        return answer.headers["X-Rollout-Backend"], answer.headers["X-Request-Id"]


async def served(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> str:
    return (await hit(http, url, headers))[0]


async def call(http: aiohttp.ClientSession, admin: str, name: str,
               body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{admin}/admin/{name}", json=body or {}, headers=AUTH) as response:
        return response.status, await response.json()


async def status(http: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with http.get(f"{admin}/admin/status") as response:
        assert response.status == 200
        document: dict[str, Any] = await response.json()
        return document


async def cohort(http: aiohttp.ClientSession, url: str, users: list[str]) -> set[str]:
    """The users (of `users`) whose request the running proxy sent to next_gen."""
    answers = await asyncio.gather(*(served(http, url, {"X-User-Id": u}) for u in users))
    return {u for u, backend in zip(users, answers, strict=True) if backend == "next_gen"}


def many_client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))


# Side-effect rules for mirrors ----------------------------------------------------------------

SIDE_EFFECT_RULES = {"sample": 1.0, "methods": ["GET", "POST"],
                     "exclude_paths": ["/v1/payments"], "headers": {"X-Dry-Run": "1"}}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
PATHS = ["/v1/tasks", "/v1/tasks/7?x=1", "/v1/payments", "/v1/payments/42/refund",
         "/v1/payment-methods", "/v1/%70ayments"]  # %70 is "p": the decoded path is excluded


def skip_reason(method: str, path: str) -> str | None:
    """The rules, restated: the reason a request must not be mirrored, or None."""
    if method not in ("GET", "POST"):
        return "method"
    decoded = path.split("?", 1)[0].replace("%70", "p")
    return "excluded_path" if decoded.startswith("/v1/payments") else None


def shadowing(backends: dict[str, Backend], **sections: Any) -> dict[str, Any]:
    base = config_dict(*urls(backends), rollout={"phase": "shadow"}, shadow=SIDE_EFFECT_RULES)
    return deep_merge(base, sections)


def header(seen: Seen, name: str) -> str | None:
    """A header a backend received, whatever the case of its name on the wire."""
    return CIMultiDict(seen.headers).get(name)


async def settle_mirrors(proxy: Running) -> None:
    """Every mirror sent so far has finished."""
    await proxy.mirrors_settled(5.0)


async def test_mirrors_obey_the_side_effect_rules_request_by_request(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    cases = [(method, path) for method in METHODS for path in PATHS]
    async with running(tmp_path, shadowing(backends)) as proxy, aiohttp.ClientSession() as http:
        for index, (method, path) in enumerate(cases):
            body = b'{"amount": 10}' if method in ("POST", "PUT", "PATCH") else None
            headers = {"X-Request-Id": f"case-{index}", "Content-Type": "application/json"}
            backend, rid = await hit(http, proxy.url, headers, path, method, body)
            assert (backend, rid) == ("legacy", f"case-{index}")
        await settle_mirrors(proxy)

    legacy, next_gen = backends["legacy"].seen, backends["next_gen"].seen
    copies = {header(seen, "X-Request-Id"): seen for seen in next_gen}
    assert len(copies) == len(next_gen), "a request was mirrored twice"
    primaries = {header(seen, "X-Request-Id"): seen for seen in legacy}
    assert len(primaries) == len(legacy) == len(cases)
    for index, (method, path) in enumerate(cases):
        rid, why = f"case-{index}", skip_reason(method, path)
        primary = primaries[rid]
        assert (primary.method, primary.path_qs) == (method, path)
        assert header(primary, "X-Dry-Run") is None, f"{method} {path}: primary got X-Dry-Run"
        assert header(primary, "X-Rollout-Shadow") is None
        if why is not None:
            assert rid not in copies, f"{method} {path} was mirrored ({why} rule broken)"
            continue
        copy = copies.get(rid)
        assert copy is not None, f"{method} {path} was not mirrored"
        assert (copy.method, copy.path_qs, copy.body) == (method, primary.path_qs, primary.body)
        assert header(copy, "X-Dry-Run") == "1"
        assert header(copy, "X-Rollout-Shadow") == "1"
    mirrored = sum(skip_reason(m, p) is None for m, p in cases)
    assert len(next_gen) == mirrored == 6
    for reason in ("method", "excluded_path"):
        expected = sum(skip_reason(m, p) == reason for m, p in cases)
        assert proxy.metric("rollout_shadow_skipped_total", reason=reason) == expected
    compared = sum(proxy.metric("rollout_shadow_comparisons_total", result=r)
                   for r in ("match", "mismatch", "error"))
    assert compared == mirrored


async def test_progressive_mirrors_only_legacy_served_requests_under_the_rules(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = shadowing(backends, rollout={"phase": "progressive", "percentage": 50})
    cases = [(f"user-{n}", METHODS[n % 5], PATHS[n % len(PATHS)]) for n in range(90)]
    answered: dict[str, str] = {}
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        for index, (user, method, path) in enumerate(cases):
            headers = {"X-Request-Id": f"mix-{index}", "X-User-Id": user}
            answered[f"mix-{index}"] = (await hit(http, proxy.url, headers, path, method))[0]
        await settle_mirrors(proxy)
    copies = [s for s in backends["next_gen"].seen if header(s, "X-Rollout-Shadow") == "1"]
    copied = {header(s, "X-Request-Id") for s in copies}
    assert len(copied) == len(copies)
    expected = {f"mix-{i}" for i, (user, method, path) in enumerate(cases)
                if answered[f"mix-{i}"] == "legacy" and skip_reason(method, path) is None}
    assert copied == expected
    assert set(answered.values()) == {"legacy", "next_gen"}
    assert all(header(s, "X-Dry-Run") == "1" for s in copies)
    primaries = [s for s in backends["next_gen"].seen if header(s, "X-Rollout-Shadow") is None]
    assert all(header(s, "X-Dry-Run") is None for s in primaries + backends["legacy"].seen)


async def test_paths_that_resolve_under_an_excluded_prefix_are_never_mirrored(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, shadowing(backends)) as proxy, aiohttp.ClientSession() as http:
        for index, path in enumerate(["//v1/payments", "/v1/./payments", "/v1/x/../payments"]):
            await hit(http, proxy.url, {"X-Request-Id": f"dot-{index}"}, path, "POST", b"{}")
        await settle_mirrors(proxy)
    assert [s.path_qs for s in backends["next_gen"].seen] == []


async def test_status_and_check_describe_the_mirroring_rules(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = shadowing(backends)
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        mirrored = (await status(http, proxy.admin))["shadow"]["mirrored"]
    assert mirrored["what"] == "100% of legacy-served requests"
    assert mirrored["methods"] == ["GET", "POST"]
    assert mirrored["never"]["paths"] == ["/v1/payments"]
    assert "every method not listed" in mirrored["never"]["methods"]
    assert mirrored["headers_added"] == {"X-Dry-Run": "1", "X-Rollout-Shadow": "1"}

    (tmp_path / "check").mkdir()
    path = write_config(tmp_path / "check", data)
    proc = await asyncio.create_subprocess_exec(
        EXE, "check", "--config", str(path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "mirroring:   100% of legacy-served requests to next_gen" in text
    assert "mirrored:  methods GET, POST; never: other methods, paths under /v1/payments" in text
    assert "copies:    X-Rollout-Shadow: 1, X-Dry-Run: 1" in text


# Session pinning ------------------------------------------------------------------------------


def pinning(backends: dict[str, Backend], percentage: float = 100, **routing: Any
            ) -> dict[str, Any]:
    return progressive(backends, percentage,
                       routing={"session": {"header": "X-Session-Id"}, **routing})


async def test_session_keeps_its_backend_over_a_percentage_drop_until_a_rollback(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, pinning(backends), sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        first = {"X-Session-Id": "s-1", "X-User-Id": "u-1"}
        assert await served(http, proxy.url, first) == "next_gen"
        code, answer = await call(http, proxy.admin, "percentage", {"percentage": 0})
        assert (code, answer["phase"], answer["percentage"]) == (200, "progressive", 0)
        for _ in range(5):
            assert await served(http, proxy.url, first) == "next_gen"
        # The pin belongs to the session, whatever user id the request carries.
        assert await served(http, proxy.url, {"X-Session-Id": "s-1", "X-User-Id": "u-9"}) \
            == "next_gen"
        assert await served(http, proxy.url, {"X-Session-Id": "s-2", "X-User-Id": "u-1"}) \
            == "legacy"
        assert await served(http, proxy.url, {"X-User-Id": "u-1"}) == "legacy"
        proxy.proxy.control.tick()
        assert proxy.metric("rollout_sessions_pinned") == 2
        assert (await status(http, proxy.admin))["sessions_pinned"] == 2

        code, _ = await call(http, proxy.admin, "rollback", {"reason": "pins must yield"})
        assert code == 200
        assert await served(http, proxy.url, first) == "legacy"


async def test_a_pin_expires_after_session_ttl_s_without_a_request(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = Monotonic()
    data = pinning(backends, session_ttl_s=60)
    async with running(tmp_path, data, monotonic=clock, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        session = {"X-Session-Id": "s-ttl", "X-User-Id": "u-1"}
        assert await served(http, proxy.url, session) == "next_gen"
        await call(http, proxy.admin, "percentage", {"percentage": 0})
        clock.now += 59
        assert await served(http, proxy.url, session) == "next_gen"
        clock.now += 59  # 118 s after the first request, 59 s after the last: the TTL slides
        assert await served(http, proxy.url, session) == "next_gen"
        clock.now += 61
        assert await served(http, proxy.url, session) == "legacy"


async def test_the_least_recently_used_pin_is_evicted_past_session_max(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = pinning(backends, session_max=3)
    async with running(tmp_path, data, sleep=parked) as proxy, aiohttp.ClientSession() as http:

        def session(name: str) -> dict[str, str]:
            return {"X-Session-Id": name, "X-User-Id": "u-1"}

        for name in ("s-1", "s-2", "s-3", "s-1", "s-4"):  # s-1 touched again: s-2 is the LRU
            assert await served(http, proxy.url, session(name)) == "next_gen"
        proxy.proxy.control.tick()
        assert proxy.metric("rollout_sessions_pinned") == 3
        await call(http, proxy.admin, "percentage", {"percentage": 0})
        for name in ("s-1", "s-3", "s-4"):
            assert await served(http, proxy.url, session(name)) == "next_gen", name
        assert await served(http, proxy.url, session("s-2")) == "legacy"
        proxy.proxy.control.tick()
        assert proxy.metric("rollout_sessions_pinned") == 3


async def test_a_cookie_can_be_the_session_source(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = progressive(backends, 100, routing={"session": {"cookie": "sid"}})
    async with running(tmp_path, data, sleep=parked) as proxy, \
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        assert await served(http, proxy.url, {"Cookie": "sid=c-1", "X-User-Id": "u"}) \
            == "next_gen"
        await call(http, proxy.admin, "percentage", {"percentage": 0})
        assert await served(http, proxy.url, {"Cookie": "theme=dark; sid=c-1"}) == "next_gen"
        assert await served(http, proxy.url, {"Cookie": "sid=c-2"}) == "legacy"
        # The configured source is the cookie: a header of the same name is not a session.
        assert await served(http, proxy.url, {"X-Session-Id": "c-1", "sid": "c-1"}) == "legacy"


async def test_a_gradual_rollback_overrides_pins_too(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = WallClock(T0)
    data = pinning(backends, 80)
    outside = user_with(lambda b: 4000 <= b < 8000)  # in the 80 % cohort, not the 40 % one
    async with running(tmp_path, data, clock=clock, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        session = {"X-Session-Id": "s-ramp", "X-User-Id": outside}
        assert await served(http, proxy.url, session) == "next_gen"
        await call(http, proxy.admin, "rollback", {"reason": "ramp down", "over_s": 60})
        clock.at(30)
        proxy.proxy.control.tick()
        assert await served(http, proxy.url, session) == "legacy"


async def test_an_explicit_opt_out_beats_a_next_gen_pin(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, pinning(backends), sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        session = {"X-Session-Id": "s-out", "X-User-Id": "u-1"}
        assert await served(http, proxy.url, session) == "next_gen"
        assert await served(http, proxy.url, {**session, "X-Next-Gen": "0"}) == "legacy"


async def test_sunset_serves_a_legacy_pinned_session_from_next_gen(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, pinning(backends, 0), sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        session = {"X-Session-Id": "s-old", "X-User-Id": "u-1"}
        assert await served(http, proxy.url, session) == "legacy"
        for phase in ("default", "sunset"):
            code, answer = await call(http, proxy.admin, "promote")
            assert (code, answer["phase"]) == (200, phase)
        assert await served(http, proxy.url, {"X-Session-Id": "s-new"}) == "next_gen"
        assert await served(http, proxy.url, session) == "next_gen"


async def test_pinned_session_leaves_next_gen_when_the_yaml_phase_goes_back_to_legacy(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = pinning(backends)
    async with running(tmp_path, data, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        headers = {"X-User-Id": "alice", "X-Session-Id": "s-1"}
        async with http.get(f"{proxy.url}/v1/tasks", headers=headers) as response:
            assert response.headers["X-Rollout-Backend"] == "next_gen"
        write_config(tmp_path, deep_merge(data, {"rollout": {"phase": "legacy"}}))
        assert proxy.proxy.control.reload()
        assert proxy.proxy.runtime.plan.phase == "legacy"
        async with http.get(f"{proxy.url}/v1/tasks", headers=headers) as response:
            assert response.headers["X-Rollout-Backend"] == "legacy"  # once a bug: next_gen


# Pins shared through Redis ---------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def redis_client(server: Redis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def eventually(check: Any, within: float) -> None:
    """Poll another process to a deadline: no event crosses the process boundary."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - polling another process's endpoint
            await asyncio.sleep(0.02)


async def two_replicas(tmp_path: Path, backends: dict[str, Backend], server: Redis,
                       started: list[Process]) -> list[Process]:
    data = deep_merge(pinning(backends), {"state": {"backend": "redis",
                                                    "redis_url": server.url}})
    made = []
    for index in range(2):
        directory = tmp_path / f"replica-{index}"
        directory.mkdir()
        made.append(spawn_serve(directory, data))
    started.extend(made)
    for replica in made:
        await wait_ready(replica.admin)
    return made


async def pinned_in_redis(server: Redis, session: str, backend: str) -> None:
    async with redis_client(server) as client:

        async def stored() -> bool:
            return bool(await client.get(f"rollout:pin:{session}") == backend.encode())

        await eventually(stored, within=5)


@NEEDS_REDIS
async def test_replicas_share_pins_through_redis_over_a_percentage_drop(
        tmp_path: Path, backends: dict[str, Backend], redis_server: Redis,
        serve_processes: list[Process]) -> None:
    first, second = await two_replicas(tmp_path, backends, redis_server, serve_processes)
    session = {"X-Session-Id": "shared-1", "X-User-Id": "u-1"}
    async with aiohttp.ClientSession() as http:
        assert await served(http, first.url, session) == "next_gen"
        await pinned_in_redis(redis_server, "shared-1", "next_gen")
        code, _ = await call(http, first.admin, "percentage", {"percentage": 0})
        assert code == 200

        async def second_dropped() -> bool:
            return (await status(http, second.admin))["percentage"] == 0

        await eventually(second_dropped, within=5)
        assert await served(http, second.url, session) == "next_gen"
        assert await served(http, second.url, {"X-Session-Id": "fresh", "X-User-Id": "u-1"}) \
            == "legacy"
        assert await served(http, first.url, session) == "next_gen"


@NEEDS_REDIS
async def test_replicas_agree_on_a_session_another_replica_re_pinned(
        tmp_path: Path, backends: dict[str, Backend], redis_server: Redis,
        serve_processes: list[Process]) -> None:
    first, second = await two_replicas(tmp_path, backends, redis_server, serve_processes)
    session = {"X-Session-Id": "shared-2", "X-User-Id": "u-1"}
    async with aiohttp.ClientSession() as http:

        async def phase_on_second(phase: str) -> None:
            async def reached() -> bool:
                return (await status(http, second.admin))["phase"] == phase
            await eventually(reached, within=5)

        assert await served(http, first.url, session) == "next_gen"  # pinned on `first`
        await pinned_in_redis(redis_server, "shared-2", "next_gen")
        await call(http, first.admin, "rollback", {"reason": "incident"})
        await phase_on_second("legacy")
        assert await served(http, second.url, session) == "legacy"  # re-pinned by `second`
        await pinned_in_redis(redis_server, "shared-2", "legacy")
        await call(http, first.admin, "reset")
        await phase_on_second("progressive")
        on_first = await served(http, first.url, session)
        on_second = await served(http, second.url, session)
        assert on_first == on_second


# Gradual rollback -----------------------------------------------------------------------------


def ramped(backends: dict[str, Backend], **rollout: Any) -> dict[str, Any]:
    return progressive(backends, 80, rollout=rollout)


async def at_time(proxy: Running, clock: WallClock, http: aiohttp.ClientSession,
                  seconds: float) -> dict[str, Any]:
    clock.at(seconds)
    proxy.proxy.control.tick()
    return await status(http, proxy.admin)


USERS = [f"user-{n}" for n in range(2000)]


async def test_a_gradual_rollback_follows_its_schedule_within_five_percent(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = WallClock(T0)
    async with running(tmp_path, ramped(backends), clock=clock, sleep=parked) as proxy, \
            many_client() as http:
        code, answer = await call(http, proxy.admin, "rollback",
                                  {"reason": "p95 up", "over_s": 60})
        assert code == 200
        assert answer["message"] == "rolled back over 60 s"
        for t in (0, 15, 30, 45):
            expected = 80 * (1 - t / 60)
            document = await at_time(proxy, clock, http, t)
            assert document["phase"] == "progressive", t
            assert abs(document["percentage"] - expected) <= 0.05 * 80, (t, document)
            assert proxy.metric("rollout_percentage") == document["percentage"]
            ramp = document["rollback_ramp"]
            assert (ramp["done"], ramp["from"], ramp["target"]) == (False, 80, 0)
            assert ramp["progress"] == pytest.approx(t / 60, abs=0.01)
            assert ramp["eta_s"] == pytest.approx(60 - t, abs=1)
            if t == 30:
                chosen = await cohort(http, proxy.url, USERS)
                assert chosen == {u for u in USERS if bucket(SALT, u) < 4000}
                assert 0.35 <= len(chosen) / len(USERS) <= 0.45
        document = await at_time(proxy, clock, http, 60)
        assert document["phase"] == "legacy"
        assert document["rollback_ramp"] == {"done": True, "target": 0}
        assert await cohort(http, proxy.url, USERS[:300]) == set()
        assert proxy.metric("rollout_rollbacks_total", trigger="manual") == 1


async def test_a_landed_ramp_shows_its_target_percentage(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = WallClock(T0)
    async with running(tmp_path, ramped(backends), clock=clock, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        await call(http, proxy.admin, "rollback", {"reason": "p95 up", "over_s": 60})
        document = await at_time(proxy, clock, http, 60)
        assert document["phase"] == "legacy"
        assert document["percentage"] <= 0.05 * 80
        assert proxy.metric("rollout_percentage") <= 0.05 * 80


async def test_a_second_rollback_or_a_reset_cancels_the_ramp(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = WallClock(T0)
    async with running(tmp_path, ramped(backends), clock=clock, sleep=parked) as proxy, \
            many_client() as http:
        await call(http, proxy.admin, "rollback", {"reason": "slow", "over_s": 60})
        assert (await at_time(proxy, clock, http, 15))["percentage"] == pytest.approx(60)
        code, _ = await call(http, proxy.admin, "rollback", {"reason": "worse: now"})
        assert code == 200
        document = await status(http, proxy.admin)
        assert (document["phase"], document["rollback_ramp"]) == ("legacy", None)
        assert await cohort(http, proxy.url, USERS[:300]) == set()
        assert proxy.metric("rollout_rollbacks_total", trigger="manual") == 2

        code, _ = await call(http, proxy.admin, "reset")
        assert code == 200
        await call(http, proxy.admin, "rollback", {"reason": "slow again", "over_s": 60})
        assert (await at_time(proxy, clock, http, 30))["percentage"] == pytest.approx(60)
        code, _ = await call(http, proxy.admin, "reset")
        assert code == 200
        for t in (30, 45, 75):
            document = await at_time(proxy, clock, http, t)
            assert (document["phase"], document["percentage"]) == ("progressive", 80)
            assert document["rollback_ramp"] is None


async def test_rollout_rollback_over_s_applies_to_a_manual_rollback_without_over_s(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = WallClock(T0)
    data = ramped(backends, rollback_over_s=60)
    async with running(tmp_path, data, clock=clock, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        code, answer = await call(http, proxy.admin, "rollback", {"reason": "from the YAML"})
        assert (code, answer["message"]) == (200, "rolled back over 60 s")
        document = await at_time(proxy, clock, http, 30)
        assert (document["phase"], document["percentage"]) == ("progressive", 40)
        assert document["rollback_ramp"]["eta_s"] == 30
        await call(http, proxy.admin, "reset")
        code, answer = await call(http, proxy.admin, "rollback",
                                  {"reason": "explicitly now", "over_s": 0})
        assert (code, answer["phase"], answer["message"]) == (200, "legacy", "rolled back")
        assert (await status(http, proxy.admin))["rollback_ramp"] is None


async def test_a_guard_triggered_rollback_is_immediate_even_with_rollback_over_s(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = WallClock(T0)
    data = deep_merge(ramped(backends, rollback_over_s=600),
                      {"guards": {"complaints_per_hour": 0}})
    cohort_user = user_with(lambda b: b < 8000)
    async with running(tmp_path, data, clock=clock, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        code, answer = await call(http, proxy.admin, "complaints",
                                  {"user_id": cohort_user, "text": "it broke my task"})
        assert (code, answer["message"]) == (200, "complaint counted against next_gen")
        proxy.proxy.control.tick()
        document = await status(http, proxy.admin)
        assert document["phase"] == "legacy"
        assert document["rollback_ramp"] is None
        assert document["tripped"] == ["complaints_per_hour"]
        assert proxy.metric("rollout_rollbacks_total", trigger="complaints_per_hour") == 1
        assert await served(http, proxy.url, {"X-User-Id": cohort_user}) == "legacy"


async def test_cli_rollback_over_sends_over_s(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    clock = WallClock(T0)
    async with running(tmp_path, ramped(backends), clock=clock, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        proc = await asyncio.create_subprocess_exec(
            EXE, "rollback", "--reason", "x", "--over", "10m", "--admin-url", proxy.admin,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "ROLLOUT_ADMIN_TOKEN": TOKEN})
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert "rolled back over 600 s" in out.decode()
        override = proxy.proxy.runtime.stored.override
        assert override is not None
        assert (override.reason, override.ramp_s, override.ramp_from) == ("x", 600, 80)
        ramp = (await status(http, proxy.admin))["rollback_ramp"]
        assert (ramp["eta_s"], ramp["percentage"]) == (600, 80)
        assert (await at_time(proxy, clock, http, 300))["percentage"] == pytest.approx(40)


@pytest.mark.parametrize(("text", "seconds"), [("10m", 600), ("90s", 90), ("90", 90),
                                               ("1h30m", 5400), ("1.5m", 90)])
def test_rollback_over_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    args = parser().parse_args(["rollback", "--reason", "x", "--over", text])
    assert args.over == seconds


# Unleash cohorts -------------------------------------------------------------------------------


def normalized_value(user: str, group: str) -> int:
    """Unleash's normalizedValue, written from its spec with mmh3 directly."""
    return int(mmh3.hash(f"{group}:{user}", 0, signed=False)) % 100 + 1


@pytest.mark.parametrize(("user", "group", "value"), [
    ("123", "gr1", 73),  # the Unleash SDKs' own test (node, java, go, ruby): same everywhere
    ("999", "groupX", 25),  # ... its murmur3 is negative as a signed int: unsigned is a must
    ("bob", "next-gen-2024", 8),  # derived from the formula (signed would give 12)
    ("erin", "next-gen-2024", 20),  # derived (signed would give 24)
    ("alice", "next-gen-2024", 50),  # derived
])
def test_unleash_normalized_value_matches_the_sdk_vectors(user: str, group: str,
                                                           value: int) -> None:
    assert normalized_value(user, group) == value
    assert unleash_value(group, user) == value


# From Unleash's client-specification: 03-gradual-rollout-user-id-strategy.json and
# 10-flexible-rollout-strategy.json (userId stickiness): groupId, percentage, userId, enabled.
SPEC_CASES = [
    ("AB12A", 100, "123", True),
    ("AB12A", 50, "122", True),
    ("AB12A", 50, "155", False),
    ("AB12A", 0, "122", False),
    ("Feature.flexibleRollout.10", 10, "174", True),
    ("Feature.flexibleRollout.10", 10, "499", False),
    ("Feature.flexibleRollout.userId.55", 55, "25", True),  # normalizedValue 55: <= counts
]


@pytest.mark.parametrize(("group", "percentage", "user", "enabled"), SPEC_CASES)
async def test_the_proxy_cohort_matches_the_unleash_client_specification(
        tmp_path: Path, backends: dict[str, Backend], group: str, percentage: float,
        user: str, enabled: bool) -> None:
    data = progressive(backends, percentage, rollout={"salt": group},
                       routing={"bucketing": "unleash"})
    async with running(tmp_path, data, sleep=parked) as proxy, aiohttp.ClientSession() as http:
        backend = await served(http, proxy.url, {"X-User-Id": user})
    assert backend == ("next_gen" if enabled else "legacy")


async def test_the_unleash_cohort_through_the_proxy_is_exactly_the_formulas(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    group, percentage = "groupX", 37
    data = progressive(backends, percentage, rollout={"salt": group},
                       routing={"bucketing": "unleash"})
    async with running(tmp_path, data, sleep=parked) as proxy, many_client() as http:
        chosen = await cohort(http, proxy.url, USERS)
    assert chosen == {u for u in USERS if normalized_value(u, group) <= percentage}
    assert chosen != {u for u in USERS if bucket(group, u) < percentage * 100}
    assert 0.32 <= len(chosen) / len(USERS) <= 0.42


@given(st.text(max_size=20), st.text(min_size=1, max_size=20),
       st.floats(0, 100), st.floats(0, 100))
def test_unleash_cohorts_are_the_formula_and_only_grow_with_the_percentage(
        salt: str, user: str, low: float, high: float) -> None:
    low, high = min(low, high), max(low, high)
    chosen, value = in_cohort(Plan("progressive", low, salt, 0.0, "unleash"), user)
    assert value == normalized_value(user, salt)
    assert 1 <= value <= 100
    assert chosen == (value <= low)
    if chosen:
        assert in_cohort(Plan("progressive", high, salt, 0.0, "unleash"), user)[0]


def test_assign_prints_the_murmur3_bucket_and_the_unleash_value(tmp_path: Path) -> None:
    data = config_dict("http://127.0.0.1:9", "http://127.0.0.1:9",
                       rollout={"phase": "progressive", "percentage": 50, "salt": "gr1"},
                       routing={"bucketing": "unleash"})
    path = write_config(tmp_path, data)
    done = subprocess.run([EXE, "assign", "--config", str(path), "123", "999"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"123  bucket {bucket('gr1', '123')}  unleash 73  legacy  ")
    value = normalized_value("999", "gr1")
    backend = "next_gen" if value <= 50 else "legacy"
    assert lines[1].startswith(f"999  bucket {bucket('gr1', '999')}  unleash {value}  {backend}")
    assert "bucketing unleash" in lines[0]


# Complaints tied to requests ------------------------------------------------------------------


def complaining(backends: dict[str, Backend]) -> dict[str, Any]:
    return progressive(backends, 50, guards={
        "complaints_per_hour": 0, "min_requests": 2, "latency_degradation": None,
        "memory_spike": None, "max_tokens": None, "error_rate": None})


LEGACY_USER = user_with(lambda b: b >= 5000)
NEXT_GEN_USER = user_with(lambda b: b < 5000)


async def complain(http: aiohttp.ClientSession, proxy: Running,
                   **body: str) -> tuple[int, dict[str, Any]]:
    return await call(http, proxy.admin, "complaints", {"text": "it went wrong", **body})


async def test_a_complaint_about_a_legacy_served_request_counts_but_never_trips(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, complaining(backends), sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        backend, rid = await hit(http, proxy.url, {"X-User-Id": LEGACY_USER})
        assert backend == "legacy"
        code, answer = await complain(http, proxy, request_id=rid)
        assert (code, answer["message"]) == (200, "complaint counted against legacy")
        # The request, not the user's current backend, decides: now the user is on next_gen.
        await call(http, proxy.admin, "percentage", {"percentage": 100})
        code, answer = await complain(http, proxy, request_id=rid, user_id=LEGACY_USER)
        assert (code, answer["message"]) == (200, "complaint counted against legacy")
        assert proxy.metric("rollout_complaints_total", backend="legacy") == 2
        assert proxy.metric("rollout_complaints_total", backend="next_gen") == 0
        proxy.proxy.control.tick()
        document = await status(http, proxy.admin)
        assert (document["phase"], document["tripped"]) == ("progressive", [])
        guard = next(g for g in document["guards"] if g["guard"] == "complaints_per_hour")
        assert guard["state"] == "ok"
        assert proxy.metric("rollout_rollbacks_total", trigger="complaints_per_hour") == 0


async def test_a_complaint_about_a_next_gen_served_request_trips_the_rollback(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, complaining(backends), sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        backend, rid = await hit(http, proxy.url, {"X-User-Id": NEXT_GEN_USER,
                                                   "X-Request-Id": "client-chosen-id"})
        assert (backend, rid) == ("next_gen", "client-chosen-id")
        await call(http, proxy.admin, "percentage", {"percentage": 0})  # user now on legacy
        code, answer = await complain(http, proxy, request_id=rid)
        assert (code, answer["message"]) == (200, "complaint counted against next_gen")
        assert proxy.metric("rollout_complaints_total", backend="next_gen") == 1
        proxy.proxy.control.tick()
        document = await status(http, proxy.admin)
        assert document["phase"] == "legacy"
        assert document["tripped"] == ["complaints_per_hour"]
        assert "complaints_per_hour" in document["reason"]
        assert proxy.metric("rollout_rollbacks_total", trigger="complaints_per_hour") == 1


async def test_a_complaint_without_request_id_uses_the_users_current_backend(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, complaining(backends), sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        code, answer = await complain(http, proxy, user_id=LEGACY_USER)
        assert (code, answer["message"]) == (200, "complaint counted against legacy")
        proxy.proxy.control.tick()
        assert (await status(http, proxy.admin))["phase"] == "progressive"
        code, answer = await complain(http, proxy, user_id=NEXT_GEN_USER)
        assert (code, answer["message"]) == (200, "complaint counted against next_gen")
        assert proxy.metric("rollout_complaints_total", backend="legacy") == 1
        assert proxy.metric("rollout_complaints_total", backend="next_gen") == 1
        proxy.proxy.control.tick()
        assert (await status(http, proxy.admin))["phase"] == "legacy"


async def test_an_unknown_request_id_without_user_id_is_a_404_that_counts_nothing(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, complaining(backends), sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.admin}/admin/complaints", headers=AUTH,
                             json={"request_id": "never-seen", "text": "x"}) as response:
            assert response.status == 404
            assert response.content_type == "application/json"
            document = await response.json()
        assert "request_id" in document["error"]
        for backend in ("legacy", "next_gen"):
            assert proxy.metric("rollout_complaints_total", backend=backend) == 0
        code, answer = await complain(http, proxy, request_id="never-seen",
                                      user_id=LEGACY_USER)
        assert (code, answer["message"]) == (200, "complaint counted against legacy")
        proxy.proxy.control.tick()
        assert (await status(http, proxy.admin))["phase"] == "progressive"
