"""The harness itself: the in-process proxy forwards to a real backend."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.conftest import Backend, config_dict, running


async def test_proxy_in_process_forwards_to_legacy(tmp_path: Path,
                                                   backends: dict[str, Backend]) -> None:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url)
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http, \
            http.get(f"{proxy.url}/v1/tasks?x=1", headers={"X-User-Id": "u"}) as response:
        assert response.status == 200
        assert response.headers["X-Rollout-Backend"] == "legacy"
        assert (await response.json())["backend"] == "legacy"
    assert backends["legacy"].seen[0].path_qs == "/v1/tasks?x=1"
