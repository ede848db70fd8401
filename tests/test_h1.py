"""proxy.datapath.h1, the lean HTTP/1.1 client, against real servers on 127.0.0.1 (and once
through the real proxy, for its connection limit).

Raw asyncio servers write exact bytes where a test needs a backend that misbehaves at the
byte level; aiohttp servers play the well-behaved ones. Nothing of the HTTP stack is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.config.model import BackendConfig
from proxy.datapath import h1, upstream
from tests.conftest import Backend, config_dict, free_port, running, serve_app

READ_SIZE = 256 * 1024  # what asyncio's socket transport reads at once (its max_size)


# A raw backend -----------------------------------------------------------------------------


@dataclass
class Peer:
    """One accepted connection, seen from the backend."""

    backend: RawBackend
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    index: int  # 1 for the first connection the backend accepted

    async def request(self) -> bytes:
        """The next request's exact bytes (head and Content-Length body); b"" at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length: *(\d+)\r$", head)
            body = await self.reader.readexactly(int(length[1])) if length else b""
        except (asyncio.IncompleteReadError, ConnectionError):
            return b""
        self.backend.requests.append(head + body)
        self.backend.changed.set()
        return head + body

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def client_gone(self) -> None:
        """Wait until the client closes this connection (whatever it still sends)."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass
        self.backend.gone += 1
        self.backend.changed.set()


Script = Callable[[Peer], Awaitable[None]]


class RawBackend:
    """An asyncio server running `script` on every connection; counts what it saw."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.accepted = 0
        self.gone = 0
        self.requests: list[bytes] = []
        self.changed = asyncio.Event()
        self.handlers: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.accepted += 1
        self.changed.set()
        try:
            await self.script(Peer(self, reader, writer, self.accepted))
        except asyncio.CancelledError:
            # stop() ends a script still waiting. The handler ends normally: asyncio 3.11's
            # stream callback would log a cancelled handler task as an error.
            pass
        finally:
            writer.close()
            self.handlers.discard(task)

    async def wait(self, holds: Callable[[], bool], within: float = 2.0) -> None:
        """Wait until `holds()` is true, woken by every connection and request seen."""
        async with asyncio.timeout(within):
            while not holds():
                self.changed.clear()
                await self.changed.wait()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()


def answer(body: bytes = b"", *head: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", *head]
    if not any(line.lower().startswith(("content-length", "transfer-encoding"))
               for line in head):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def answers(*script: bytes) -> Script:
    """Keep the connection and answer its requests in turn; every connection plays the
    whole list from its start."""
    async def play(peer: Peer) -> None:
        for data in script:
            if not await peer.request():
                return
            peer.send(data)
        await peer.client_gone()
    return play


def always(data: bytes) -> Script:
    """Answer every request on the connection with the same bytes, keeping it alive."""
    async def play(peer: Peer) -> None:
        while await peer.request():
            peer.send(data)
    return play


def held(data: bytes, gate: asyncio.Event) -> Script:
    """As always(data), but the first answer's last byte waits for `gate`: until then that
    answer has not ended, so its connection stays busy (an answer whole with its head gives
    its connection back at once)."""
    async def play(peer: Peer) -> None:
        if not await peer.request():
            return
        peer.send(data[:-1])
        await gate.wait()
        peer.send(data[-1:])
        while await peer.request():
            peer.send(data)
    return play


# Fixtures and helpers ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_backends() -> AsyncIterator[Callable[[Script], Awaitable[RawBackend]]]:
    """Start RawBackends playing scripts; all stopped on the way out."""
    made: list[RawBackend] = []

    async def start(script: Script) -> RawBackend:
        backend = RawBackend(script)
        await backend.start()
        made.append(backend)
        return backend

    try:
        yield start
    finally:
        for backend in made:
            await backend.stop()


@contextlib.asynccontextmanager
async def pool_maker(default_timeout_s: float) -> AsyncIterator[Callable[..., h1.Pool]]:
    """Make pools to 127.0.0.1 ports; all closed on the way out."""
    made: list[h1.Pool] = []

    def make(port: int, *, limit: int = 0, timeout_s: float = default_timeout_s,
             max_head_bytes: int = h1.MAX_HEAD_BYTES) -> h1.Pool:
        pool = h1.Pool("127.0.0.1", port, limit=limit, connect_timeout_s=1.0,
                       timeout_s=timeout_s, max_head_bytes=max_head_bytes)
        made.append(pool)
        return pool

    try:
        yield make
    finally:
        for pool in made:
            await pool.close()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Script], Awaitable[RawBackend]]]:
    async with raw_backends() as start:
        yield start


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., h1.Pool]]:
    async with pool_maker(2.0) as make:
        yield make


async def fetch(pool: h1.Pool, target: str = "/", method: str = "GET",
                body: bytes | None = None) -> tuple[h1.Response, bytes]:
    """One whole request: the answer (released) and its body."""
    response = await pool.request(method, target, CIMultiDict(), body)
    try:
        return response, await response.read()
    finally:
        response.release()


async def until(holds: Callable[[], object], within: float = 2.0) -> None:
    """Yield to the loop until the client's own state shows `holds` (no event exposes it).
    Each turn runs pending I/O; nothing waits on the clock but the deadline."""
    async with asyncio.timeout(within):
        while not holds():  # noqa: ASYNC110 (no event exists for the pool's own state)
            await asyncio.sleep(0)  # one loop turn, not a delay


async def aiohttp_backend(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner, url = await serve_app(app)
    return runner, int(url.rsplit(":", 1)[1])


# How an answer is framed -------------------------------------------------------------------


async def test_content_length_answer_arrives_whole_with_its_head(
        pools: Callable[..., h1.Pool]) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=201, reason="Made", body=b"x" * 5000,
                            headers={"X-Kind": "cl"})

    runner, port = await aiohttp_backend(handler)
    try:
        response, body = await fetch(pools(port))
    finally:
        await runner.cleanup()
    assert (response.status, response.reason) == (201, "Made")
    assert response.headers["X-Kind"] == "cl"
    assert response.content_length == 5000
    assert body == b"x" * 5000


async def test_chunked_answer_streams_each_piece_as_it_comes(
        pools: Callable[..., h1.Pool]) -> None:
    more = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = web.StreamResponse()
        stream.enable_chunked_encoding()
        await stream.prepare(request)
        await stream.write(b"data: 1\n\n")
        await more.wait()
        await stream.write(b"data: 2\n\n")
        await stream.write_eof()
        return stream

    runner, port = await aiohttp_backend(handler)
    try:
        response = await pools(port).request("GET", "/events", CIMultiDict(), None)
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert response.content_length is None
        assert await response.next_chunk() == b"data: 1\n\n"  # before the backend ends
        more.set()
        assert await response.read() == b"data: 2\n\n"
        assert response.keep_alive
        response.release()
    finally:
        await runner.cleanup()


async def test_answer_framed_by_close_ends_at_the_backends_close(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    async def play(peer: Peer) -> None:
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nno length, ")
        peer.send(b"no chunks")

    backend = await raw(play)
    pool = pools(backend.port)
    response, body = await fetch(pool)
    assert body == b"no length, no chunks"
    assert not response.keep_alive
    await fetch(pool)  # the next request needs a new connection
    assert backend.accepted == 2


async def test_a_body_that_came_with_its_head_gives_its_connection_back_at_once(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    # The handler's small-answer path uses `whole` and never calls release().
    backend = await raw(always(answer(b"small")))
    pool = pools(backend.port)
    for _ in range(3):
        response = await pool.request("GET", "/", CIMultiDict(), None)
        assert response.whole == b"small"
        assert len(pool.idle) == 1  # back in the pool before any release()
        assert await response.read() == b"small"  # and still readable as a stream
    assert backend.accepted == 1


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
async def test_no_body_statuses_end_at_their_head_and_keep_the_connection(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool], status: str) -> None:
    # A 304 may carry the Content-Length of the representation it stands for: no body follows.
    length = "Content-Length: 7" if status.startswith("304") else "X-Empty: yes"
    backend = await raw(always(answer(b"", length, status=status)))
    pool = pools(backend.port, timeout_s=0.5)
    for _ in range(2):
        response, body = await fetch(pool)
        assert (response.status, body) == (int(status[:3]), b"")
    assert backend.accepted == 1


async def test_head_answer_reads_no_body_and_its_connection_is_not_reused(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    async def play(peer: Peer) -> None:
        while request := await peer.request():
            if request.startswith(b"HEAD "):
                peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            else:
                peer.send(answer(b"after"))

    backend = await raw(play)
    pool = pools(backend.port, timeout_s=5.0)
    response = await pool.request("HEAD", "/file", CIMultiDict(), None)
    assert response.content_length == 1234
    async with asyncio.timeout(0.5):  # far less than timeout_s: no body is awaited
        assert await response.read() == b""
    response.release()
    _, body = await fetch(pool)
    assert body == b"after"
    assert backend.accepted == 2


async def test_informational_heads_are_skipped_for_the_real_answer(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    early = (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
             b"HTTP/1.1 100 Continue\r\n\r\n")
    backend = await raw(always(early + answer(b"final", "X-Final: yes")))
    pool = pools(backend.port)
    for _ in range(2):
        response, body = await fetch(pool, method="POST", body=b"task")
        assert (response.status, body) == (200, b"final")
        assert response.headers["X-Final"] == "yes"
        assert "Link" not in response.headers
    assert backend.accepted == 1


# Keep-alive --------------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    backend = await raw(always(answer(b"ok")))
    pool = pools(backend.port)
    for target in ("/one", "/two", "/three"):
        _, body = await fetch(pool, target)
        assert body == b"ok"
    assert backend.accepted == 1
    assert [r.split(b" ")[1] for r in backend.requests] == [b"/one", b"/two", b"/three"]


async def test_a_connection_idle_past_keepalive_s_by_the_pools_clock_is_not_reused(
        raw: Callable[[Script], Awaitable[RawBackend]]) -> None:
    """The pool reads time from its injected clock: 29 s idle is reused, 31 s is not."""
    backend = await raw(always(answer(b"ok")))
    now = [1000.0]
    pool = h1.Pool("127.0.0.1", backend.port, limit=0, connect_timeout_s=1.0, timeout_s=2.0,
                   keepalive_s=30.0, clock=lambda: now[0])
    try:
        await fetch(pool)
        now[0] += 29
        await fetch(pool)
        assert backend.accepted == 1
        now[0] += 31
        _, body = await fetch(pool)
        assert (body, backend.accepted) == (b"ok", 2)
    finally:
        await pool.close()


async def test_connection_close_from_the_backend_means_a_new_connection_next(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    backend = await raw(answers(answer(b"bye", "Connection: close"), answer(b"never")))
    pool = pools(backend.port)
    for _ in range(2):
        response, body = await fetch(pool)
        assert (body, response.keep_alive) == (b"bye", False)
    assert backend.accepted == 2


async def test_unread_body_on_release_closes_the_connection(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    async def play(peer: Peer) -> None:
        await peer.request()
        if peer.index == 1:
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf-")
            await peer.client_gone()
            return
        peer.send(answer(b"fresh"))
        await peer.client_gone()

    backend = await raw(play)
    pool = pools(backend.port)
    response = await pool.request("GET", "/", CIMultiDict(), None)
    response.release()  # the rest of its body would be read as the next answer's head
    await backend.wait(lambda: backend.gone == 1)
    _, body = await fetch(pool)
    assert body == b"fresh"
    assert backend.accepted == 2


async def test_idle_connection_closed_by_the_backend_is_not_reused(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    idle_timeout = [asyncio.Event() for _ in range(3)]

    async def play(peer: Peer) -> None:
        await peer.request()
        peer.send(answer(b"ok"))
        await idle_timeout[peer.index - 1].wait()

    backend = await raw(play)
    pool = pools(backend.port)
    await fetch(pool)
    for index, method in enumerate(("GET", "POST")):
        idle_timeout[index].set()  # the backend closes the connection the pool keeps
        await until(lambda: not pool.open)
        _, body = await fetch(pool, method=method)
        assert body == b"ok"
    assert backend.accepted == 3


async def close_unanswered_on_reuse(peer: Peer) -> None:
    """The backend's idle timeout races the reuse: the first connection reads its second
    request and closes without a word; later connections answer everything."""
    if peer.index > 1:
        await always(answer(b"on a new connection"))(peer)
        return
    await peer.request()
    peer.send(answer(b"first"))
    await peer.request()


async def test_get_on_a_connection_closed_unanswered_is_retried_on_a_new_one(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    backend = await raw(close_unanswered_on_reuse)
    pool = pools(backend.port)
    await fetch(pool, "/one")
    response, body = await fetch(pool, "/two")
    assert (response.status, body) == (200, b"on a new connection")
    assert backend.accepted == 2
    assert [r.split(b" ")[1] for r in backend.requests] == [b"/one", b"/two", b"/two"]


async def test_post_on_a_connection_closed_unanswered_is_not_repeated(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    backend = await raw(close_unanswered_on_reuse)
    pool = pools(backend.port)
    await fetch(pool, "/one")
    with pytest.raises(h1.WireError) as caught:
        await pool.request("POST", "/tasks", CIMultiDict(), b'{"run": 1}')
    assert caught.value.kind == "reset"
    assert caught.value.status == 502
    assert backend.accepted == 1  # the task may have run: it is not sent again
    assert [r.split(b" ")[0] for r in backend.requests] == [b"GET", b"POST"]


async def test_get_whose_answer_began_is_not_retried(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    async def play(peer: Peer) -> None:
        await peer.request()
        peer.send(answer(b"first"))
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")  # then the backend dies

    backend = await raw(play)
    pool = pools(backend.port)
    await fetch(pool)
    with pytest.raises(h1.WireError) as caught:
        await pool.request("GET", "/", CIMultiDict(), None)
    assert caught.value.kind == "reset"
    assert backend.accepted == 1


# Timeouts and broken answers ---------------------------------------------------------------


async def test_no_answer_head_within_timeout_is_a_timeout(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    async def play(peer: Peer) -> None:
        await peer.request()
        await peer.client_gone()  # never answers

    backend = await raw(play)
    pool = pools(backend.port, timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(h1.WireError) as caught:
        await pool.request("GET", "/slow", CIMultiDict(), None)
    assert caught.value.kind == "timeout"
    assert 0.2 <= time.monotonic() - started < 1.0
    assert caught.value.status == 504
    await backend.wait(lambda: backend.gone == 1)  # the stalled connection was dropped


async def test_stall_mid_body_times_out_the_next_chunk(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    async def play(peer: Peer) -> None:
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await peer.client_gone()

    backend = await raw(play)
    response = await pools(backend.port, timeout_s=0.2).request("GET", "/", CIMultiDict(),
                                                                None)
    assert await response.next_chunk() == b"abc"
    with pytest.raises(h1.WireError) as caught:
        await response.next_chunk()
    assert caught.value.kind == "timeout"
    assert upstream.read_error(caught.value, "legacy").kind == "timeout"
    response.release()
    await backend.wait(lambda: backend.gone == 1)


async def test_nobody_listening_is_a_connect_error(pools: Callable[..., h1.Pool]) -> None:
    pool = pools(free_port())
    with pytest.raises(h1.WireError) as caught:
        await pool.request("POST", "/", CIMultiDict(), b"x")
    assert caught.value.kind == "connect_error"
    assert not caught.value.sent


async def test_answer_cut_short_is_truncated(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    async def play(peer: Peer) -> None:
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")

    backend = await raw(play)
    response = await pools(backend.port).request("GET", "/", CIMultiDict(), None)
    with pytest.raises(h1.WireError) as caught:
        await response.read()
    assert caught.value.kind == "truncated"
    response.close()


async def test_garbage_instead_of_a_status_line_is_a_bad_response(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    backend = await raw(always(b"SSH-2.0-OpenSSH_9.6\r\n"))
    pool = pools(backend.port)
    with pytest.raises(h1.WireError) as caught:
        await pool.request("GET", "/", CIMultiDict(), None)
    assert caught.value.kind == "bad_response"
    assert not pool.open


# Bounded heads (rule 7) --------------------------------------------------------------------

ENDLESS = 64 * 2**20  # what a hostile script writes at most, if nobody stops it first


def endless(start: bytes, piece: bytes, sent: list[int], *, before: bytes = b"") -> Script:
    """Answer with `before`, `start`, then `piece` again and again until the client hangs
    up (or ENDLESS bytes): `sent` gets how many the backend could write."""
    async def play(peer: Peer) -> None:
        await peer.request()
        total = 0
        try:
            peer.send(before + start)
            while total < ENDLESS:
                peer.send(piece)
                total += len(piece)
                await peer.writer.drain()
        except ConnectionError:
            pass
        sent.append(total)
        peer.backend.changed.set()
    return play


HOSTILE_HEADS = {
    "endless_header_lines": (b"HTTP/1.1 200 OK\r\n", b"X-A: " + b"a" * 1000 + b"\r\n"),
    "one_value_of_mebibytes": (b"HTTP/1.1 200 OK\r\nX-A: ", b"a" * 4096),
    "endless_reason": (b"HTTP/1.1 200 ", b"O" * 4096),
    "endless_informational_heads": (b"", b"HTTP/1.1 100 Continue\r\n\r\n"),
}


@pytest.mark.parametrize("start, piece", HOSTILE_HEADS.values(), ids=HOSTILE_HEADS.keys())
async def test_a_head_that_never_ends_is_cut_at_max_head_bytes(
        raw: Callable[[Script], Awaitable[RawBackend]], pools: Callable[..., h1.Pool],
        start: bytes, piece: bytes) -> None:
    sent: list[int] = []
    backend = await raw(endless(start, piece, sent))
    pool = pools(backend.port, timeout_s=5.0)
    started = time.monotonic()
    with pytest.raises(h1.WireError) as caught:
        await pool.request("GET", "/", CIMultiDict(), None)
    took = time.monotonic() - started
    assert caught.value.kind == "head_too_large", caught.value
    assert caught.value.status == 502
    assert took < 2.0, took  # at once, not at timeout_s
    await backend.wait(lambda: bool(sent), within=5.0)
    # the backend could write about its socket buffers' worth, never the whole stream
    assert sent[0] < 16 * 2**20, sent
    assert not pool.open


def head_of(size: int, lines: int = 1) -> bytes:
    """An answer head of exactly `size` bytes, its padding spread over `lines` headers."""
    frame = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    pad = size - len(frame) - lines * len(b"X-P: \r\n")
    assert pad >= lines
    values = [b"p" * (pad // lines + (1 if n < pad % lines else 0)) for n in range(lines)]
    head = frame[:-2] + b"".join(b"X-P: " + v + b"\r\n" for v in values) + b"\r\n"
    assert len(head) == size
    return head


@pytest.mark.parametrize("with_body", [0, 200_000], ids=["alone", "with_a_large_body"])
async def test_a_head_of_max_head_bytes_passes_and_one_byte_more_does_not(
        raw: Callable[[Script], Awaitable[RawBackend]], pools: Callable[..., h1.Pool],
        with_body: int) -> None:
    body = b"b" * with_body
    cl = f"Content-Length: {len(body) or 5}".encode()
    at_bound = head_of(4096 - (len(cl) - 17)).replace(b"Content-Length: 5", cl, 1)
    assert len(at_bound) == 4096
    over = at_bound.replace(b"X-P: ", b"X-P: q", 1)
    payload = body or b"hello"
    backend = await raw(answers(at_bound + payload, over + payload))
    pool = pools(backend.port, max_head_bytes=4096)
    response, got = await fetch(pool)
    assert (response.status, got) == (200, payload)  # the body that came with it is kept
    with pytest.raises(h1.WireError) as caught:
        await pool.request("GET", "/", CIMultiDict(), None)
    assert caught.value.kind == "head_too_large"


async def test_a_hundred_header_lines_pass_and_one_more_does_not(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    lines = [f"X-H{n}: {n}" for n in range(h1.MAX_HEADER_LINES - 1)]  # + Content-Length
    backend = await raw(answers(answer(b"ok", *lines), answer(b"ok", *lines, "X-One: more")))
    pool = pools(backend.port)
    response, body = await fetch(pool)
    assert body == b"ok" and len(response.headers) == h1.MAX_HEADER_LINES
    with pytest.raises(h1.WireError) as caught:
        await pool.request("GET", "/", CIMultiDict(), None)
    assert caught.value.kind == "head_too_large"
    assert str(h1.MAX_HEADER_LINES) in caught.value.detail


async def test_trailers_that_never_end_fail_the_answer_after_its_body(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    sent: list[int] = []
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    backend = await raw(endless(b"5\r\nhello\r\n0\r\n", b"X-T: " + b"t" * 1000 + b"\r\n",
                                sent, before=head))
    response = await pools(backend.port, timeout_s=5.0).request("GET", "/", CIMultiDict(),
                                                                None)
    assert await response.next_chunk() == b"hello"
    started = time.monotonic()
    with pytest.raises(h1.WireError) as caught:
        async with asyncio.timeout(5):
            await response.next_chunk()
    assert caught.value.kind == "head_too_large"
    assert upstream.read_error(caught.value, "legacy").kind == "head_too_large"
    assert time.monotonic() - started < 2.0
    response.close()
    await backend.wait(lambda: bool(sent), within=5.0)
    assert sent[0] < 16 * 2**20, sent


async def test_chunks_split_after_their_size_lines_are_body_not_trailers(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    """A read that begins right after a chunk's size line is that chunk's data, whatever
    its size: only the last chunk's are trailers. Small trailers pass and are dropped."""
    async def play(peer: Peer) -> None:
        while await peer.request():
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(20):
                peer.send(b"800\r\n")
                await peer.writer.drain()
                await asyncio.sleep(0)  # one loop turn: the size line is its own read
                peer.send(b"d" * 2048 + b"\r\n")
                await peer.writer.drain()
                await asyncio.sleep(0)
            peer.send(b"0\r\nX-Checksum: abc\r\n\r\n")

    backend = await raw(play)
    pool = pools(backend.port, max_head_bytes=1024)
    for _ in range(2):
        response, body = await fetch(pool)
        assert body == b"d" * 2048 * 20
        assert "X-Checksum" not in response.headers
    assert backend.accepted == 1  # whole answers: the connection served again


# The connection limit ----------------------------------------------------------------------


async def test_limit_one_makes_the_second_request_wait_for_the_same_connection(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    gate = asyncio.Event()
    backend = await raw(held(answer(b"ok"), gate))
    pool = pools(backend.port, limit=1)
    first = await pool.request("GET", "/first", CIMultiDict(), None)
    second = asyncio.ensure_future(fetch(pool, "/second"))
    await until(lambda: pool.waiters)
    assert len(backend.requests) == 1 and not second.done()
    gate.set()
    assert await first.read() == b"ok"
    first.release()
    _, body = await second
    assert body == b"ok"
    assert backend.accepted == 1


async def test_limit_one_with_nothing_freed_within_timeout_is_a_connect_error(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    backend = await raw(held(answer(b"ok"), asyncio.Event()))
    pool = pools(backend.port, limit=1, timeout_s=0.2)
    first = await pool.request("GET", "/", CIMultiDict(), None)
    with pytest.raises(h1.WireError) as caught:
        await pool.request("GET", "/", CIMultiDict(), None)
    assert caught.value.kind == "connect_error"
    assert backend.accepted == 1
    first.release()


async def test_limit_holds_when_a_freed_slot_races_a_newcomer(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    async def play(peer: Peer) -> None:
        if peer.index == 1:  # the first answer never ends, so its release closes it
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            await peer.client_gone()
            return
        await always(answer(b"ok"))(peer)

    backend = await raw(play)
    pool = pools(backend.port, limit=1)
    first = await pool.request("GET", "/a", CIMultiDict(), None)
    waiting = asyncio.ensure_future(fetch(pool, "/b"))
    await until(lambda: pool.waiters)
    first.release()  # closes its connection: the waiting request is told a slot is free
    _, body = await fetch(pool, "/c")  # a new request, before the waiting one runs again
    await waiting
    assert body == b"ok"
    assert len(pool.open) <= 1
    assert backend.accepted == 2


async def test_slot_handed_over_as_the_wait_times_out_is_not_lost(
        pools: Callable[..., h1.Pool]) -> None:
    async def hello(request: web.Request) -> web.StreamResponse:
        if request.path == "/held":  # an answer that never ends: its slot stays held
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"hel")
            await asyncio.Event().wait()
        return web.Response(text="hello")

    runner, port = await aiohttp_backend(hello)
    pool = pools(port, limit=1, timeout_s=0.2)
    loop = asyncio.get_running_loop()
    try:
        first = await pool.request("GET", "/held", {}, None)  # holds the only slot
        waiting = asyncio.create_task(pool.request("GET", "/", {}, None))
        await asyncio.sleep(0)  # one yield: the task runs up to its wait, with no I/O
        assert len(pool.waiters) == 1

        def stall() -> None:  # the loop stopped past both deadlines, as in a GC pause
            time.sleep(0.4)

        loop.call_later(0.05, first.close)  # the slot frees just before the wait's deadline
        loop.call_soon(stall)
        with contextlib.suppress(h1.WireError):
            (await waiting).release()
        assert pool.connecting == 0, "a held slot was never given back"
        async with asyncio.timeout(5.0):
            again = await pool.request("GET", "/", {}, None)
        assert await again.read() == b"hello"
        again.release()
    finally:
        await runner.cleanup()


async def test_limit_one_serves_requests_one_after_another_through_the_proxy(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       backends={"legacy": {"max_connections": 1}})
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        async def one() -> int:
            async with http.get(f"{proxy.url}/v1/x") as response:
                await response.read()
                return response.status

        async with asyncio.timeout(5.0):
            statuses = await asyncio.gather(*(one() for _ in range(20)))
        pool = proxy.proxy.runtime.pools["legacy"].client
        assert statuses == [200] * 20
        assert len(pool.open) <= 1 and pool.connecting == 0


# Back-pressure -----------------------------------------------------------------------------


async def test_slow_reader_keeps_the_buffer_bounded_and_gets_every_byte(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    payload = hashlib.shake_256(b"rollout").digest(12 * 2**20)

    async def play(peer: Peer) -> None:
        await peer.request()
        peer.send(f"HTTP/1.1 200 OK\r\nContent-Length: {len(payload)}\r\n\r\n".encode())
        for start in range(0, len(payload), 65536):
            peer.send(payload[start:start + 65536])
            await peer.writer.drain()
        await peer.client_gone()

    backend = await raw(play)
    response = await pools(backend.port, timeout_s=5.0).request("GET", "/big",
                                                                CIMultiDict(), None)
    bound = h1.HIGH_WATER + READ_SIZE
    await until(lambda: response._paused, within=5.0)  # the reader has not read a byte
    assert response._conn is not None and response._conn.transport is not None
    assert not response._conn.transport.is_reading()  # the rest waits in the backend's socket
    assert response._buffered <= bound
    assert not response.done
    received = []
    while chunk := await response.next_chunk():
        assert len(chunk) <= bound  # a chunk is everything buffered at that moment
        received.append(chunk)
    assert b"".join(received) == payload
    response.release()


async def test_answer_over_high_water_read_after_it_ended_leaves_the_connection_usable(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    big = b"b" * (h1.HIGH_WATER + 1)  # the byte that crosses HIGH_WATER is the last one
    backend = await raw(answers(answer(big), answer(b"next")))
    pool = pools(backend.port, timeout_s=0.5)
    first = await pool.request("GET", "/big", CIMultiDict(), None)
    await until(lambda: first.done)
    assert await first.read() == big
    first.release()
    _, body = await fetch(pool)
    assert body == b"next"
    assert backend.accepted == 1


# What the backend receives -----------------------------------------------------------------


async def sent_bytes(raw: Callable[[Script], Awaitable[RawBackend]],
                     pools: Callable[..., h1.Pool], method: str, target: str,
                     headers: CIMultiDict[str], body: bytes | None) -> tuple[bytes, int]:
    backend = await raw(always(answer(b"ok")))
    response = await pools(backend.port).request(method, target, headers, body)
    await response.read()
    response.release()
    return backend.requests[0], backend.port


async def test_get_carries_host_and_only_the_callers_headers(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    headers = CIMultiDict([("X-Trace", "t-1"), ("Accept", "text/event-stream"),
                           ("X-Trace", "t-2")])
    sent, port = await sent_bytes(raw, pools, "GET", "/v1/run?x=1&y=%20", headers, None)
    assert sent == (f"GET /v1/run?x=1&y=%20 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    "X-Trace: t-1\r\nAccept: text/event-stream\r\nX-Trace: t-2\r\n\r\n"
                    ).encode()


async def test_post_with_a_body_says_its_length(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    body = b'{"task": "summarise"}'
    headers = CIMultiDict([("Content-Type", "application/json")])
    sent, port = await sent_bytes(raw, pools, "POST", "/v1/tasks", headers, body)
    assert sent == (f"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                    ).encode() + body


async def test_large_post_body_arrives_whole(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    body = hashlib.shake_256(b"body").digest(300_000)  # past the single-write size
    sent, _ = await sent_bytes(raw, pools, "PUT", "/blob", CIMultiDict(), body)
    assert sent.endswith(b"\r\nContent-Length: 300000\r\n\r\n" + body)


async def test_post_without_a_body_says_content_length_zero(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    sent, port = await sent_bytes(raw, pools, "POST", "/v1/ping", CIMultiDict(), None)
    assert sent == (f"POST /v1/ping HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    "Content-Length: 0\r\n\r\n").encode()


async def test_non_ascii_header_values_pass_byte_for_byte(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    # aiohttp hands the proxy header bytes decoded as UTF-8 with surrogateescape: a Latin-1
    # byte that is not UTF-8 must go out as that same byte.
    headers = CIMultiDict([("X-Name", "Zoë – 東京"), ("X-Latin1", "caf\udce9")])
    sent, _ = await sent_bytes(raw, pools, "GET", "/", headers, None)
    assert b"\r\nX-Name: Zo\xc3\xab \xe2\x80\x93 \xe6\x9d\xb1\xe4\xba\xac\r\n" in sent
    assert b"\r\nX-Latin1: caf\xe9\r\n" in sent


@pytest.mark.parametrize("where", ["headers", "extra", "target"])
@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nX-Injected: 1", "a\rb"])
async def test_line_break_in_a_header_or_target_is_refused_before_anything_is_sent(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool], value: str, where: str) -> None:
    backend = await raw(always(answer(b"ok")))
    pool = pools(backend.port)
    headers = CIMultiDict([("X-Note", value)] if where == "headers" else [])
    extra = (("X-Rollout-Shadow", value),) if where == "extra" else ()
    target = f"/{value}" if where == "target" else "/"
    with pytest.raises(h1.WireError) as caught:
        await pool.request("GET", target, headers, None, extra)
    assert caught.value.kind == "bad_request"
    assert caught.value.status == 400
    assert not pool.open
    await fetch(pool, "/after")
    assert backend.accepted == 1
    assert backend.requests[0].startswith(b"GET /after ")  # the refused one never left


async def test_backend_url_path_prefix_is_put_before_every_target(
        pools: Callable[..., h1.Pool]) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path_qs)
        return web.Response(text="ok")

    runner, port = await aiohttp_backend(handler)
    backend = BackendConfig(name="next_gen", url=f"http://127.0.0.1:{port}/base/",
                            timeout_s=2, connect_timeout_s=1, max_connections=4)
    pool = upstream.make_pool(backend)
    try:
        for path_qs in ("/v1/run?x=1", "/"):
            response = await pool.client.request("GET", path_qs, CIMultiDict(), None)
            assert await response.read() == b"ok"
            response.release()
        with pytest.raises(upstream.UpstreamError) as caught:  # never a target naming a host
            await pool.client.request("GET", "http://elsewhere/", CIMultiDict(), None)
        assert caught.value.kind == "bad_request" and "next_gen" in str(caught.value)
    finally:
        await pool.close()
        await runner.cleanup()
    assert seen == ["/base/v1/run?x=1", "/base/"]


# Closing the pool; a backend talking out of turn -------------------------------------------


async def test_pool_close_fails_waiting_requests(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    backend = await raw(held(answer(b"ok"), asyncio.Event()))
    pool = pools(backend.port, limit=1, timeout_s=5.0)
    busy = await pool.request("GET", "/", CIMultiDict(), None)
    waiting = asyncio.ensure_future(fetch(pool))
    await until(lambda: pool.waiters)
    await pool.close()
    async with asyncio.timeout(1.0):
        with pytest.raises(h1.WireError) as caught:
            await waiting
    assert caught.value.kind == "connect_error"
    busy.release()
    with pytest.raises(h1.WireError) as caught:
        await pool.request("GET", "/", CIMultiDict(), None)
    assert caught.value.kind == "connect_error"


async def test_pool_close_closes_idle_connections(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    backend = await raw(answers(answer(b"ok")))
    pool = pools(backend.port)
    await fetch(pool)
    assert len(pool.idle) == 1
    await pool.close()
    await backend.wait(lambda: backend.gone == 1)
    assert not pool.idle and not pool.open


async def test_pool_close_opens_no_new_connection_for_a_waiter(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    async def play(peer: Peer) -> None:
        if await peer.request() == b"SENTINEL\r\n\r\n":
            return
        peer.send(answer(b"ok")[:-1])  # not ended: the connection stays busy
        await peer.client_gone()

    backend = await raw(play)
    pool = pools(backend.port, limit=1, timeout_s=5.0)
    busy = await pool.request("GET", "/", CIMultiDict(), None)
    waiting = asyncio.ensure_future(fetch(pool))
    await until(lambda: pool.waiters)
    await pool.close()
    with pytest.raises(h1.WireError):
        await waiting
    busy.release()
    # Connections are accepted in order: once this one is seen, any the waiter made was too.
    _, writer = await asyncio.open_connection("127.0.0.1", backend.port)
    writer.write(b"SENTINEL\r\n\r\n")
    await backend.wait(lambda: backend.requests[-1] == b"SENTINEL\r\n\r\n")
    writer.close()
    assert backend.accepted == 2  # the held request's connection, and the sentinel


async def test_bytes_out_of_turn_on_an_idle_connection_drop_it(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    idle = asyncio.Event()

    async def play(peer: Peer) -> None:
        await peer.request()
        peer.send(answer(b"mine"))
        if peer.index == 1:
            await idle.wait()
            peer.send(answer(b"stale", "X-Stale: yes"))  # nobody asked
        while await peer.request():
            peer.send(answer(b"fresh"))

    backend = await raw(play)
    pool = pools(backend.port)
    _, body = await fetch(pool)
    assert body == b"mine"
    idle.set()
    await until(lambda: not pool.open)
    response, body = await fetch(pool)
    assert body == b"mine"  # the new connection's first answer, not the stale one
    assert "X-Stale" not in response.headers
    assert backend.accepted == 2


async def test_bytes_right_behind_the_answer_do_not_spoil_the_next_request(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    # A backend that answers twice, e.g. a framework writing an error page after a handler
    # already answered: the stray head arrives in the same segment as the real answer.
    # That connection is dropped; the next request gets a clean answer on a new one.
    stray = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 40\r\n\r\n"
    backend = await raw(answers(answer(b"mine") + stray, answer(b"stale")))
    pool = pools(backend.port)
    _, body = await fetch(pool)
    assert body == b"mine"
    response, body = await fetch(pool)
    assert (response.status, body) == (200, b"mine")
    assert backend.accepted == 2


async def test_pool_close_mid_answer_framed_by_close_is_not_a_clean_end(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    async def play(peer: Peer) -> None:
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n")
        await peer.client_gone()

    backend = await raw(play)
    pool = pools(backend.port)
    response = await pool.request("GET", "/events", CIMultiDict(), None)
    assert await response.next_chunk() == b"data: 1\n\n"
    await pool.close()  # e.g. a config reload retires the pool while the stream runs
    with pytest.raises(h1.WireError):
        async with asyncio.timeout(1.0):
            await response.read()


async def test_transfer_encoding_without_chunked_is_framed_by_close(
        raw: Callable[[Script], Awaitable[RawBackend]],
        pools: Callable[..., h1.Pool]) -> None:
    async def play(peer: Peer) -> None:
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nwhole body")

    backend = await raw(play)
    _, body = await fetch(pools(backend.port))
    assert body == b"whole body"
