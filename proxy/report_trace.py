"""What one line of the comparison trace says: its two answers and how they compared.

Rules:
1. A line is a comparison, blank, or bad; a bad line gets a reason, never an exception.
2. A figure that is missing, negative, not finite or of the wrong type is no figure (None).
3. next_gen gave no complete answer (result `error`) when its status is null or an `error`
   field is set; such an answer is never a success.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

MAX_LINE_BYTES: Final = 1 << 20
PREFIX_DEPTH: Final = 2

Result = Literal["match", "mismatch", "error"]
Line = tuple[str, int, bytes]  # file name, line number, raw bytes

# Path segments that name one object rather than a route (as the capture rules define ids).
_ID_SEGMENT: Final = re.compile(
    r"\d+|[0-9a-fA-F]{8,}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


@dataclass(frozen=True, slots=True)
class Answer:
    """What one side of a comparison measured; None where the trace had no figure."""

    status: int | None = None
    time_ms: float | None = None
    ttft_ms: float | None = None
    tokens: float | None = None
    memory_mb: float | None = None
    cost_usd: float | None = None
    success: bool = False
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Comparison:
    execution_id: str
    ts: str
    path: str
    result: Result
    kinds: tuple[str, ...]  # mismatch kinds (status, success, shape), or ("error",)
    old: Answer
    new: Answer
    diff: tuple[str, ...] = ()
    noise: tuple[str, ...] = ()


def _number(value: object) -> float | None:
    # type() rather than isinstance(): a bool is no figure, and this runs ten times a line.
    if (type(value) is float or type(value) is int) and 0 <= value < math.inf:
        return value
    return None


def _text(value: object) -> str | None:
    if value is None or value is False or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _paths(value: object) -> tuple[str, ...]:
    if not value or not isinstance(value, list):
        return ()
    return tuple(item if isinstance(item, str) else json.dumps(item) for item in value)


def _answer(side: dict[str, Any]) -> Answer:
    status = side.get("status")
    if type(status) is not int:
        status = None
    success = side.get("success")
    if type(success) is not bool:
        # The proxy's own rule when no success field is configured: status < 500.
        success = status is not None and status < 500
    get = side.get
    return Answer(status, _number(get("time_ms")), _number(get("ttft_ms")),
                  _number(get("tokens")), _number(get("memory_mb")), _number(get("cost_usd")),
                  success, _text(get("error")))


def _failed(answer: Answer, error: str | None) -> Answer:
    """next_gen's answer when it gave none that is complete: never a success."""
    reason = answer.error or error or ("no status" if answer.status is None else "error")
    return Answer(answer.status, answer.time_ms, answer.ttft_ms, answer.tokens,
                  answer.memory_mb, answer.cost_usd, False, reason)


def parse_line(data: bytes) -> Comparison | str | None:
    """A comparison, the reason a line is bad, or None for a blank line."""
    if not data.strip():
        return None
    if len(data) >= MAX_LINE_BYTES and not data.endswith(b"\n"):
        return f"longer than {MAX_LINE_BYTES} bytes"
    try:
        obj = json.loads(data)
    except UnicodeDecodeError:
        return "not UTF-8"
    except ValueError as exc:
        return f"not JSON ({exc})"
    if not isinstance(obj, dict):
        return "not a JSON object"
    old, new = obj.get("old_system"), obj.get("new_system")
    if not isinstance(old, dict):
        return "no old_system object"
    if new is not None and not isinstance(new, dict):
        return "new_system is not an object"
    return _comparison(obj, _answer(old), _answer(new) if new else Answer())


def _comparison(obj: dict[str, Any], old: Answer, new: Answer) -> Comparison:
    match = obj.get("match")
    if not isinstance(match, dict):
        match = {}
    # The proxy writes its verdict as match.result; a top-level result is read too.
    stated = match.get("result", obj.get("result"))
    error = _text(obj.get("error"))
    kinds: tuple[str, ...] = ()
    result: Result = "match"
    if new.status is None or new.error is not None or error is not None or stated == "error":
        result, kinds, new = "error", ("error",), _failed(new, error)
    elif match and False in match.values():
        kinds = tuple(k for k in ("status", "success", "shape") if match.get(k) is False)
        result = "mismatch" if kinds else "match"
    if stated == "mismatch" and result == "match":
        result = "mismatch"
    return Comparison(
        str(obj.get("execution_id") or ""),
        str(obj.get("ts") or ""),
        str(obj.get("path") or "/"),
        result,
        kinds,
        old,
        new,
        _paths(match.get("diff")) if result == "mismatch" else (),  # "<no answer>" is no path
        _paths(match.get("noise")),
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
