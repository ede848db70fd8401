"""The transport seam implemented with aiohttp's client: `serve --transport aiohttp`.

Kept to measure the lean client (proxy.datapath.h1) against (`make bench` runs both), and as a
fallback should h1 meet a backend it cannot talk to. It follows the same rules
(PITFALLS.md): no decompression, no cookie jar, no auto headers, no redirects; every error
leaves as UpstreamError. It has no fire(): mirrors go through request() as tasks.
"""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.datapath.transport import Headers, Meter, Sink, UpstreamError

SKIP_AUTO = frozenset({"Accept-Encoding", "User-Agent", "Content-Type"})


def upstream_error(exc: BaseException, where: str, reading: bool = False) -> UpstreamError:
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamError("timeout", f"{where}: no answer in time")
    if isinstance(exc, aiohttp.ClientConnectorError) and not reading:
        return UpstreamError("connect_error", f"{where}: {exc}")
    if isinstance(exc, aiohttp.ClientPayloadError) or reading:
        return UpstreamError("truncated", f"{where}: {exc}")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return UpstreamError("reset", f"{where}: {exc}")
    return UpstreamError("bad_response", f"{where}: {exc}")


class AiohttpAnswer:
    __slots__ = ("content_length", "headers", "reason", "response", "status", "where")
    whole = None  # never whole with its head here: the body is read as it comes

    def __init__(self, response: aiohttp.ClientResponse, where: str) -> None:
        self.response, self.where = response, where
        self.status, self.reason = response.status, response.reason
        self.headers = response.headers
        self.content_length = response.content_length

    async def read(self) -> bytes:
        try:
            return await self.response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise upstream_error(exc, self.where, reading=True) from exc

    async def next_chunk(self) -> bytes:
        try:
            return await self.response.content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise upstream_error(exc, self.where, reading=True) from exc

    def release(self) -> None:
        self.response.release()

    def close(self) -> None:
        self.response.close()


class AiohttpClient:
    def __init__(self, host: str, port: int, *, name: str, prefix: str,
                 tls: ssl.SSLContext | None, limit: int, connect_timeout_s: float,
                 timeout_s: float, max_head_bytes: int) -> None:
        self.name = name  # the backend's, in the errors request() raises
        self.base = f"{'https' if tls else 'http'}://{host}:{port}"
        self.prefix = prefix  # the backend URL's own path, put before every target
        self.tls, self.limit, self.max_head_bytes = tls, limit, max_head_bytes
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s,
                                             sock_read=timeout_s)
        self.session: aiohttp.ClientSession | None = None
        self.closed = False

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:  # made on first use: it needs the running loop
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.limit, ssl=self.tls or False),
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=SKIP_AUTO, timeout=self.timeout,
                max_field_size=self.max_head_bytes)
        return self.session

    async def request(self, method: str, target: str, headers: Headers, body: bytes | None,
                      extra: tuple[tuple[str, str], ...] = ()) -> AiohttpAnswer:
        if not target.startswith("/"):  # origin-form only: never let a target name a host
            raise UpstreamError("bad_request", f"refused request target {target[:50]!r}"
                                ).named(self.name)
        sent = CIMultiDict(headers)
        for name, value in extra:
            sent.add(name, value)
        try:
            response = await self._session().request(
                method, URL(self.base + self.prefix + target, encoded=True), headers=sent,
                data=body, allow_redirects=False, compress=None, chunked=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise upstream_error(exc, self.base).named(self.name) from exc
        return AiohttpAnswer(response, self.base)

    def fire(self, method: str, target: str, headers: Headers, body: bytes | None, sink: Sink,
             extra: tuple[tuple[str, str], ...] = ()) -> bool:
        return False

    async def close(self) -> None:
        self.closed = True
        if self.session is not None:
            await self.session.close()
            await asyncio.sleep(0)  # let the connector's transports close


class AiohttpTransport:
    name = "aiohttp"

    def client(self, host: str, port: int, *, name: str, prefix: str,
               tls: ssl.SSLContext | None, limit: int, connect_timeout_s: float,
               timeout_s: float, max_head_bytes: int,
               meter: Meter | None = None) -> AiohttpClient:
        # meter: aiohttp reads in its own protocol, which cannot be timed from here
        return AiohttpClient(host, port, name=name, prefix=prefix, tls=tls, limit=limit,
                             connect_timeout_s=connect_timeout_s, timeout_s=timeout_s,
                             max_head_bytes=max_head_bytes)
