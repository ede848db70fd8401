"""An incremental `text/event-stream` parser, fed chunk by chunk as the answer passes (pure).

Rules (WHATWG HTML, server-sent events): lines end with CRLF, LF or CR; a blank line ends an
event; `data:` lines join with LF; a leading space after the colon is dropped; `:` lines are
comments. Only what the proxy measures is kept: the last event whose JSON data carries a path,
so memory stays bounded however long the stream runs.
"""

from __future__ import annotations

import json
from typing import Any

MAX_LINE = 1 << 20  # a longer line is not an event we measure; it is skipped


class EventStream:
    __slots__ = ("_buffer", "_data", "_size", "_skipping", "events", "last_json", "paths",
                 "wanted")

    def __init__(self, wanted: tuple[tuple[str, ...], ...]) -> None:
        self.wanted = wanted  # JSON paths whose last value we keep
        self.paths: dict[tuple[str, ...], Any] = {}
        self._buffer = b""
        self._data: list[bytes] = []
        self._size = 0  # bytes in _data; an event past MAX_LINE is not one we measure
        self._skipping = False
        self.events = 0
        self.last_json: Any = None

    def feed(self, chunk: bytes) -> None:
        buffer = self._buffer + chunk if self._buffer else chunk
        start = 0
        while True:
            end = _line_end(buffer, start)
            if end < 0:
                break
            line, start = buffer[start:end], end + (2 if buffer[end:end + 2] == b"\r\n" else 1)
            if self._skipping:
                self._skipping = False
                continue
            if len(line) <= MAX_LINE:
                self._line(line)
        rest = buffer[start:]
        if len(rest) > MAX_LINE:  # keep a trailing CR: it may be half of this line's end
            rest, self._skipping = rest[-1:] if rest.endswith(b"\r") else b"", True
        self._buffer = rest

    def close(self) -> None:
        """End of stream: a final event without its blank line still counts."""
        if self._buffer and not self._skipping:
            self._line(self._buffer.removesuffix(b"\r"))
        self._buffer, self._skipping = b"", False
        self._line(b"")

    def _line(self, line: bytes) -> None:
        if not line:
            if self._data and self._size <= MAX_LINE:
                self._dispatch(b"\n".join(self._data))
            self._data, self._size = [], 0
            return
        if line.startswith(b":"):
            return
        field, _, value = line.partition(b":")
        if field == b"data":
            value = value[1:] if value.startswith(b" ") else value
            self._size += len(value) + 1
            if self._size <= MAX_LINE:
                self._data.append(value)
            else:
                self._data = [b""]  # an event is open; keep none of it

    def _dispatch(self, data: bytes) -> None:
        self.events += 1
        if not self.wanted or not data.lstrip(b" \t\r\n").startswith((b"{", b"[")):
            return
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            return
        self.last_json = document
        for path in self.wanted:
            value = _at(document, path)
            if value is not None:
                self.paths[path] = value


def _line_end(buffer: bytes, start: int) -> int:
    lf = buffer.find(b"\n", start)
    cr = buffer.find(b"\r", start, lf if lf >= 0 else len(buffer))
    if cr >= 0 and cr + 1 == len(buffer):
        return -1 if lf < 0 else cr  # a CR at the very end may be half of CRLF: wait
    return cr if cr >= 0 else lf


def _at(document: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document
