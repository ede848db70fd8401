"""The least an aiohttp reverse proxy can do, as a yardstick for rollout-proxy's overhead.

One shared ClientSession, request and answer bodies buffered, hop-by-hop headers dropped,
no features. `python -m load.minimal_proxy --listen 127.0.0.1:P --upstream http://127.0.0.1:Q`
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from load.procs import raise_fd_limit

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-connection",
})
# Framing and the Host are set anew on each side.
NOT_COPIED = HOP_BY_HOP | {"content-length", "host", "expect"}

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def copied(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    named = {name.strip().lower() for value in headers.getall("Connection", [])
             for name in value.split(",")}
    drop = NOT_COPIED | named
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


async def forward(request: web.Request) -> web.Response:
    session, upstream = request.app[SESSION], request.app[UPSTREAM]
    body = await request.read()
    try:
        async with session.request(request.method, upstream + request.path_qs,
                                   headers=copied(request.headers), data=body or None,
                                   allow_redirects=False) as resp:
            payload = await resp.read()
            return web.Response(status=resp.status, reason=resp.reason, body=payload,
                                headers=copied(resp.headers))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return web.json_response({"error": type(exc).__name__}, status=502)


async def _session_context(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                     skip_auto_headers=("User-Agent", "Accept-Encoding")) as s:
        app[SESSION] = s
        yield


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session_context)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def serve(host: str, port: int, upstream: str) -> None:
    runner = web.AppRunner(make_app(upstream), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=8192).start()
        print(f"load.minimal_proxy http://{host}:{port} -> {upstream}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load.minimal_proxy", description=__doc__)
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--upstream", required=True, help="http://host:port")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    raise_fd_limit()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(host, int(port), args.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
