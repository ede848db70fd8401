"""Smoke test of the load tools (load/): short runs against the fake backend, directly and
through rollout-proxy. They prove the tools work end to end, never how fast anything is."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

# `load` is a directory of the repo, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load import bench, hostile, loadgen, memory, rollout, targets
from load.measure import Load, parse_wrk
from load.procs import Children
from load.rounds import Plan, run_rounds
from load.wire import RequestParser

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 200
DURATION_S = 1.0


@pytest.fixture
async def children(tmp_path: Path) -> AsyncIterator[Children]:
    async with Children(tmp_path) as started:
        yield started


def _proxy_installed() -> bool:
    return (rollout.executable() is not None
            and importlib.util.find_spec("proxy.offline.cli") is not None)


async def test_loadgen_against_backend_completes_without_errors(children: Children) -> None:
    backend = await targets.backend(children, "backend")

    result = await loadgen.run(backend.url, "users", concurrency=4, requests=REQUESTS,
                               duration=DURATION_S, timeout_s=5)

    assert result.requests > 0
    assert result.error_count == 0
    assert result.ok == result.requests <= REQUESTS


async def test_loadgen_posts_through_rollout_proxy_in_legacy(children: Children,
                                                             tmp_path: Path) -> None:
    if not _proxy_installed():
        pytest.skip("rollout-proxy is not installed")
    backend = await targets.backend(children, "backend")
    setup = rollout.Setup("legacy", backend.url, backend.url)
    proxy = await rollout.start(children, "proxy", setup, tmp_path, cpu=None, ready_timeout_s=30)

    result = await loadgen.run(proxy.url, "post", concurrency=4, requests=REQUESTS,
                               duration=DURATION_S, timeout_s=5)

    assert result.requests > 0
    assert result.error_count == 0
    assert result.ok == result.requests


async def test_sse_scenario_counts_every_event(children: Children) -> None:
    backend = await targets.backend(children, "sse", "sse")

    result = await loadgen.run(backend.url, "sse", concurrency=2, requests=20,
                               duration=DURATION_S, timeout_s=5)

    assert result.error_count == 0
    assert result.ok > 0
    assert result.events == 12 * result.ok  # 10 deltas, the usage event, [DONE]


def test_request_parser_frames_pipelined_and_chunked_requests() -> None:
    parser = RequestParser()
    buf = bytearray(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
                    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                    b"GET / HTTP/1.0\r\n\r\n")

    requests = [parser.feed(buf) for _ in range(4)]

    assert [r and r.close for r in requests] == [False, False, True, None]
    assert buf == b""


def test_parse_wrk_reads_the_line_our_lua_prints() -> None:
    output = ('Running 1s test\nWRK_JSON {"requests": 100, "duration_us": 2000000, "bytes": 1, '
              '"connect": 0, "read": 1, "write": 0, "status": 2, "timeout": 0, "p50_us": 1500, '
              '"p90_us": 2000, "p99_us": 3000, "max_us": 4000}\n')

    result = parse_wrk(output)

    assert (result.requests, result.errors, result.rps, result.p50_ms) == (100, 3, 50.0, 1.5)
    assert result.answered_ok == 98


async def _exchange(port: int, until: bytes, at_least: int = 0) -> bytes:
    """One GET on a new connection: what came until `until` (or `at_least` bytes, or EOF)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = b""
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        async with asyncio.timeout(5):
            while not (until and until in got) and not (at_least and len(got) >= at_least):
                piece = await reader.read(65536)
                if not piece:
                    break
                got += piece
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    return got


async def test_hostile_backend_answers_the_four_kinds_in_turn() -> None:
    cycle = hostile.Cycle()
    server = await asyncio.get_running_loop().create_server(
        lambda: hostile.HostileProtocol(cycle), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        head = await _exchange(port, b"", at_least=256 * 1024)
        sse = await _exchange(port, b"0\r\n\r\n")
        drip = await _exchange(port, b"\r\n\r\n*")
        reset = await _exchange(port, b"")
    finally:
        server.close()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\n\r\n" not in head
    assert b"Content-Type: text/event-stream" in sse and b"total_tokens" in sse
    body = sse.partition(b"\r\n\r\n")[2]
    assert body.count(b"x") == hostile.SSE_LINE - len(b"data: \n\n")
    assert body.startswith(b"400\r\n")  # in 1 KiB chunks
    assert drip.endswith(b"Content-Length: 10\r\n\r\n*")
    assert reset == b"HTTP/1.1 200 OK\r\nContent-Type: appl" or reset == b""
    assert dict(cycle.served) == dict.fromkeys(hostile.KINDS, 1)


async def test_bench_before_runs_the_other_checkouts_own_entry_point(
        children: Children, tmp_path: Path) -> None:
    # `bench --before DIR`: the other revision's code runs, not this checkout's `proxy`.
    tree = tmp_path / "other"
    (tree / "proxy").mkdir(parents=True)
    (tree / "pyproject.toml").write_text(
        '[project]\nname = "x"\n[project.scripts]\nrollout-proxy = "proxy.old_cli:main"\n')
    (tree / "proxy" / "__init__.py").write_text("")
    (tree / "proxy" / "old_cli.py").write_text(
        "import sys\nimport proxy\n\ndef main():\n"
        "    print('ran', proxy.__file__, *sys.argv[1:])\n    return 0\n")
    argv, env = rollout.command(rollout.Setup("legacy", "a", "b", tree=tree))
    child = await children.start("other", [*argv, "serve"], env=env)
    async with asyncio.timeout(30):
        assert await child.process.wait() == 0
    assert child.log.read_text().split() == ["ran", str(tree / "proxy" / "__init__.py"), "serve"]


async def test_bench_rounds_with_fresh_processes_measure_a_new_proxy_each_round(
        children: Children, tmp_path: Path) -> None:
    # `bench --before`: each round starts the rollout-proxy targets again.
    if not _proxy_installed():
        pytest.skip("rollout-proxy is not installed")
    backend = await targets.backend(children, "backend")
    proxy = await targets.rollout_proxy(
        children, "legacy", rollout.Setup("legacy", backend.url, backend.url), tmp_path)
    assert proxy.restart is not None
    started = [proxy]

    async def restart() -> targets.Target:
        again = started[-1].restart
        assert again is not None
        started.append(await again())
        return replace(started[-1], restart=restart)

    plan = Plan(rounds=3, busy=Load(connections=2, duration_s=DURATION_S / 2), single=None,
                use_wrk=False, pause_s=0, fresh=True)
    runs = (await run_rounds([replace(proxy, restart=restart)], plan, tmp_path))["legacy"]
    assert not runs.failures and len(runs.busy) == 3
    assert all(m.rps > 0 and m.errors == 0 for m in runs.busy)
    assert len({target.pids for target in started}) == 3  # a new process each later round


def test_a_fall_from_the_before_revision_is_read_from_the_rounds_paired() -> None:
    # One round twice as fast for both revisions moves neither's share of it.
    now = {0: 1000.0, 1: 2000.0, 2: 900.0, 3: 1800.0}
    then = {0: 1000.0, 1: 2000.0, 2: 1000.0, 3: 2000.0}
    fall = bench.paired_fall(now, then)
    assert fall is not None and fall[0] == pytest.approx((1 - 0.9 ** 0.5) * 100)
    assert fall[1] > 0
    same = bench.paired_fall(then, then)
    assert same is not None and same[0] == pytest.approx(0.0) and same[1] == pytest.approx(0.0)
    # Only the rounds both were measured in count; one pair is too few.
    assert bench.paired_fall({0: 900.0, 2: 950.0}, {0: 1000.0, 1: 1000.0}) is None
    # A round this revision answered nothing in is not left out: it is a fall of 100 %.
    assert bench.paired_fall({0: 1000.0, 1: 0.0}, {0: 1000.0, 1: 1000.0}) == (100.0, 0.0)
    assert bench.per_round({"a": {0: 10.0, 1: 8.0}, "b": {0: 5.0, 1: 0.0, 2: 4.0}}.__getitem__,
                           "a", "b") == {0: 2.0}


def test_cpu_time_counts_what_a_process_spent() -> None:
    # make bench's CPU us column: a process's user and system time, as the kernel counts it.
    before = memory.cpu_s([os.getpid()])
    spent_until = time.process_time() + 0.1
    while time.process_time() < spent_until:
        pass
    assert 0.07 <= memory.cpu_s([os.getpid()]) - before <= 2.0


def crossings(*args: str) -> list[int]:
    """`python -m load.crossings --top 0 ARGS`: its two figures (progressive, shadow)."""
    done = subprocess.run([sys.executable, "-m", "load.crossings", "--top", "0", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=90, check=True)
    return [int(line.split(": ", 1)[1].split()[0]) for line in done.stdout.splitlines()]


def test_crossings_counts_the_calls_steps_and_opcodes_of_the_checkout_it_is_given(
        tmp_path: Path) -> None:
    calls, steps, opcodes = crossings(), crossings("--steps"), crossings("--opcodes")
    assert len(calls) == len(steps) == len(opcodes) == 2 and all(calls) and all(opcodes)
    assert calls[1] > calls[0] and opcodes[1] > opcodes[0]  # the mirror leg adds to both
    # A call into another module is a step there and one back (its return), at the least.
    assert steps[0] >= 2 * calls[0] and steps[1] >= 2 * calls[1]
    # --tree: another checkout's proxy/ runs; here a copy whose request ids cost 100 loops.
    shutil.copytree(ROOT / "proxy", tmp_path / "proxy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with (tmp_path / "proxy" / "datapath" / "headers.py").open("a") as extra:
        extra.write("\n_request_id = request_id\n\n\ndef request_id(headers):\n"
                    "    for _ in range(100):\n        pass\n    return _request_id(headers)\n")
    other = crossings("--opcodes", "--tree", str(tmp_path))
    assert other[0] - opcodes[0] >= 300
