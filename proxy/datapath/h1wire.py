"""One backend connection's HTTP/1.1: the answer's framing (llhttp through httptools) and the
connection's keep-alive state. The socket and pool layer is proxy/datapath/h1.py, whose rules
these follow (1, 3, 7, 8 and 9 are kept here, and a connection's part of 2 and 4 to 6). Time
is read from the pool's clock (`Pool.clock`), so a test can drive it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.datapath.transport import Sink, UpstreamError

if TYPE_CHECKING:
    from proxy.datapath.h1 import Pool

HIGH_WATER = 256 * 1024
MAX_HEAD_BYTES = 64 * 1024  # limits.max_header_bytes' default (Envoy's is 60 KiB)
MAX_HEADER_LINES = 100  # Envoy's max_headers_count; aiohttp allows a request 128
log = logging.getLogger("rollout_proxy")


class WireError(UpstreamError):
    """kind: connect_error (nothing was sent), timeout, reset, bad_response, truncated,
    head_too_large (rule 7). The transport seam's one error (proxy/datapath/transport.py), so the
    data path above never needs to know this client."""


def _tell(sink: Sink, response: Response | None, body: bytes | None,
          error: WireError | None, retry: bool = False) -> None:
    try:  # inside the parser's callbacks: an error here must not break the connection
        sink.done(response, body, error, retry)
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
    """An answer whose head has arrived; its body is `whole` when it came with the head,
    else read with read() or next_chunk()."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_paused", "_waiter", "content_length",
                 "done", "error", "headers", "keep_alive", "reason", "sink", "status",
                 "streamed", "timeout_s", "whole")

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
        self.streamed = False  # a piece of the body went to the sink (else done() is given it)
        self.whole: bytes | None = None  # the body, if it had ended when the head was handed

    # Fed by the connection -----------------------------------------------------------------

    def feed(self, data: bytes, last: bool = False) -> None:
        """A piece of the body; `last`: the answer ends with it."""
        if self.sink is not None:
            if last and not self.streamed:  # whole in one read: done() is given it
                self._chunks.append(data)
                return
            self.streamed = True
            if self._conn is not None:
                self._conn.last_data = self._conn.pool.clock()
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
            body = None if self.streamed else self._whole()
            self.release()
            _tell(sink, self, body, None)

    def fail(self, error: WireError) -> None:
        if not self.done and self.error is None:
            self.error = error
            self._wake()
            if self.sink is not None:
                sink, self.sink = self.sink, None
                self.close()
                _tell(sink, self, None, error)

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

    def handed(self) -> None:
        """The head goes to the reader (Connection.send): a body that has already ended
        cleanly (came with the head, most answers) becomes `whole`, still readable too, and
        the connection goes back to the pool at once, not when the reader is done."""
        if self.done and self.error is None:
            chunks = self._chunks
            if len(chunks) > 1:  # kept joined: `whole` and a reader share one piece
                whole = b"".join(chunks)
                chunks.clear()
                chunks.append(whole)
            self.whole = chunks[0] if chunks else b""
            self.release()

    def _whole(self) -> bytes | None:
        if self.done and self.error is None:
            self._buffered = 0
            return b"".join(self._drain())
        return None

    async def read(self) -> bytes:
        body = self._whole()
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
            self.last_data = self.pool.clock()  # the body gets a whole timeout_s from here
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

    def deliver(self, last: bool = False) -> None:
        """The body pieces parsed so far go to the Response, joined (rule 8); `last`: the
        answer ends with them."""
        pieces, response = self.pieces, self.response
        if not pieces:
            return
        self.pieces = []
        if response is not None and not response.done:
            response.feed(pieces[0] if len(pieces) == 1 else b"".join(pieces), last)

    def on_message_complete(self) -> None:
        if self.pieces:
            self.deliver(last=True)
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
        outcome.handed()
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
        self.last_data = self.pool.clock()  # Pool.fire then watches it for timeout_s

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
        _tell(sink, None, None, error, retry)

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


