"""A section's keys as a table of fields, and the reading of a section by its table.

Rules: the table is the one list of a section's keys, so reading, defaults, bounds and the
did-you-mean for an unknown key all come from it. A default is written as it would be in the
file. `null` turns off a field typed `X | None`; on a figure that cannot be off it means 0 where
its bounds allow 0, else the default (`drain_timeout_s: null` is 0, `timeout_s: null` is 60).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlsplit

from proxy.config.yamlsource import Section


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # a default that says the key must be written

Reader = Callable[[Section, "Field"], Any]


@dataclass(frozen=True, slots=True)
class Field:
    """One key of a section: the type read, the default as it would be written, bounds, purpose.

    `type` is int, float, str, Path or bool, `| None` when null turns it off; a key with
    structure names the type its `read` returns, and a section of its own lists `fields`.
    """

    key: str
    type: Any
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()
    fields: tuple[Field, ...] = ()
    read: Reader | None = None

    @property
    def optional(self) -> bool:
        return type(None) in get_args(self.type)

    @property
    def base_type(self) -> Any:
        kinds = [kind for kind in get_args(self.type) if kind is not type(None)]
        return kinds[0] if self.optional and len(kinds) == 1 else self.type

    def allows(self, value: float) -> bool:
        low, high = self.low, self.high
        return ((low is None or (value > low if self.low_open else value >= low))
                and (high is None or value <= high))


def read_fields(s: Section, fields: tuple[Field, ...]) -> dict[str, Any]:
    """Every field of the table by key; then any key the table lacks is reported."""
    values = {f.key: read_field(s, f) for f in fields}
    s.close(f.key for f in fields)
    return values


def read_section(s: Section, f: Field) -> dict[str, Any]:
    """The values of a key that is a section of its own, by its table."""
    default = f.default if isinstance(f.default, dict) else None  # REQUIRED: read as empty
    return read_fields(s.section(f.key, default), f.fields)


def read_field(s: Section, f: Field) -> Any:
    """One field's value: by its reader, by its own table, or by its type."""
    if f.default is None and not s.has(f.key):
        return None
    if f.read is not None:
        return f.read(s, f)
    if f.fields:
        return f.type(**read_section(s, f))
    if f.choices:
        return s.choice(f.key, f.default, f.choices)
    if f.base_type is bool:
        return s.flag(f.key, f.default)
    if f.base_type in (str, Path):
        return read_text(s, f)
    return read_number(s, f)


def read_text(s: Section, f: Field) -> str | Path | None:
    value = s.text(f.key, f.default)
    if not value and not f.optional:
        value = f.default
    if f.base_type is Path:
        return Path(value) if value else None
    return value


def read_number(s: Section, f: Field) -> float | None:
    integer = f.base_type is int
    value = s.number(f.key, f.default, low=f.low, high=f.high, integer=integer,
                     low_open=f.low_open)
    if value is None and not f.optional:  # null on a figure that cannot be off
        value = 0 if f.allows(0) else f.default
    if value is None:
        return None
    return int(value) if integer else float(value)


# Readers for values of common shapes, each given its section and its row. -----------------


def header_map(s: Section, f: Field) -> tuple[tuple[str, str], ...]:
    raw = s.raw(f.key, f.default) or {}
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str | int | float) and not isinstance(
                v, bool) for k, v in raw.items()):
        s.report(f.key, f"must map header names to values, got {raw!r}")
        return ()
    pairs = tuple((k, str(v)) for k, v in raw.items())
    for name, value in pairs:
        if not name.isascii() or any(c in name for c in " :\r\n") or any(
                c in value for c in "\r\n"):
            s.report(f.key, f"header {name!r} is not a valid header line")
    return pairs


def path_prefixes(s: Section, f: Field) -> tuple[str, ...]:
    raw = s.raw(f.key, f.default)
    if not isinstance(raw, list) or not all(isinstance(p, str) and p.startswith("/") for p in raw):
        s.report(f.key, f"must be a list of path prefixes starting with '/', got {raw!r}")
        return tuple(f.default)
    return tuple(raw)


def strings(s: Section, f: Field, what: str) -> list[str]:
    """A list of strings, where null means an empty list."""
    raw = s.raw(f.key, f.default) or []
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        s.report(f.key, f"must be a list of {what}, got {raw!r}")
        return []
    return raw


def http_url(s: Section, f: Field) -> str | None:
    value = s.text(f.key, f.default)
    if value and urlsplit(value).scheme not in ("http", "https"):
        s.report(f.key, f"must be an http(s) URL, got {value!r}")
    return value


def only_value(s: Section, f: Field) -> Any:
    """A section of one key (`{days: 90}`) read as that key's value."""
    (value,) = read_section(s, f).values()
    return value


def moment(s: Section, f: Field) -> datetime | None:
    value = s.raw(f.key)
    if value is None:
        return None
    parsed = to_datetime(value)
    if parsed is None:
        s.report(f.key, f"must be a date or RFC 3339 time, got {value!r}")
    return parsed


def due(s: Section, f: Field) -> datetime | None:
    if not s.has(f.key):
        s.report(f.key, "is required")
    return moment(s, f)


def to_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None
