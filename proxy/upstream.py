"""Backend connection pools and the upstream half of forwarding.

Rules (PITFALLS.md): no decompression (bytes pass unchanged), no cookie jar (the pool is
shared by every user), no auto headers, no redirects followed; the client's errors become
UpstreamError at this boundary, with the status the client should get.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import ClassVar

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy import h1
from proxy.config import BackendConfig

SKIP_AUTO = frozenset({"Accept-Encoding", "User-Agent", "Content-Type"})


class UpstreamError(Exception):
    """A backend gave no usable answer. `kind` names why; `status` is what the client gets."""

    STATUS: ClassVar[dict[str, int]] = {"connect_error": 502, "timeout": 504, "reset": 502,
                                        "bad_request": 400, "bad_response": 502,
                                        "head_too_large": 502, "truncated": 502}

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail

    @property
    def status(self) -> int:
        return self.STATUS.get(self.kind, 502)

    @property
    def sent(self) -> bool:
        """Whether the backend may have received the request (so a retry may repeat it)."""
        return self.kind != "connect_error"


@dataclass(slots=True)
class Pool:
    """One backend's connections for one purpose (primary traffic or mirrors). HTTP goes
    through the lean client (proxy.h1); a WebSocket through aiohttp's, made on first use."""

    backend: BackendConfig
    client: h1.Pool
    timeout_s: float
    prefix: str = ""  # the backend URL's own path, put before every request's
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
              limit: int | None = None, max_head_bytes: int = h1.MAX_HEAD_BYTES) -> Pool:
    timeout_s = timeout_s or backend.timeout_s
    url = URL(backend.url)
    tls = ssl.create_default_context() if url.scheme == "https" else None
    client = h1.Pool(url.host or "127.0.0.1", url.port or (443 if tls else 80), tls=tls,
                     limit=limit or backend.max_connections,
                     connect_timeout_s=backend.connect_timeout_s, timeout_s=timeout_s,
                     max_head_bytes=max_head_bytes)
    return Pool(backend, client, timeout_s, url.raw_path.rstrip("/"))


async def send(pool: Pool, method: str, path_qs: str, headers: CIMultiDict[str],
               body: bytes | None, extra: tuple[tuple[str, str], ...] = ()) -> h1.Response:
    """Send a request and wait for the answer's head, within the backend's timeout."""
    try:
        return await pool.client.request(method, target(pool, path_qs), headers, body, extra)
    except h1.WireError as exc:
        raise upstream_error(exc, pool.backend.name) from exc


def fire(pool: Pool, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes | None,
         sink: h1.Sink, extra: tuple[tuple[str, str], ...] = ()) -> bool:
    """Send on an idle connection, the answer going to `sink` as it is parsed (h1.Pool.fire);
    False when none is idle (then use send())."""
    try:
        return pool.client.fire(method, target(pool, path_qs), headers, body, sink, extra)
    except h1.WireError as exc:
        raise upstream_error(exc, pool.backend.name) from exc


def target(pool: Pool, path_qs: str) -> str:
    """The request target on this backend (its URL's path prefix first)."""
    if not path_qs.startswith("/"):  # never let a target name another host
        raise UpstreamError("bad_request", f"refused request target {path_qs[:50]!r}")
    return pool.prefix + path_qs


def upstream_error(exc: h1.WireError, backend: str) -> UpstreamError:
    if exc.kind == "timeout":
        return UpstreamError("timeout", f"no answer from {backend}: {exc.detail}")
    return UpstreamError(exc.kind, f"{backend}: {exc.detail}")


def read_error(exc: h1.WireError, backend: str) -> UpstreamError:
    """An error while the body streams: the answer is incomplete."""
    if exc.kind == "timeout":
        return UpstreamError("timeout", f"{backend} stalled mid-answer")
    if exc.kind == "head_too_large":  # its trailers
        return UpstreamError(exc.kind, f"{backend}: {exc.detail}")
    return UpstreamError("truncated", f"{backend} ended the answer early: {exc.detail}")
