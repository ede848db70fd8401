"""rollout-proxy as a benchmark target: a generated config (SPEC's main keys only) and its
process, started pinned and ready once its admin /readyz answers 200."""

from __future__ import annotations

import secrets
import shutil
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from load.procs import Child, Children, free_port, wait_http

NEVER = 1_000_000_000  # guards' min_requests: a benchmark must never trip a rollback


@dataclass(frozen=True, slots=True)
class Setup:
    """One proxy instance: a phase and the two backends it sits in front of."""

    phase: str
    legacy: str
    next_gen: str
    percentage: float = 0.0
    sample: float = 0.0  # shadow.sample: mirroring only where a benchmark asks for it
    shadow_timeout_s: float = 60.0
    overrides: tuple[tuple[str, Any], ...] = ()  # (dotted.key.path, value), applied last
    transport: str = "h1"  # serve --transport: the client that speaks to the backends
    tree: Path | None = None  # a checkout of another revision to run instead (bench --before)


@dataclass(frozen=True, slots=True)
class Running:
    child: Child
    url: str
    admin_url: str


def executable() -> str | None:
    """The rollout-proxy next to this interpreter, else on PATH."""
    beside = Path(sys.executable).with_name("rollout-proxy")
    return str(beside) if beside.exists() else shutil.which("rollout-proxy")


def command(setup: Setup) -> tuple[list[str], dict[str, str]]:
    """How to run `rollout-proxy`: this checkout's, or `setup.tree`'s (its own entry point,
    from its pyproject.toml, run with this interpreter and its checkout first on the path)."""
    if setup.tree is None:
        binary = executable()
        if binary is None:
            raise FileNotFoundError("rollout-proxy is not installed (pip install -e .)")
        return [binary], {}
    project = tomllib.loads((setup.tree / "pyproject.toml").read_text())
    module, _, function = project["project"]["scripts"]["rollout-proxy"].partition(":")
    tree = str(setup.tree.resolve())  # before the working directory, which `-c` puts first
    launch = (f"import sys; sys.path.insert(0, {tree!r}); from {module} import {function}; "
              f"sys.exit({function}())")
    return [sys.executable, "-c", launch], {"PYTHONPATH": tree}


def config(setup: Setup, listen: int, admin: int, workdir: Path) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{listen}",
        "admin": {"listen": f"127.0.0.1:{admin}", "token_env": "ROLLOUT_ADMIN_TOKEN"},
        "backends": {"legacy": {"url": setup.legacy, "timeout_s": 60},
                     "next_gen": {"url": setup.next_gen, "timeout_s": 60}},
        "rollout": {"phase": setup.phase, "percentage": setup.percentage, "salt": "bench"},
        "routing": {"user_id": [{"header": "X-User-Id"}], "opt_header": "X-Next-Gen",
                    "anonymous": "legacy", "paths": ["/"]},
        "shadow": {"sample": setup.sample, "max_in_flight": 256,
                   "timeout_s": setup.shadow_timeout_s},
        "fallback": {"enabled": True, "on": ["connect_error", "timeout", "5xx"], "attempts": 1},
        "limits": {"max_body_bytes": 10_485_760, "header_timeout_s": 10,
                   "max_in_flight": 10_000, "trusted_hops": 0, "drain_timeout_s": 5},
        "telemetry": {"tokens": {"header": "X-Tokens-Used", "json": "usage.total_tokens"},
                      "success": {"json": "success"}, "memory": {"header": "X-Memory-MB"},
                      "trace_file": str(workdir / "traces" / "comparisons.jsonl")},
        "guards": {"window_s": 300, "min_requests": NEVER, "error_rate": 0.05,
                   "latency_degradation": 0.20, "memory_spike": 2.0, "max_tokens": 20000,
                   "max_time_ms": None, "complaints_per_hour": 10, "action": "alert",
                   "webhook": None},
        "state": {"backend": "file", "path": str(workdir / "state" / "rollout-state.json")},
    }


def override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set data[a][b][c] = value for "a.b.c", making the sections on the way."""
    *sections, key = dotted.split(".")
    for name in sections:
        data = data.setdefault(name, {})
    data[key] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`backends.legacy.max_connections=10000` -> (path, YAML value)."""
    path, sep, value = text.partition("=")
    if not sep or not path:
        raise ValueError(f"expected KEY.PATH=VALUE, got {text!r}")
    return path.strip(), yaml.safe_load(value)


def write_config(setup: Setup, workdir: Path) -> tuple[Path, int, int]:
    """The config file of one instance in its own directory, and its two ports."""
    workdir.mkdir(parents=True, exist_ok=True)
    listen, admin = free_port(), free_port()
    path = workdir / "routing.yaml"
    data = config(setup, listen, admin, workdir)
    for dotted, value in setup.overrides:
        override(data, dotted, value)
    # safe_dump quotes the key 'on', so YAML 1.1 does not read it as true.
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, listen, admin


async def start(children: Children, name: str, setup: Setup, workdir: Path, *,
                cpu: int | None = 0, ready_timeout_s: float = 30.0) -> Running:
    argv, env = command(setup)
    path, listen, admin = write_config(setup, workdir / name)
    env["ROLLOUT_ADMIN_TOKEN"] = secrets.token_hex(16)
    argv += ["serve", "--config", str(path)]
    if setup.transport != "h1":  # the default; a revision from before the flag lacks it
        argv += ["--transport", setup.transport]
    child = await children.start(name, argv, cpu=cpu, env=env)
    admin_url = f"http://127.0.0.1:{admin}"
    try:
        await wait_http(child, f"{admin_url}/readyz", ready_timeout_s)
    except BaseException:
        await children.stop(child)
        raise
    return Running(child, f"http://127.0.0.1:{listen}/", admin_url)


async def metrics(admin_url: str, prefixes: tuple[str, ...]) -> list[str]:
    """The proxy's non-zero samples whose names start with one of `prefixes`."""
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
                f"{admin_url}/metrics") as resp:
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return [f"(metrics unavailable: {exc})"]
    return [line for line in text.splitlines() if line.startswith(prefixes)
            and not line.endswith((" 0.0", " 0"))]
