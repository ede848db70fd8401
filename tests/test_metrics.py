"""/metrics as Prometheus scrapes it: promtool-clean, the SPEC's families, the phase gauge,
and no label value that carries a user id, a request id or a raw path."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.config.model import PHASES
from proxy.telemetry.families import FAMILIES
from proxy.telemetry.metrics import code_class
from tests.conftest import TOKEN, Backend, Running, config_dict, metrics_samples, running

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")


async def parked(seconds: float) -> None:
    await asyncio.Event().wait()


async def scrape(http: aiohttp.ClientSession, proxy: Running) -> str:
    async with http.get(f"{proxy.admin}/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return await response.text()


async def promtool(text: str) -> tuple[int, str]:
    assert PROMTOOL is not None
    process = await asyncio.create_subprocess_exec(
        PROMTOOL, "check", "metrics", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(20):
        out, _ = await process.communicate(text.encode())
    assert process.returncode is not None
    return process.returncode, out.decode()


async def admin_post(http: aiohttp.ClientSession, proxy: Running, name: str,
                     body: dict[str, Any] | None = None) -> None:
    async with http.post(f"{proxy.admin}/admin/{name}", json=body or {},
                         headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 200


async def mixed_traffic(http: aiohttp.ClientSession, proxy: Running, count: int = 12) -> None:
    """Primaries on both backends, mirrors, fallbacks: every role gets series."""
    for index in range(count):
        headers = {"X-User-Id": f"user-{index}", "X-Request-Id": f"rid-{index}"}
        path = "/fail" if index % 4 == 0 else f"/v1/tasks/{index}"
        async with http.post(f"{proxy.url}{path}", json={"task": index},
                             headers=headers) as response:
            await response.read()


def split_backends(backends: dict[str, Backend], memory: bool) -> None:
    extra = {"X-Memory-MB": "128"} if memory else {}

    async def next_gen(request: web.Request) -> web.Response:
        status = 500 if request.path == "/fail" else 200
        return web.json_response({"success": status == 200, "usage": {"total_tokens": 900}},
                                 status=status, headers=extra)

    async def legacy(request: web.Request) -> web.Response:
        return web.json_response({"success": True, "usage": {"total_tokens": 9000}},
                                 headers={"X-Tokens-Used": "9000", **extra})

    backends["next_gen"].handler, backends["legacy"].handler = next_gen, legacy


def busy(backends: dict[str, Backend]) -> dict[str, Any]:
    return config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "progressive", "percentage": 50})


@needs_promtool
async def test_promtool_finds_metrics_clean_after_mixed_traffic(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    split_backends(backends, memory=False)
    async with running(tmp_path, busy(backends), sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        await mixed_traffic(http, proxy)
        await admin_post(http, proxy, "rollback", {"reason": "drill"})
        proxy.proxy.control.tick()
        code, out = await promtool(await scrape(http, proxy))
    assert (code, out) == (0, "")


@needs_promtool
async def test_promtool_finds_metrics_clean_when_backends_report_memory(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    split_backends(backends, memory=True)
    async with running(tmp_path, busy(backends), sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        await mixed_traffic(http, proxy, 4)
        code, out = await promtool(await scrape(http, proxy))
    assert (code, out) == (0, "")


async def test_the_spec_metric_families_are_exposed(tmp_path: Path,
                                                    backends: dict[str, Backend]) -> None:
    async with running(tmp_path, busy(backends), sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        families = {f.name: f for f in text_string_to_metric_families(await scrape(http, proxy))}
    expected = {
        "rollout_requests": ("counter", {"backend", "role", "code_class"}),
        "rollout_request_duration_seconds": ("histogram", {"backend", "role"}),
        "rollout_tokens": ("counter", {"backend", "role"}),
        "rollout_shadow_comparisons": ("counter", {"result"}),
        "rollout_percentage": ("gauge", set()),
        "rollout_phase": ("gauge", {"phase"}),
    }
    for name, (kind, labels) in expected.items():
        assert families[name].type == kind, name
        assert families[name].samples, name
        assert set(families[name].samples[0].labels) - {"le"} == labels, name
    for name in ("rollout_shadow_dropped", "rollout_fallbacks", "rollout_rollbacks",
                 "rollout_config_reloads"):
        assert families[name].type == "counter", name


async def test_requests_are_counted_by_backend_role_and_code_class(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    split_backends(backends, memory=False)
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "shadow"})
    async with running(tmp_path, data, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        await mixed_traffic(http, proxy, 8)  # two of them on /fail
    # After stop(): the mirrors were given their grace, so every one is counted.
    assert proxy.metric("rollout_requests_total", backend="legacy", role="primary",
                        code_class="2xx") == 8
    assert proxy.metric("rollout_requests_total", backend="next_gen", role="shadow",
                        code_class="2xx") == 6
    assert proxy.metric("rollout_requests_total", backend="next_gen", role="shadow",
                        code_class="5xx") == 2
    assert proxy.metric("rollout_tokens_total", backend="legacy", role="primary") == 8 * 9000
    assert proxy.metric("rollout_shadow_comparisons_total", result="match") == 6
    assert proxy.metric("rollout_shadow_comparisons_total", result="mismatch") == 2


async def test_rollout_phase_has_one_series_per_phase_with_1_for_the_current(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    async with running(tmp_path, busy(backends), sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        def phases(text: str) -> dict[str, float]:
            return {dict(labels)["phase"]: value
                    for (name, labels), value in metrics_samples(text).items()
                    if name == "rollout_phase"}

        assert phases(await scrape(http, proxy)) == {
            p: (1.0 if p == "progressive" else 0.0) for p in PHASES}
        assert proxy.metric("rollout_percentage") == 50
        await admin_post(http, proxy, "rollback", {"reason": "drill"})
        assert phases(await scrape(http, proxy)) == {
            p: (1.0 if p == "legacy" else 0.0) for p in PHASES}
        assert proxy.metric("rollout_percentage") == 50


async def test_no_label_value_holds_a_user_id_request_id_or_path(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    users = [f"uid-secret-{i:04d}" for i in range(25)]
    rids = [f"rid-secret-{i:04d}" for i in range(25)]
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "progressive", "percentage": 50},
                       guards={"min_requests": 5, "complaints_per_hour": 1000})
    async with running(tmp_path, data, sleep=parked) as proxy, \
            aiohttp.ClientSession() as http:
        for user, rid in zip(users, rids, strict=True):
            opt = {"X-Next-Gen": "1"} if user.endswith("7") else {}
            async with http.get(f"{proxy.url}/v1/path-secret/{user}?q={rid}",
                                headers={"X-User-Id": user, "X-Request-Id": rid,
                                         **opt}) as response:
                await response.read()
            await admin_post(http, proxy, "complaints", {"user_id": user, "text": rid})
        proxy.proxy.control.tick()
        text = await scrape(http, proxy)
    for secret in (*users, *rids, "path-secret", "/v1"):
        assert secret not in text
    labels = {value for (_, pairs), _ in metrics_samples(text).items() for _, value in pairs}
    assert all(len(value) < 40 for value in labels)


def test_code_class_buckets_statuses() -> None:
    assert [code_class(s) for s in (101, 200, 304, 404, 503, None, 99, 600)] == [
        "1xx", "2xx", "3xx", "4xx", "5xx", "error", "error", "error"]


TRAFFIC = """
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.observe import Measurement
import sys
metrics = Metrics(multiprocess_dir=sys.argv[1] if len(sys.argv) > 1 else None)
metrics.answered("legacy", "primary", 200, 0.02, 900, 128)
metrics.answered("next_gen", "shadow", 503, 0.3, None, None)
metrics.errored("next_gen", "primary", "head_too_large")
metrics.compared("mismatch")
metrics.traced("written", 3)
metrics.fallbacks.labels("error").inc()
metrics.show_plan("progressive", 25, False)
sys.stdout.write(metrics.exposition().decode())
"""


async def exposition_of(tmp_path: Path, workers: bool) -> dict[str, Any]:
    """What /metrics shows after the same answers, in one process or as one of --workers
    (prometheus_client picks its file-backed values at import: a fresh interpreter)."""
    shared = tmp_path / "metrics"
    shared.mkdir(exist_ok=True)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared)} if workers else None
    args = [str(shared)] if workers else []
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TRAFFIC, *args, env=env, stdout=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out, _ = await process.communicate()
    assert process.returncode == 0
    return {family.name: (family.type, sorted((s.name, tuple(sorted(s.labels.items())), s.value)
                                              for s in family.samples))
            for family in text_string_to_metric_families(out.decode())}


async def test_one_process_and_workers_show_the_same_families_and_figures(
        tmp_path: Path) -> None:
    alone = await exposition_of(tmp_path, workers=False)
    shared = await exposition_of(tmp_path, workers=True)
    assert {name.removesuffix("_total") for name in alone} == {f.name for f in FAMILIES}
    # --workers' files hold only the families a worker wrote to; the rest show no samples.
    assert {name: alone[name] for name in shared} == shared
    assert all(not samples for name, (_, samples) in alone.items() if name not in shared)
    assert len(shared) >= 12
    requests = dict(((labels, value) for _, labels, value in alone["rollout_requests"][1]))
    assert requests[(("backend", "next_gen"), ("code_class", "error"), ("role", "primary"))] == 1
    assert requests[(("backend", "next_gen"), ("code_class", "5xx"), ("role", "shadow"))] == 1
