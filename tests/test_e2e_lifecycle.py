"""End to end on the process: `rollout-proxy serve` started for real, probed, signalled.

The backends run in the test's event loop, so the test never blocks the loop while the proxy
needs them: waits on the process go through a thread, and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from tests.conftest import Backend, Process, config_dict, spawn_serve, wait_ready

WAIT = 10.0  # the bound on any single wait in this file (a process may be slow to start)


def legacy_config(backends: dict[str, Backend], **sections: Any) -> dict[str, Any]:
    return config_dict(backends["legacy"].url, backends["next_gen"].url, **sections)


async def started(tmp_path: Path, data: dict[str, Any], serve_processes: list[Process]
                  ) -> Process:
    process = spawn_serve(tmp_path, data)
    serve_processes.append(process)
    try:
        await wait_ready(process.admin, WAIT)
    except TimeoutError:
        raise AssertionError(f"not ready: {process.log.read_text()}") from None
    return process


async def exit_code(process: Process) -> int:
    """Wait (WAIT at most) for the process to end without blocking the backends' loop."""
    return await asyncio.to_thread(process.proc.wait, WAIT)


async def readiness(admin: str) -> int | None:
    """The /readyz status, or None once the admin port is gone."""
    async with aiohttp.ClientSession() as http:
        try:
            async with http.get(f"{admin}/readyz") as response:
                return response.status
        except aiohttp.ClientConnectionError:
            return None


async def until_not_ready(admin: str) -> int | None:
    """Poll /readyz (within a deadline) until it stops answering 200."""
    async with asyncio.timeout(WAIT):
        while True:
            status = await readiness(admin)
            if status != 200:
                return status
            await asyncio.sleep(0.02)


async def refuses_connections(url: str) -> bool:
    parsed = URL(url)
    try:
        _, writer = await asyncio.open_connection(parsed.host, parsed.port)
    except ConnectionRefusedError:
        return True
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return False


def holding(release: asyncio.Event, path: str) -> Callable[[web.Request],
                                                          Awaitable[web.StreamResponse]]:
    """A backend handler that answers `path` only once `release` is set."""
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == path:
            async with asyncio.timeout(30):
                await release.wait()
            return web.Response(text="finished after release")
        return web.Response(text="quick")

    return handler


async def test_serve_answers_health_readiness_and_traffic(
        tmp_path: Path, backends: dict[str, Backend], serve_processes: list[Process]) -> None:
    process = await started(tmp_path, legacy_config(backends), serve_processes)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{process.admin}/healthz") as health:
            assert health.status == 200
        async with http.get(f"{process.admin}/readyz") as ready:
            assert ready.status == 200
            assert (await ready.json())["ready"] is True
        async with http.get(f"{process.url}/v1/tasks") as proxied:
            assert proxied.status == 200
            assert proxied.headers["X-Rollout-Backend"] == "legacy"
    assert await exit_code_after_sigterm(process) == 0


async def test_serve_process_parses_with_the_c_parser(
        tmp_path: Path, backends: dict[str, Backend], serve_processes: list[Process]) -> None:
    """Requests only llhttp refuses (PITFALLS.md) get 400 from the real process."""
    process = await started(tmp_path, legacy_config(backends), serve_processes)
    strict_only = [
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
    ]
    parsed = URL(process.url)
    for raw in strict_only:
        reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
        try:
            writer.write(raw)
            async with asyncio.timeout(WAIT):
                answer = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert answer.split(b" ", 2)[1] == b"400", answer[:80]
    assert backends["legacy"].seen == []
    assert await exit_code_after_sigterm(process) == 0


async def exit_code_after_sigterm(process: Process) -> int:
    process.proc.send_signal(signal.SIGTERM)
    return await exit_code(process)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_signal_drains_the_request_in_flight_then_exits_0(
        tmp_path: Path, backends: dict[str, Backend], serve_processes: list[Process],
        sig: signal.Signals) -> None:
    release = asyncio.Event()
    backends["legacy"].handler = holding(release, "/v1/slow")
    data = legacy_config(backends, limits={"drain_timeout_s": 20})
    process = await started(tmp_path, data, serve_processes)
    async with aiohttp.ClientSession() as http, aiohttp.ClientSession() as idle:
        async with idle.get(f"{process.url}/v1/quick") as quick:  # leaves a kept-alive conn
            assert await quick.text() == "quick"

        async def slow() -> tuple[int, str]:
            async with http.get(f"{process.url}/v1/slow") as response:
                return response.status, await response.text()

        in_flight = asyncio.ensure_future(slow())
        try:
            await backends["legacy"].wait_for(2)
            process.proc.send_signal(sig)
            assert await until_not_ready(process.admin) in (503, None)
            assert await refuses_connections(process.url)
            assert process.proc.poll() is None  # still draining the request in flight
        finally:
            release.set()
        async with asyncio.timeout(WAIT):
            assert await in_flight == (200, "finished after release")
        assert await exit_code(process) == 0
    assert [seen.path_qs for seen in backends["legacy"].seen] == ["/v1/quick", "/v1/slow"]


async def test_sigterm_lets_a_stream_in_flight_finish(
        tmp_path: Path, backends: dict[str, Backend], serve_processes: list[Process]) -> None:
    release = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        async with asyncio.timeout(30):
            await release.wait()
        await response.write(b"data: two\n\n")
        await response.write_eof()
        return response

    backends["legacy"].handler = events
    data = legacy_config(backends, limits={"drain_timeout_s": 20})
    process = await started(tmp_path, data, serve_processes)
    async with aiohttp.ClientSession() as http, \
            http.get(f"{process.url}/v1/events") as response:
        try:
            async with asyncio.timeout(WAIT):
                assert await response.content.readuntil(b"\n\n") == b"data: one\n\n"
            process.proc.send_signal(signal.SIGTERM)
            assert await until_not_ready(process.admin) in (503, None)
            assert process.proc.poll() is None
        finally:
            release.set()
        async with asyncio.timeout(WAIT):
            assert await response.content.read() == b"data: two\n\n"
    assert await exit_code(process) == 0


async def test_sigterm_exits_0_when_a_request_outlives_drain_timeout(
        tmp_path: Path, backends: dict[str, Backend], serve_processes: list[Process]) -> None:
    never = asyncio.Event()
    backends["legacy"].handler = holding(never, "/v1/stuck")
    data = legacy_config(backends, limits={"drain_timeout_s": 1})
    process = await started(tmp_path, data, serve_processes)
    try:
        async with aiohttp.ClientSession() as http:
            async def stuck() -> int:
                async with http.get(f"{process.url}/v1/stuck") as response:
                    await response.read()
                    return response.status

            in_flight = asyncio.ensure_future(stuck())
            await backends["legacy"].wait_for(1)
            signalled = time.monotonic()
            process.proc.send_signal(signal.SIGTERM)
            assert await exit_code(process) == 0
            took = time.monotonic() - signalled
            async with asyncio.timeout(WAIT):
                outcome = (await asyncio.gather(in_flight, return_exceptions=True))[0]
    finally:
        never.set()
    assert took >= 0.9  # the request was given its drain time
    assert took < 5.0, f"exit took {took:.1f} s with drain_timeout_s 1"
    # the request was cut off: an error for the client, never a made-up success
    assert isinstance(outcome, aiohttp.ClientError) or outcome != 200


async def test_exit_takes_no_longer_than_drain_timeout(
        tmp_path: Path, backends: dict[str, Backend], serve_processes: list[Process]) -> None:
    never = asyncio.Event()
    backends["legacy"].handler = holding(never, "/v1/stuck")
    drain_s = 1.0
    process = await started(tmp_path, legacy_config(backends, limits={"drain_timeout_s": drain_s}),
                            serve_processes)
    try:
        async with aiohttp.ClientSession() as http:
            in_flight = asyncio.ensure_future(http.get(f"{process.url}/v1/stuck"))
            await backends["legacy"].wait_for(1)
            signalled = time.monotonic()
            process.proc.send_signal(signal.SIGTERM)
            assert await exit_code(process) == 0
            took = time.monotonic() - signalled
            async with asyncio.timeout(WAIT):
                await asyncio.gather(in_flight, return_exceptions=True)
    finally:
        never.set()
    assert took < drain_s + 1.0, f"exit took {took:.1f} s with drain_timeout_s {drain_s:g}"


async def test_serve_refuses_a_bad_config_naming_the_key(
        tmp_path: Path, backends: dict[str, Backend], serve_processes: list[Process]) -> None:
    data = legacy_config(backends, rollout={"percentage": 150},
                         limits={"header_timeout_s": "soon"})
    process = spawn_serve(tmp_path, data)
    serve_processes.append(process)
    assert await exit_code(process) == 1
    output = process.log.read_text()
    assert "rollout.percentage" in output and "150" in output
    assert "limits.header_timeout_s" in output
    assert await refuses_connections(process.url)
