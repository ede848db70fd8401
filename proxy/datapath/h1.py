"""A lean HTTP/1.1 client for the backends: a keep-alive pool and an llhttp parser.

Why not aiohttp's ClientSession: per request it builds a URL, a ClientRequest, a
ClientResponse, a StreamReader, timers and trace hooks. Profiled under `make bench` that was
the largest share of the proxy's time. Here a request is one write of bytes built from the
headers. The answer is parsed by httptools (llhttp, as in Node.js and uvicorn) straight into
the Response the handler reads.

Rules:
1. Bytes pass unchanged: no decompression, no cookies, no redirects, no headers of our own
   but Host and the framing (PITFALLS.md).
2. A connection goes back to the pool only when its answer was read whole and the backend
   keeps it alive. Anything else closes it: a timeout, a parse error, an unread body, HEAD.
3. At most HIGH_WATER bytes of an answer wait for the reader; past that the socket is not
   read (the backend feels the back-pressure).
4. A reused connection that the backend closed before any byte of the answer is retried
   once on a new one, for idempotent methods only: the backend's idle timeout raced our
   reuse and nothing ran.
5. Every wait is bounded: connecting by connect_timeout_s, a free connection, the answer's
   head and each piece of its body by timeout_s.
6. `Pool.fire` sends on an idle connection and hands the answer to a Sink as it is parsed,
   with no coroutine waiting for it (shadow mirrors: one per request). The Sink hears
   exactly once that the answer ended or failed; its callbacks run inside the parser.
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
import logging
import ssl
import time
from collections import deque
from typing import Any, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.datapath.transport import Meter, Sink, UpstreamError

HIGH_WATER = 256 * 1024
MAX_HEAD_BYTES = 64 * 1024  # limits.max_header_bytes' default (Envoy's is 60 KiB)
MAX_HEADER_LINES = 100  # Envoy's max_headers_count; aiohttp allows a request 128
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # an empty body still says Content-Length: 0
Headers = CIMultiDict[str] | CIMultiDictProxy[str]
log = logging.getLogger("rollout_proxy")


class WireError(UpstreamError):
    """kind: connect_error (nothing was sent), timeout, reset, bad_response, truncated,
    head_too_large (rule 7). The transport seam's one error (proxy/datapath/transport.py), so the
    data path above never needs to know this client."""


def _tell(sink: Sink, response: Response | None, error: WireError | None,
          retry: bool = False) -> None:
    try:  # inside the parser's callbacks: an error here must not break the connection
        sink.done(response, error, retry)
    except Exception:
        log.exception("an answer's sink failed")


def _expire(waiter: asyncio.Future[Any], timeout_s: float) -> None:
    if not waiter.done():  # the error is made only now: timers mostly never fire
        waiter.set_result(WireError("timeout", f"no answer within {timeout_s:g} s"))


def fresh(error: WireError) -> WireError:
    """A copy to raise. Futures and responses keep errors that are never raised themselves:
    a raised error's traceback holds the frames it passed, whose locals hold the future or
    the response, a cycle only the cyclic GC frees (seen as RSS growing in the soak)."""
    return WireError(error.kind, error.detail)


class Response:
    """An answer whose head has arrived; its body is read with read() or next_chunk()."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_paused", "_waiter", "content_length",
                 "done", "error", "headers", "keep_alive", "reason", "sink", "status",
                 "timeout_s")

    def __init__(self, conn: Connection, status: int, reason: str | None,
                 headers: CIMultiDictProxy[str], timeout_s: float) -> None:
        self._conn: Connection | None = conn
        self.status, self.reason, self.headers = status, reason, headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self.timeout_s = timeout_s
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.done = False
        self.keep_alive = False
        self.error: WireError | None = None
        self.sink: Sink | None = None  # set by Pool.fire: the body goes there, not to a reader

    # Fed by the connection -----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.sink is not None:
            if self._conn is not None:
                self._conn.last_data = time.monotonic()
            self.sink.chunk(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def finish(self, keep_alive: bool) -> None:
        if self.error is not None:  # cut before its end (e.g. the pool closed): stays an error
            return
        self.done, self.keep_alive = True, keep_alive
        if self._paused and self._conn is not None:  # whole: the connection may serve again
            self._paused = False
            self._conn.resume_reading()
        self._wake()
        if self.sink is not None:
            sink, self.sink = self.sink, None
            self.release()
            _tell(sink, self, None)

    def fail(self, error: WireError) -> None:
        if not self.done and self.error is None:
            self.error = error
            self._wake()
            if self.sink is not None:
                sink, self.sink = self.sink, None
                self.close()
                _tell(sink, self, error)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # Read by the handler -------------------------------------------------------------------

    async def next_chunk(self) -> bytes:
        """What has arrived of the body (b"" at its end); WireError if it cannot finish."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(
                    self._drain())
                self._buffered -= len(chunk) if self._chunks else self._buffered
                if self._paused and self._buffered < HIGH_WATER // 4 and self._conn:
                    self._paused = False
                    self._conn.resume_reading()
                return chunk
            if self.done:
                return b""
            if self.error is not None:
                raise fresh(self.error)
            await self._wait()

    def _drain(self) -> list[bytes]:
        chunks = list(self._chunks)
        self._chunks.clear()
        return chunks

    def take(self) -> bytes | None:
        """The whole body if the answer has already ended cleanly, else None (read it)."""
        if self.done and self.error is None:
            self._buffered = 0
            return b"".join(self._drain())
        return None

    async def read(self) -> bytes:
        body = self.take()
        if body is not None:
            return body
        parts = []
        while chunk := await self.next_chunk():
            parts.append(chunk)
        return b"".join(parts)

    async def _wait(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        timer = waiter.get_loop().call_later(self.timeout_s, self._expire)
        try:
            await waiter
        finally:
            timer.cancel()

    def _expire(self) -> None:
        self.fail(WireError("timeout", f"no part of the answer within {self.timeout_s:g} s"))

    def release(self) -> None:
        """Done with the answer: its connection is reused if the answer ended cleanly."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.unwatch()
        if self.done and self.keep_alive and self.error is None:
            conn.pool.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.unwatch()
            conn.close()


class Connection(asyncio.Protocol):
    """One keep-alive connection to a backend, answering one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.expecting = False  # a request was sent and its answer has not ended
        self.got_bytes = False
        self.head_only = False
        self.informational = False
        self.until_close = False
        self.waiter: asyncio.Future[Response | WireError] | None = None
        self.response: Response | None = None
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.sink: Sink | None = None  # Pool.fire's, until the answer's head comes
        self.last_data = 0.0  # with a sink: when the request went or the last piece came
        self.idempotent = False  # with a sink: may be sent again after a reset (rule 4)
        self.head_bytes = 0  # read since the request, until the final head ended (rule 7)
        self.header_lines = 0
        self.trailing = 0  # 1: a chunk's size line ended; 2: no body since (rule 7)
        self.trailer_bytes = 0
        self.refused: WireError | None = None  # why on_header stopped the parser
        self.pieces: list[bytes] = []  # the body found in the read being parsed (rule 8)

    # asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        meter = self.pool.meter
        if meter is None:
            self.received(data)
            return
        started = time.perf_counter()
        self.received(data)
        if not meter.spend(time.perf_counter() - started) and self.expecting \
                and not self.closed:
            self.failed(WireError("shed", "a mirror's answer took more than its share of "
                                  "the loop (shadow.max_loop_share)"))

    def received(self, data: bytes) -> None:
        if not self.expecting:  # nobody asked: a backend talking out of turn is not reused
            self.close()
            return
        self.got_bytes = True
        if self.response is None:  # the head: counted before the parser holds any of it
            if self.head_bytes + len(data) > self.pool.max_head_bytes:
                self.head_past_bound(data)
                return
            self.head_bytes += len(data)
        elif self.trailing:
            self.trailer(data)
            return
        self.feed(data)

    def feed(self, data: bytes | memoryview) -> bool:
        """Parse; False when the answer failed (and the connection was closed)."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.deliver()
            self.failed(WireError("bad_response", "the backend switched protocols unasked"))
        except httptools.HttpParserError as exc:
            self.deliver()  # what was parsed before the error still goes to the reader
            refused, self.refused = self.refused, None
            self.failed(refused or WireError(
                "bad_response" if self.response is None else "truncated",
                f"unparseable answer: {exc}"))
        else:
            if self.pieces:
                self.deliver()
            return True
        return False

    def head_past_bound(self, data: bytes) -> None:
        """This read goes past max_head_bytes: what fits is parsed, and the rest only if
        the head ended within it (it is a body that came with the head)."""
        limit = self.pool.max_head_bytes
        fits, view = limit - self.head_bytes, memoryview(data)
        self.head_bytes = limit
        if not self.feed(view[:fits]) or self.closed:
            return
        if self.response is None:
            self.failed(WireError("head_too_large", f"the answer head is over {limit} bytes "
                                  "(limits.max_header_bytes)"))
            return
        if self.trailing:
            self.trailer(view[fits:])
        else:
            self.feed(view[fits:])

    def trailer(self, data: bytes | memoryview) -> None:
        """A read that began after a chunk's size line: if neither body nor another chunk
        came of it, that was the last chunk and these bytes are its trailers (rule 7)."""
        self.trailing = 2  # on_body and on_chunk_header change it
        if not self.feed(data) or self.closed:
            return
        if self.trailing != 2:
            self.trailer_bytes = 0
            return
        self.trailer_bytes += len(data)
        if self.trailer_bytes > self.pool.max_head_bytes:
            self.failed(WireError("head_too_large", f"the answer's trailers are over "
                                  f"{self.pool.max_head_bytes} bytes (limits.max_header_bytes)"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        del self.parser  # it refers back to us: let reference counting free both
        self.transport = None
        response = self.response
        if response is not None and not response.done:
            if self.until_close and exc is None:
                response.finish(keep_alive=False)
            else:
                response.fail(WireError("truncated", "the backend closed the connection "
                                        "before the answer ended"))
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(WireError("reset", "the backend closed the connection"))
        elif self.sink is not None:
            self.sink_failed(WireError("reset", "the backend closed the connection"))

    # httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self.expecting:  # a second answer nobody asked for, in the same read
            self.close()
            return
        self.raw_headers, self.reason, self.header_lines = [], b"", 0

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:  # a trailer: never forwarded, so not kept either
            return
        self.header_lines += 1
        if self.header_lines > MAX_HEADER_LINES:
            self.refused = WireError("head_too_large", f"the answer head has over "
                                     f"{MAX_HEADER_LINES} header lines")
            raise WireError("head_too_large", "")  # stops the parser; feed() reports it
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if not self.expecting:
            return
        status = self.parser.get_status_code()
        self.informational = 100 <= status < 200
        if self.informational:  # 103 Early Hints and the like: the answer is still to come
            return
        headers = CIMultiDictProxy(CIMultiDict([
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in self.raw_headers]))
        reason = self.reason.decode("ascii") if self.reason.isascii() else None
        response = Response(self, status, reason, headers, self.pool.timeout_s)
        self.response = response
        if self.sink is not None:
            response.sink, self.sink = self.sink, None
            self.last_data = time.monotonic()  # the body gets a whole timeout_s from here
            response.sink.head(response)
        coding = headers.get("Transfer-Encoding", "").rsplit(",", 1)[-1].strip().lower()
        # RFC 9112 6.3: a response whose last transfer coding is not chunked ends at close.
        framed = coding == "chunked" or ("Content-Length" in headers and not coding)
        self.until_close = not framed and status not in (204, 304) and not self.head_only
        if self.head_only:  # llhttp cannot be told a HEAD answer has no body: do not reuse
            self.expecting = False
            response.finish(keep_alive=False)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_chunk_header(self) -> None:
        self.trailing = 1  # the next read begins the chunk's data, or its trailers if last

    def on_body(self, body: bytes) -> None:
        self.trailing = 0
        if self.expecting and self.response is not None and not self.response.done:
            self.pieces.append(body)

    def deliver(self) -> None:
        """The body pieces parsed so far go to the Response, joined (rule 8)."""
        pieces, response = self.pieces, self.response
        if not pieces:
            return
        self.pieces = []
        if response is not None and not response.done:
            response.feed(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def on_message_complete(self) -> None:
        if self.pieces:
            self.deliver()
        if (not self.expecting or self.informational or self.response is None
                or self.response.done):
            return
        self.expecting, self.trailing = False, 0
        self.response.finish(keep_alive=self.parser.should_keep_alive())

    # Used by the pool and the response -----------------------------------------------------

    async def send(self, head: bytes, body: bytes | None, head_only: bool) -> Response:
        if self.transport is None or self.closed:  # lost while handed from request to request
            self.got_bytes = False  # nothing of this request's answer: safe to retry
            raise WireError("reset", "the backend closed the connection")
        waiter: asyncio.Future[Response | WireError] = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        self.begin(head, body, head_only)
        timeout_s = self.pool.timeout_s
        timer = waiter.get_loop().call_later(timeout_s, _expire, waiter, timeout_s)
        try:
            outcome = await waiter
        finally:
            timer.cancel()
            self.waiter = None
        if isinstance(outcome, WireError):
            raise fresh(outcome)
        return outcome

    def begin(self, head: bytes, body: bytes | None, head_only: bool) -> None:
        """A new exchange: write the request (head and a small body in one write)."""
        assert self.transport is not None
        self.expecting, self.got_bytes, self.head_only = True, False, head_only
        self.response, self.head_bytes, self.trailing, self.trailer_bytes = None, 0, 0, 0
        if body and len(body) <= 65536:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            if body:
                self.transport.write(body)

    def start(self, head: bytes, body: bytes | None, head_only: bool, sink: Sink,
              idempotent: bool) -> None:
        """Send, and hand the answer to `sink` as it is parsed (Pool.fire)."""
        self.sink, self.idempotent = sink, idempotent
        self.begin(head, body, head_only)
        self.last_data = time.monotonic()
        self.pool.watch(self)

    def expire(self) -> None:
        """Pool.sweep found this sink's answer quiet for timeout_s."""
        what = "no answer" if self.response is None else "no part of the answer"
        self.failed(WireError("timeout", f"{what} within {self.pool.timeout_s:g} s"))

    def unwatch(self) -> None:
        self.pool.fired.pop(self, None)

    def sink_failed(self, error: WireError, ours: bool = False) -> None:
        """No head came: tell the sink once, and give the connection up. `ours`: we closed
        it (the pool closing), so the backend may have run the request: never a retry."""
        sink, self.sink = self.sink, None
        if sink is None:
            return
        self.unwatch()
        retry = (not ours and error.kind == "reset" and self.reused and not self.got_bytes
                 and self.idempotent)  # as request() retries (rule 4)
        self.close()
        _tell(sink, None, error, retry)

    def failed(self, error: WireError) -> None:
        if self.response is not None:
            self.response.fail(error)
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(error)
        elif self.sink is not None:
            self.sink_failed(error)
        self.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.response is not None and not self.response.done:
                self.response.fail(WireError("truncated", "the connection was closed before "
                                             "the answer ended"))
            elif self.sink is not None:
                self.sink_failed(WireError("reset", "the connection was closed before the "
                                           "answer came"), ours=True)
            if self.transport is not None:
                self.transport.abort()
            self.pool.forget(self)


class Pool:
    """Keep-alive connections to one backend, at most `limit` open at once (0: no limit)."""

    def __init__(self, host: str, port: int, *, limit: int, connect_timeout_s: float,
                 timeout_s: float, keepalive_s: float = 30.0,
                 tls: ssl.SSLContext | None = None,
                 max_head_bytes: int = MAX_HEAD_BYTES, meter: Meter | None = None) -> None:
        self.host, self.port, self.tls = host, port, tls
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
        head = self.head(method, target, headers, body, extra)
        head_only = method == "HEAD"
        for attempt in (1, 2):
            conn = await self.acquire()
            try:
                return await conn.send(head, body, head_only)
            except BaseException as exc:
                conn.close()
                if not (isinstance(exc, WireError) and exc.kind == "reset" and attempt == 1
                        and conn.reused and not conn.got_bytes and method in IDEMPOTENT):
                    raise
        raise AssertionError("not reached")

    def head(self, method: str, target: str, headers: Headers, body: bytes | None,
             extra: tuple[tuple[str, str], ...] = ()) -> bytes:
        # A Host among the headers (a backend's configured headers) replaces the URL's.
        host = "" if "Host" in headers else f"Host: {self.host_header}\r\n"
        lines = [f"{method} {target} HTTP/1.1\r\n{host}"]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        if extra:
            lines += [f"{name}: {value}\r\n" for name, value in extra]
        if body is not None or method in BODY_METHODS:
            lines.append(f"Content-Length: {len(body) if body else 0}\r\n")
        lines.append("\r\n")
        text = "".join(lines)
        breaks = len(lines) + (1 if host else 0)  # the first entry holds one or two lines
        if text.count("\n") != breaks or text.count("\r") != breaks:
            raise WireError("bad_request", "a header holds a line break")
        return text.encode("utf-8", "surrogateescape")

    def fire(self, method: str, target: str, headers: Headers, body: bytes | None, sink: Sink,
             extra: tuple[tuple[str, str], ...] = ()) -> bool:
        """Send on an idle connection; the answer goes to `sink` as it is parsed. False, with
        nothing sent, when no connection is idle (then use request())."""
        if not self.idle:
            return False
        head = self.head(method, target, headers, body, extra)
        conn = self.take_idle()
        if conn is None:
            return False
        conn.start(head, body, method == "HEAD", sink, method in IDEMPOTENT)
        return True

    def watch(self, conn: Connection) -> None:
        self.fired[conn] = None
        if self.sweeper is None:
            self.sweeper = asyncio.get_running_loop().call_later(self.sweep_s, self.sweep)

    def sweep(self) -> None:
        self.sweeper = None
        now, timeout_s = time.monotonic(), self.timeout_s
        for conn in [c for c in self.fired if now - c.last_data >= timeout_s]:
            conn.expire()
        if self.fired and self.sweeper is None:  # a sink may have fired again meanwhile
            self.sweeper = asyncio.get_running_loop().call_later(self.sweep_s, self.sweep)

    def take_idle(self) -> Connection | None:
        now = time.monotonic()
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
        now = time.monotonic()
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
