"""The transport seam: what the data path needs of an HTTP/1.1 client, and the one error it
raises. The server and the shadow speak to backends only through this (a Client, made for each
backend's pool by proxy.datapath.upstream); they never import an implementation.

Implementations: proxy.datapath.h1 (the lean client, the default) and
proxy.datapath.aiohttp_transport (aiohttp's client, to compare: `serve --transport aiohttp`).

Rule: every failure of a backend surfaces as UpstreamError, with `kind` naming why:
connect_error (nothing was sent), timeout, reset, bad_response, truncated, head_too_large,
and shed (a mirror's answer cut for taking more than its share of the loop: never the
backend's fault, never shown to a client).
"""

from __future__ import annotations

import ssl
from typing import ClassVar, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

Headers = CIMultiDict[str] | CIMultiDictProxy[str]


class UpstreamError(Exception):
    """A backend gave no usable answer. `kind` names why; `status` is what the client gets."""

    STATUS: ClassVar[dict[str, int]] = {"connect_error": 502, "timeout": 504, "reset": 502,
                                        "bad_request": 400, "bad_response": 502,
                                        "truncated": 502, "head_too_large": 502,
                                        "shed": 502}

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail

    @property
    def status(self) -> int:
        return self.STATUS.get(self.kind, 502)

    def named(self, backend: str) -> UpstreamError:
        """This error as the client is told it: which backend failed (raised by a Client)."""
        if self.kind == "timeout":
            return type(self)("timeout", f"no answer from {backend}: {self.detail}")
        return type(self)(self.kind, f"{backend}: {self.detail}")

    @property
    def sent(self) -> bool:
        """Whether the backend may have received the request (so a retry may repeat it)."""
        return self.kind != "connect_error"


class Answer(Protocol):
    """An answer whose head has arrived. Its body is `whole` when it had all come with the
    head (the answer is then done with: releasing or closing it changes nothing), else None;
    either way it can be read with read() or next_chunk() (UpstreamError if it cannot
    finish), then the answer is released or closed."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def whole(self) -> bytes | None: ...

    async def read(self) -> bytes: ...

    async def next_chunk(self) -> bytes: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


class Sink(Protocol):
    """Takes an answer as it is parsed (Client.fire): no task per request. head() comes
    first; chunk() gives the body as it arrives, except a body that arrived whole in one
    read: then done() is given it as `body` (None when it was chunked, or on an error)."""

    def head(self, response: Answer) -> None: ...

    def chunk(self, data: bytes) -> None: ...

    def done(self, response: Answer | None, body: bytes | None, error: UpstreamError | None,
             retry: bool) -> None: ...


class Meter(Protocol):
    """Told how long each read of a mirror's answer took (proxy/datapath/loopshare.py);
    False: cut that answer (UpstreamError "shed")."""

    def spend(self, seconds: float) -> bool: ...

    def connected(self) -> None:
        """A connection was made (or tried) for a mirror."""


class Client(Protocol):
    """One backend's connections for one purpose (the clients' traffic, or mirrors).

    Rules: an error leaves request() and fire() named for the backend (UpstreamError.named);
    a target is the client's path and query, sent after the backend URL's own path (the
    client's `prefix`); one that is not a path (origin-form) is refused as bad_request, so
    no request can name another host."""

    closed: bool
    max_head_bytes: int

    async def request(self, method: str, target: str, headers: Headers, body: bytes | None,
                      extra: tuple[tuple[str, str], ...] = ()) -> Answer: ...

    def fire(self, method: str, target: str, headers: Headers, body: bytes | None, sink: Sink,
             extra: tuple[tuple[str, str], ...] = ()) -> bool:
        """Send on an idle connection, the answer going to `sink`; False when this client
        cannot (none idle, or no such path): then use request()."""

    async def close(self) -> None: ...


class Transport(Protocol):
    """Makes the clients: what `build(config, transport=...)` is given."""

    name: str

    def client(self, host: str, port: int, *, name: str, prefix: str,
               tls: ssl.SSLContext | None, limit: int, connect_timeout_s: float,
               timeout_s: float, max_head_bytes: int, meter: Meter | None = None) -> Client:
        """`meter`, for the mirrors' clients: charged with the time each read takes (an
        implementation that cannot time its reads ignores it: aiohttp's, whose mirrors are
        then charged only for measuring what they read)."""
