"""Usage-pattern capture wired into the running proxy, and replay of what it captured."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from proxy.offline import replay
from tests.conftest import Backend, config_dict, running


async def test_proxy_captures_patterns_without_secrets_and_replay_accepts_them(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       telemetry={"capture": {"file": "captures/patterns.jsonl",
                                              "per_pattern": 2}})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        for task in (17, 18, 19):
            async with http.post(f"{proxy.url}/v1/tasks/{task}",
                                 headers={"Authorization": "Bearer sk-planted-secret",
                                          "Cookie": "sid=planted-cookie"},
                                 json={"goal": "book", "password": "planted-password"}) as answer:
                assert answer.status == 200
    captured = (tmp_path / "captures" / "patterns.jsonl").read_text()
    for secret in ("sk-planted-secret", "planted-cookie", "planted-password"):
        assert secret not in captured
    (pattern,) = [json.loads(line) for line in captured.splitlines()]
    assert (pattern["method"], pattern["path"], pattern["count"]) == ("POST",
                                                                       "/v1/tasks/{id}", 3)
    assert len(pattern["samples"]) == 2
    # replay.main runs its own event loop, so it runs in a thread beside the backends' loop.
    code = await asyncio.to_thread(replay.main, [
        str(tmp_path / "captures" / "patterns.jsonl"), "--target", backends["next_gen"].url,
        "--baseline", backends["legacy"].url, "--config", str(proxy.path)])
    assert code == 0
    assert any(seen.headers.get("X-Rollout-Replay") == "1" for seen in backends["next_gen"].seen)
