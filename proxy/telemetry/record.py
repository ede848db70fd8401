"""The comparison trace's one schema: the line the proxy writes for each comparison
(`TraceRecord.line`) and the record `report` reads back from it (`parse_line`).

Rules:
1. A line is a comparison, blank, or bad; a bad line gets a reason, never an exception.
2. A figure that is missing, negative, not finite or of the wrong type is no figure (None).
3. The verdict (match, mismatch, error, and the kinds of a mismatch) is compare.py's rule,
   read back by `compare.verdict`: next_gen gave no complete answer (error) when its status
   is null or an `error` field is set, and such an answer is never a success.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final, Literal

from proxy.telemetry.compare import Comparison, verdict
from proxy.telemetry.observe import Measurement, json_value

MAX_LINE_BYTES: Final = 1 << 20
Result = Literal["match", "mismatch", "error"]


@dataclass(frozen=True, slots=True)
class Side:
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
class TraceRecord:
    execution_id: str
    ts: str
    path: str
    result: Result
    kinds: tuple[str, ...]  # mismatch kinds (status, success, shape), or ("error",)
    old: Side
    new: Side
    diff: tuple[str, ...] = ()
    noise: tuple[str, ...] = ()
    method: str = ""

    @staticmethod
    def line(rid: str, ts: str, method: str, path_qs: str, old: Measurement, new: Measurement,
             match: Comparison) -> str:
        """The line the proxy writes for one comparison: what parse_line reads back as a
        TraceRecord. Written as JSON directly (no dict per mirror); never bodies or ids."""
        return (f'{{"execution_id":{json_value(rid)},"ts":"{ts}",'
                f'"method":{json_value(method)},'
                f'"path":{json_value(path_qs.split("?", 1)[0])},'
                f'"old_system":{old.trace_json()},"new_system":{new.trace_json()},'
                f'"match":{match.trace_json()}}}')


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


def _answer(side: dict[str, Any]) -> Side:
    status = side.get("status")
    if type(status) is not int:
        status = None
    success = side.get("success")
    if type(success) is not bool:
        # The proxy's own rule when no success field is configured: status < 500.
        success = status is not None and status < 500
    get = side.get
    return Side(status, _number(get("time_ms")), _number(get("ttft_ms")),
                  _number(get("tokens")), _number(get("memory_mb")), _number(get("cost_usd")),
                  success, _text(get("error")))


def _failed(answer: Side, error: str | None) -> Side:
    """next_gen's answer when it gave none that is complete: never a success."""
    reason = answer.error or error or ("no status" if answer.status is None else "error")
    return Side(answer.status, answer.time_ms, answer.ttft_ms, answer.tokens,
                  answer.memory_mb, answer.cost_usd, False, reason)


def parse_line(data: bytes) -> TraceRecord | str | None:
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
    return _comparison(obj, _answer(old), _answer(new) if new else Side())


def _comparison(obj: dict[str, Any], old: Side, new: Side) -> TraceRecord:
    match = obj.get("match")
    if not isinstance(match, dict):
        match = {}
    error = _text(obj.get("error"))
    # The proxy writes its verdict as match.result; a top-level result is read too.
    result, kinds = verdict(match.get("result", obj.get("result")), match,
                            new.status is None or new.error is not None or error is not None)
    if result == "error":
        new = _failed(new, error)
    return TraceRecord(
        str(obj.get("execution_id") or ""),
        str(obj.get("ts") or ""),
        str(obj.get("path") or "/"),
        result,  # type: ignore[arg-type]  # verdict() gives one of Result's three
        kinds,
        old,
        new,
        _paths(match.get("diff")) if result == "mismatch" else (),  # "<no answer>" is no path
        _paths(match.get("noise")),
        str(obj.get("method") or ""),
    )
