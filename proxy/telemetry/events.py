"""An incremental `text/event-stream` parser, fed chunk by chunk as the answer passes (pure).

Rules (WHATWG HTML, server-sent events): lines end with CRLF, LF or CR; a blank line ends an
event; `data:` lines join with LF; a leading space after the colon is dropped; `:` lines are
comments. Only what the proxy measures is kept: the last event whose JSON data carries a path,
so memory stays bounded however long the stream runs.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_LINE = 1 << 20  # a longer line is not an event we measure; it is skipped
JSON_START = re.compile(rb"[ \t\r\n]*[{\[]")  # matched in place: lstrip() would copy the data


class EventStream:
    __slots__ = ("_cr", "_data", "_open", "_open_size", "_size", "_skipping", "events",
                 "last_json", "paths", "wanted")

    def __init__(self, wanted: tuple[tuple[str, ...], ...]) -> None:
        self.wanted = wanted  # JSON paths whose last value we keep
        self.paths: dict[tuple[str, ...], Any] = {}
        self._open: list[bytes] = []  # pieces of the line not ended yet, as they came
        self._open_size = 0
        self._cr = False  # the last chunk ended with CR: its line ended, unless an LF follows
        self._data: list[bytes] = []
        self._size = 0  # bytes in _data; an event past MAX_LINE is not one we measure
        self._skipping = False
        self.events = 0
        self.last_json: Any = None

    @property
    def held(self) -> int:
        """Bytes kept for the line and the event not ended yet (each at most MAX_LINE)."""
        return self._open_size + sum(map(len, self._data))

    def feed(self, chunk: bytes) -> None:
        """Only the new bytes are scanned: a long line in small pieces costs its length once,
        not once per piece (the pieces are joined when it ends)."""
        start, size = 0, len(chunk)
        if self._cr:
            self._cr = False
            self._end_line(b"")
            if chunk[:1] == b"\n":  # the second half of that CRLF
                start = 1
        while start < size:
            end = _line_end(chunk, start)
            if end < 0:
                self._keep(chunk[start:] if start else chunk)
                return
            after = end + 1
            if chunk[end] == 13:  # CR
                if after == size:  # may be half of a CRLF: the next chunk says
                    self._keep(chunk[start:end])
                    self._cr = True
                    return
                if chunk[after] == 10:
                    after += 1
            self._end_line(chunk[start:end])
            start = after

    def close(self) -> None:
        """End of stream: a final event without its blank line still counts."""
        if self._cr or self._open:
            self._end_line(b"")
        self._cr = self._skipping = False
        self._line(b"")

    def _keep(self, piece: bytes) -> None:
        """Part of a line that has not ended; past MAX_LINE the line is dropped, not kept."""
        if self._skipping or not piece:
            return
        self._open_size += len(piece)
        if self._open_size > MAX_LINE:
            self._open, self._open_size, self._skipping = [], 0, True
            return
        self._open.append(piece)

    def _end_line(self, tail: bytes) -> None:
        if self._skipping:
            self._skipping = False
            return
        line = tail
        if self._open:
            line = b"".join((*self._open, tail))
            self._open, self._open_size = [], 0
        if len(line) <= MAX_LINE:
            self._line(line)

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
        if not self.wanted or JSON_START.match(data) is None:
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
    """Where the first line end (CR or LF) at or after `start` is; -1 if none."""
    lf = buffer.find(b"\n", start)
    cr = buffer.find(b"\r", start, lf if lf >= 0 else len(buffer))
    return cr if cr >= 0 else lf


def _at(document: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document
