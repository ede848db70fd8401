"""How two answers differ: outcome (status class, success) and JSON shape, never bytes.

Rules (SPEC "Comparison result"): `error` when next_gen gave no complete answer; `mismatch`
when both answered but differ in status class, success or shape (keys and value types,
recursively, minus `shadow.compare.ignore` paths); else `match`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.observe import Measurement

MAX_DIFF = 20


@dataclass(frozen=True, slots=True)
class Comparison:
    result: str  # match | mismatch | error
    status: bool
    success: bool
    shape: bool
    diff: tuple[str, ...] = field(default_factory=tuple)

    def trace_fields(self) -> dict[str, Any]:
        return {"result": self.result, "status": self.status, "success": self.success,
                "shape": self.shape, "diff": list(self.diff)}


def compare(old: Measurement, old_body: Any, new: Measurement, new_body: Any,
            ignore: frozenset[str]) -> Comparison:
    if new.status is None:
        return Comparison("error", False, False, False, ("<no answer>",))
    same_status = old.status is not None and old.status // 100 == new.status // 100
    same_success = old.success == new.success
    diff = shape_diff(old_body, new_body, "", ignore)
    same_shape = not diff
    result = "match" if same_status and same_success and same_shape else "mismatch"
    return Comparison(result, same_status, same_success, same_shape, tuple(diff[:MAX_DIFF]))


def kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def shape_diff(old: Any, new: Any, path: str, ignore: frozenset[str]) -> list[str]:
    """Paths (dotted, `[]` for array items) whose presence or type differs."""
    if path in ignore:
        return []
    if kind(old) != kind(new):
        return [path or "$"]
    if isinstance(old, dict):
        diffs: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            child = f"{path}.{key}" if path else str(key)
            if child in ignore:
                continue
            if key not in old or key not in new:
                diffs.append(child)
            else:
                diffs.extend(shape_diff(old[key], new[key], child, ignore))
        return diffs
    if isinstance(old, list) and old and new:
        return shape_diff(old[0], new[0], f"{path}[]", ignore)
    return []
