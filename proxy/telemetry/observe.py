"""What one answer measured: status, timings, bytes, tokens, success, memory.

Rule 1: `measure` builds every answer's Measurement, at every site (the primary, a mirror, a
baseline, a replay, an answer passed over for a fallback); `no_answer` every request that got
none. A change to what is measured is made here only.
Rule 2: measuring never delays or buffers what the client receives. The body is teed into a
bounded buffer only when a figure must come from it, and parsed as JSON only when the answer
says it is JSON and fits the cap.
Rule 3: a Tee given an Allowance (the mirrors' one, shadow.max_held_bytes) takes every byte it
keeps from it, and gives them back once measured; when the allowance is spent the Tee gives
up (`starved`): the answer is still timed and counted, its body is not read for figures.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.config.model import Extract, TelemetryConfig
from proxy.telemetry.events import EventStream


@dataclass(slots=True)  # made per answer: not frozen, whose __init__ costs five times as much
class Measurement:
    status: int | None  # None: no complete answer
    time_ms: float
    ttft_ms: float | None
    bytes: int
    tokens: float | None
    success: bool | None
    memory_mb: float | None
    error: str | None = None  # connect_error, timeout, reset, truncated, bad_response,
    #   head_too_large
    cost_usd: float | None = None


def measure_tee(status: int | None, headers: Mapping[str, str], tee: Tee, *, started: float,
                first_byte: float | None, ended: float, telemetry: TelemetryConfig,
                error: str | None = None, backend: str | None = None) -> tuple[Measurement, Any]:
    """measure() over the body a Tee collected, and the parsed document (for a comparison).
    With an error the answer is incomplete: its status is not counted and its body is not
    parsed (no figure is read from it, and a comparison with it is an error whatever it
    holds: parsing a mirror cut mid-line would only cost the loop)."""
    document = tee.json() if error is None else None
    tee.release()
    return measure(None if error else status, headers, document, started=started,
                   first_byte=first_byte, ended=ended, size=tee.size, telemetry=telemetry,
                   error=error, backend=backend), document


def measure_body(status: int, headers: Mapping[str, str], body: bytes, *, started: float,
                 ended: float, telemetry: TelemetryConfig, compare: bool,
                 backend: str | None = None) -> tuple[Measurement, Any]:
    """measure_tee() for an answer whose body came whole with its head (its first byte then
    is its last), and the parsed document when `compare` asks for it."""
    tee = tee_for(headers, telemetry, compare)
    tee.feed(body)
    return measure_tee(status, headers, tee, started=started, first_byte=ended, ended=ended,
                       telemetry=telemetry, backend=backend)


def no_answer(kind: str, time_ms: float = 0.0) -> Measurement:
    """A request that got no complete answer: `kind` says why (connect_error, timeout, ...)."""
    return Measurement(None, time_ms, None, 0, None, False, None, kind)


class Allowance(Protocol):
    """Bytes that many answers' Tees share (rule 3)."""

    def take(self, size: int) -> bool: ...

    def give(self, size: int) -> None: ...


class Tee:
    """Collects a copy of the body up to `cap` bytes while it streams; past the cap, gives up.
    An event stream is parsed as it passes instead, keeping only the figures' last values."""

    __slots__ = ("allowance", "cap", "chunks", "events", "kept", "overflow", "size", "starved",
                 "wanted")

    def __init__(self, wanted: bool, cap: int, events: EventStream | None = None,
                 allowance: Allowance | None = None) -> None:
        self.wanted, self.cap = wanted and cap > 0, cap
        self.events = events
        self.allowance = allowance
        self.chunks: list[bytes] = []
        self.size, self.overflow = 0, False
        self.kept = 0  # taken from the allowance
        self.starved = False  # the allowance was spent: no figures from the body (rule 3)

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        events = self.events
        if events is not None:
            events.feed(chunk)
            if self.allowance is not None:
                self._hold(events.held)
            return
        if not self.wanted or self.overflow:
            return
        if self.size > self.cap:
            self.overflow, self.chunks = True, []
            self.release()
            return
        if self.allowance is not None:
            self._hold(self.kept + len(chunk))
            if self.starved:
                return
        self.chunks.append(chunk)

    def _hold(self, size: int) -> None:
        """Keep `size` bytes in all: take the growth from the allowance, give back a fall."""
        allowance, kept = self.allowance, self.kept
        assert allowance is not None
        if size < kept:
            allowance.give(kept - size)
        elif size > kept and not allowance.take(size - kept):
            self.release()
            self.starved, self.overflow, self.wanted = True, True, False
            self.events, self.chunks = None, []
            return
        self.kept = size

    def release(self) -> None:
        """Give back what was taken from the allowance (once measured, or given up)."""
        if self.kept and self.allowance is not None:
            self.allowance.give(self.kept)
        self.kept = 0

    def json(self) -> Any:
        if self.events is not None:
            return self.stream_document()
        if not self.wanted or self.overflow or not self.chunks:
            return None
        try:
            # Decoded here: json.loads(bytes) first sniffs for UTF-16/32, which JSON on the
            # wire is not (RFC 8259 8.1); a body that is not UTF-8 is no figure either.
            return json.loads(b"".join(self.chunks).decode("utf-8-sig"))  # a BOM is allowed
        except (ValueError, RecursionError):  # deep nesting is not a figure we can read
            return None

    def stream_document(self) -> Any:
        """The last JSON event, with the last value seen of each measured path laid over it."""
        assert self.events is not None
        self.events.close()
        last = self.events.last_json
        document: dict[str, Any] = dict(last) if isinstance(last, dict) else {}
        for path, value in self.events.paths.items():
            node = document
            for key in path[:-1]:
                child = node.get(key)
                node[key] = child = dict(child) if isinstance(child, dict) else {}
                node = child
            node[path[-1]] = value
        return document


def tee_for(headers: Mapping[str, str], telemetry: TelemetryConfig, compare: bool,
            allowance: Allowance | None = None) -> Tee:
    """A Tee that collects what this answer's figures need, and nothing more."""
    content_type = headers.get("Content-Type", "").lower()  # media types ignore case
    if content_type.startswith("text/event-stream") and not headers.get("Content-Encoding"):
        wanted = tuple(p for p in (telemetry.tokens.json, telemetry.success.json) if p)
        if compare or (telemetry.tokens.json and not (
                telemetry.tokens.header and telemetry.tokens.header in headers)):
            return Tee(True, telemetry.json_max_bytes, EventStream(wanted), allowance)
    return Tee(wants_body(headers, telemetry, compare), telemetry.json_max_bytes,
               allowance=allowance)


def wants_body(headers: Mapping[str, str], telemetry: TelemetryConfig, compare: bool) -> bool:
    """Whether a figure (or a comparison) needs the body: only JSON bodies are ever parsed."""
    if "json" not in headers.get("Content-Type", "").lower() or headers.get("Content-Encoding"):
        return False
    if compare:
        return True
    # Outside a comparison only tokens matter (success feeds comparisons; guards use status).
    return bool(telemetry.tokens.json) and not (
        telemetry.tokens.header and telemetry.tokens.header in headers)


def json_path(document: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if isinstance(document, dict):
            document = document.get(key)
        elif isinstance(document, list) and key.isdigit() and int(key) < len(document):
            document = document[int(key)]
        else:
            return None
    return document


def number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def figure(extract: Extract, headers: Mapping[str, str], body: Any) -> float | None:
    if extract.header:
        value = headers.get(extract.header)
        if value is not None:
            return number(value)
    if extract.json and body is not None:
        return number(json_path(body, extract.json))
    return None


def succeeded(extract: Extract, status: int | None, body: Any) -> bool | None:
    if status is None:
        return False
    if extract.json and body is not None:
        value = json_path(body, extract.json)
        if isinstance(value, bool):
            return value
    return status < 500


def measure(status: int | None, headers: Mapping[str, str], body: Any, *, started: float,
            first_byte: float | None, ended: float, size: int, telemetry: TelemetryConfig,
            error: str | None = None, backend: str | None = None) -> Measurement:
    tokens = figure(telemetry.tokens, headers, body) if status is not None else None
    price = telemetry.usd_per_1k_tokens.get(backend or "")
    return Measurement(
        status=status,
        time_ms=(ended - started) * 1000,
        ttft_ms=(first_byte - started) * 1000 if first_byte is not None else None,
        bytes=size,
        tokens=tokens,
        success=succeeded(telemetry.success, status, body),
        memory_mb=figure(telemetry.memory, headers, body) if status is not None else None,
        error=error,
        cost_usd=tokens / 1000 * price if tokens is not None and price is not None else None,
    )
