"""`python -m load.crossings`: how many module boundaries one request crosses in `proxy/`.

The real proxy runs in this process in front of two aiohttp backends, and a profiler counts
every call from a function of one `proxy/` module into a function of another, while one
request is served: `progressive`, served by next_gen (the primary leg), and `shadow`, served
by legacy and mirrored to next_gen (the mirror leg counted apart). A coroutine resumed is not
a new call; the control loop's own work is left out. Prints the count, the modules met and
the busiest pairs. A reading aid for the architecture, not a benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

import proxy
from proxy.app import build, start, stop
from proxy.config.loading import load_config

ROOT = str(Path(proxy.__file__).parent)
SKIPPED_ROOTS = ("control",)  # the control loop and state watch run beside the request
RESUMABLE = 0x20 | 0x80 | 0x200  # CO_GENERATOR, CO_COROUTINE, CO_ASYNC_GENERATOR
FRESH = 8  # a coroutine's first run starts past its RETURN_GENERATOR, POP_TOP (CPython 3.11)


def module_of(frame: FrameType) -> str | None:
    name = frame.f_code.co_filename
    if not name.startswith(ROOT):
        return None
    return name[len(ROOT) + 1:].removesuffix(".py").replace("/", ".")


class Crossings:
    def __init__(self) -> None:
        self.pairs: Counter[tuple[str, str]] = Counter()
        self.calls: Counter[tuple[str, str]] = Counter()  # (caller module, callee function)

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or (frame.f_code.co_flags & RESUMABLE and frame.f_lasti > FRESH):
            return  # a coroutine or generator resumed: not a new call
        callee = module_of(frame)
        caller_frame = frame.f_back
        caller = module_of(caller_frame) if caller_frame is not None else None
        if callee is None or caller is None or callee == caller:
            return
        root, walk = caller, caller_frame
        while walk is not None:
            found = module_of(walk)
            root = found or root
            walk = walk.f_back
        if root.split(".")[0] in SKIPPED_ROOTS:
            return  # the control plane's own work (its loop, the state watch), not the request
        self.pairs[(caller, callee)] += 1
        self.calls[(caller, f"{callee}.{frame.f_code.co_qualname}")] += 1

    @property
    def total(self) -> int:
        return sum(self.pairs.values())

    def modules(self) -> set[str]:
        return {m for pair in self.pairs for m in pair}


@contextmanager
def profiled(crossings: Crossings) -> Iterator[None]:
    sys.setprofile(crossings.profile)
    try:
        yield
    finally:
        sys.setprofile(None)


async def backend(name: str) -> tuple[web.AppRunner, str]:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"backend": name, "success": True,
                                  "usage": {"total_tokens": 100}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def parked(seconds: float) -> None:
    await asyncio.Event().wait()


async def one_request(phase: str, workdir: Path, mirrored: bool) -> Crossings:
    old, old_url = await backend("legacy")
    new, new_url = await backend("next_gen")
    data = {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"},
            "backends": {"legacy": {"url": old_url}, "next_gen": {"url": new_url}},
            "rollout": {"phase": phase, "percentage": 100, "salt": "x"},
            "shadow": {"sample": 1.0 if mirrored else 0.0},
            "telemetry": {"trace_file": str(workdir / f"{phase}.jsonl")},
            "state": {"path": str(workdir / f"{phase}-state.json")},
            "guards": {"min_requests": 1_000_000}}
    path = workdir / f"{phase}.yaml"
    path.write_text(yaml.safe_dump(data))
    running = build(load_config(path), registry=CollectorRegistry(), sleep=parked)
    await start(running)
    url = f"http://127.0.0.1:{running.ports['proxy']}/v1/tasks"
    crossings = Crossings()
    try:
        async with aiohttp.ClientSession() as http:
            for index in range(3):  # warm: connections made, first-use paths taken
                async with http.post(url, json={"task": index},
                                     headers={"X-User-Id": f"warm-{index}"}) as response:
                    await response.read()
                await drained(running)
            with profiled(crossings):
                async with http.post(url, json={"task": "counted"},
                                     headers={"X-User-Id": "counted"}) as response:
                    await response.read()
                await drained(running)
    finally:
        await stop(running)
        await old.cleanup()
        await new.cleanup()
    return crossings


async def drained(running: Any) -> None:
    shadow = getattr(running, "shadow", None) or getattr(running.runtime, "shadow", None)
    await asyncio.sleep(0)  # let the mirror start on the loop's next turn
    if shadow is not None:
        async with asyncio.timeout(5):
            await shadow.drained.wait()
    await asyncio.sleep(0.05)  # the bookkeeping scheduled after the answer (call_soon)


def report(title: str, crossings: Crossings, top: int, calls: bool) -> str:
    lines = [f"{title}: {crossings.total} crossings between {len(crossings.modules())} "
             "modules"]
    for (caller, callee), count in crossings.pairs.most_common(top):
        lines.append(f"  {count:3d}  {caller} -> {callee}")
    if calls:
        lines.append("  the calls:")
        for (caller, callee), count in sorted(crossings.calls.items()):
            lines.append(f"  {count:3d}  {caller} -> {callee}")
    return "\n".join(lines)


async def main(top: int, calls: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        primary = await one_request("progressive", Path(tmp), mirrored=False)
        mirrored = await one_request("shadow", Path(tmp), mirrored=True)
    print(report("progressive, served by next_gen", primary, top, calls))
    print(report("shadow, served by legacy and mirrored", mirrored, top, calls))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=15, help="the busiest pairs to list")
    parser.add_argument("--calls", action="store_true", help="list every function called")
    args = parser.parse_args()
    asyncio.run(main(args.top, args.calls))
