"""Backend connection pools and the upstream half of forwarding.

Rules (PITFALLS.md): no decompression (bytes pass unchanged), no cookie jar (the pool is
shared by every user), no auto headers, no redirects followed; aiohttp's exceptions become
UpstreamError at this boundary, with the status the client should get.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from typing import ClassVar

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.config import BackendConfig

SKIP_AUTO = frozenset({"Accept-Encoding", "User-Agent", "Content-Type"})


class UpstreamError(Exception):
    """A backend gave no usable answer. `kind` names why; `status` is what the client gets."""

    STATUS: ClassVar[dict[str, int]] = {"connect_error": 502, "timeout": 504, "reset": 502,
                                        "bad_request": 400,
                                        "bad_response": 502, "truncated": 502}

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
    """One backend's connection pool for one purpose (primary traffic or mirrors)."""

    backend: BackendConfig
    session: aiohttp.ClientSession
    timeout_s: float

    async def close(self) -> None:
        await self.session.close()


def make_pool(backend: BackendConfig, *, timeout_s: float | None = None,
              limit: int | None = None) -> Pool:
    timeout_s = timeout_s or backend.timeout_s
    connector = aiohttp.TCPConnector(limit=limit or backend.max_connections, limit_per_host=0,
                                     keepalive_timeout=30, enable_cleanup_closed=False,
                                     ttl_dns_cache=60)
    session = aiohttp.ClientSession(
        connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=SKIP_AUTO, read_bufsize=2**16,
        # `connect` also covers waiting for a free pooled connection: under a burst that wait
        # is queueing, not a dead backend, so it gets the backend's whole timeout; only the
        # TCP connect itself is held to connect_timeout_s.
        timeout=aiohttp.ClientTimeout(total=None, connect=timeout_s,
                                      sock_connect=backend.connect_timeout_s,
                                      sock_read=timeout_s),
    )
    return Pool(backend, session, timeout_s)


async def send(pool: Pool, method: str, path_qs: str, headers: CIMultiDict[str],
               body: bytes | None) -> aiohttp.ClientResponse:
    """Send a request and wait for the answer's head, within the backend's timeout."""
    if not path_qs.startswith("/"):  # never let a target name another host
        raise UpstreamError("bad_request", f"refused request target {path_qs[:50]!r}")
    url = URL(pool.backend.url + path_qs, encoded=True)
    try:
        # The session's sock_read bounds the wait for the answer's head (first byte).
        # A fresh BytesIO per send: aiohttp streams it (bytes over 1 MiB warn of a blocked
        # loop), and a fallback replays the same bytes.
        data = io.BytesIO(body) if body is not None and len(body) > 2**20 else body
        return await pool.session.request(method, url, headers=headers, data=data,
                                          allow_redirects=False, compress=None)
    except aiohttp.ConnectionTimeoutError as exc:  # nothing reached the backend
        raise UpstreamError("connect_error", f"cannot connect to {pool.backend.name} within "
                            f"{pool.backend.connect_timeout_s:g} s") from exc
    except TimeoutError as exc:
        raise UpstreamError("timeout", f"no answer from {pool.backend.name} "
                            f"within {pool.timeout_s:g} s") from exc
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamError("connect_error", f"cannot connect to {pool.backend.name}: "
                            f"{exc.os_error.strerror or exc}") from exc
    except aiohttp.ServerDisconnectedError as exc:
        raise UpstreamError("reset", f"{pool.backend.name} closed the connection") from exc
    except aiohttp.ClientResponseError as exc:
        raise UpstreamError("bad_response", f"{pool.backend.name} sent an invalid answer: "
                            f"{exc.message}") from exc
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        raise UpstreamError("reset", f"{pool.backend.name}: {exc}") from exc


def read_error(exc: BaseException, backend: str) -> UpstreamError:
    """An error while the body streams: the answer is incomplete."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return UpstreamError("timeout", f"{backend} stalled mid-answer")
    return UpstreamError("truncated", f"{backend} ended the answer early: {exc}")
