"""Reading the comparison trace for `report`: lines, route prefixes, moments. The record a
line holds, and how it is parsed, is proxy/telemetry/record.py's (the writer's module too).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

from proxy.telemetry.record import MAX_LINE_BYTES, Result, parse_line
from proxy.telemetry.record import Side as Answer
from proxy.telemetry.record import TraceRecord as Comparison

__all__ = ["MAX_LINE_BYTES", "Answer", "Comparison", "Line", "Result", "epoch", "parse_line",
           "path_prefix"]
PREFIX_DEPTH: Final = 2

Line = tuple[str, int, bytes]  # file name, line number, raw bytes

# Path segments that name one object rather than a route (as the capture rules define ids).
_ID_SEGMENT: Final = re.compile(
    r"\d+|[0-9a-fA-F]{8,}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def path_prefix(path: str) -> str:
    """The route part of a path: up to PREFIX_DEPTH segments, stopping at an id."""
    kept: list[str] = []
    for segment in path.split("?", 1)[0].split("/"):
        if len(kept) == PREFIX_DEPTH:
            break
        if not segment:
            continue
        if _ID_SEGMENT.fullmatch(segment):
            break
        kept.append(segment)
    return "/" + "/".join(kept)


def epoch(ts: str) -> float | None:
    try:
        moment = datetime.fromisoformat(ts)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
