"""The things a benchmark drives: fake backends, reference proxies, the minimal proxy and
rollout-proxy in a phase, each started as a pinned child and described by a Target."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from load import reference, rollout
from load.procs import ALLOWED_CPUS, PYTHON, Child, Children, StartError, free_port, wait_port

# The proxy under test gets a core of its own; the load generator and backends share the other.
PROXY_CPU = ALLOWED_CPUS[0]
LOAD_CPU = ALLOWED_CPUS[-1]
CHECKOUT = Path(__file__).resolve().parent.parent  # this checkout, run as --before runs another


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    url: str
    pids: tuple[int, ...] = ()
    note: str = ""
    admin_url: str | None = None  # rollout-proxy's admin port
    restart: Callable[[], Awaitable[Target]] | None = None  # stop it, start it afresh


Overrides = tuple[tuple[str, Any], ...]
Starter = Callable[[Children, Target, Path], Awaitable[Target]]


@dataclass(slots=True)
class Skipped:
    reasons: dict[str, str] = field(default_factory=dict)


async def backend(children: Children, name: str, mode: str = "fast", *, nginx: bool = False,
                  extra: tuple[str, ...] = ()) -> Target:
    """A fake backend on the load core: nginx with fixed JSON when asked, else load.backend."""
    port = free_port()
    argv = [PYTHON, "-m", "load.backend", "--port", str(port), "--mode", mode, *extra]
    if nginx:
        argv += ["--engine", "nginx"]
    child = await children.start(name, argv, cpu=LOAD_CPU)
    await wait_port(child, port)
    engine = "nginx" if nginx else "load.backend"
    return Target(name, f"http://127.0.0.1:{port}/", (child.pid,), f"{engine} {mode}")


async def _ready(children: Children, name: str, argv: list[str], port: int,
                 note: str) -> Target:
    child: Child = await children.start(name, argv, cpu=PROXY_CPU)
    await wait_port(child, port)
    return Target(name, f"http://127.0.0.1:{port}/", (child.pid,), note)


def _host_port(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")


async def minimal_proxy(children: Children, upstream: Target,
                        workdir: Path | None = None) -> Target:
    port = free_port()
    argv = [PYTHON, "-m", "load.minimal_proxy", "--listen", f"127.0.0.1:{port}",
            "--upstream", upstream.url.rstrip("/")]
    return await _ready(children, "minimal", argv, port, "load.minimal_proxy (aiohttp)")


async def nginx_proxy(children: Children, upstream: Target, workdir: Path) -> Target:
    port, home = free_port(), workdir / "nginx-proxy"
    home.mkdir(parents=True, exist_ok=True)
    conf = reference.nginx_proxy_config("127.0.0.1", port, _host_port(upstream.url), home)
    argv = reference.nginx_command(reference.write_config(home, "nginx.conf", conf), home)
    return await _ready(children, "nginx", argv, port, "nginx, 1 worker, keepalive upstream")


async def haproxy(children: Children, upstream: Target, workdir: Path) -> Target:
    port = free_port()
    conf = reference.haproxy_config("127.0.0.1", port, _host_port(upstream.url))
    argv = reference.haproxy_command(reference.write_config(workdir, "haproxy.cfg", conf))
    return await _ready(children, "haproxy", argv, port, "haproxy, 1 thread")


async def rollout_proxy(children: Children, name: str, setup: rollout.Setup,
                        workdir: Path) -> Target:
    running = await rollout.start(children, name, setup, workdir, cpu=PROXY_CPU)
    note = f"rollout-proxy {setup.phase}"
    if setup.tree is not None:
        note += f" from {setup.tree}"
    if setup.transport != "h1":
        note += f" (--transport {setup.transport})"
    if setup.phase == "progressive":
        note += f" {setup.percentage:g} %"
    if setup.phase != "legacy":
        note += f", shadow.sample {setup.sample:g}"

    async def restart() -> Target:
        await children.stop(running.child)
        return await rollout_proxy(children, name, setup, workdir)

    return Target(name, running.url, (running.child.pid,), note, running.admin_url, restart)


async def references(children: Children, upstream: Target, workdir: Path,
                     skipped: Skipped) -> list[Target]:
    """nginx and haproxy as reverse proxies when installed, and the minimal aiohttp proxy."""
    starters: dict[str, tuple[bool, Starter]] = {
        "nginx": (reference.nginx_available(), nginx_proxy),
        "haproxy": (reference.haproxy_available(), haproxy),
        "minimal": (True, minimal_proxy),
    }
    found = []
    for name, (installed, starter) in starters.items():
        if not installed:
            skipped.reasons[name] = f"{name} not installed"
            continue
        try:
            found.append(await starter(children, upstream, workdir))
        except (OSError, StartError) as exc:
            skipped.reasons[name] = f"{name} did not start: {exc}"
    return found


async def rollout_phases(children: Children, legacy: Target, next_gen: Target, workdir: Path,
                         skipped: Skipped, overrides: Overrides = (),
                         before: Path | None = None) -> list[Target]:
    """rollout-proxy in legacy, shadow (sample 1.0) and progressive (50 %); with `before` (a
    checkout of another revision), its shadow and progressive too, as NAME@before."""
    urls = (legacy.url, next_gen.url)
    setups = {
        "legacy": rollout.Setup("legacy", *urls, overrides=overrides),
        "shadow": rollout.Setup("shadow", *urls, sample=1.0, overrides=overrides),
        "progressive": rollout.Setup("progressive", *urls, percentage=50, overrides=overrides),
        "progressive-aiohttp": rollout.Setup("progressive", *urls, percentage=50,
                                             overrides=overrides, transport="aiohttp"),
    }
    if before is not None:
        # Both revisions start the same way (rollout.command with a tree), so a comparison
        # differs in the code alone, not in how the process was launched.
        for name in ("shadow", "progressive"):
            setups[name] = replace(setups[name], tree=CHECKOUT)
            setups[f"{name}@before"] = replace(setups[name], tree=before)
    found = []
    for name, setup in setups.items():
        try:
            found.append(await rollout_proxy(children, name, setup, workdir))
        except (OSError, StartError) as exc:
            skipped.reasons[name] = f"rollout-proxy did not start: {exc}"
    return found
