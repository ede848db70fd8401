"""How two answers differ: outcome (status class, success) and JSON shape, never bytes.

Rules (SPEC "Comparison result"): `error` when next_gen gave no complete answer; `mismatch`
when both answered but differ in status class, success or shape (keys and value types,
recursively, minus `shadow.compare.ignore` paths); else `match`.
With a baseline (legacy asked twice, as Diffy does), values are compared too: a path whose
value legacy repeats faithfully but next_gen changes is a real difference (a mismatch); a
path whose value differs between legacy's own two answers is noise and never one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.telemetry.observe import Measurement

MAX_DIFF = 20


@dataclass(frozen=True, slots=True)
class Comparison:
    result: str  # match | mismatch | error
    status: bool
    success: bool
    shape: bool
    diff: tuple[str, ...] = field(default_factory=tuple)
    noise: tuple[str, ...] = field(default_factory=tuple)


MATCH = Comparison("match", True, True, True)


MISMATCH_KINDS = ("status", "success", "shape")  # what a mismatch can be about


def verdict(stated: object, flags: dict[str, Any], failed: bool) -> tuple[str, tuple[str, ...]]:
    """The result and a mismatch's kinds, read back from a trace line's `match` (`stated` is
    its result, `flags` its status/success/shape booleans; `failed` when next_gen gave no
    complete answer): the rule compare() wrote it by, applied again."""
    if failed or stated == "error":
        return "error", ("error",)
    kinds = tuple(k for k in MISMATCH_KINDS if flags.get(k) is False)
    return ("mismatch" if kinds or stated == "mismatch" else "match"), kinds


def compare(old: Measurement, old_body: Any, new: Measurement, new_body: Any,
            ignore: frozenset[str], noise: Noise | None = None) -> Comparison:
    if new.status is None:
        return Comparison("error", False, False, False, ("<no answer>",))
    same_status = old.status is not None and old.status // 100 == new.status // 100
    same_success = old.success == new.success
    # No shortcut on old_body == new_body: Python holds 1 == True, a change of JSON type.
    diff = [] if same_shape(old_body, new_body, "", ignore) else shape_diff(
        old_body, new_body, "", ignore)
    shaped = not diff
    noisy: list[str] = []
    if noise is not None and noise.learned and shaped:
        changed = value_diff(old_body, new_body, ignore)
        noisy = [path for path in changed if noise.noisy(path)]
        diff = [path for path in changed if noise.stable(path)]
    same = same_status and same_success and shaped and not diff
    if same and not noisy:
        return MATCH  # the usual verdict: one shared instance, not one per mirror
    return Comparison("match" if same else "mismatch", same_status, same_success, shaped,
                      tuple(diff[:MAX_DIFF]), tuple(noisy[:MAX_DIFF]))


def leaves(document: Any, path: str, ignore: frozenset[str], out: dict[str, Any]) -> None:
    """Flatten to path -> value; an array is one value (its items move between answers)."""
    if path in ignore:
        return
    if isinstance(document, dict):
        for key, value in document.items():
            leaves(value, f"{path}.{key}" if path else str(key), ignore, out)
    else:
        out[path or "$"] = document


def value_diff(old: Any, new: Any, ignore: frozenset[str]) -> list[str]:
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    leaves(old, "", ignore, a)
    leaves(new, "", ignore, b)
    return sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))


class Noise:
    """Per path: how often legacy's two answers to the same request were compared, and how
    often that path's value differed between them. Bounded to MAX_PATHS paths."""

    MAX_PATHS = 10_000

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.differing: dict[str, int] = {}
        self.samples = 0

    @property
    def learned(self) -> bool:
        return self.samples > 0

    def learn(self, first: Any, second: Any, ignore: frozenset[str]) -> None:
        a: dict[str, Any] = {}
        b: dict[str, Any] = {}
        leaves(first, "", ignore, a)
        leaves(second, "", ignore, b)
        self.samples += 1
        for path in a.keys() | b.keys():
            if path not in self.seen and len(self.seen) >= self.MAX_PATHS:
                continue
            self.seen[path] = self.seen.get(path, 0) + 1
            if a.get(path) != b.get(path):
                self.differing[path] = self.differing.get(path, 0) + 1

    def noisy(self, path: str) -> bool:
        return self.differing.get(path, 0) > 0

    def stable(self, path: str) -> bool:
        return self.seen.get(path, 0) > 0 and not self.noisy(path)

    def status(self) -> dict[str, Any]:
        return {"samples": self.samples,
                "paths": {p: {"seen": n, "differing": self.differing.get(p, 0)}
                          for p, n in sorted(self.seen.items())[:200]}}


# JSON's kinds by Python type, as json.loads makes them (bool before int: True is an int).
KINDS: dict[type, str] = {type(None): "null", bool: "boolean", int: "number",
                          float: "number", str: "string", list: "array", dict: "object"}


def kind(value: Any) -> str:
    found = KINDS.get(type(value))
    if found is not None:
        return found
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def same_shape(old: Any, new: Any, path: str, ignore: frozenset[str]) -> bool:
    """shape_diff(...) == [], without building a path unless some are ignored: nearly every
    mirror's answer has legacy's shape, and this check runs per mirror."""
    if ignore and path in ignore:
        return True
    shape = kind(old)
    if shape != kind(new):
        return False
    if shape == "object" and isinstance(old, dict) and isinstance(new, dict):
        if old.keys() != new.keys():
            return not shape_diff(old, new, path, ignore)  # ignored keys may explain it
        for key, value in old.items():
            child = (f"{path}.{key}" if path else str(key)) if ignore else ""
            if not same_shape(value, new[key], child, ignore):
                return False
        return True
    if shape == "array" and old and new:
        return same_shape(old[0], new[0], f"{path}[]" if ignore else "", ignore)
    return not shape_diff(old, new, path, ignore) if shape == "object" else True


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
