"""`--scenario hostile`: the client's latency through `shadow` when next_gen is hostile.

rollout-proxy runs `shadow` (sample 1.0) in front of one legacy twice, under the same load and
in interleaved rounds: `healthy` mirrors to load.backend fast, `hostile` to this module run as
a child (`python -m load.hostile --port P`, at nice 19 so that it never starves the load
generator on the same core), which answers the requests it gets in turn with

1. a head that never ends: 1,000-byte header lines until the proxy hangs up (at most ENDLESS),
2. an event stream whose first line is 1 MiB, in 1 KiB chunks one loop turn apart, then a
   usage event,
3. a drip: Content-Length 10, one byte every 0.2 s (httpbin's /drip?duration=2),
4. a reset: half a head, then RST.

Clients only ever get legacy's answers: their p50/p99 against the healthy run, the proxy's
peak RSS in each and its own counts of what it cut are what the README's bounds are judged by.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import struct
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import cast

import uvloop

from load import checks, reference, rollout, targets
from load.output import Report, header, skipped_text, tool_text
from load.procs import PYTHON, Child, Children, StartError, free_port, raise_fd_limit, wait_port
from load.rollout import Setup
from load.rounds import Plan, Runs, format_table, run_rounds, say, summarise
from load.wire import BadRequest, RequestParser

KINDS = ("endless_head", "long_sse_line", "drip", "reset")
ENDLESS = 64 * 2**20  # what an endless head writes at most, if the proxy never hangs up
HEADER_LINE = b"X-Hostile: " + b"a" * 987 + b"\r\n"  # 1,000 bytes
SSE_LINE, SSE_PIECE = 2**20, 1024
DRIP_BYTES, DRIP_GAP_S = 10, 0.2
SEND_BUFFER = 64 * 1024
P99_FACTOR = 1.5  # hostile p99 / healthy p99, at most
RSS_GROWTH_MB = 64.0  # hostile peak RSS over healthy's, at most: one unbounded head is 64 MiB
COUNTERS = ("rollout_rejected_answers_total", "rollout_shadow_dropped_total",
            "rollout_shadow_comparisons_total", "rollout_requests_total")

Piece = bytes | float  # bytes to write now, or seconds to wait (0.0: one loop turn)


def parse_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"kinds are {','.join(KINDS)}, got {text!r}")
    return kinds


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def endless_head() -> Iterator[Piece]:
    yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    for _ in range(ENDLESS // len(HEADER_LINE)):
        yield HEADER_LINE


def long_sse_line() -> Iterator[Piece]:
    yield (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n")
    line = b"data: " + b"x" * (SSE_LINE - len(b"data: ") - 2) + b"\n\n"
    for start in range(0, len(line), SSE_PIECE):
        yield _chunk(line[start:start + SSE_PIECE])
        yield 0.0
    yield _chunk(b'data: {"usage": {"total_tokens": 1200}}\n\n') + b"0\r\n\r\n"


def drip() -> Iterator[Piece]:
    yield (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Length: %d\r\n\r\n" % DRIP_BYTES)
    for _ in range(DRIP_BYTES):
        yield b"*"
        yield DRIP_GAP_S


ANSWERS = {"endless_head": endless_head, "long_sse_line": long_sse_line, "drip": drip}
DESCRIBED = {"endless_head": "an endless head", "long_sse_line": "a 1 MiB SSE line in 1 KiB "
             "chunks", "drip": f"a drip ({DRIP_BYTES} bytes, {DRIP_GAP_S:g} s apart)",
             "reset": "a reset"}


class Cycle:
    """Which answer the next request gets, and how many of each were begun."""

    def __init__(self, kinds: tuple[str, ...] = KINDS) -> None:
        self.kinds = kinds
        self.served: Counter[str] = Counter()
        self._next = 0

    def take(self) -> str:
        kind = self.kinds[self._next % len(self.kinds)]
        self._next += 1
        self.served[kind] += 1
        return kind


class HostileProtocol(asyncio.Protocol):
    """One connection: each request gets the cycle's next answer, written as the socket
    takes it (an endless head stops when the proxy stops reading or hangs up)."""

    def __init__(self, cycle: Cycle) -> None:
        self._cycle = cycle
        self._parser = RequestParser()
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._pieces: Iterator[Piece] | None = None
        self._close_after = False
        self._paused = False
        self._timer: asyncio.Handle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small buffers: an endless head is written as it is read
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self._transport.set_write_buffer_limits(high=SEND_BUFFER)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport, self._pieces = None, None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._timer is None:
            self._pump()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._next_request()

    def _next_request(self) -> None:
        if self._pieces is not None or self._transport is None:
            return
        try:
            request = self._parser.feed(self._buf)
        except BadRequest:
            self._transport.close()
            return
        if request is None:
            return
        kind = self._cycle.take()
        if kind == "reset":
            self._reset(self._transport)
            return
        self._close_after = request.close or kind == "endless_head"
        self._pieces = ANSWERS[kind]()
        self._pump()

    def _reset(self, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: appl")
        sock = transport.get_extra_info("socket")
        if sock is not None:  # linger 0: close() sends RST, not FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def _pump(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        while self._pieces is not None and self._transport is not None and not self._paused:
            piece = next(self._pieces, None)
            if piece is None:
                self._answered()
                return
            if isinstance(piece, float):
                self._timer = (loop.call_later(piece, self._pump) if piece > 0
                               else loop.call_soon(self._pump))
                return
            self._transport.write(piece)

    def _answered(self) -> None:
        self._pieces = None
        if self._close_after and self._transport is not None:
            self._transport.close()
            return
        self._next_request()


async def serve(port: int, kinds: tuple[str, ...]) -> None:
    """Serve until SIGTERM or SIGINT, then print how many answers of each kind were begun."""
    loop = asyncio.get_running_loop()
    cycle = Cycle(kinds)
    server = await loop.create_server(lambda: HostileProtocol(cycle), "127.0.0.1", port,
                                      backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    print(json.dumps({"served": dict(cycle.served)}), flush=True)


async def start_hostile(children: Children, kinds: tuple[str, ...]
                        ) -> tuple[Child, targets.Target]:
    port = free_port()
    argv = ["nice", "-n", "19", PYTHON, "-m", "load.hostile", "--port", str(port),
            "--kinds", ",".join(kinds)]
    child = await children.start("next_gen-hostile", argv, cpu=targets.LOAD_CPU)
    await wait_port(child, port)
    return child, targets.Target("next_gen-hostile", f"http://127.0.0.1:{port}/", (child.pid,))


def served_counts(child: Child) -> Counter[str]:
    """What the stopped child printed last: the answers it began, by kind."""
    for line in reversed(child.log_tail(5).splitlines()):
        if line.startswith("{"):
            return Counter(json.loads(line)["served"])
    return Counter()


def _peaks(runs: Runs | None) -> list[float]:
    return [m.peak_rss_mb for m in runs.busy if m.peak_rss_mb is not None] if runs else []


def hostile_checks(results: dict[str, Runs], p99: dict[str, float],
                   served: Counter[str], kinds: tuple[str, ...]) -> list[checks.Check]:
    healthy, hostile = _peaks(results.get("healthy")), _peaks(results.get("hostile"))
    growth = max(hostile) - max(healthy) if healthy and hostile else None
    drift = hostile[-1] - hostile[0] if len(hostile) > 1 else None
    ratio = checks.ratio(p99.get("hostile"), p99.get("healthy"))
    return [checks.at_most("client p99, hostile / healthy next_gen", ratio, P99_FACTOR),
            checks.at_most("proxy peak RSS, hostile over healthy", growth, RSS_GROWTH_MB, " MB"),
            checks.info("proxy peak RSS, hostile: last round over first", drift, " MB"),
            checks.at_least("hostile answers begun, fewest of any kind",
                            min((served[k] for k in kinds), default=0), 1)]


async def _proxies(children: Children, legacy: targets.Target, next_gens: dict[str, str],
                   args: argparse.Namespace, workdir: Path,
                   skipped: targets.Skipped) -> list[targets.Target]:
    found = []
    for name, url in next_gens.items():
        setup = Setup("shadow", legacy.url, url, sample=1.0, overrides=tuple(args.set))
        try:
            found.append(await targets.rollout_proxy(children, name, setup, workdir))
        except (OSError, StartError) as exc:
            skipped.reasons[name] = f"rollout-proxy did not start: {exc}"
    return found


async def _counters(found: list[targets.Target]) -> str:
    parts = []
    for target in found:
        if target.admin_url is not None:
            lines = await rollout.metrics(target.admin_url, COUNTERS)
            parts.append(f"{target.name}:\n" + "\n".join(f"  {line}" for line in lines))
    return "proxy counters (from /metrics):\n" + "\n".join(parts)


async def hostile(args: argparse.Namespace, plan: Plan, workdir: Path) -> Report:
    """Shadow with a healthy next_gen against shadow with a hostile one, same load."""
    skipped = targets.Skipped()
    async with Children(workdir / "logs") as children:
        legacy = await targets.backend(children, "legacy", nginx=reference.nginx_available())
        healthy = await targets.backend(children, "next_gen-healthy")
        kinds = tuple(args.hostile_kinds)
        child, next_gen = await start_hostile(children, kinds)
        found = await _proxies(children, legacy, {"healthy": healthy.url, "hostile": next_gen.url},
                               args, workdir, skipped)
        say(f"  {plan.rounds} rounds of {plan.busy.duration_s:g} s per proxy")
        results = await run_rounds(found, replace(plan, single=None), workdir)
        counts = await _counters(found)
        await children.stop(child)
        served = served_counts(child)
    rows = summarise(found, results, baseline="healthy")
    verdicts = hostile_checks(results, {s.name: s.p99_ms for s in rows}, served, kinds)
    lines = [f"{plan.rounds} rounds, interleaved; each: {tool_text(plan.busy, plan.use_wrk)}",
             f"legacy: {legacy.note}; proxies: shadow, sample 1.0, shadow.max_in_flight 256",
             "healthy next_gen: load.backend fast; hostile next_gen: load.hostile (nice 19) "
             f"answers in turn: {', '.join(DESCRIBED[k] for k in kinds)}",
             "hostile answers begun: " + ", ".join(f"{k} {served[k]}" for k in kinds)]
    text = "\n\n".join([header("rollout-proxy bench: hostile", lines),
                        format_table(rows, baseline="healthy"), checks.format_checks(verdicts),
                        counts, *skipped_text(skipped)])
    data = {"scenario": "hostile", "served": dict(served),
            "targets": [s.to_json() for s in rows],
            "runs": {name: [m.to_json() for m in r.busy] for name, r in results.items()},
            "checks": [c.to_json() for c in verdicts], "skipped": skipped.reasons}
    return Report(text, data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load.hostile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kinds", type=parse_kinds, default=KINDS,
                        help=f"comma-separated, in turn (default {','.join(KINDS)})")
    args = parser.parse_args(argv)
    raise_fd_limit()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, args.kinds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
