"""A cheap fake backend for benchmarks: canned JSON answers, fast, slow, sse, flaky or stall.

It is a raw asyncio.Protocol on uvloop (no HTTP framework), so one core serves far more than
the proxy under test; `--engine nginx` runs nginx with a fixed-JSON config instead.

    python -m load.backend --port 8001 --mode fast|slow|sse|flaky|stall [--engine nginx]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass
from typing import cast

import uvloop

from load import reference
from load.procs import raise_fd_limit
from load.wire import BadRequest, Request, RequestParser

MODES = ("fast", "slow", "sse", "flaky", "stall")
ANSWER = {"success": True, "usage": {"total_tokens": 1200}}
TOKENS = 1200
MAX_BUFFER_BYTES = 4 * 1024 * 1024

# One step of an answer: wait this many seconds, then write these bytes.
Step = tuple[float, bytes]


@dataclass(frozen=True, slots=True)
class Options:
    mode: str = "fast"
    delay_s: float = 2.0
    error_rate: float = 0.3
    body_bytes: int = 0
    events: int = 10
    event_gap_s: float = 0.0
    seed: int = 1


def json_body(size: int = 0, answer: dict[str, object] | None = None) -> bytes:
    """The canned answer, padded with a `pad` field up to `size` bytes when asked."""
    plain = json.dumps(answer or ANSWER).encode()
    if size <= len(plain) + 12:
        return plain
    padded = dict(answer or ANSWER, pad="")
    pad_len = size - len(json.dumps(padded).encode())
    return json.dumps(dict(padded, pad="x" * pad_len)).encode()


def sse_events(count: int = 10) -> list[bytes]:
    """An OpenAI-style stream: `count` content deltas, a usage event, then [DONE]."""
    base: dict[str, object] = {"id": "chatcmpl-1", "object": "chat.completion.chunk"}
    events = [{**base, "choices": [{"index": 0, "delta": {"content": f"word{i} "}}]}
              for i in range(count)]
    usage = {"prompt_tokens": 200, "completion_tokens": 1000, "total_tokens": TOKENS}
    events.append({**base, "choices": [], "usage": usage})
    lines = [b"data: " + json.dumps(event).encode() + b"\n\n" for event in events]
    return [*lines, b"data: [DONE]\n\n"]


def sse_body_size(count: int = 10) -> int:
    """Bytes of the event stream's body (without chunk framing), for a same-size JSON answer."""
    return sum(len(event) for event in sse_events(count))


def _head(status: str, content_type: str, framing: str, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{framing}\r\n"
            f"{extra}\r\n").encode()


def _json_answer(status: str, body: bytes) -> tuple[bytes, bytes]:
    head = _head(status, "application/json", f"Content-Length: {len(body)}",
                 f"X-Tokens-Used: {TOKENS}\r\n")
    return head, body


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class Answers:
    """Builds the steps of each answer; the one place that knows the modes."""

    def __init__(self, options: Options) -> None:
        self._options = options
        self._random = random.Random(options.seed)
        self._ok = _json_answer("200 OK", json_body(options.body_bytes))
        failed = {"success": False, "error": "flaky backend"}
        self._failed = _json_answer("500 Internal Server Error", json_body(0, failed))
        self._sse_head = _head("200 OK", "text/event-stream",
                               "Transfer-Encoding: chunked", "Cache-Control: no-cache\r\n")
        self._sse_chunks = [_chunk(event) for event in sse_events(options.events)]

    def steps(self, request: Request) -> list[Step] | None:
        """The writes of one answer; None for an answer that never comes (stall)."""
        mode, head_only = self._options.mode, request.method == b"HEAD"
        if mode == "stall":
            return None
        if mode == "sse":
            return self._sse_steps(head_only)
        head, body = self._ok
        if mode == "flaky" and self._random.random() < self._options.error_rate:
            head, body = self._failed
        delay = self._options.delay_s if mode == "slow" else 0.0
        return [(delay, head if head_only else head + body)]

    def _sse_steps(self, head_only: bool) -> list[Step]:
        if head_only:
            return [(0.0, self._sse_head)]
        gap = self._options.event_gap_s
        if gap <= 0:
            return [(0.0, self._sse_head + b"".join(self._sse_chunks) + b"0\r\n\r\n")]
        first, *rest = self._sse_chunks
        return [(0.0, self._sse_head + first), *[(gap, c) for c in rest], (0.0, b"0\r\n\r\n")]


class BackendProtocol(asyncio.Protocol):
    """One connection: answers its requests in order, each after its steps' delays."""

    def __init__(self, answers: Answers) -> None:
        self._answers = answers
        self._parser = RequestParser()
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._pending: deque[Step] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but they are one.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > MAX_BUFFER_BYTES and self._transport is not None:
            self._transport.close()
            return
        self._answer_ready()

    def _answer_ready(self) -> None:
        while not self._busy and self._transport is not None:
            try:
                request = self._parser.feed(self._buf)
            except BadRequest:
                self._transport.write(_head("400 Bad Request", "text/plain", "Content-Length: 0"))
                self._transport.close()
                self._transport = None
                return
            if request is None:
                return
            self._busy, self._close_after = True, request.close
            steps = self._answers.steps(request)
            if steps is None or not self._write_due(steps):
                return

    def _write_due(self, steps: list[Step]) -> bool:
        """Write what is due now; True when the whole answer went out."""
        self._pending.extend(steps)
        return self._flush()

    def _flush(self) -> bool:
        transport = self._transport
        while self._pending and transport is not None:
            delay, data = self._pending[0]
            if delay > 0:
                self._pending[0] = (0.0, data)
                self._timer = asyncio.get_running_loop().call_later(delay, self._resume)
                return False
            self._pending.popleft()
            transport.write(data)
        self._busy = False
        if self._close_after and transport is not None:
            transport.close()
            self._transport = None
        return True

    def _resume(self) -> None:
        self._timer = None
        if self._flush():
            self._answer_ready()


async def serve(host: str, port: int, options: Options) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    answers = Answers(options)
    server = await loop.create_server(lambda: BackendProtocol(answers), host, port,
                                      backlog=8192, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"load.backend {options.mode} listening on http://{host}:{port}", flush=True)
    async with server:
        await stop.wait()


def run_nginx(host: str, port: int, body_bytes: int) -> int:
    """Run nginx answering the canned JSON until SIGTERM/SIGINT, then remove its files."""
    with tempfile.TemporaryDirectory(prefix="load-nginx-") as workdir:
        conf = reference.nginx_backend_config(host, port, workdir, json_body(body_bytes), TOKENS)
        argv = reference.nginx_command(reference.write_config(workdir, "nginx.conf", conf),
                                       workdir)
        with subprocess.Popen(argv) as nginx:
            def forward(signum: int, _frame: object) -> None:
                nginx.send_signal(signum)

            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, forward)
            return nginx.wait()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m load.backend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=MODES, default="fast")
    parser.add_argument("--engine", choices=("raw", "nginx"), default="raw",
                        help="nginx: run nginx with a fixed-JSON config (fast mode only)")
    parser.add_argument("--delay", type=float, default=2.0, help="slow mode: seconds per answer")
    parser.add_argument("--error-rate", type=float, default=0.3, help="flaky mode: share of 500s")
    parser.add_argument("--body-bytes", type=int, default=0, help="pad the JSON answer to this")
    parser.add_argument("--events", type=int, default=10, help="sse mode: content events")
    parser.add_argument("--event-gap-ms", type=float, default=0.0, help="sse mode: gap between")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engine == "nginx":
        if args.mode != "fast" or not reference.nginx_available():
            print("--engine nginx needs --mode fast and nginx installed", file=sys.stderr)
            return 2
        return run_nginx(args.host, args.port, args.body_bytes)
    options = Options(args.mode, args.delay, args.error_rate, args.body_bytes, args.events,
                      args.event_gap_ms / 1000, args.seed)
    raise_fd_limit()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.host, args.port, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
