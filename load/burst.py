"""N requests in flight at once, one per connection, all connections opened beforehand.

What slow5000 needs: an aiohttp client's own overhead at 5,000 at once is a second or more.
Here the connections are opened first (not timed), and each latency runs from a request's
write to its answer's last byte. Raw asyncio protocols keep the client cheap. Two shapes:

- burst (default): every request written in the same instant, one per connection;
- `--steady S`: each connection sends its next request as soon as its answer ends, for S
  seconds, the first requests spread evenly over `--ramp` seconds (set it to the backend's
  answer time). That is N requests in flight all the time: N users of a slow backend.

    python -m load.burst URL -n 5000 [--steady 12 --ramp 2] [--timeout 30] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import cast
from urllib.parse import urlsplit

import uvloop

from load.loadgen import percentiles
from load.procs import raise_fd_limit

CONNECT_AT_ONCE = 500


@dataclass(frozen=True, slots=True)
class BurstResult:
    url: str
    sent: int
    answers: int
    statuses: dict[str, int]
    errors: dict[str, int]
    connect_s: float
    latency_ms: dict[str, float]

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def answer_complete(buf: bytes | bytearray) -> int | None:
    """The status once `buf` holds a whole answer (Content-Length or chunked), else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    status = int(head[9:12])
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip() == b"content-length":
            return status if len(buf) - end - 4 >= int(value) else None
        if name.strip() == b"transfer-encoding" and b"chunked" in value:
            return status if buf.endswith(b"0\r\n\r\n") else None
    return status  # no body framing: a 204/304 or an answer without a body


class OneShot(asyncio.Protocol):
    """One connection that sends one request and waits for its answer."""

    def __init__(self, done: asyncio.Future[tuple[int | None, float, str]]) -> None:
        self._done = done
        self._buf = bytearray()
        self._sent_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self._sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        status = answer_complete(self._buf)
        if status is not None:
            self._finish(status, "")

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(None, "reset")

    def _finish(self, status: int | None, error: str) -> None:
        if self._done.done():
            return
        self._done.set_result((status, (time.perf_counter() - self._sent_at) * 1000, error))
        if self.transport is not None:
            self.transport.close()


async def _connect(host: str, port: int, gate: asyncio.Semaphore,
                   ) -> tuple[OneShot, asyncio.Future[tuple[int | None, float, str]]] | None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[int | None, float, str]] = loop.create_future()
    async with gate:
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: OneShot(done), host, port), 30)
        except (OSError, TimeoutError):
            return None
    return protocol, done


class Looping(asyncio.Protocol):
    """One kept-alive connection sending its next request as soon as an answer ends."""

    def __init__(self, request: bytes, until: float, outcomes: list[tuple[int | None, float,
                 str]], done: asyncio.Future[None]) -> None:
        self._request, self._until, self._outcomes, self._done = request, until, outcomes, done
        self._buf = bytearray()
        self._sent_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self) -> None:
        if self.transport is None or self.transport.is_closing():
            self._stop()
            return
        self._buf.clear()
        self._sent_at = time.perf_counter()
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        status = answer_complete(self._buf)
        if status is None:
            return
        now = time.perf_counter()
        self._outcomes.append((status, (now - self._sent_at) * 1000, ""))
        if now < self._until:
            self.send()
        else:
            self._stop()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done() and self._sent_at:
            self._outcomes.append((None, 0.0, "reset"))
        self._stop()

    def _stop(self) -> None:
        if not self._done.done():
            self._done.set_result(None)
        if self.transport is not None:
            self.transport.close()


async def steady(url: str, count: int, duration_s: float, ramp_s: float,
                 timeout_s: float = 30.0) -> BurstResult:
    """`count` connections each looping request -> answer for `duration_s`, their first
    requests spread over `ramp_s`; the answers of requests started before the end count."""
    raise_fd_limit(count + 1024)
    host, port, request = _request(url)
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)
    outcomes: list[tuple[int | None, float, str]] = []
    started = time.perf_counter()
    until = started + 3600  # set once every connection is open

    async def connect() -> tuple[Looping, asyncio.Future[None]] | None:
        done: asyncio.Future[None] = loop.create_future()
        async with gate:
            try:
                _, protocol = await asyncio.wait_for(loop.create_connection(
                    lambda: Looping(request, until, outcomes, done), host, port), 30)
            except (OSError, TimeoutError):
                return None
        return protocol, done

    opened = await asyncio.gather(*(connect() for _ in range(count)))
    connect_s = time.perf_counter() - started
    live = [pair for pair in opened if pair is not None]
    end = time.perf_counter() + duration_s
    for index, (protocol, _) in enumerate(live):
        protocol._until = end
        loop.call_later(ramp_s * index / max(1, len(live)), protocol.send)
    await asyncio.wait([done for _, done in live], timeout=duration_s + timeout_s)
    for protocol, _ in live:
        if protocol.transport is not None:
            protocol.transport.close()
    sent = len(outcomes) + sum(1 for _, done in live if not done.done())
    return _tally(url, sent + count - len(live), sent, outcomes, connect_s)


def _request(url: str) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, port, f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


async def burst(url: str, count: int, timeout_s: float = 30.0) -> BurstResult:
    """Open `count` connections, then send one request on each at once; wait for the answers."""
    raise_fd_limit(count + 1024)
    host, port, request = _request(url)
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)
    started = time.perf_counter()
    opened = await asyncio.gather(*(_connect(host, port, gate) for _ in range(count)))
    connect_s = time.perf_counter() - started
    live = [pair for pair in opened if pair is not None]
    for protocol, _ in live:
        protocol.send(request)
    finished, _ = await asyncio.wait([done for _, done in live], timeout=timeout_s)
    for protocol, _ in live:
        if protocol.transport is not None:
            protocol.transport.close()
    return _tally(url, count, len(live), [f.result() for f in finished], connect_s)


def _tally(url: str, count: int, sent: int, outcomes: list[tuple[int | None, float, str]],
           connect_s: float) -> BurstResult:
    statuses = Counter(str(status) for status, _, _ in outcomes if status is not None)
    errors = Counter(error for status, _, error in outcomes if status is None)
    errors["connect"] += count - sent
    errors["timeout"] += sent - len(outcomes)
    latencies = [ms for status, ms, _ in outcomes if status is not None]
    return BurstResult(url, sent, sum(statuses.values()), dict(statuses),
                       {k: v for k, v in errors.items() if v}, round(connect_s, 3),
                       {k: round(v, 3) for k, v in percentiles(latencies).items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load.burst", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("-n", "--requests", type=int, default=5000)
    parser.add_argument("--timeout", type=float, default=30.0, help="for the answers, seconds")
    parser.add_argument("--steady", type=float, default=0.0, metavar="S",
                        help="loop requests on every connection for S seconds")
    parser.add_argument("--ramp", type=float, default=2.0, metavar="S",
                        help="with --steady: spread the first requests over S seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(
            steady(args.url, args.requests, args.steady, args.ramp, args.timeout)
            if args.steady > 0 else burst(args.url, args.requests, args.timeout))
    print(json.dumps(result.to_json()) if args.json else json.dumps(result.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
