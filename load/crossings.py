"""`python -m load.crossings`: how many module boundaries one request crosses in `proxy/`.

The real proxy runs in this process in front of two aiohttp backends, and a profiler counts
every call from a function of one `proxy/` module into a function of another, while one
request is served: `progressive`, served by next_gen (the primary leg), and `shadow`, served
by legacy and mirrored to next_gen (the mirror leg counted apart). A coroutine resumed is not
a new call; the control loop's own work is left out. Prints the count, the modules met and
the busiest pairs. A reading aid for the architecture, not a benchmark.

`--steps` counts instead every change of the `proxy/` module running, as a reader stepping
through the request sees it: a call into another module, the return from it, and a coroutine
or a callback of another module resumed by the event loop (frames outside `proxy/`, such as
aiohttp's and asyncio's, are stepped over). About twice the calls, plus the resumes.

`--opcodes` counts instead the Python instructions `proxy/`'s own code executes for that one
request: a figure of the proxy's work that, unlike a timing, no other process on the core
can move (the same code counts the same). `--tree DIR` runs another checkout's `proxy/`
(this tool and the backends stay this checkout's), so two revisions compare in two runs.
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

ROOT = ""  # the proxy package's folder, set by use_tree()
SKIPPED_ROOTS = ("control",)  # the control loop and state watch run beside the request
RESUMABLE = 0x20 | 0x80 | 0x200  # CO_GENERATOR, CO_COROUTINE, CO_ASYNC_GENERATOR
FRESH = 8  # a coroutine's first run starts past its RETURN_GENERATOR, POP_TOP (CPython 3.11)


def use_tree(tree: Path | None) -> Any:
    """Import `proxy` (from `tree`, a checkout, when given) and return its app module."""
    global ROOT
    if tree is not None:
        sys.path.insert(0, str(tree.resolve()))
    import proxy
    import proxy.app

    ROOT = str(Path(proxy.__file__).parent)
    return proxy.app


def loader() -> Any:
    try:  # config/loading.py since the folders; config.py before
        from proxy.config.loading import load_config
    except ImportError:
        from proxy.config import load_config  # type: ignore[attr-defined,no-redef]
    return load_config


def module_of(frame: FrameType) -> str | None:
    name = frame.f_code.co_filename
    if not name.startswith(ROOT):
        return None
    return name[len(ROOT) + 1:].removesuffix(".py").replace("/", ".")


def beside(frame: FrameType | None) -> bool:
    """Whether the outermost proxy/ frame under `frame` is the control plane's (its loop,
    the state watch): work beside the request, not for it."""
    root, walk = "", frame
    while walk is not None:
        root = module_of(walk) or root
        walk = walk.f_back
    return root.split(".")[0] in SKIPPED_ROOTS


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
        if beside(caller_frame):
            return  # the control plane's own work (its loop, the state watch), not the request
        self.pairs[(caller, callee)] += 1
        self.calls[(caller, f"{callee}.{frame.f_code.co_qualname}")] += 1

    @property
    def total(self) -> int:
        return sum(self.pairs.values())

    def modules(self) -> set[str]:
        return {m for pair in self.pairs for m in pair}


class Steps(Crossings):
    """Every change of the proxy/ module running (see the module's docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.last: str | None = None

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            running = frame
        elif event == "return" and frame.f_back is not None:
            running = frame.f_back
        else:
            return
        module = module_of(running)
        if module is None or module == self.last or beside(running):
            return
        if self.last is not None:
            self.pairs[(self.last, module)] += 1
            self.calls[(self.last, f"{module}.{running.f_code.co_qualname}")] += 1
        self.last = module


class Opcodes:
    """The Python instructions executed by proxy/'s code for the request, the control
    plane's own work left out (as by Crossings)."""

    def __init__(self) -> None:
        self.total = 0
        self.functions: Counter[str] = Counter()

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        module = module_of(frame)
        if module is None or beside(frame):
            return None  # not proxy/'s code, or not the request's: its opcodes not counted
        frame.f_trace_opcodes = True
        name = f"{module}.{frame.f_code.co_qualname}"
        functions = self.functions

        def opcode(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                self.total += 1
                functions[name] += 1
            return opcode

        return opcode


@contextmanager
def profiled(counter: Crossings | Opcodes) -> Iterator[None]:
    if isinstance(counter, Opcodes):
        sys.settrace(counter.trace)
    else:
        sys.setprofile(counter.profile)
    try:
        yield
    finally:
        sys.settrace(None)
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


async def one_request(phase: str, workdir: Path, mirrored: bool,
                      counter: Crossings | Opcodes) -> None:
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
    app = sys.modules["proxy.app"]
    running = app.build(loader()(path), registry=CollectorRegistry(), sleep=parked)
    await app.start(running)
    url = f"http://127.0.0.1:{running.ports['proxy']}/v1/tasks"
    try:
        async with aiohttp.ClientSession() as http:
            for index in range(3):  # warm: connections made, first-use paths taken
                async with http.post(url, json={"task": index},
                                     headers={"X-User-Id": f"warm-{index}"}) as response:
                    await response.read()
                await drained(running)
            with profiled(counter):
                async with http.post(url, json={"task": "counted"},
                                     headers={"X-User-Id": "counted"}) as response:
                    await response.read()
                await drained(running)
    finally:
        await app.stop(running)
        await old.cleanup()
        await new.cleanup()


async def drained(running: Any) -> None:
    shadow = getattr(running, "shadow", None) or getattr(running.runtime, "shadow", None)
    await asyncio.sleep(0)  # let the mirror start on the loop's next turn
    if shadow is not None:
        async with asyncio.timeout(5):
            await shadow.drained.wait()
    await asyncio.sleep(0.05)  # the bookkeeping scheduled after the answer (call_soon)


def report(title: str, crossings: Crossings, top: int, calls: bool) -> str:
    what = "module changes" if isinstance(crossings, Steps) else "crossings"
    lines = [f"{title}: {crossings.total} {what} between {len(crossings.modules())} modules"]
    for (caller, callee), count in crossings.pairs.most_common(top):
        lines.append(f"  {count:3d}  {caller} -> {callee}")
    if calls:
        lines.append("  the calls:")
        for (caller, callee), count in sorted(crossings.calls.items()):
            lines.append(f"  {count:3d}  {caller} -> {callee}")
    return "\n".join(lines)


PHASES = (("progressive", "progressive, served by next_gen", False),
          ("shadow", "shadow, served by legacy and mirrored", True))


async def main(top: int, calls: bool, opcodes: bool, steps: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for phase, title, mirrored in PHASES:
            counter: Crossings | Opcodes = Opcodes() if opcodes else Steps() if steps \
                else Crossings()
            await one_request(phase, Path(tmp), mirrored, counter)
            if isinstance(counter, Opcodes):
                print(f"{title}: {counter.total} opcodes of proxy/'s code")
                for name, count in counter.functions.most_common(top):
                    print(f"  {count:5d}  {name}")
            else:
                print(report(title, counter, top, calls))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=15,
                        help="the busiest pairs (or, with --opcodes, functions) to list")
    parser.add_argument("--calls", action="store_true", help="list every function called")
    parser.add_argument("--steps", action="store_true",
                        help="count every change of the proxy/ module running instead")
    parser.add_argument("--opcodes", action="store_true",
                        help="count the Python instructions of proxy/'s code instead")
    parser.add_argument("--tree", type=Path, help="a checkout whose proxy/ to run")
    args = parser.parse_args()
    use_tree(args.tree)
    asyncio.run(main(args.top, args.calls, args.opcodes, args.steps))
