"""A lean HTTP/1.1 client for the backends: the socket and keep-alive pool layer (here) over
one connection's framing and state (proxy/datapath/h1wire.py, llhttp through httptools).
Time is read from `Pool.clock` (time.monotonic unless a test injects one).

Why not aiohttp's ClientSession: per request it builds a URL, a ClientRequest, a
ClientResponse, a StreamReader, timers and trace hooks. Profiled under `make bench` that was
the largest share of the proxy's time. Here a request is one write of bytes built from the
headers. The answer is parsed by httptools (llhttp, as in Node.js and uvicorn) straight into
the Response the handler reads.

Rules:
1. Bytes pass unchanged: no decompression, no cookies, no redirects, no headers of our own
   but Host and the framing (PITFALLS.md).
2. A connection goes back to the pool only when its answer has ended cleanly and the backend
   keeps it alive: when the reader is done with it, or, for a body that came with its head
   (`Response.whole`), as the head is handed over. Anything else closes it: a timeout, a
   parse error, an unread body, HEAD.
3. At most HIGH_WATER bytes of an answer wait for the reader; past that the socket is not
   read (the backend feels the back-pressure).
4. A reused connection that the backend closed before any byte of the answer is retried
   once on a new one, for idempotent methods only: the backend's idle timeout raced our
   reuse and nothing ran.
5. Every wait is bounded: connecting by connect_timeout_s, a free connection, the answer's
   head and each piece of its body by timeout_s.
6. `Pool.fire` sends on an idle connection and hands the answer to a Sink as it is parsed,
   with no coroutine waiting for it (shadow mirrors: one per request). The Sink hears
   exactly once that the answer ended or failed; its callbacks run inside the parser. A
   body that ends in the read it began in (most answers) is not chunked to the Sink: done()
   is given it whole, one call instead of one per piece.
   Its head and the quiet between body pieces are bounded by timeout_s, checked by one
   sweep per pool every timeout_s / 8 (at most 1 s), not by a timer per request.
7. An answer's head is bounded: at most `max_head_bytes` from the request until the final
   head has ended (informational heads and the status line included) and MAX_HEADER_LINES
   header lines, and its trailer section at most `max_head_bytes` too. Past that the
   connection is closed and the answer fails as "head_too_large": the bytes are counted
   before the parser sees them, since httptools joins a header value's pieces as they come
   (an endless value would grow, quadratically, until timeout_s).
8. The body pieces llhttp finds in one read (a chunked answer's chunks) reach the Response
   as one piece, after the read is parsed: bytes that came together leave together, and a
   stream of small chunks costs one call per read, not one per chunk.
9. A pool with a `meter` (the mirrors', proxy/datapath/loopshare.py) times every read of an
   answer and tells the meter, and tells it of every connection made; when the meter says
   so, the answer being read is cut ("shed").
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.datapath.h1wire import (
    HIGH_WATER,
    MAX_HEAD_BYTES,
    MAX_HEADER_LINES,
    Connection,
    Response,
    WireError,
)
from proxy.datapath.transport import Meter, Sink

__all__ = ["BODY_METHODS", "HIGH_WATER", "IDEMPOTENT", "MAX_HEADER_LINES", "MAX_HEAD_BYTES",
           "Connection", "Pool", "Response", "WireError"]

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # an empty body still says Content-Length: 0
Headers = CIMultiDict[str] | CIMultiDictProxy[str]


class Pool:
    """Keep-alive connections to one backend, at most `limit` open at once (0: no limit)."""

    def __init__(self, host: str, port: int, *, limit: int, connect_timeout_s: float,
                 timeout_s: float, name: str = "", prefix: str = "",
                 keepalive_s: float = 30.0,
                 tls: ssl.SSLContext | None = None,
                 max_head_bytes: int = MAX_HEAD_BYTES, meter: Meter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.name = name or host  # the backend's, in the errors request() and fire() raise
        self.prefix = prefix  # the backend URL's own path, put before every target
        self.clock = clock  # every deadline and idle age is read from it
        self.meter = meter  # rule 9
        self.max_head_bytes = max_head_bytes  # rule 7; set again when the config changes
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal
        self.host_header = name if port == (443 if tls else 80) else f"{name}:{port}"
        self.limit, self.connect_timeout_s, self.timeout_s = limit, connect_timeout_s, timeout_s
        self.keepalive_s = keepalive_s
        self.idle: list[Connection] = []
        self.open: set[Connection] = set()
        self.connecting = 0
        self.waiters: deque[asyncio.Future[Connection | None]] = deque()
        self.closed = False
        # Pool.fire's requests, bounded by one sweep every sweep_s instead of a timer each
        # (a timeout strikes between timeout_s and timeout_s + sweep_s).
        self.fired: dict[Connection, None] = {}
        self.sweeper: asyncio.TimerHandle | None = None
        self.sweep_s = min(1.0, max(0.005, timeout_s / 8))

    async def request(self, method: str, target: str, headers: Headers, body: bytes | None,
                      extra: tuple[tuple[str, str], ...] = ()) -> Response:
        """Send, and wait for the answer's head. `extra` headers go after `headers` (the
        caller makes sure no name is in both)."""
        try:
            head = self.head(method, target, headers, body, extra)
            head_only = method == "HEAD"
            for attempt in (1, 2):
                conn = await self.acquire()
                try:
                    return await conn.send(head, body, head_only)
                except BaseException as exc:
                    conn.close()
                    if not (isinstance(exc, WireError) and exc.kind == "reset"
                            and attempt == 1 and conn.reused and not conn.got_bytes
                            and method in IDEMPOTENT):
                        raise
            raise AssertionError("not reached")
        except WireError as exc:
            raise exc.named(self.name) from exc

    def head(self, method: str, target: str, headers: Headers, body: bytes | None,
             extra: tuple[tuple[str, str], ...] = ()) -> bytes:
        if not target.startswith("/"):  # origin-form only: never let a target name a host
            raise WireError("bad_request", f"refused request target {target[:50]!r}")
        # A Host among the headers (a backend's configured headers) replaces the URL's.
        host = "" if "Host" in headers else f"Host: {self.host_header}\r\n"
        # "name: value" joined in C (map over str.join), not by a Python loop per header.
        fields = list(map(": ".join, headers.items()))
        if extra:
            fields += map(": ".join, extra)
        if body is not None or method in BODY_METHODS:
            fields.append(f"Content-Length: {len(body) if body else 0}")
        start = f"{method} {self.prefix}{target} HTTP/1.1\r\n{host}"
        text = start + "\r\n".join(fields) + "\r\n\r\n" if fields else start + "\r\n"
        # One line break per field, the request line, the Host line and the blank line.
        breaks = len(fields) + 2 + (1 if host else 0)
        if text.count("\n") != breaks or text.count("\r") != breaks:
            raise WireError("bad_request", "a header holds a line break")
        return text.encode("utf-8", "surrogateescape")

    def fire(self, method: str, target: str, headers: Headers, body: bytes | None, sink: Sink,
             extra: tuple[tuple[str, str], ...] = ()) -> bool:
        """Send on an idle connection; the answer goes to `sink` as it is parsed. False, with
        nothing sent, when no connection is idle (then use request())."""
        if not self.idle:
            return False
        try:
            head = self.head(method, target, headers, body, extra)
        except WireError as exc:
            raise exc.named(self.name) from exc
        conn = self.take_idle()
        if conn is None:
            return False
        conn.start(head, body, method == "HEAD", sink, method in IDEMPOTENT)
        self.watch(conn)  # its timeout: one sweep for all fired connections
        return True

    def watch(self, conn: Connection) -> None:
        self.fired[conn] = None
        if self.sweeper is None:
            self.sweeper = asyncio.get_running_loop().call_later(self.sweep_s, self.sweep)

    def sweep(self) -> None:
        self.sweeper = None
        now, timeout_s = self.clock(), self.timeout_s
        for conn in [c for c in self.fired if now - c.last_data >= timeout_s]:
            conn.expire()
        if self.fired and self.sweeper is None:  # a sink may have fired again meanwhile
            self.sweeper = asyncio.get_running_loop().call_later(self.sweep_s, self.sweep)

    def take_idle(self) -> Connection | None:
        now = self.clock()
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_s:
                conn.reused = True
                return conn
            conn.close()
        return None

    async def acquire(self) -> Connection:
        conn = self.take_idle()
        if conn is not None:
            return conn
        if self.closed:
            raise WireError("connect_error", "the pool is closed")
        if self.limit and len(self.open) + self.connecting >= self.limit:
            given = await self.wait_turn()
            if given is not None:
                return given
            return await self.connect(reserved=True)  # wake() held a slot for us
        return await self.connect()

    async def wait_turn(self) -> Connection | None:
        """Wait for a connection handed back, or a slot held for us (None), within
        timeout_s."""
        waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await waiter
        except BaseException as exc:
            handed = waiter.done() and not waiter.cancelled() and waiter.exception() is None
            if isinstance(exc, TimeoutError):
                if handed:  # handed over as the deadline struck: take it
                    return waiter.result()
                raise WireError("connect_error", f"no free connection within "
                                f"{self.timeout_s:g} s (backend max_connections is "
                                f"{self.limit})") from None
            if handed:  # cancelled with something in hand: give it on
                given = waiter.result()
                if given is not None:
                    self.put(given)
                else:
                    self.connecting -= 1
                    self.wake()
            raise
        finally:
            if not waiter.done():
                waiter.cancel()

    async def connect(self, reserved: bool = False) -> Connection:
        loop = asyncio.get_running_loop()
        if not reserved:
            self.connecting += 1
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: Connection(self), self.host, self.port, ssl=self.tls,
                    server_hostname=self.host if self.tls else None)
        except TimeoutError:
            raise WireError("connect_error",
                            f"cannot connect within {self.connect_timeout_s:g} s") from None
        except OSError as exc:
            raise WireError("connect_error", f"cannot connect: {exc.strerror or exc}") from exc
        finally:
            self.connecting -= 1
            if self.meter is not None:  # rule 9: a connection costs the loop too
                self.meter.connected()
        if self.closed:
            conn.close()
            raise WireError("connect_error", "the pool is closed")
        self.open.add(conn)
        return conn

    def put(self, conn: Connection) -> None:
        """A connection whose answer ended cleanly: to a waiting request, else idle."""
        if conn.closed or self.closed:
            conn.close()
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                conn.reused = True
                waiter.set_result(conn)
                return
        now = self.clock()
        conn.idle_since = now
        self.idle.append(conn)
        oldest = self.idle[0]
        if now - oldest.idle_since >= self.keepalive_s:
            oldest.close()

    def forget(self, conn: Connection) -> None:
        """A connection closed: its slot is free for a waiting request."""
        self.fired.pop(conn, None)
        if conn in self.open:
            self.open.discard(conn)
            if conn in self.idle:
                self.idle.remove(conn)
            self.wake()

    def wake(self) -> None:
        """A slot is free: hold it for the first waiting request (counted as connecting, so
        a request arriving meanwhile cannot take it too)."""
        while self.waiters and not self.closed:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.connecting += 1
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self.closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        while self.waiters:  # first: a slot freed below must not become a new connection
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(WireError("connect_error", "the pool is closed"))
        for conn in list(self.open):
            conn.close()
        self.idle.clear()
