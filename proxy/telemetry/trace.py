"""The comparison trace: JSON Lines written by a buffered background writer.

Rules: the event loop never touches the disk (writes run in a thread); the buffer is bounded
in lines and in bytes (a line can be long: a request's path, a diff of long JSON keys): past
either, a line is dropped and counted, never blocking traffic. While one batch is written the
next fills, so at most twice the bound waits for the disk. A line is counted once: "written"
once its batch is on disk, "dropped", or "error" when its batch's write failed. The file
rotates by size (X → X.1 → X.2 …, `keep` old files); `close()` flushes every buffered line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

from proxy.telemetry.metrics import Metrics
from proxy.telemetry.record import COMPACT

log = logging.getLogger("rollout_proxy")
MAX_BUFFERED = 100_000
MAX_BUFFERED_BYTES = 64 * 2**20
FLUSH_LINES, FLUSH_BYTES = 1000, 2**20  # either wakes the writer before its interval


class TraceWriter:
    def __init__(self, path: Path, *, max_bytes: int, keep: int, metrics: Metrics,
                 interval_s: float = 0.5, rotate: bool = True) -> None:
        self.path, self.max_bytes, self.keep = path, max_bytes, keep
        self.rotate = rotate  # with --workers only worker 0 rotates; the others append
        self.metrics, self.interval_s = metrics, interval_s
        self.buffer: list[str] = []
        self.buffered_bytes = 0  # characters in buffer: its lines are ASCII (COMPACT, json_value)
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self.writing: asyncio.Future[None] | None = None  # the write running in its thread

    def write(self, record: dict[str, Any]) -> None:
        self.write_line(COMPACT.encode(record))

    def write_line(self, line: str) -> None:
        """One JSON document, already encoded, without its newline."""
        size = len(line) + 1
        if len(self.buffer) >= MAX_BUFFERED or self.buffered_bytes + size > MAX_BUFFERED_BYTES:
            self.metrics.traced("dropped")
            return
        self.buffer.append(line + "\n")
        self.buffered_bytes += size
        if len(self.buffer) >= FLUSH_LINES or self.buffered_bytes >= FLUSH_BYTES:
            self.wake.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.interval_s)
            self.wake.clear()
            await self.flush()

    async def flush(self) -> None:
        async with self.lock:
            if not self.buffer:
                return
            lines, self.buffer, self.buffered_bytes = self.buffer, [], 0
            # Shielded: a cancelled flush leaves its write to finish, and close() waits; the
            # write counts its lines when it ends, whether or not this flush is still there.
            self.writing = asyncio.ensure_future(asyncio.to_thread(self._append, "".join(lines)))
            self.writing.add_done_callback(partial(self._ended, len(lines)))
            with contextlib.suppress(OSError):  # counted and logged by _ended
                await asyncio.shield(self.writing)

    def _ended(self, lines: int, write: asyncio.Future[None]) -> None:
        """Count a batch's lines once: written, or lost ("error") when its write failed."""
        failure = "cancelled" if write.cancelled() else write.exception()
        if failure is None:
            self.metrics.traced("written", lines)
            return
        self.metrics.traced("error", lines)
        log.error(json.dumps({"event": "trace_write_failed", "path": str(self.path),
                              "error": str(failure), "lines": lines}))

    def _append(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode()
        with contextlib.suppress(FileNotFoundError):
            if self.rotate and self.path.stat().st_size + len(data) > self.max_bytes:
                self._rotate()
        with self.path.open("ab") as handle:
            handle.write(data)

    def _rotate(self) -> None:
        if self.keep <= 0:
            self.path.unlink()
            return
        for index in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    async def close(self) -> None:
        if self.writing is not None:
            await asyncio.wait([self.writing])
        await self.flush()
