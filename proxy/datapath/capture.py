"""Usage-pattern capture: a few sample requests of each distinct pattern, for `replay`.

Rules:
1. A pattern is (method, path with numeric, hex (8+ digits) and UUID segments written `{id}`,
   the request JSON's shape: keys and value types, recursively; "-" for a body that is not
   JSON). observe() runs on the hot path: no I/O, no await; once a pattern holds `per_pattern`
   samples a request of it is only counted. Replays (X-Rollout-Replay) are not captured.
2. Never stored: Authorization, Cookie, Proxy-Authorization, X-Api-Key, hop-by-hop headers and
   the per-request identities the proxy rebuilds (Host, X-Forwarded-*, X-Request-Id, ...).
   JSON fields (at any depth, in lists too) and query or form parameters named in `redact`
   become "[redacted]". A body over `max_body_bytes` keeps its shape (in the key) but not its
   values: the sample has `"body": null, "truncated": true`.
3. Memory is bounded: at most `max_patterns` patterns, each with at most `per_pattern` samples
   of at most `max_body_bytes` of body (kept serialized, as UTF-8 bytes) + MAX_HEADER_BYTES of
   headers + the path (aiohttp caps the request line at 8 KiB), and a shape of at most
   MAX_SHAPE characters: about max_patterns × per_pattern × (max_body_bytes + 24 KiB).
   A request of a new pattern past `max_patterns` is counted in `dropped_patterns`, not kept.
4. The file (JSON Lines, one pattern a line, most seen first) is rewritten atomically (temp file
   in the same directory, fsync, os.replace) in a thread, at most once per interval and only
   when something changed; close() writes a last time. An existing file is merged in first,
   so counts and samples carry over a restart; bad lines in it are skipped and logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode

from proxy.config.model import CaptureConfig
from proxy.datapath.headers import HOP_BY_HOP, connection_named
from proxy.state.store import write_atomically
from proxy.telemetry.compare import kind

log = logging.getLogger("rollout_proxy")

REDACTED: Final = "[redacted]"
NOT_JSON: Final = "-"
MAX_HEADER_BYTES: Final = 16 * 1024
MAX_SHAPE: Final = 4096
REPLAY_HEADER: Final = "X-Rollout-Replay"
SECRET_HEADERS: Final = frozenset({"authorization", "cookie", "proxy-authorization", "x-api-key"})
NOT_STORED: Final = SECRET_HEADERS | HOP_BY_HOP | frozenset({
    "content-length", "host", "expect", "via", "forwarded", "x-forwarded-for",
    "x-forwarded-proto", "x-forwarded-host", "x-request-id", "traceparent", "tracestate",
    REPLAY_HEADER.lower(),
})
ID_SEGMENT: Final = re.compile(
    r"\d+|[0-9a-fA-F]{8,}"
    r"|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
FORM: Final = "application/x-www-form-urlencoded"
SCALARS: Final[dict[type, str]] = {str: "string", bool: "boolean", int: "number",
                                   float: "number", type(None): "null"}

Key = tuple[str, str, str]  # method, path template, shape


@dataclass(slots=True)
class Pattern:
    count: int = 0
    samples: list[bytes] = field(default_factory=list)  # each one serialized JSON object


def template(path: str) -> str:
    """`/v1/tasks/123` → `/v1/tasks/{id}` (numeric, hex of 8+ digits, UUID segments)."""
    return "/".join("{id}" if ID_SEGMENT.fullmatch(s) else s for s in path.split("/"))


def shape_of(value: Any) -> str:
    """Keys and value types, recursively, as a canonical string (keys sorted; an array is
    the sorted set of its items' shapes). type() dispatch: this runs on every JSON request."""
    of = type(value)
    if of is dict:
        return "{" + ",".join(f"{quoted(k)}:{shape_of(v)}" for k, v in sorted(value.items())) + "}"
    if of is list:
        return "[" + ",".join(sorted({shape_of(item) for item in value})) + "]"
    return SCALARS.get(of) or kind(value)


def quoted(key: str) -> str:
    """json.dumps(key, ensure_ascii=False), without its cost for a plain key."""
    if key.isprintable() and '"' not in key and "\\" not in key:
        return f'"{key}"'
    return json.dumps(key, ensure_ascii=False)


def bounded_shape(shape: str) -> str:
    if len(shape) <= MAX_SHAPE:
        return shape
    digest = hashlib.sha256(shape.encode()).hexdigest()[:16]
    return f"{shape[:MAX_SHAPE - 40]}…#{digest}"


def redacted(value: Any, names: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if str(k).lower() in names else redacted(v, names)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(item, names) for item in value]
    return value


def redacted_query(text: str, names: frozenset[str]) -> str:
    pairs = parse_qsl(text, keep_blank_values=True)
    if not any(name.lower() in names for name, _ in pairs):
        return text
    return urlencode([(n, REDACTED if n.lower() in names else v) for n, v in pairs])


def kept_headers(headers: Mapping[str, str]) -> tuple[dict[str, str], bool]:
    """The headers a sample may keep, and whether some were left out for MAX_HEADER_BYTES."""
    named = connection_named(headers) if "Connection" in headers else frozenset()
    kept: dict[str, str] = {}
    size, cut = 0, False
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in NOT_STORED or lowered in named:
            continue
        size += len(name) + len(value)
        if size > MAX_HEADER_BYTES:
            cut = True
            continue
        kept[name] = f"{kept[name]}, {value}" if name in kept else value
    return kept, cut


def looks_json(body: bytes, content_type: str) -> bool:
    if "json" in content_type.lower():
        return True
    return not content_type and body.lstrip()[:1] in (b"{", b"[")


def parse(body: bytes | None, content_type: str) -> tuple[bool, Any]:
    """(is JSON, document). Bodies too deep to walk count as not JSON."""
    if not body or not looks_json(body, content_type):
        return False, None
    try:
        return True, json.loads(body)
    except (ValueError, RecursionError):
        return False, None


def serialize(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class Capture:
    def __init__(self, config: CaptureConfig) -> None:
        self.config = config
        self.patterns: dict[Key, Pattern] = {}
        self.dropped_patterns = 0  # requests whose (new) pattern was past max_patterns
        self.failed_writes = 0
        self.dirty = False
        self.loaded = False
        self.lock = asyncio.Lock()
        self.writing: asyncio.Future[None] | None = None  # the write running in its thread

    def observe(self, method: str, path: str, headers: Mapping[str, str], body: bytes | None,
                content_type: str) -> None:
        if headers.get(REPLAY_HEADER):
            return
        route, _, _ = path.partition("?")
        is_json, document = parse(body, content_type)
        try:
            shape = bounded_shape(shape_of(document)) if is_json else NOT_JSON
        except RecursionError:
            is_json, document, shape = False, None, NOT_JSON
        key = (method.upper(), template(route), shape)
        pattern = self.patterns.get(key)
        if pattern is None:
            if len(self.patterns) >= self.config.max_patterns:
                self.dropped_patterns += 1
                return
            pattern = self.patterns[key] = Pattern()
        pattern.count += 1
        self.dirty = True
        if len(pattern.samples) < self.config.per_pattern:
            pattern.samples.append(self.sample(path, headers, body, content_type,
                                               is_json, document))

    def sample(self, path: str, headers: Mapping[str, str], body: bytes | None,
               content_type: str, is_json: bool, document: Any) -> bytes:
        kept, cut = kept_headers(headers)
        route, mark, query = path.partition("?")
        record: dict[str, Any] = {"headers": kept, "body": None,
                                  "path": route + mark + redacted_query(query, self.config.redact)}
        if cut:
            record["headers_truncated"] = True
        if body:
            self.add_body(record, body, content_type, is_json, document)
        return serialize(record)

    def add_body(self, record: dict[str, Any], body: bytes, content_type: str, is_json: bool,
                 document: Any) -> None:
        limit = self.config.max_body_bytes
        if len(body) > limit:
            record["truncated"] = True
            return
        if is_json:
            try:
                value = redacted(document, self.config.redact)
                fits = len(serialize(value)) <= limit  # "[redacted]" may be longer than a value
            except RecursionError:
                record["omitted"] = "too deeply nested"
                return
            if fits:
                record["body"] = value
            else:
                record["truncated"] = True
            return
        if looks_json(body, content_type):  # JSON by its type, but not parseable
            record["omitted"] = "not valid JSON"
            return
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            record["omitted"] = "not UTF-8 text"
            return
        if content_type.lower().startswith(FORM):
            text = redacted_query(text, self.config.redact)
        if len(serialize(text)) > limit:  # escapes and "[redacted]" may make it longer
            record["truncated"] = True
            return
        record["body"] = text

    async def load(self) -> None:
        """Merge the existing file in (once): counts add up, samples fill up to per_pattern."""
        async with self.lock:
            if self.loaded:
                return
            entries = await asyncio.to_thread(read_patterns, self.config.file, self.config)
            for key, count, samples in entries:
                self.merge(key, count, samples)
            self.loaded = True

    def merge(self, key: Key, count: int, samples: list[bytes]) -> None:
        pattern = self.patterns.get(key)
        if pattern is None:
            if len(self.patterns) >= self.config.max_patterns:
                self.dropped_patterns += count
                return
            pattern = self.patterns[key] = Pattern()
        pattern.count += count
        room = self.config.per_pattern - len(pattern.samples)
        pattern.samples.extend(samples[:max(room, 0)])

    async def run(self, interval_s: float = 60.0) -> None:
        await self.load()
        while True:
            await asyncio.sleep(interval_s)
            await self.save()

    async def save(self) -> None:
        """Rewrite the file when something changed since the last write."""
        async with self.lock:
            if not self.dirty or not self.loaded:
                return
            snapshot = [(key, p.count, tuple(p.samples)) for key, p in self.patterns.items()]
            self.dirty = False
            try:
                # Shielded: a cancelled save leaves its write to finish, and close() waits.
                self.writing = asyncio.ensure_future(
                    asyncio.to_thread(write_atomically, self.config.file, lines(snapshot)))
                await asyncio.shield(self.writing)
            except OSError as exc:
                self.dirty = True
                self.failed_writes += 1
                log.error(json.dumps({"event": "capture_write_failed",
                                      "path": str(self.config.file), "error": str(exc)}))

    async def close(self) -> None:
        if self.writing is not None and not self.writing.done():
            try:
                await self.writing
            except OSError:
                self.dirty = True  # the snapshot it held is written again below
        await self.load()  # never overwrite a file that was not merged in
        await self.save()


def lines(snapshot: list[tuple[Key, int, tuple[bytes, ...]]]) -> Iterable[bytes]:
    """The file's lines, most seen pattern first (a generator: runs in the writer thread)."""
    for (method, path, shape), count, samples in sorted(snapshot, key=lambda e: -e[1]):
        head = serialize({"method": method, "path": path, "shape": shape, "count": count})
        yield head[:-1] + b',"samples":[' + b",".join(samples) + b"]}\n"


def read_patterns(path: Path, config: CaptureConfig) -> list[tuple[Key, int, list[bytes]]]:
    """The patterns of an existing capture file, re-sanitized; bad lines skipped and logged."""
    entries: list[tuple[Key, int, list[bytes]]] = []
    bad: list[int] = []
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return entries
    except OSError as exc:
        log.error(json.dumps({"event": "capture_load_failed", "path": str(path),
                              "error": str(exc)}))
        return entries
    with handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            entry = read_line(raw, config)
            if entry is None:
                bad.append(number)
            else:
                entries.append(entry)
    if bad:
        log.warning(json.dumps({"event": "capture_bad_lines", "path": str(path),
                                "skipped": len(bad), "lines": bad[:20]}))
    return entries


def read_line(raw: bytes, config: CaptureConfig) -> tuple[Key, int, list[bytes]] | None:
    try:
        line = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(line, dict):
        return None
    method, path, shape, count = (line.get(k) for k in ("method", "path", "shape", "count"))
    samples = line.get("samples", [])
    if not (isinstance(method, str) and method and isinstance(path, str) and path.startswith("/")
            and isinstance(shape, str) and isinstance(count, int) and not isinstance(count, bool)
            and count >= 0 and isinstance(samples, list)):
        return None
    kept = [clean for s in samples if (clean := stored_sample(s, config)) is not None]
    return (method.upper(), path, shape), count, kept[:config.per_pattern]


def stored_sample(sample: Any, config: CaptureConfig) -> bytes | None:
    """A sample read back, held to today's rules (an older file may predate a redact name)."""
    if not isinstance(sample, dict) or not isinstance(sample.get("headers", {}), dict):
        return None
    headers = {str(k): str(v) for k, v in sample.get("headers", {}).items()}
    record = dict(sample)
    record["headers"], cut = kept_headers(headers)
    if cut:
        record["headers_truncated"] = True
    try:
        record["body"] = redacted(sample.get("body"), config.redact)
    except RecursionError:
        return None
    if isinstance(record.get("path"), str):
        route, mark, query = record["path"].partition("?")
        record["path"] = route + mark + redacted_query(query, config.redact)
    data = serialize(record)
    body_size = len(serialize(record["body"]))
    if body_size > config.max_body_bytes:
        record["body"], record["truncated"] = None, True
        data = serialize(record)
    return data
