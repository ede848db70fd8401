"""HTTP/1.1 request framing for the fake backend: where each request ends, nothing more.

Rules: a request is a head up to the blank line, then a body framed by Content-Length or
by chunked transfer coding; HTTP/1.0 closes unless it asks for keep-alive. Anything else
(bad sizes, heads over MAX_HEAD_BYTES) is a BadRequest. Pure: bytes in, requests out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_HEAD_BYTES = 65536


class BadRequest(ValueError):
    """The bytes are not a request this parser understands."""


@dataclass(frozen=True, slots=True)
class Request:
    method: bytes
    close: bool


class _State(enum.Enum):
    HEAD = enum.auto()
    BODY = enum.auto()
    CHUNK_SIZE = enum.auto()
    CHUNK_DATA = enum.auto()
    TRAILERS = enum.auto()


@dataclass(frozen=True, slots=True)
class _Head:
    method: bytes
    close: bool
    length: int
    chunked: bool


def parse_head(head: bytes) -> _Head:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise BadRequest(f"bad request line: {lines[0][:80]!r}")
    close = parts[2] == b"HTTP/1.0"
    length, chunked = 0, False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise BadRequest(f"bad header line: {line[:80]!r}")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = _content_length(value)
        elif name == b"transfer-encoding":
            chunked = value.endswith(b"chunked")
        elif name == b"connection":
            close = b"close" in value or (close and b"keep-alive" not in value)
    return _Head(parts[0], close, length, chunked)


def _content_length(value: bytes) -> int:
    if not value.isdigit():
        raise BadRequest(f"bad Content-Length: {value[:20]!r}")
    return int(value)


class RequestParser:
    """Consumes a connection's bytes and yields one Request each time one is complete."""

    def __init__(self) -> None:
        self._state = _State.HEAD
        self._left = 0
        self._head: _Head | None = None

    def feed(self, buf: bytearray) -> Request | None:
        """Consume what it can from buf; a Request once a whole one has been read."""
        while True:
            done = self._step(buf)
            if done is None:
                return None
            if done:
                head, self._head, self._state = self._head, None, _State.HEAD
                assert head is not None
                return Request(head.method, head.close)

    def _step(self, buf: bytearray) -> bool | None:
        """True: request complete; False: progress made; None: needs more bytes."""
        if self._state is _State.HEAD:
            return self._read_head(buf)
        if self._state in (_State.BODY, _State.CHUNK_DATA):
            return self._skip(buf)
        if self._state is _State.CHUNK_SIZE:
            return self._read_chunk_size(buf)
        return self._read_trailers(buf)

    def _read_head(self, buf: bytearray) -> bool | None:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise BadRequest("request head too large")
            return None
        head = parse_head(bytes(buf[:end]))
        del buf[: end + 4]
        self._head = head
        if head.chunked:
            self._state = _State.CHUNK_SIZE
            return False
        self._left, self._state = head.length, _State.BODY
        return head.length == 0

    def _skip(self, buf: bytearray) -> bool | None:
        taken = min(len(buf), self._left)
        del buf[:taken]
        self._left -= taken
        if self._left:
            return None
        if self._state is _State.CHUNK_DATA:
            self._state = _State.CHUNK_SIZE
            return False
        return True

    def _read_chunk_size(self, buf: bytearray) -> bool | None:
        end = buf.find(b"\r\n")
        if end < 0:
            return None
        try:
            size = int(bytes(buf[:end]).split(b";")[0].strip(), 16)
        except ValueError as exc:
            raise BadRequest("bad chunk size") from exc
        del buf[: end + 2]
        if size == 0:
            self._state = _State.TRAILERS
        else:
            self._left, self._state = size + 2, _State.CHUNK_DATA
        return False

    def _read_trailers(self, buf: bytearray) -> bool | None:
        if len(buf) < 2:
            return None
        if buf.startswith(b"\r\n"):
            del buf[:2]
            return True
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        del buf[: end + 4]
        return True
