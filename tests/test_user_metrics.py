"""The plan's user metrics and migration tools, end to end on real servers on 127.0.0.1:
backend feature-flag headers, feedback, distinct users and adoption, support tickets, and the
rollback verbs of the installed `rollout-proxy` script.

The backends run in the test's event loop, so waits on a child process go through a thread or
asyncio's subprocess API, and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import mmh3
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.config.loading import load_config
from tests.conftest import (
    EXE,
    TOKEN,
    Backend,
    Process,
    Running,
    config_dict,
    metrics_samples,
    running,
    spawn_serve,
    wait_ready,
    write_config,
)

FLAGS = "intent_analysis,vision_perception"
FLAG, LEGACY_MODE = "X-Feature-Flags", "X-Legacy-Mode"
FLAG_HEADERS = {"backends": {"next_gen": {"headers": {FLAG: FLAGS}},
                             "legacy": {"headers": {LEGACY_MODE: "1"}}}}
WAIT = 10.0  # the bound on any single wait on another process
SALT = "test"  # conftest's rollout.salt


def config(fakes: dict[str, Backend], **sections: Any) -> dict[str, Any]:
    return config_dict(fakes["legacy"].url, fakes["next_gen"].url, **sections)


def flagged(fakes: dict[str, Backend], phase: str, percentage: float = 0,
            **sections: Any) -> dict[str, Any]:
    """Both backends with their own headers (next_gen's flags, legacy's mode)."""
    return config(fakes, **FLAG_HEADERS, rollout={"phase": phase, "percentage": percentage},
                  **sections)


def bucket(user: str) -> int:
    """The SPEC's formula, written out here rather than taken from proxy.datapath.decide."""
    return int(mmh3.hash(f"{SALT}:{user}", signed=False)) % 10000


def user_in(cohort: bool, percentage: float) -> str:
    """The first user id that is (or is not) in next_gen's cohort at `percentage`."""
    return next(f"user-{n}" for n in range(10_000)
                if (bucket(f"user-{n}") < percentage * 100) == cohort)


async def parked(seconds: float) -> None:
    """Holds the control loop still: the tests call control.tick() themselves."""
    await asyncio.Event().wait()


@dataclass
class Flags:
    """Every value of X-Feature-Flags (and X-Legacy-Mode) each request to a backend carried."""

    flags: list[list[str]]
    legacy_mode: list[list[str]]


def record_flags(backend: Backend, status: int = 200) -> Flags:
    seen = Flags([], [])

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.flags.append(request.headers.getall(FLAG, []))
        seen.legacy_mode.append(request.headers.getall(LEGACY_MODE, []))
        return web.json_response({"backend": backend.name, "success": status < 500},
                                 status=status)

    backend.handler = handle
    return seen


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str, user: str | None = None,
              **headers: str) -> tuple[str, str, bool]:
    """(backend, request id, fallback) of one proxied GET."""
    sent = CIMultiDict({k.replace("_", "-"): v for k, v in headers.items()})
    if user is not None:
        sent["X-User-Id"] = user
    async with http.get(f"{url}/v1/tasks", headers=sent) as response:
        await response.read()
        assert response.status == 200, response.status
        return (response.headers["X-Rollout-Backend"], response.headers["X-Request-Id"],
                response.headers.get("X-Rollout-Fallback") == "true")


async def admin_post(http: aiohttp.ClientSession, admin: str, path: str, body: Any,
                     token: str = TOKEN) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{admin}/admin/{path}", data=json.dumps(body),
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/json"}) as response:
        return response.status, await response.json()


async def status_of(http: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with http.get(f"{admin}/admin/status") as response:
        assert response.status == 200
        document: dict[str, Any] = await response.json()
        return document


def close_to(estimate: float, truth: float, within: float = 0.02) -> bool:
    return abs(estimate - truth) <= within * truth


def today() -> str:
    return datetime.now(UTC).date().isoformat()


# Feature flags: backends.<name>.headers ------------------------------------------------------


@pytest.mark.parametrize(("phase", "percentage", "opt_in"), [
    ("progressive", 100, False), ("opt_in", 0, True)], ids=["progressive-100", "opt-in"])
async def test_next_gen_gets_its_flags_as_primary_replacing_the_clients(
        tmp_path: Path, backends: dict[str, Backend], http: aiohttp.ClientSession,
        phase: str, percentage: float, opt_in: bool) -> None:
    next_gen = record_flags(backends["next_gen"])
    client = CIMultiDict([("X-User-Id", "alice"), (FLAG, "client-made"),
                          (FLAG.lower(), "second-copy")])
    if opt_in:
        client["X-Next-Gen"] = "1"
    async with running(tmp_path, flagged(backends, phase, percentage,
                                         shadow={"sample": 1.0})) as proxy, \
            http.get(f"{proxy.url}/v1/tasks", headers=client) as response:
        assert response.status == 200
        assert response.headers["X-Rollout-Backend"] == "next_gen"
    assert next_gen.flags == [[FLAGS]]  # replaced, not appended to the client's two
    assert next_gen.legacy_mode == [[]]  # legacy's own headers stay legacy's
    assert backends["legacy"].seen == []


async def test_shadow_copies_carry_next_gens_flags_and_legacy_never_does(
        tmp_path: Path, backends: dict[str, Backend], http: aiohttp.ClientSession) -> None:
    """Phase shadow, with a baseline copy to legacy too: next_gen's copy has the flags
    (replacing the client's), legacy's primary and baseline copy have only legacy's header."""
    legacy, next_gen = record_flags(backends["legacy"]), record_flags(backends["next_gen"])
    data = flagged(backends, "shadow", shadow={"sample": 1.0,
                                               "compare": {"baseline_sample": 1.0}})
    async with running(tmp_path, data) as proxy:
        assert (await get(http, proxy.url, "alice"))[0] == "legacy"
        await backends["next_gen"].wait_for(1)
        await backends["legacy"].wait_for(2)
        assert (await get(http, proxy.url, "bob", **{FLAG: "client-made"}))[0] == "legacy"
        await backends["next_gen"].wait_for(2)
        await backends["legacy"].wait_for(4)
    assert next_gen.flags == [[FLAGS], [FLAGS]]
    assert next_gen.legacy_mode == [[], []]
    assert all(h.get("X-Rollout-Shadow") == "1" for h in
               (s.headers for s in backends["next_gen"].seen))
    assert legacy.legacy_mode == [["1"]] * 4  # two primaries, two baseline copies
    assert all(FLAGS not in values for values in legacy.flags)
    assert legacy.flags[:2] == [[], []]  # alice's primary and copy: no flags at all
    assert sorted(map(tuple, legacy.flags[2:])) == [("client-made",), ("client-made",)]


async def test_legacy_gets_its_own_headers_on_fallback_and_never_the_flags(
        tmp_path: Path, backends: dict[str, Backend], http: aiohttp.ClientSession) -> None:
    next_gen = record_flags(backends["next_gen"], status=500)
    legacy = record_flags(backends["legacy"])
    async with running(tmp_path, flagged(backends, "progressive", 100,
                                         shadow={"sample": 0.0})) as proxy:
        backend, _, fell_back = await get(http, proxy.url, "alice")
    assert (backend, fell_back) == ("legacy", True)
    assert next_gen.flags == [[FLAGS]] and next_gen.legacy_mode == [[]]
    assert legacy.flags == [[]] and legacy.legacy_mode == [["1"]]


async def test_check_prints_each_backends_headers(tmp_path: Path,
                                                  backends: dict[str, Backend]) -> None:
    path = write_config(tmp_path, flagged(backends, "progressive", 30))
    process = await asyncio.create_subprocess_exec(
        EXE, "check", "--config", str(path), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(WAIT):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert headers_listed(lines, "next_gen") == [f"{FLAG}: {FLAGS}"], lines
    assert headers_listed(lines, "legacy") == [f"{LEGACY_MODE}: 1"], lines


def headers_listed(lines: list[str], backend: str) -> list[str]:
    """The `header:` lines under `backend: NAME ...` in check's output."""
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["backend:", backend])
    listed = []
    for line in lines[start + 1:]:
        if not line.startswith("  header:"):
            break
        assert line.endswith(f"(on every request to {backend})"), line
        listed.append(line.removeprefix("  header:").rsplit(" (", 1)[0].strip())
    return listed


# Feedback ----------------------------------------------------------------------------------


def feedback_metrics(proxy: Running) -> dict[tuple[str, ...], float]:
    """Every rollout_feedback_total and rollout_migration_reports_total sample."""
    found: dict[tuple[str, ...], float] = {}
    for family in proxy.registry.collect():
        for sample in family.samples:
            if sample.name == "rollout_feedback_total":
                found[("feedback", sample.labels["backend"], sample.labels["score"])] = \
                    sample.value
            elif sample.name == "rollout_migration_reports_total":
                found[("migration", sample.labels["result"])] = sample.value
    return found


async def test_feedback_counts_against_the_backend_that_served_the_request(
        tmp_path: Path, backends: dict[str, Backend], http: aiohttp.ClientSession) -> None:
    legacy_user, next_gen_user = user_in(False, 30), user_in(True, 30)
    async with running(tmp_path, flagged(backends, "progressive", 30,
                                         shadow={"sample": 0.0}), sleep=parked) as proxy:
        on_legacy = await get(http, proxy.url, legacy_user)
        on_next_gen = await get(http, proxy.url, next_gen_user)
        assert (on_legacy[0], on_next_gen[0]) == ("legacy", "next_gen")
        code, answer = await admin_post(http, proxy.admin, "feedback",
                                        {"request_id": on_legacy[1], "score": 4})
        assert (code, answer["message"]) == (200, "feedback counted against legacy")
        assert proxy.metric("rollout_feedback_total", backend="legacy", score="4") == 1
        # The request decides, not the user: next_gen's user, legacy's request.
        code, _ = await admin_post(http, proxy.admin, "feedback", {
            "request_id": on_legacy[1], "user_id": next_gen_user, "score": 2,
            "migrated": False})
        assert code == 200
        for score in (5, 5):
            code, _ = await admin_post(http, proxy.admin, "feedback", {
                "request_id": on_next_gen[1], "score": score, "migrated": True})
            assert code == 200
        assert feedback_metrics(proxy) == {
            ("feedback", "legacy", "4"): 1, ("feedback", "legacy", "2"): 1,
            ("feedback", "next_gen", "5"): 2,
            ("migration", "success"): 2, ("migration", "failure"): 1}
        feedback = (await status_of(http, proxy.admin))["feedback"]
    assert feedback["legacy"] == {"count": 2, "mean_score": 3.0, "scores": {"4": 1, "2": 1}}
    assert feedback["next_gen"] == {"count": 2, "mean_score": 5.0, "scores": {"5": 2}}
    assert feedback["migration"] == {"success": 2, "failure": 1, "success_rate": 0.6667}


async def test_feedback_on_a_fallback_answer_counts_against_legacy(
        tmp_path: Path, backends: dict[str, Backend], http: aiohttp.ClientSession) -> None:
    record_flags(backends["next_gen"], status=503)
    async with running(tmp_path, flagged(backends, "progressive", 100,
                                         shadow={"sample": 0.0}), sleep=parked) as proxy:
        backend, rid, fell_back = await get(http, proxy.url, "alice")
        assert (backend, fell_back) == ("legacy", True)
        code, answer = await admin_post(http, proxy.admin, "feedback",
                                        {"request_id": rid, "score": 1, "user_id": "alice"})
        assert (code, answer["message"]) == (200, "feedback counted against legacy")
        assert feedback_metrics(proxy) == {("feedback", "legacy", "1"): 1}


async def test_feedback_by_user_id_uses_the_users_current_backend(
        tmp_path: Path, backends: dict[str, Backend], http: aiohttp.ClientSession) -> None:
    legacy_user, next_gen_user = user_in(False, 30), user_in(True, 30)
    async with running(tmp_path, flagged(backends, "progressive", 30), sleep=parked) as proxy:
        for user, expected in ((legacy_user, "legacy"), (next_gen_user, "next_gen")):
            code, answer = await admin_post(http, proxy.admin, "feedback",
                                            {"user_id": user, "score": 3})
            assert (code, answer["message"]) == (200, f"feedback counted against {expected}")
        code, _ = await admin_post(http, proxy.admin, "percentage", {"percentage": 100})
        assert code == 200
        code, answer = await admin_post(http, proxy.admin, "feedback",
                                        {"user_id": legacy_user, "score": 3})
        assert (code, answer["message"]) == (200, "feedback counted against next_gen")
        assert feedback_metrics(proxy) == {("feedback", "legacy", "3"): 1,
                                           ("feedback", "next_gen", "3"): 2}


RID = "<the request id>"  # stands for a real request's id in the bodies below
BAD_FEEDBACK: list[tuple[dict[str, Any], str]] = [  # each also says migrated: true, or tries
    ({"request_id": RID, "score": 0, "migrated": True}, "score"),
    ({"request_id": RID, "score": 6, "migrated": True}, "score"),
    ({"request_id": RID, "score": "5", "migrated": True}, "score"),
    ({"request_id": RID, "score": 4.5, "migrated": True}, "score"),
    ({"request_id": RID, "score": True, "migrated": True}, "score"),
    ({"request_id": RID, "migrated": True}, "score"),
    ({"score": 4, "migrated": True}, "user_id or request_id"),
    ({"request_id": RID, "score": 4, "migrated": "yes"}, "migrated"),
    ({"request_id": RID, "score": 4, "migrated": 1}, "migrated"),
    ({"request_id": 17, "score": 4, "migrated": True}, "request_id"),
    ({"request_id": RID, "user_id": ["alice"], "score": 4, "migrated": True}, "user_id"),
]


async def test_a_bad_feedback_body_is_a_400_naming_the_field_and_counts_nothing(
        tmp_path: Path, backends: dict[str, Backend], http: aiohttp.ClientSession) -> None:
    async with running(tmp_path, flagged(backends, "legacy"), sleep=parked) as proxy:
        _, rid, _ = await get(http, proxy.url, "alice")
        for body, field in BAD_FEEDBACK:
            sent = {key: rid if value == RID else value for key, value in body.items()}
            code, answer = await admin_post(http, proxy.admin, "feedback", sent)
            assert code == 400, (sent, answer)
            assert answer["error"].startswith(f"{field}:"), (sent, answer)
        code, answer = await admin_post(http, proxy.admin, "feedback", [4])
        assert code == 400 and "JSON object" in answer["error"]
        code, answer = await admin_post(http, proxy.admin, "feedback",
                                        {"request_id": "never-seen", "score": 4,
                                         "migrated": True})
        assert code == 404 and answer["error"].startswith("request_id:")
        code, _ = await admin_post(http, proxy.admin, "feedback",
                                   {"request_id": rid, "score": 4, "migrated": True},
                                   token="wrong")
        assert code == 401
        assert feedback_metrics(proxy) == {}
        assert (proxy.proxy.runtime.stored.feedback, proxy.proxy.runtime.stored.migrations) \
            == ({}, {})
        feedback = (await status_of(http, proxy.admin))["feedback"]
    assert feedback == {"migration": {"success_rate": None}}


# Active users and adoption -----------------------------------------------------------------


async def served_by(url: str, users: list[str], concurrency: int = 50
                    ) -> dict[str, set[str]]:
    """One request per user, `concurrency` at once; who was served by which backend."""
    served: dict[str, set[str]] = {"legacy": set(), "next_gen": set()}
    pending = iter(users)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=WAIT)) as http:

        async def worker() -> None:
            for user in pending:
                backend, _, fell_back = await get(http, url, user)
                assert not fell_back
                served[backend].add(user)

        async with asyncio.timeout(40):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return served


async def test_ten_thousand_users_give_counts_and_adoption_within_two_percent(
        tmp_path: Path, backends: dict[str, Backend], http: aiohttp.ClientSession) -> None:
    users = [f"visitor-{n}" for n in range(10_000)]
    data = config(backends, rollout={"phase": "progressive", "percentage": 30},
                  shadow={"sample": 0.0})
    async with running(tmp_path, data, sleep=parked) as proxy:
        served = await served_by(proxy.url, users)
        await proxy.proxy.runtime.users.refresh(datetime.now(UTC))
        [row] = (await status_of(http, proxy.admin))["users"]
    legacy, next_gen = len(served["legacy"]), len(served["next_gen"])
    assert legacy + next_gen == 10_000 and 2_500 < next_gen < 3_500
    assert row["day"] == today()
    assert close_to(row["legacy"], legacy), (row, legacy)
    assert close_to(row["next_gen"], next_gen), (row, next_gen)
    assert close_to(row["adoption"], next_gen / (legacy + next_gen)), (row, next_gen)


async def test_only_primary_answers_to_known_users_are_counted(
        tmp_path: Path, backends: dict[str, Backend], http: aiohttp.ClientSession) -> None:
    """Anonymous requests are not users, a fallback answer is not a primary one, a user seen
    twice counts once, and a user on both backends counts once in adoption's union."""
    async def handle(request: web.Request) -> web.StreamResponse:
        status = 500 if request.headers.get("X-User-Id") == "fails-over" else 200
        return web.json_response({"success": status == 200}, status=status)

    backends["next_gen"].handler = handle
    data = config(backends, rollout={"phase": "progressive", "percentage": 0},
                  shadow={"sample": 0.0})
    async with running(tmp_path, data, sleep=parked) as proxy:
        for _ in range(20):
            assert (await get(http, proxy.url))[0] == "legacy"  # anonymous
        backend, _, fell_back = await get(http, proxy.url, "fails-over", X_Next_Gen="1")
        assert (backend, fell_back) == ("legacy", True)
        rt = proxy.proxy.runtime
        await rt.users.refresh(datetime.now(UTC))
        assert (await status_of(http, proxy.admin))["users"] == []
        for user in ("ann", "bea", "ann"):
            assert (await get(http, proxy.url, user))[0] == "legacy"
        assert (await get(http, proxy.url, "ann", X_Next_Gen="1"))[0] == "next_gen"
        await rt.users.refresh(datetime.now(UTC))
        [row] = (await status_of(http, proxy.admin))["users"]
    assert (row["legacy"], row["next_gen"], row["adoption"]) == (2, 1, 0.5)


# Support tickets ---------------------------------------------------------------------------


async def test_support_tickets_are_complaints_per_distinct_user_of_each_backend(
        tmp_path: Path, backends: dict[str, Backend], http: aiohttp.ClientSession) -> None:
    data = config(backends, rollout={"phase": "progressive", "percentage": 0},
                  shadow={"sample": 0.0})
    async with running(tmp_path, data, sleep=parked) as proxy:
        rid = {user: (await get(http, proxy.url, user))[1] for user in "abcd"}
        rid |= {user: (await get(http, proxy.url, user, X_Next_Gen="1"))[1] for user in "ef"}
        said = [{"request_id": rid["a"]}, {"request_id": rid["b"]}, {"user_id": "c"},
                {"request_id": rid["e"], "user_id": "a"}]
        for body in said:
            code, answer = await admin_post(http, proxy.admin, "complaints",
                                            {**body, "text": "it got worse"})
            assert code == 200, answer
        code, answer = await admin_post(http, proxy.admin, "complaints",
                                        {"request_id": rid["f"]})
        assert code == 400 and answer["error"].startswith("text:")
        assert proxy.metric("rollout_complaints_total", backend="legacy") == 3
        assert proxy.metric("rollout_complaints_total", backend="next_gen") == 1
        await proxy.proxy.runtime.users.refresh(datetime.now(UTC))
        [row] = (await status_of(http, proxy.admin))["users"]
    assert (row["day"], row["legacy"], row["next_gen"]) == (today(), 4, 2)
    assert row["tickets"] == {"complaints": {"legacy": 3, "next_gen": 1},
                              "legacy_rate": 0.75, "next_gen_rate": 0.5, "ratio": 0.6667}


# Across a restart of the real process -------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, data: dict[str, Any],
                  serve_processes: list[Process]) -> AsyncIterator[Process]:
    """`rollout-proxy serve` for real; SIGTERM at the end, which must exit 0."""
    process = spawn_serve(tmp_path, data)
    serve_processes.append(process)
    try:
        await wait_ready(process.admin, WAIT)
    except TimeoutError:
        raise AssertionError(f"not ready: {process.log.read_text()}") from None
    yield process
    code = await asyncio.to_thread(process.terminate, WAIT)
    assert code == 0, process.log.read_text()


async def gauges(http: aiohttp.ClientSession, admin: str, want: dict[str, float]) -> None:
    """Poll /metrics (to a deadline) until rollout_active_users{backend} shows `want`:
    the process's own users loop sets it every 5 s."""
    got: dict[str, float | None] = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(WAIT):
            while True:
                async with http.get(f"{admin}/metrics") as response:
                    samples = metrics_samples(await response.text())
                got = {b: samples.get(("rollout_active_users", (("backend", b),)))
                       for b in want}
                if got == want:
                    return
                await asyncio.sleep(0.2)
    raise AssertionError(f"rollout_active_users never showed {want}: last {got}")


async def test_feedback_tickets_and_user_sketches_survive_a_restart(
        tmp_path: Path, backends: dict[str, Backend], http: aiohttp.ClientSession,
        serve_processes: list[Process]) -> None:
    data = config(backends, rollout={"phase": "progressive", "percentage": 30},
                  shadow={"sample": 0.0})
    users = [f"member-{n}" for n in range(300)]
    async with serving(tmp_path, data, serve_processes) as first:
        served = await served_by(first.url, users, concurrency=10)
        legacy_rid = (await get(http, first.url, next(iter(served["legacy"]))))[1]
        next_gen_rid = (await get(http, first.url, next(iter(served["next_gen"]))))[1]
        said = [("feedback", {"request_id": legacy_rid, "score": 4, "migrated": False}),
                ("feedback", {"request_id": next_gen_rid, "score": 5, "migrated": True}),
                ("complaints", {"request_id": next_gen_rid, "text": "slow"})]
        for path, body in said:
            code, answer = await admin_post(http, first.admin, path, body)
            assert code == 200, answer
        before = await status_of(http, first.admin)
        [row] = before["users"]
        assert close_to(row["legacy"], len(served["legacy"]))
        assert close_to(row["next_gen"], len(served["next_gen"]))
        await gauges(http, first.admin, {"legacy": row["legacy"], "next_gen": row["next_gen"]})
    sketches = load_config(first.path).state.path.with_name("rollout-state.users.json")
    assert set(json.loads(sketches.read_text())[today()]) == {"legacy", "next_gen"}
    async with serving(tmp_path, data, serve_processes) as second:
        after = await status_of(http, second.admin)
        assert after["users"] == before["users"]
        assert after["feedback"] == before["feedback"] == {
            "legacy": {"count": 1, "mean_score": 4.0, "scores": {"4": 1}},
            "next_gen": {"count": 1, "mean_score": 5.0, "scores": {"5": 1}},
            "migration": {"success": 1, "failure": 1, "success_rate": 0.5}}
        assert after["users"][0]["tickets"]["complaints"] == {"legacy": 0, "next_gen": 1}
        # The same users again, after the restart: a union, so nobody counts twice.
        again = await served_by(second.url, users[:100], concurrency=10)
        assert not again["legacy"] - served["legacy"]
        [row] = (await status_of(http, second.admin))["users"]
        assert close_to(row["legacy"], len(served["legacy"]))
        assert close_to(row["next_gen"], len(served["next_gen"]))


# The rollback verbs of the installed script -------------------------------------------------


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ROLLOUT_ADMIN_URL"}
    return {**env, "ROLLOUT_ADMIN_TOKEN": TOKEN}


async def cli(*args: str, within: float = WAIT) -> Result:
    process = await asyncio.create_subprocess_exec(
        EXE, *args, env=cli_env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(within):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


@contextlib.asynccontextmanager
async def watching(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A long-running verb with stdout a pipe (not a terminal); killed if the test leaves."""
    process = await asyncio.create_subprocess_exec(
        EXE, *args, env=cli_env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def line_of(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(WAIT):
        return (await process.stdout.readline()).decode()


@pytest.fixture
async def at_fifty(tmp_path: Path, backends: dict[str, Backend]) -> AsyncIterator[Running]:
    data = config(backends, rollout={"phase": "progressive", "percentage": 50},
                  shadow={"sample": 0.0})
    async with running(tmp_path, data, sleep=parked) as proxy:
        yield proxy


def plan(proxy: Running) -> tuple[str, float]:
    return proxy.proxy.runtime.plan.phase, proxy.proxy.runtime.plan.percentage


async def test_rollback_version_stable_sends_everyone_to_legacy(at_fifty: Running) -> None:
    result = await cli("rollback", "--version", "stable", "--reason", "x",
                       "--admin-url", at_fifty.admin)
    assert result.code == 0, result.err
    assert plan(at_fifty)[0] == "legacy"
    override = at_fifty.proxy.runtime.stored.override
    assert override is not None and (override.phase, override.percentage) == ("legacy", None)


async def test_rollback_to_an_unknown_version_is_a_usage_error(at_fifty: Running) -> None:
    result = await cli("rollback", "--version", "canary", "--reason", "x",
                       "--admin-url", at_fifty.admin)
    assert result.code == 2
    assert "--version" in result.err and "canary" in result.err
    assert at_fifty.proxy.runtime.stored.override is None
    assert plan(at_fifty) == ("progressive", 50)


async def test_rollback_to_a_percentage_keeps_progressive(at_fifty: Running) -> None:
    result = await cli("rollback", "--percentage", "5", "--reason", "x",
                       "--admin-url", at_fifty.admin)
    assert result.code == 0, result.err
    assert plan(at_fifty) == ("progressive", 5)


async def test_rollback_monitor_prints_the_ramp_and_exits_0_when_it_lands(
        at_fifty: Running) -> None:
    result = await cli("rollback", "--reason", "x", "--over", "2s", "--monitor",
                       "--admin-url", at_fifty.admin, within=15)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert "rolled back" in lines[0] and "over 2 s" in lines[0]
    watched = lines[1:-1]
    assert watched and all(line.startswith("phase ") for line in watched), lines
    assert "ramp " in watched[0] and "guards ok" in watched[0]
    assert lines[-1] == "rollback complete"
    at_fifty.proxy.control.tick()
    assert plan(at_fifty) == ("legacy", 0)


async def test_rollback_monitor_with_nothing_to_ramp_is_complete_at_once(
        at_fifty: Running) -> None:
    result = await cli("rollback", "--reason", "x", "--monitor", "--admin-url", at_fifty.admin)
    assert result.code == 0, result.err
    assert result.out.splitlines()[-1] == "rollback complete"
    assert plan(at_fifty)[0] == "legacy"


async def test_feedback_verb_posts_a_score_against_the_request(
        at_fifty: Running, http: aiohttp.ClientSession) -> None:
    backend, rid, _ = await get(http, at_fifty.url, "alice")
    result = await cli("feedback", "--score", "4", "--request-id", rid, "--migrated", "yes",
                       "--admin-url", at_fifty.admin)
    assert result.code == 0, result.err
    assert f"feedback counted against {backend}" in result.out
    assert feedback_metrics(at_fifty) == {("feedback", backend, "4"): 1,
                                          ("migration", "success"): 1}
    refused = await cli("feedback", "--score", "4", "--admin-url", at_fifty.admin)
    assert refused.code == 1 and "user_id or request_id" in refused.err
    usage = await cli("feedback", "--score", "6", "--user-id", "alice",
                      "--admin-url", at_fifty.admin)
    assert usage.code == 2 and "--score" in usage.err
    assert feedback_metrics(at_fifty) == {("feedback", backend, "4"): 1,
                                          ("migration", "success"): 1}


async def test_status_watch_exits_0_on_ctrl_c_while_healthy(at_fifty: Running) -> None:
    async with watching("status", "--watch", "--admin-url", at_fifty.admin) as process:
        first = await line_of(process)
        assert first.startswith("phase progressive") and "guards ok" in first
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT):
            assert await process.wait() == 0


async def test_status_watch_exits_1_once_a_guard_has_fired(
        tmp_path: Path, backends: dict[str, Backend], http: aiohttp.ClientSession) -> None:
    record_flags(backends["next_gen"], status=500)
    data = config(backends, rollout={"phase": "progressive", "percentage": 100},
                  shadow={"sample": 0.0}, guards={"min_requests": 5, "error_rate": 0.05})
    async with running(tmp_path, data, sleep=parked) as proxy, \
            watching("status", "--watch", "--admin-url", proxy.admin) as process:
        assert "guards ok" in await line_of(process)
        for n in range(6):  # answered by legacy, by next_gen past the retry budget, or
            # straight by legacy once the breaker opened: next_gen fails 5 times either way
            async with http.get(f"{proxy.url}/", headers={"X-User-Id": f"u{n}"}) as response:
                assert response.status in (200, 500)
        assert len(backends["next_gen"].seen) >= 5
        proxy.proxy.control.tick()
        assert "error_rate" in proxy.proxy.runtime.stored.tripped
        async with asyncio.timeout(WAIT):
            out, err = await process.communicate()
        assert process.returncode == 1, err.decode()
        last = out.decode().strip().splitlines()[-1]
        assert "guards tripped: " in last and "error_rate" in last
        assert plan(proxy)[0] == "legacy"  # action rollback
        result = await cli("status", "--watch", "--admin-url", proxy.admin)
        assert result.code == 1 and "error_rate" in result.out


# serve --workers N: full proxies sharing one state file and one users file -------------------


@contextlib.asynccontextmanager
async def two_workers(tmp_path: Path, data: dict[str, Any]
                      ) -> AsyncIterator[tuple[Running, Running]]:
    """What `serve --workers 2` runs: two full proxies on the same state and users files
    (workers.py). Their control loops are held still, so the test says when each adopts the
    other's change (control.tick(); a worker does it every 0.5 s)."""
    async with running(tmp_path, data, sleep=parked) as first, \
            running(tmp_path, data, sleep=parked) as second:
        yield first, second


async def test_feedback_taken_by_two_workers_is_all_counted(
        tmp_path: Path, backends: dict[str, Backend], http: aiohttp.ClientSession) -> None:
    async with two_workers(tmp_path, config(backends)) as (first, second):
        for worker, user in ((first, "ann"), (second, "bea")):
            code, answer = await admin_post(http, worker.admin, "feedback",
                                            {"user_id": user, "score": 5})
            assert code == 200, answer
        for worker in (first, second):
            worker.proxy.control.tick()
        counted = [(await status_of(http, w.admin))["feedback"]["legacy"]["count"]
                   for w in (first, second)]
    assert counted == [2, 2]


async def test_feedback_to_another_worker_never_undoes_a_rollback(
        tmp_path: Path, backends: dict[str, Backend], http: aiohttp.ClientSession) -> None:
    data = config(backends, rollout={"phase": "progressive", "percentage": 50})
    async with two_workers(tmp_path, data) as (first, second):
        code, answer = await admin_post(http, first.admin, "rollback", {"reason": "p95"})
        assert (code, plan(first)[0]) == (200, "legacy"), answer
        code, answer = await admin_post(http, second.admin, "feedback",
                                        {"user_id": "ann", "score": 1})
        assert code == 200, answer
        for worker in (first, second):
            worker.proxy.control.tick()
        assert (plan(first)[0], plan(second)[0]) == ("legacy", "legacy")


async def test_users_seen_by_two_workers_all_survive_a_restart(
        tmp_path: Path, backends: dict[str, Backend], http: aiohttp.ClientSession) -> None:
    data = config(backends, shadow={"sample": 0.0})
    users = [f"member-{n}" for n in range(200)]
    async with two_workers(tmp_path, data) as (first, second):
        await served_by(first.url, users[:100])
        await served_by(second.url, users[100:])
    async with running(tmp_path, data, sleep=parked) as restarted:
        await restarted.proxy.runtime.users.refresh(datetime.now(UTC))
        [row] = (await status_of(http, restarted.admin))["users"]
    assert close_to(row["legacy"], 200), row
