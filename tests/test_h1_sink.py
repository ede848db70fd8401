"""proxy.datapath.h1's Pool.fire: an answer handed to a Sink as it is parsed, no coroutine waiting.

Raw asyncio backends (tests.test_h1's RawBackend) script the exact bytes and pauses; the pool
talks to them over real sockets on 127.0.0.1. Nothing of the HTTP stack is mocked. Every test
checks the Sink contract: head at most once and before any chunk, nothing after `done`, and
`done` exactly once per fired request.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from multidict import CIMultiDict

from proxy.datapath import h1
from tests.test_h1 import Peer, RawBackend, Script, answer, pool_maker, raw_backends

TIMEOUT_S = 0.3  # the pools' timeout_s: short, so the file runs in a few seconds
PAUSE_S = 0.12  # a pause in an answer that must not trip TIMEOUT_S
Start = Callable[[Script], Awaitable[RawBackend]]
MakePool = Callable[..., h1.Pool]
Done = tuple[h1.Response | None, h1.WireError | None, bool]


# A recording sink --------------------------------------------------------------------------


class Recorder:
    """A Sink that records what it hears, in order, and every breach of the contract."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.heads: list[h1.Response] = []
        self.chunks: list[bytes] = []
        self.dones: list[Done] = []
        self.faults: list[str] = []
        self.taken = b""  # a body that came whole in one read: done() is given it
        self.changed = asyncio.Event()

    def _seen(self, what: str) -> None:
        if self.dones:
            self.faults.append(f"{what} after done")
        self.events.append(what)
        self.changed.set()

    def head(self, response: h1.Response) -> None:
        if self.heads:
            self.faults.append("a second head")
        self._seen("head")
        self.heads.append(response)

    def chunk(self, data: bytes) -> None:
        if not self.heads:
            self.faults.append("a chunk before the head")
        self._seen("chunk")
        self.chunks.append(data)

    def done(self, response: h1.Response | None, body: bytes | None,
             error: h1.WireError | None, retry: bool) -> None:
        if body is not None:
            self.taken = body
        self._seen("done")
        self.dones.append((response, error, retry))

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks) + self.taken

    async def wait(self, holds: Callable[[], object], within: float = 2.0) -> None:
        """Wait until `holds()`, woken by every callback the sink hears."""
        async with asyncio.timeout(within):
            while not holds():
                self.changed.clear()
                await self.changed.wait()

    async def ended(self, within: float = 2.0) -> Done:
        await self.wait(lambda: self.dones, within)
        return self.dones[0]

    def once(self) -> Done:
        """`done` came exactly once, and nothing broke the contract."""
        assert self.faults == []
        assert len(self.dones) == 1, self.events
        return self.dones[0]


async def body_is(sink: Recorder, expected: bytes) -> None:
    await sink.wait(lambda: sink.body == expected)


async def gone(conn: h1.Connection) -> None:
    """Wait until the connection's loss was handled (connection_lost ran): whatever the
    client would still tell a sink about it has been told."""
    async with asyncio.timeout(2.0):
        while conn.transport is not None or not conn.closed:  # noqa: ASYNC110
            await asyncio.sleep(0)  # one loop turn, not a delay


async def turns(count: int = 10) -> None:
    """A few loop turns: a late callback, if any, would have run."""
    for _ in range(count):
        await asyncio.sleep(0)


# Fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
async def raw() -> AsyncIterator[Start]:
    async with raw_backends() as start:
        yield start


@pytest.fixture
async def pools() -> AsyncIterator[MakePool]:
    async with pool_maker(TIMEOUT_S) as make:
        yield make


async def warmed(peer: Peer) -> bool:
    """Answer the connection's first request (the one that makes it idle in the pool)."""
    if not await peer.request():
        return False
    peer.send(answer(b"warm"))
    return True


async def idle_connection(pool: h1.Pool) -> h1.Connection:
    """One whole request through request(): its connection is left idle for fire()."""
    response = await pool.request("GET", "/warm", CIMultiDict(), None)
    assert await response.read() == b"warm"
    response.release()
    assert len(pool.idle) == 1
    return pool.idle[0]


def fire(pool: h1.Pool, sink: h1.Sink, target: str = "/fired", method: str = "GET",
         body: bytes | None = None) -> None:
    assert pool.fire(method, target, CIMultiDict(), body, sink)


def serve_after_warm(*script: bytes) -> Script:
    """Warm, then answer the next requests with `script` in turn, then keep the connection."""
    async def play(peer: Peer) -> None:
        if not await warmed(peer):
            return
        for data in script:
            if not await peer.request():
                return
            peer.send(data)
        await peer.client_gone()
    return play


async def silent_after_warm(peer: Peer) -> None:
    """Warm, then read the next request and never answer it (the backend still works on it)."""
    if await warmed(peer) and await peer.request():
        await peer.client_gone()


# A whole answer ----------------------------------------------------------------------------


async def test_an_answer_whole_in_one_read_is_taken_at_done_not_chunked(
        raw: Start, pools: MakePool) -> None:
    # Most mirrors' answers: head and body in one read; the sink hears head, then done.
    backend = await raw(serve_after_warm(answer(b'{"ok": true}', "Content-Type: application/json")))
    pool = pools(backend.port)
    conn = await idle_connection(pool)
    sink = Recorder()
    fire(pool, sink)
    response, error, retry = await sink.ended()
    assert (error, retry) == (None, False) and response is sink.heads[0]
    assert sink.events == ["head", "done"] and sink.chunks == []
    assert sink.taken == b'{"ok": true}'
    assert pool.idle == [conn]  # back in the pool before the sink heard done
    sink.once()


async def test_content_length_answer_reaches_the_sink_and_the_connection_serves_again(
        raw: Start, pools: MakePool) -> None:
    body = hashlib.shake_256(b"fired").digest(200_000)  # more than one read
    whole = answer(body, "X-Kind: cl", status="201 Created")
    backend = await raw(serve_after_warm(whole, whole))
    pool = pools(backend.port)
    conn = await idle_connection(pool)
    for n in (1, 2):
        sink = Recorder()
        fire(pool, sink, f"/fired/{n}")
        response, error, retry = await sink.ended()
        assert (error, retry) == (None, False)
        assert response is not None and response is sink.heads[0]
        assert (response.status, response.reason) == (201, "Created")
        assert response.headers["X-Kind"] == "cl"
        assert response.content_length == len(body)
        assert sink.events[0] == "head" and sink.events[-1] == "done"
        assert sink.events.count("chunk") == len(sink.chunks) >= 1
        assert sink.body == body
        assert pool.idle == [conn] and not conn.closed  # back in the pool, whole
        await turns()
        sink.once()
    assert backend.accepted == 1
    assert [r.split(b" ")[1] for r in backend.requests] == [b"/warm", b"/fired/1",
                                                            b"/fired/2"]


async def test_fire_sends_the_same_bytes_as_request(raw: Start, pools: MakePool) -> None:
    small = b'{"task": "summarise"}'
    large = hashlib.shake_256(b"large").digest(300_000)  # past the single-write size
    backend = await raw(serve_after_warm(answer(b"a"), answer(b"b"), answer(b"c")))
    pool = pools(backend.port)
    await idle_connection(pool)
    host = f"Host: 127.0.0.1:{backend.port}\r\n"
    for method, body, sent in [
            ("GET", None, f"GET /fired HTTP/1.1\r\n{host}\r\n".encode()),
            ("POST", small, f"POST /fired HTTP/1.1\r\n{host}Content-Length: {len(small)}"
                            "\r\n\r\n".encode() + small),
            ("PUT", large, f"PUT /fired HTTP/1.1\r\n{host}Content-Length: {len(large)}"
                           "\r\n\r\n".encode() + large)]:
        sink = Recorder()
        fire(pool, sink, method=method, body=body)
        _, error, _ = await sink.ended()
        assert error is None
        sink.once()
        assert backend.requests[-1] == sent
    assert backend.accepted == 1


async def test_fire_without_an_idle_connection_returns_false_and_sends_nothing(
        raw: Start, pools: MakePool) -> None:
    gate = asyncio.Event()

    async def play(peer: Peer) -> None:
        if not await peer.request():
            return
        peer.send(answer(b"warm")[:-1])  # its last byte waits: the connection is busy
        await gate.wait()
        peer.send(b"m")
        if await peer.request():
            peer.send(answer(b"fired"))
        await peer.client_gone()

    backend = await raw(play)
    pool = pools(backend.port)
    sink = Recorder()
    assert not pool.fire("GET", "/never", CIMultiDict(), None, sink)  # nothing connected
    busy = await pool.request("GET", "/warm", CIMultiDict(), None)
    assert not pool.fire("GET", "/never", CIMultiDict(), None, sink)  # the one is busy
    gate.set()
    assert await busy.read() == b"warm"
    busy.release()
    fired = Recorder()
    fire(pool, fired)
    _, error, _ = await fired.ended()
    assert error is None and fired.body == b"fired"
    fired.once()
    assert sink.events == []  # the refused fires never reach their sink
    assert backend.accepted == 1
    assert [r.split(b" ")[1] for r in backend.requests] == [b"/warm", b"/fired"]


async def test_fire_does_not_use_a_connection_idle_past_keepalive(
        raw: Start, pools: MakePool) -> None:
    backend = await raw(serve_after_warm())
    pool = pools(backend.port)
    conn = await idle_connection(pool)
    conn.idle_since -= pool.keepalive_s  # idle for as long as the backend keeps it
    sink = Recorder()
    assert not pool.fire("GET", "/never", CIMultiDict(), None, sink)
    assert conn.closed and not pool.idle
    await backend.wait(lambda: backend.gone == 1)
    assert len(backend.requests) == 1 and sink.events == []


async def test_chunked_answer_reaches_the_sink_piece_by_piece(
        raw: Start, pools: MakePool) -> None:
    pieces = [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n", b"data: 4\n\n"]
    go: asyncio.Queue[None] = asyncio.Queue()

    async def play(peer: Peer) -> None:
        await warmed(peer)
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in [*pieces, b""]:
            await go.get()
            await asyncio.sleep(PAUSE_S)  # the pause of a stream: quiet, under timeout_s
            peer.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        await peer.client_gone()

    backend = await raw(play)
    pool = pools(backend.port)
    conn = await idle_connection(pool)
    sink = Recorder()
    started = time.monotonic()
    fire(pool, sink)
    await sink.wait(lambda: sink.heads)
    for n in range(len(pieces)):
        go.put_nowait(None)
        await body_is(sink, b"".join(pieces[:n + 1]))  # this piece, before the next is sent
        assert not sink.dones
    go.put_nowait(None)
    response, error, retry = await sink.ended()
    assert time.monotonic() - started > TIMEOUT_S  # in all longer than timeout_s: not cut
    assert response is not None and response.headers["Transfer-Encoding"] == "chunked"
    assert (error, retry) == (None, False)
    assert sink.body == b"".join(pieces) and len(sink.chunks) >= len(pieces)
    assert pool.idle == [conn]
    await turns()
    sink.once()


async def test_answer_framed_by_close_ends_cleanly_at_the_close(
        raw: Start, pools: MakePool) -> None:
    async def play(peer: Peer) -> None:
        await warmed(peer)
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nno length, ")
        peer.send(b"no chunks")

    backend = await raw(play)
    pool = pools(backend.port)
    conn = await idle_connection(pool)
    sink = Recorder()
    fire(pool, sink)
    response, error, retry = await sink.ended()
    assert response is not None and (error, retry) == (None, False)
    assert sink.body == b"no length, no chunks"
    await gone(conn)
    sink.once()
    assert not pool.idle and not pool.open


async def test_informational_heads_do_not_reach_the_sink(raw: Start, pools: MakePool) -> None:
    early = (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
             b"HTTP/1.1 100 Continue\r\n\r\n")
    backend = await raw(serve_after_warm(early + answer(b"final", "X-Final: yes")))
    pool = pools(backend.port)
    conn = await idle_connection(pool)
    sink = Recorder()
    fire(pool, sink, method="POST", body=b"task")
    response, error, _ = await sink.ended()
    assert error is None and response is not None
    assert response.status == 200 and response.headers["X-Final"] == "yes"
    assert "Link" not in response.headers
    assert sink.body == b"final"
    assert pool.idle == [conn]
    await turns()
    sink.once()


async def test_head_via_fire_ends_at_its_head_and_the_connection_is_not_reused(
        raw: Start, pools: MakePool) -> None:
    async def play(peer: Peer) -> None:
        await warmed(peer)
        while request := await peer.request():
            if request.startswith(b"HEAD "):
                peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            else:
                peer.send(answer(b"after"))

    backend = await raw(play)
    pool = pools(backend.port, timeout_s=5.0)
    conn = await idle_connection(pool)
    sink = Recorder()
    fire(pool, sink, "/file", method="HEAD")
    response, error, retry = await sink.ended(within=1.0)  # far less than timeout_s
    assert response is not None and response.content_length == 1234
    assert (error, retry) == (None, False)
    assert sink.events == ["head", "done"]
    await gone(conn)  # llhttp cannot be told a HEAD answer has no body: never reused
    sink.once()
    response = await pool.request("GET", "/", CIMultiDict(), None)
    assert await response.read() == b"warm"  # a new connection's first answer
    response.release()
    assert backend.accepted == 2


async def test_large_body_goes_to_the_sink_without_pausing_the_connection(
        raw: Start, pools: MakePool) -> None:
    payload = hashlib.shake_256(b"rollout").digest(4 * 2**20)

    class Watcher(Recorder):
        """Also notes, at every piece, whether the connection was still being read."""

        def __init__(self) -> None:
            super().__init__()
            self.reading: list[bool] = []

        def chunk(self, data: bytes) -> None:
            response = self.heads[0]
            conn = response._conn
            transport = conn.transport if conn is not None else None
            self.reading.append(transport is not None and transport.is_reading()
                                and not response._paused and response._buffered == 0)
            super().chunk(data)

    async def play(peer: Peer) -> None:
        await warmed(peer)
        await peer.request()
        peer.send(f"HTTP/1.1 200 OK\r\nContent-Length: {len(payload)}\r\n\r\n".encode())
        for start in range(0, len(payload), 65536):
            peer.send(payload[start:start + 65536])
            await peer.writer.drain()
        await peer.client_gone()

    backend = await raw(play)
    pool = pools(backend.port, timeout_s=5.0)
    conn = await idle_connection(pool)
    sink = Watcher()
    fire(pool, sink)
    response, error, retry = await sink.ended(within=10.0)
    assert response is not None and (error, retry) == (None, False)
    assert len(sink.chunks) > 1
    assert all(sink.reading)  # never paused: nothing was buffered for a reader
    assert len(sink.body) == len(payload) and sink.body == payload
    assert pool.idle == [conn]
    await turns()
    sink.once()


async def test_done_may_fire_the_next_request_at_once(raw: Start, pools: MakePool) -> None:
    backend = await raw(serve_after_warm(answer(b"one"), answer(b"two")))
    pool = pools(backend.port)
    conn = await idle_connection(pool)
    second = Recorder()
    fired_again: list[bool] = []

    class Chain(Recorder):
        def done(self, response: h1.Response | None, body: bytes | None,
                 error: h1.WireError | None, retry: bool) -> None:
            super().done(response, body, error, retry)
            fired_again.append(pool.fire("GET", "/two", CIMultiDict(), None, second))

    first = Chain()
    fire(pool, first, "/one")
    await first.ended()
    assert fired_again == [True]  # the connection was back in the pool when done came
    _, error, _ = await second.ended()
    assert error is None and (first.body, second.body) == (b"one", b"two")
    assert pool.idle == [conn]
    await turns()
    first.once()
    second.once()
    assert backend.accepted == 1


async def test_a_request_waiting_for_the_limit_gets_the_connection_a_fired_answer_frees(
        raw: Start, pools: MakePool) -> None:
    go = asyncio.Event()

    async def play(peer: Peer) -> None:
        await warmed(peer)
        await peer.request()
        await go.wait()
        peer.send(answer(b"fired"))
        while await peer.request():
            peer.send(answer(b"waited"))

    backend = await raw(play)
    pool = pools(backend.port, limit=1, timeout_s=2.0)
    conn = await idle_connection(pool)
    sink = Recorder()
    fire(pool, sink)
    waiting = asyncio.ensure_future(pool.request("GET", "/waited", CIMultiDict(), None))
    async with asyncio.timeout(2.0):
        while not pool.waiters:  # noqa: ASYNC110 (no event shows the pool's own state)
            await asyncio.sleep(0)
    go.set()
    _, error, _ = await sink.ended()
    assert error is None
    response = await waiting
    assert await response.read() == b"waited"
    response.release()
    assert pool.idle == [conn]
    sink.once()
    assert backend.accepted == 1


# Timeouts ----------------------------------------------------------------------------------


async def test_no_head_within_timeout_is_a_timeout_and_the_connection_is_dropped(
        raw: Start, pools: MakePool) -> None:
    backend = await raw(silent_after_warm)
    pool = pools(backend.port)
    conn = await idle_connection(pool)
    sink = Recorder()
    started = time.monotonic()
    fire(pool, sink)
    response, error, retry = await sink.ended()
    waited = time.monotonic() - started
    assert response is None and error is not None
    assert (error.kind, retry) == ("timeout", False)
    assert TIMEOUT_S * 0.95 <= waited < TIMEOUT_S + 1.0
    assert sink.events == ["done"]
    await backend.wait(lambda: backend.gone == 1)  # the stalled connection was dropped
    await gone(conn)
    sink.once()
    assert not pool.idle and not pool.open
    assert not pool.fire("GET", "/", CIMultiDict(), None, Recorder())


async def test_body_stalled_past_timeout_is_a_timeout(raw: Start, pools: MakePool) -> None:
    async def play(peer: Peer) -> None:
        await warmed(peer)
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await peer.client_gone()

    backend = await raw(play)
    pool = pools(backend.port)
    conn = await idle_connection(pool)
    sink = Recorder()
    fire(pool, sink)
    await sink.wait(lambda: sink.chunks)
    stalled = time.monotonic()
    response, error, retry = await sink.ended()
    assert TIMEOUT_S * 0.95 <= time.monotonic() - stalled < TIMEOUT_S + 1.0
    assert response is sink.heads[0] and error is not None
    assert (error.kind, retry) == ("timeout", False)
    assert sink.body == b"abc"
    await backend.wait(lambda: backend.gone == 1)
    await gone(conn)
    sink.once()
    assert not pool.idle and not pool.open


async def test_body_trickling_longer_than_timeout_in_all_is_not_cut(
        raw: Start, pools: MakePool) -> None:
    body = b"trickle"

    async def play(peer: Peer) -> None:
        await warmed(peer)
        await peer.request()
        peer.send(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                  + body[:1])
        for byte in range(1, len(body)):
            await asyncio.sleep(PAUSE_S)  # each gap under timeout_s, all of them far over
            peer.send(body[byte:byte + 1])
        await peer.client_gone()

    backend = await raw(play)
    pool = pools(backend.port)
    conn = await idle_connection(pool)
    sink = Recorder()
    started = time.monotonic()
    fire(pool, sink)
    response, error, retry = await sink.ended(within=5.0)
    assert time.monotonic() - started > 2 * TIMEOUT_S
    assert response is not None and (error, retry) == (None, False)
    assert sink.body == body and len(sink.chunks) == len(body)
    assert pool.idle == [conn]
    await turns()
    sink.once()


async def test_a_stalled_fired_request_times_out_without_cutting_a_trickling_one(
        raw: Start, pools: MakePool) -> None:
    body = b"trickle"

    async def play(peer: Peer) -> None:
        await warmed(peer)
        request = await peer.request()
        if request.startswith(b"GET /stall "):
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        else:
            peer.send(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            for byte in range(len(body)):
                await asyncio.sleep(PAUSE_S)
                peer.send(body[byte:byte + 1])
        await peer.client_gone()

    backend = await raw(play)
    pool = pools(backend.port)
    warm = await asyncio.gather(*(pool.request("GET", "/warm", CIMultiDict(), None)
                                  for _ in range(2)))
    for response in warm:
        assert await response.read() == b"warm"
        response.release()
    assert len(pool.idle) == 2 and backend.accepted == 2
    stalled, trickling = Recorder(), Recorder()
    fire(pool, stalled, "/stall")
    fire(pool, trickling, "/trickle")
    cut, error, _ = await stalled.ended()
    assert cut is not None and error is not None and error.kind == "timeout"
    assert not trickling.dones  # the same pool's deadline did not touch the other answer
    whole, error, retry = await trickling.ended(within=5.0)
    assert whole is not None and (error, retry) == (None, False)
    assert trickling.body == body
    assert len(pool.idle) == 1 and len(pool.open) == 1
    await backend.wait(lambda: backend.gone == 1)
    await turns()
    stalled.once()
    trickling.once()


async def test_a_sink_firing_again_from_a_timeout_keeps_one_sweep(
        raw: Start, pools: MakePool) -> None:
    backend = await raw(silent_after_warm)
    pool = pools(backend.port)
    warm = await asyncio.gather(*(pool.request("GET", "/warm", CIMultiDict(), None)
                                  for _ in range(2)))
    for response in warm:
        assert await response.read() == b"warm"
        response.release()
    sweeps: list[float] = []
    sweep = pool.sweep

    def spy() -> None:  # passes through: only notes when the pool's sweep runs
        sweeps.append(asyncio.get_running_loop().time())
        sweep()

    pool.sweep = spy  # type: ignore[method-assign]
    again = Recorder()

    class Refire(Recorder):
        def done(self, response: h1.Response | None, body: bytes | None,
                 error: h1.WireError | None, retry: bool) -> None:
            super().done(response, body, error, retry)
            fire(pool, again, "/again")  # from inside the sweep that timed this one out

    first = Refire()
    fire(pool, first)
    await first.ended()
    await again.ended()
    first.once()
    again.once()
    gaps = [later - earlier for earlier, later in itertools.pairwise(sweeps)]
    assert gaps and min(gaps) >= pool.sweep_s / 2, gaps  # one chain: sweep_s apart


@pytest.mark.parametrize("how", ["request", "fire"])
async def test_a_late_head_leaves_the_body_a_whole_timeout(
        raw: Start, pools: MakePool, how: str) -> None:
    timeout_s = 0.4  # head at 0.25 s, body 0.25 s after it: both waits under timeout_s

    async def play(peer: Peer) -> None:
        await warmed(peer)
        await peer.request()
        await asyncio.sleep(0.25)
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        await asyncio.sleep(0.25)
        peer.send(b"body")
        await peer.client_gone()

    backend = await raw(play)
    pool = pools(backend.port, timeout_s=timeout_s)
    await idle_connection(pool)
    if how == "request":
        response = await pool.request("GET", "/", CIMultiDict(), None)
        assert await response.read() == b"body"
        response.release()
        return
    sink = Recorder()
    fire(pool, sink)
    _, error, _ = await sink.ended()
    sink.once()
    assert error is None, error
    assert sink.body == b"body"


# The connection breaks ---------------------------------------------------------------------


@pytest.mark.parametrize(("method", "body", "retry_expected"),
                         [("GET", None, True), ("POST", b"x", False)])
async def test_reused_connection_closed_unanswered_says_retry(
        raw: Start, pools: MakePool, method: str, body: bytes | None,
        retry_expected: bool) -> None:
    """As request() (rule 4): only an idempotent method may be sent again."""
    async def play(peer: Peer) -> None:
        await warmed(peer)
        await peer.request()  # the backend's idle timeout raced the reuse: closes, silent

    backend = await raw(play)
    pool = pools(backend.port, timeout_s=5.0)
    conn = await idle_connection(pool)
    sink = Recorder()
    fire(pool, sink, method=method, body=body)
    response, error, retry = await sink.ended()
    assert response is None and error is not None
    assert (error.kind, retry) == ("reset", retry_expected)
    assert sink.events == ["done"]
    await gone(conn)
    sink.once()
    assert not pool.idle and not pool.open
    assert len(backend.requests) == 2  # fire itself never sends again


async def test_reused_connection_closed_after_part_of_the_head_is_no_retry(
        raw: Start, pools: MakePool) -> None:
    async def play(peer: Peer) -> None:
        await warmed(peer)
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")  # then the backend dies

    backend = await raw(play)
    pool = pools(backend.port, timeout_s=5.0)
    conn = await idle_connection(pool)
    sink = Recorder()
    fire(pool, sink)
    response, error, retry = await sink.ended()
    assert response is None and error is not None
    assert (error.kind, retry) == ("reset", False)  # something came: the request ran
    await gone(conn)
    sink.once()


async def test_close_mid_body_is_truncated_and_the_connection_is_not_reused(
        raw: Start, pools: MakePool) -> None:
    async def play(peer: Peer) -> None:
        if not await warmed(peer):
            return
        if await peer.request() and peer.index == 1:
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            return  # closes, 90 bytes short
        await peer.client_gone()

    backend = await raw(play)
    pool = pools(backend.port, timeout_s=5.0)
    conn = await idle_connection(pool)
    sink = Recorder()
    fire(pool, sink)
    response, error, retry = await sink.ended()
    assert response is sink.heads[0] and error is not None
    assert (error.kind, retry) == ("truncated", False)
    assert sink.body == b"0123456789"
    await gone(conn)
    sink.once()
    assert not pool.idle
    await idle_connection(pool)  # the next request needs a new connection
    assert backend.accepted == 2


async def test_garbage_instead_of_a_head_is_a_bad_response(
        raw: Start, pools: MakePool) -> None:
    backend = await raw(serve_after_warm(b"SSH-2.0-OpenSSH_9.6\r\n"))
    pool = pools(backend.port, timeout_s=5.0)
    conn = await idle_connection(pool)
    sink = Recorder()
    fire(pool, sink)
    response, error, retry = await sink.ended()
    assert response is None and error is not None
    assert (error.kind, retry) == ("bad_response", False)
    await gone(conn)
    sink.once()
    assert not pool.open


async def test_a_head_past_max_head_bytes_is_head_too_large_and_the_sink_hears_it_once(
        raw: Start, pools: MakePool) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"X-A: " + b"a" * 5000 + b"\r\n" * 2
    backend = await raw(serve_after_warm(head))
    pool = pools(backend.port, timeout_s=5.0, max_head_bytes=4096)
    conn = await idle_connection(pool)
    sink = Recorder()
    fire(pool, sink)
    response, error, retry = await sink.ended()
    assert response is None and error is not None
    assert (error.kind, retry) == ("head_too_large", False)
    await gone(conn)
    sink.once()
    assert not pool.open


async def test_trailers_past_max_head_bytes_end_a_fired_answer_after_its_body(
        raw: Start, pools: MakePool) -> None:
    async def play(peer: Peer) -> None:
        if not await warmed(peer) or not await peer.request():
            return
        peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n")
        for _ in range(3):  # each its own read, after the last chunk's size line
            await sink.wait(lambda: sink.chunks)
            peer.send(b"X-T: " + b"t" * 3000 + b"\r\n")
            await peer.writer.drain()
            await turns()
        await peer.client_gone()

    sink = Recorder()
    backend = await raw(play)
    pool = pools(backend.port, timeout_s=5.0, max_head_bytes=4096)
    await idle_connection(pool)
    fire(pool, sink)
    response, error, _ = await sink.ended()
    assert sink.body == b"hello"
    assert response is not None and error is not None and error.kind == "head_too_large"
    sink.once()


# Sinks that fail ---------------------------------------------------------------------------


class Failing(Recorder):
    """Records, then raises from the callback named `where`."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def head(self, response: h1.Response) -> None:
        super().head(response)
        if self.where == "head":
            raise RuntimeError("sink broke in head")

    def chunk(self, data: bytes) -> None:
        super().chunk(data)
        if self.where == "chunk":
            raise RuntimeError("sink broke in chunk")

    def done(self, response: h1.Response | None, body: bytes | None,
             error: h1.WireError | None, retry: bool) -> None:
        super().done(response, body, error, retry)
        if self.where == "done":
            raise RuntimeError("sink broke in done")


async def test_sink_whose_done_raises_leaves_the_pool_working(
        raw: Start, pools: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    backend = await raw(serve_after_warm(answer(b"one"), answer(b"two")))
    pool = pools(backend.port)
    conn = await idle_connection(pool)
    broken = Failing("done")
    with caplog.at_level(logging.ERROR, logger="rollout_proxy"):
        fire(pool, broken)
        _, error, _ = await broken.ended()
    assert error is None and broken.body == b"one"
    assert any(record.exc_info is not None and "sink broke in done" in str(record.exc_info[1])
               for record in caplog.records)
    assert pool.idle == [conn]
    sink = Recorder()
    fire(pool, sink)
    _, error, _ = await sink.ended()
    assert error is None and sink.body == b"two"
    await turns()
    broken.once()
    sink.once()
    assert backend.accepted == 1


@pytest.mark.parametrize("where", ["head", "chunk"])
async def test_sink_raising_mid_answer_hears_done_once_and_the_connection_is_dropped(
        raw: Start, pools: MakePool, where: str) -> None:
    # An answer still streaming (a body that ends in its first read is never chunked).
    streaming = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n"
    backend = await raw(serve_after_warm(streaming))
    pool = pools(backend.port)
    conn = await idle_connection(pool)
    sink = Failing(where)
    fire(pool, sink)
    response, error, retry = await sink.ended()
    assert response is sink.heads[0] and error is not None and not retry
    await gone(conn)  # the rest of the answer was not read: the connection is not reused
    sink.once()
    await idle_connection(pool)
    assert backend.accepted == 2


# Closing the pool --------------------------------------------------------------------------


async def test_pool_close_while_a_fired_request_waits_for_its_head(
        raw: Start, pools: MakePool) -> None:
    backend = await raw(silent_after_warm)
    pool = pools(backend.port, timeout_s=5.0)
    conn = await idle_connection(pool)
    sink = Recorder()
    fire(pool, sink)
    await backend.wait(lambda: len(backend.requests) == 2)
    await pool.close()  # e.g. a config reload retires the pool
    response, error, _ = await sink.ended(within=1.0)  # far less than timeout_s
    assert response is None and error is not None
    await gone(conn)
    await turns()
    sink.once()


async def test_pool_close_mid_body_ends_the_answer_with_an_error(
        raw: Start, pools: MakePool) -> None:
    async def play(peer: Peer) -> None:
        await warmed(peer)
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n")
        await peer.client_gone()

    backend = await raw(play)
    pool = pools(backend.port, timeout_s=5.0)
    conn = await idle_connection(pool)
    sink = Recorder()
    fire(pool, sink, "/events")
    await body_is(sink, b"data: 1\n\n")
    await pool.close()
    response, error, retry = await sink.ended(within=1.0)
    assert response is sink.heads[0] and error is not None and not retry
    await gone(conn)
    await turns()
    sink.once()


async def test_pool_close_while_a_fired_request_waits_is_no_retry(
        raw: Start, pools: MakePool) -> None:
    backend = await raw(silent_after_warm)
    pool = pools(backend.port, timeout_s=5.0)
    conn = await idle_connection(pool)
    sink = Recorder()
    fire(pool, sink, method="POST", body=b'{"run": 1}')
    await backend.wait(lambda: len(backend.requests) == 2)
    await pool.close()
    _, error, retry = await sink.ended(within=1.0)
    await gone(conn)
    sink.once()
    assert error is not None
    assert not retry  # the backend closed nothing: the pool did
