"""The admin verbs of `rollout-proxy` (the installed console script) against a running proxy:
output, exit codes (0 done, 1 refused, 2 usage) and where the admin URL comes from."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.offline.cli import format_status
from tests.conftest import EXE, TOKEN, Backend, Running, config_dict, deep_merge, running


@dataclass
class Result:
    code: int
    out: str
    err: str


async def cli(*args: str, token: str | None = TOKEN, **env: str) -> Result:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("ROLLOUT_ADMIN_URL", "ROLLOUT_ADMIN_TOKEN")}
    if token is not None:
        full_env["ROLLOUT_ADMIN_TOKEN"] = token
    full_env.update(env)
    process = await asyncio.create_subprocess_exec(
        EXE, *args, env=full_env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(20):
        out, err = await process.communicate()
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


def progressive(backends: dict[str, Backend]) -> dict[str, Any]:
    return config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "progressive", "percentage": 50},
                       shadow={"sample": 0.0})


async def parked(seconds: float) -> None:
    await asyncio.Event().wait()


@pytest.fixture
async def proxy(tmp_path: Path, backends: dict[str, Backend]) -> Any:
    async with running(tmp_path, progressive(backends), sleep=parked) as started:
        yield started


def plan(proxy: Running) -> tuple[str, float]:
    return proxy.proxy.runtime.plan.phase, proxy.proxy.runtime.plan.percentage


async def test_status_prints_a_readable_table(proxy: Running) -> None:
    result = await cli("status", "--admin-url", proxy.admin)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split()[:4] == ["phase", "progressive", "percentage", "50"]
    assert any(line.startswith("configured") and "progressive 50 %" in line for line in lines)
    assert any(line.startswith("override") and "none" in line for line in lines)
    assert proxy.config.version in result.out
    header = next(line for line in lines if line.startswith("backend"))
    assert header.split()[:3] == ["backend", "requests", "errors"]
    assert any(line.split()[:2] == ["legacy", "0"] for line in lines)
    assert any(line.split()[:2] == ["next_gen", "0"] for line in lines)
    assert any(line.startswith("guard error_rate") for line in lines)


async def test_status_json_is_the_admin_document(proxy: Running) -> None:
    result = await cli("status", "--json", "--admin-url", proxy.admin)
    assert result.code == 0
    document = json.loads(result.out)
    assert (document["phase"], document["config_version"]) == ("progressive",
                                                               proxy.config.version)


async def test_rollback_with_reason_changes_the_phase(proxy: Running) -> None:
    result = await cli("rollback", "--reason", "p95 doubled", "--admin-url", proxy.admin)
    assert result.code == 0, result.err
    assert "rolled back" in result.out and "legacy" in result.out
    assert plan(proxy) == ("legacy", 50)
    override = proxy.proxy.runtime.stored.override
    assert override is not None and override.reason == "p95 doubled"
    status = await cli("status", "--admin-url", proxy.admin)
    assert "p95 doubled" in status.out


async def test_rollback_to_a_percentage(proxy: Running) -> None:
    result = await cli("rollback", "--percentage", "5", "--reason", "trim",
                       "--admin-url", proxy.admin)
    assert result.code == 0, result.err
    assert plan(proxy) == ("progressive", 5)


async def test_set_percentage_pause_resume_promote_reset(proxy: Running) -> None:
    url = ("--admin-url", proxy.admin)
    assert (await cli("set-percentage", "30", *url)).code == 0
    assert plan(proxy) == ("progressive", 30)
    assert (await cli("pause", *url)).code == 0
    assert proxy.proxy.runtime.stored.paused
    assert (await cli("resume", *url)).code == 0
    assert not proxy.proxy.runtime.stored.paused
    promoted = await cli("promote", *url)
    assert promoted.code == 0 and "default" in promoted.out
    assert plan(proxy)[0] == "default"
    assert (await cli("reset", *url)).code == 0
    assert plan(proxy) == ("progressive", 50)


async def test_promote_during_a_rollback_exits_1_with_the_servers_message(
        proxy: Running) -> None:
    url = ("--admin-url", proxy.admin)
    assert (await cli("rollback", "--reason", "guard", *url)).code == 0
    result = await cli("promote", *url)
    assert result.code == 1
    assert "409" in result.err and "reset" in result.err
    assert plan(proxy)[0] == "legacy"


@pytest.mark.parametrize("token", ["wrong-token", None])
async def test_a_refused_token_exits_1_with_the_servers_message(proxy: Running,
                                                                token: str | None) -> None:
    result = await cli("rollback", "--reason", "x", "--admin-url", proxy.admin, token=token)
    assert result.code == 1
    assert "401" in result.err and "missing or wrong bearer token" in result.err
    assert plan(proxy) == ("progressive", 50)


async def test_no_token_configured_on_the_server_exits_1_naming_the_env_var(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, progressive(backends), token=None, sleep=parked) as proxy:
        result = await cli("pause", "--admin-url", proxy.admin)
    assert result.code == 1
    assert "403" in result.err and "ROLLOUT_TEST_TOKEN" in result.err


async def test_a_server_side_validation_refusal_exits_1(proxy: Running) -> None:
    result = await cli("set-percentage", "150", "--admin-url", proxy.admin)
    assert result.code == 1
    assert "percentage" in result.err
    assert plan(proxy) == ("progressive", 50)


@pytest.mark.parametrize("args", [
    ["rollback"],  # --reason is required
    ["set-percentage", "half"],
    ["set-percentage"],
    ["status", "--bogus"],
    ["frobnicate"],
    [],
])
async def test_usage_errors_exit_2(args: list[str]) -> None:
    result = await cli(*args, "--admin-url", "http://127.0.0.1:9") if args else await cli()
    assert result.code == 2, result
    assert "usage" in result.err


async def test_an_unreachable_admin_api_exits_1_saying_so() -> None:
    from tests.conftest import dead_url

    url = dead_url()
    result = await cli("status", "--admin-url", url)
    assert result.code == 1
    assert "cannot reach" in result.err and url in result.err


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
async def test_admin_url_defaults_to_the_configs_admin_listen(
        tmp_path: Path, proxy: Running, host: str) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    data = yaml.safe_load(proxy.path.read_text())
    data = deep_merge(data, {"admin": {"listen": f"{host}:{proxy.proxy.ports['admin']}"}})
    path = other / "routing.yaml"
    path.write_text(yaml.safe_dump(data))
    result = await cli("rollback", "--reason", "from config", "--config", str(path))
    assert result.code == 0, result.err
    assert plan(proxy)[0] == "legacy"


async def test_admin_url_comes_from_the_environment_before_the_config(
        tmp_path: Path, proxy: Running) -> None:
    from tests.conftest import dead_url

    path = tmp_path / "elsewhere.yaml"
    path.write_text(yaml.safe_dump({"admin": {"listen": dead_url().removeprefix("http://")}}))
    result = await cli("status", "--config", str(path), ROLLOUT_ADMIN_URL=proxy.admin)
    assert result.code == 0, result.err
    # --admin-url wins over the environment.
    result = await cli("status", "--admin-url", proxy.admin, ROLLOUT_ADMIN_URL=dead_url())
    assert result.code == 0, result.err


def test_format_status_renders_override_figures_guards_and_next_step() -> None:
    figures = {"requests": 12, "errors": 1, "error_rate": 0.0833, "p50_ms": 12.345,
               "p95_ms": None, "mean_tokens": 1200.0, "mean_memory_mb": None}
    text = format_status({
        "phase": "legacy", "percentage": 25.0, "paused": True,
        "configured": {"phase": "progressive", "percentage": 25.0},
        "override": {"action": "rollback", "by": "guard", "at": "2030-01-01T00:00:00Z",
                     "reason": "guard error_rate"},
        "circuit": {"next_gen": "open"}, "config_version": "abcdef012345",
        "config_loaded_at": "2030-01-01T00:00:00Z",
        "backends": {"next_gen": figures},
        "guards": [{"guard": "error_rate", "state": "tripped", "detail": "0.0833 > 0.05"}],
        "schedule": {"next": {"at": "2030-02-01T00:00:00+00:00", "phase": None,
                              "percentage": 50, "waiting": "a rollback is in force"}},
    })
    lines = text.splitlines()
    assert lines[0].split() == ["phase", "legacy", "percentage", "25", "%", "paused", "yes"]
    assert "rollback by guard at 2030-01-01T00:00:00Z: guard error_rate" in text
    assert "next_gen open" in text
    row = next(line for line in lines if line.startswith("next_gen "))
    assert row.split() == ["next_gen", "12", "8.3%", "12.3", "-", "1200.0", "-"]
    assert "guard error_rate" in text and "tripped" in text
    assert "waiting: a rollback is in force" in text
