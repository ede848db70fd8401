"""Backend connection pools over a Transport (proxy/datapath/transport.py): h1 by default.
A request goes to `pool.client` (the seam), which puts the backend URL's path before it.

Rules (PITFALLS.md): no decompression (bytes pass unchanged), no cookie jar (the pool is
shared by every user), no auto headers, no redirects followed; a client's errors are
UpstreamError named for the backend, with the status the client should get.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import aiohttp
from yarl import URL

from proxy.config.model import BackendConfig
from proxy.datapath import h1
from proxy.datapath.transport import Client, Meter, Transport, UpstreamError

__all__ = ["H1", "Pool", "UpstreamError", "make_pool", "read_error", "transport_named"]

SKIP_AUTO = frozenset({"Accept-Encoding", "User-Agent", "Content-Type"})


class H1Transport:
    """The default transport: proxy.datapath.h1, the lean HTTP/1.1 client."""

    name = "h1"

    def client(self, host: str, port: int, *, name: str, prefix: str,
               tls: ssl.SSLContext | None, limit: int, connect_timeout_s: float,
               timeout_s: float, max_head_bytes: int, meter: Meter | None = None) -> h1.Pool:
        return h1.Pool(host, port, name=name, prefix=prefix, tls=tls, limit=limit,
                       connect_timeout_s=connect_timeout_s, timeout_s=timeout_s,
                       max_head_bytes=max_head_bytes, meter=meter)


H1 = H1Transport()


def transport_named(name: str) -> Transport:
    if name == "aiohttp":
        from proxy.datapath.aiohttp_transport import AiohttpTransport

        return AiohttpTransport()
    return H1


@dataclass(slots=True)
class Pool:
    """One backend's connections for one purpose (primary traffic or mirrors). HTTP goes
    through its transport's client (h1 by default); a WebSocket through aiohttp's, made on
    first use."""

    backend: BackendConfig
    client: Client
    timeout_s: float
    session: aiohttp.ClientSession | None = None

    @property
    def closed(self) -> bool:
        return self.client.closed

    def websockets(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=SKIP_AUTO,
                timeout=aiohttp.ClientTimeout(
                    # sock_read bounds the handshake; aiohttp lifts it for the frames.
                    total=None, sock_connect=self.backend.connect_timeout_s,
                    sock_read=self.timeout_s))
        return self.session

    async def close(self) -> None:
        await self.client.close()
        if self.session is not None:
            await self.session.close()


def make_pool(backend: BackendConfig, *, timeout_s: float | None = None,
              limit: int | None = None, max_head_bytes: int = h1.MAX_HEAD_BYTES,
              transport: Transport = H1, meter: Meter | None = None) -> Pool:
    timeout_s = timeout_s or backend.timeout_s
    url = URL(backend.url)
    tls = ssl.create_default_context() if url.scheme == "https" else None
    client = transport.client(url.host or "127.0.0.1", url.port or (443 if tls else 80),
                              name=backend.name, prefix=url.raw_path.rstrip("/"), tls=tls,
                              limit=limit or backend.max_connections,
                              connect_timeout_s=backend.connect_timeout_s,
                              timeout_s=timeout_s, max_head_bytes=max_head_bytes,
                              meter=meter)
    return Pool(backend, client, timeout_s)


def read_error(exc: UpstreamError, backend: str) -> UpstreamError:
    """An error while the body streams: the answer is incomplete."""
    if exc.kind == "timeout":
        return UpstreamError("timeout", f"{backend} stalled mid-answer")
    if exc.kind in ("head_too_large", "shed"):  # its trailers; cut by the proxy
        return UpstreamError(exc.kind, f"{backend}: {exc.detail}")
    return UpstreamError("truncated", f"{backend} ended the answer early: {exc.detail}")
