"""The comparison trace's one schema: the line the proxy writes for each comparison
(`TraceRecord.line`, with `side_json` and `match_json` for its parts and `utc_stamp` for its
time) and the record `report` reads back from it (`parse_line`). A field is added, renamed or
formatted here only.

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
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

from proxy.telemetry.compare import MATCH, Comparison, verdict
from proxy.telemetry.observe import Measurement

MAX_LINE_BYTES: Final = 1 << 20
_STRING = json.encoder.encode_basestring_ascii  # what json.dumps uses by default
COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps would build one per call
_second: list[Any] = [None, ""]  # the last whole second formatted, and its text
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
    def line(rid: str, now: float, method: str, path_qs: str, old: Measurement,
             new: Measurement, match: Comparison) -> str:
        """The line the proxy writes for one comparison made at `now` (the epoch): what
        parse_line reads back as a TraceRecord. Never bodies or ids."""
        return (f'{{"execution_id":{json_value(rid)},"ts":"{utc_stamp(now)}",'
                f'"method":{json_value(method)},'
                f'"path":{json_value(path_qs.split("?", 1)[0])},'
                f'"old_system":{side_json(old)},"new_system":{side_json(new)},'
                f'"match":{match_json(match)}}}')


# The writer's half: JSON written directly, byte for byte what json.dumps(separators=(",",
# ":")) writes for the *_fields dicts (tests/test_trace_json.py), without a dict per mirror.

def utc_stamp(now: float) -> str:
    """RFC 3339 UTC with milliseconds, as datetime.isoformat gives, at a fraction of the cost
    (the date and time are formatted once a second)."""
    micro = round(now * 1_000_000)  # as datetime rounds a timestamp: to microseconds
    second = micro // 1_000_000
    if second != _second[0]:
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{micro // 1000 % 1000:03d}Z"


def json_value(value: Any) -> str:
    """One value as json.dumps(separators=(",", ":")) writes it."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is str:
        return _STRING(value)
    if type(value) is int:
        return int.__repr__(value)
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)
    return COMPACT.encode(value)


def whole(value: float | None) -> float | int | None:
    return int(value) if value is not None and float(value).is_integer() else value


def side_fields(seen: Measurement) -> dict[str, Any]:
    """One side of a comparison (old_system, new_system) as the trace holds it."""
    fields: dict[str, Any] = {
        "status": seen.status, "time_ms": round(seen.time_ms, 3),
        "ttft_ms": None if seen.ttft_ms is None else round(seen.ttft_ms, 3),
        "tokens": whole(seen.tokens), "success": seen.success,
        "memory_mb": seen.memory_mb, "bytes": seen.bytes,
        "cost_usd": None if seen.cost_usd is None else round(seen.cost_usd, 8),
    }
    if seen.error:
        fields["error"] = seen.error
    return fields


def side_json(seen: Measurement) -> str:
    """side_fields() as compact JSON."""
    value = json_value
    status, tokens, success, memory = seen.status, seen.tokens, seen.success, seen.memory_mb
    ttft = "null" if seen.ttft_ms is None else value(round(seen.ttft_ms, 3))
    cost = "null" if seen.cost_usd is None else value(round(seen.cost_usd, 8))
    text = (f'{{"status":{"null" if status is None else value(status)},'
            f'"time_ms":{value(round(seen.time_ms, 3))},"ttft_ms":{ttft},'
            f'"tokens":{"null" if tokens is None else value(whole(tokens))},'
            f'"success":{"true" if success is True else value(success)},'
            f'"memory_mb":{"null" if memory is None else value(memory)},'
            f'"bytes":{value(seen.bytes)},"cost_usd":{cost}')
    if seen.error:
        text += f',"error":{value(seen.error)}'
    return text + "}"


def match_fields(match: Comparison) -> dict[str, Any]:
    """A comparison's verdict (the line's `match`) as the trace holds it."""
    return {"result": match.result, "status": match.status, "success": match.success,
            "shape": match.shape, "diff": list(match.diff), "noise": list(match.noise)}


def match_json(match: Comparison) -> str:
    """match_fields() as compact JSON."""
    if match is MATCH:
        return MATCH_JSON
    diff = ",".join(json_value(path) for path in match.diff)
    noise = ",".join(json_value(path) for path in match.noise)
    return (f'{{"result":{json_value(match.result)},"status":{json_value(match.status)},'
            f'"success":{json_value(match.success)},"shape":{json_value(match.shape)},'
            f'"diff":[{diff}],"noise":[{noise}]}}')


MATCH_JSON = match_json(Comparison("match", True, True, True))  # a twin: MATCH's own is this


# The reader's half ----------------------------------------------------------------------

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
