"""Simulated agent backends and the demo: legacy (slow, token-hungry) and next_gen (ten times
faster, a tenth of the tokens, failing 2 % of the time), with the proxy in front in `shadow`.

`python -m proxy.offline.demo --backend legacy --port 8001` runs one backend alone (compose
uses it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    tokens: int
    seconds: float
    memory_mb: float
    failure_rate: float
    streams: bool = False  # answers as server-sent events, usage in the last event


PROFILES = {
    "legacy": Profile("legacy", 12_000, 5.0, 820.0, 0.0),
    "next_gen": Profile("next_gen", 1_200, 0.5, 310.0, 0.02, streams=True),
}
STEPS = 5
FEATURE_FLAGS = "intent_analysis,vision_perception,parallel_execution,smart_caching"


def backend_app(profile: Profile, speed: float,
                rng: random.Random | None = None) -> web.Application:
    rng = rng or random.Random()

    async def task(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seconds = profile.seconds / speed * rng.uniform(0.8, 1.2)
        tokens = int(profile.tokens * rng.uniform(0.9, 1.1))
        memory = round(profile.memory_mb * rng.uniform(0.9, 1.1), 1)
        headers = {"X-Memory-MB": str(memory), "X-Backend": profile.name}
        if rng.random() < profile.failure_rate:
            await asyncio.sleep(seconds)
            return web.json_response({"success": False, "error": "agent crashed",
                                      "usage": {"total_tokens": tokens}},
                                     status=500, headers=headers)
        answer: dict[str, Any] = {
            "id": uuid.uuid4().hex, "created": int(time.time()), "backend": profile.name,
            "success": True, "result": {"status": "done", "steps": rng.randint(3, 9),
                                        "echo_bytes": len(body)},
            "usage": {"total_tokens": tokens},
        }
        if profile.streams:
            return await stream(request, answer, seconds, headers)
        await asyncio.sleep(seconds)
        headers["X-Tokens-Used"] = str(tokens)
        return web.json_response(answer, headers=headers)

    async def stream(request: web.Request, answer: dict[str, Any], seconds: float,
                     headers: dict[str, str]) -> web.StreamResponse:
        """An OpenAI chat-completions style stream: deltas, then usage, then [DONE]."""
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        for step in range(STEPS):
            await asyncio.sleep(seconds / STEPS)
            delta = {"id": answer["id"], "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"content": f"step {step + 1} "}}]}
            await response.write(f"data: {json.dumps(delta)}\n\n".encode())
        await response.write(f"data: {json.dumps(answer)}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        return response

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"backend": profile.name, "status": "ok"})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_route("*", "/{tail:.*}", task)
    return app


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(preferred: int) -> int:
    if port_free(preferred):
        return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_backend(app: web.Application, port: int,
                      host: str = "127.0.0.1") -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def demo_config(legacy: int, next_gen: int, listen: int, admin: int) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{listen}",
        "admin": {"listen": f"127.0.0.1:{admin}", "token_env": "ROLLOUT_ADMIN_TOKEN"},
        "backends": {"legacy": {"url": f"http://127.0.0.1:{legacy}", "timeout_s": 60},
                     "next_gen": {"url": f"http://127.0.0.1:{next_gen}", "timeout_s": 60,
                                  "headers": {"X-Feature-Flags": FEATURE_FLAGS}}},
        "rollout": {"phase": "shadow", "percentage": 10, "salt": "demo"},
        "shadow": {"sample": 1.0, "compare": {"ignore": ["backend"], "baseline_sample": 0.2}},
        "guards": {"min_requests": 20, "action": "alert"},
        "telemetry": {"trace_file": "traces/comparisons.jsonl",
                      "cost": {"legacy": {"usd_per_1k_tokens": 0.03},
                               "next_gen": {"usd_per_1k_tokens": 0.002}}},
    }


async def demo(speed: float, directory: Path) -> None:
    from proxy.app import build, start, stop
    from proxy.config.loading import load_config

    ports = [pick_port(p) for p in (8001, 8002, 8080, 9090)]
    runners = [await run_backend(backend_app(PROFILES["legacy"], speed), ports[0]),
               await run_backend(backend_app(PROFILES["next_gen"], speed), ports[1])]
    path = directory / "routing.yaml"
    path.write_text(yaml.safe_dump(demo_config(*ports), sort_keys=False))
    proxy = build(load_config(path))
    await start(proxy)
    print(f"""rollout-proxy demo (speed x{speed:g}), phase shadow: legacy serves, next_gen mirrored
  proxy:   http://127.0.0.1:{ports[2]}
  admin:   http://127.0.0.1:{ports[3]}/admin/status   metrics: http://127.0.0.1:{ports[3]}/metrics
  legacy:  http://127.0.0.1:{ports[0]}   next_gen: http://127.0.0.1:{ports[1]}
  config:  {path}   (edit it: the proxy reloads within 2 s)
  trace:   {directory / 'traces/comparisons.jsonl'}
try:
  curl -s -H 'X-User-Id: alice' -H 'Content-Type: application/json' \\
       -d '{{"task": "book a table"}}' http://127.0.0.1:{ports[2]}/v1/tasks
  rollout-proxy report {directory / 'traces/comparisons.jsonl'}
Ctrl-C stops.""", flush=True)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await stop(proxy)
    for runner in runners:
        await runner.cleanup()
    print("demo stopped", flush=True)


def run_demo(speed: float) -> int:
    import uvloop

    with tempfile.TemporaryDirectory(prefix="rollout-demo-") as directory:
        uvloop.run(demo(speed, Path(directory)))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="a simulated agent backend")
    parser.add_argument("--backend", choices=sorted(PROFILES), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--speed", type=float, default=10.0)
    args = parser.parse_args()
    web.run_app(backend_app(PROFILES[args.backend], args.speed), host=args.host, port=args.port,
                access_log=None, print=lambda *_: print(json.dumps(
                    {"event": "backend_up", "backend": args.backend, "port": args.port})))


if __name__ == "__main__":
    main()
