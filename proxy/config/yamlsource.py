"""YAML read with line numbers kept, and the key-path walker the config loader is built on.

Rule: every problem is collected, never raised one at a time, so `check` shows them all at once.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        return f"{self.path or '<top>'}: {self.message}{where}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


class LineDict(dict[Any, Any]):
    """A mapping that remembers the line of each key, for error messages."""

    lines: dict[Any, int]


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, bool):  # YAML 1.1 reads on/yes/true as True: keep what was written
            key = key_node.value
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str) -> Any:
    """Parse YAML; a syntax error becomes a ConfigError naming the line."""
    try:
        return yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem("", f"not valid YAML: {problem}", line)]) from exc


class Section:
    """One mapping of the file, read key by key; unknown keys are reported when closed."""

    def __init__(self, data: Any, path: str, problems: list[Problem], line: int | None = None):
        self.path, self.problems, self.line = path, problems, line
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.report("", f"must be a mapping, got {type_name(data)}")
            data = {}
        self.data: dict[Any, Any] = data
        self.seen: set[Any] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def line_of(self, key: Any) -> int | None:
        lines = getattr(self.data, "lines", None)
        return lines.get(key, self.line) if lines else self.line

    def report(self, key: str, message: str) -> None:
        path = self.key_path(key) if key else self.path
        self.problems.append(Problem(path, message, self.line_of(key) if key else self.line))

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None, *, aliases: Iterable[Any] = ()) -> Any:
        for name in (key, *aliases):
            if name in self.data:
                self.seen.add(name)
                return self.data[name]
        return default

    def section(self, key: str, default: Any = None) -> Section:
        return Section(self.raw(key, default), self.key_path(key), self.problems,
                       self.line_of(key))

    def number(self, key: str, default: float | None, *, low: float | None = None,
               high: float | None = None, integer: bool = False,
               low_open: bool = False) -> float | None:
        value = self.raw(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            self.report(key, f"must be a number, got {value!r}")
            return default
        if integer and not float(value).is_integer():
            self.report(key, f"must be a whole number, got {value!r}")
            return default
        if (low is not None and (value <= low if low_open else value < low)) or (
                high is not None and value > high):
            self.report(key, range_message(low, high, low_open, value))
            return default
        return int(value) if integer else float(value)

    def text(self, key: str, default: str | None) -> str | None:
        value = self.raw(key, default)
        if value is None or isinstance(value, str):
            return value
        self.report(key, f"must be a string, got {value!r}")
        return default

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(key, default)
        if value in choices:
            return str(value)
        hint = suggest(value, choices)
        self.report(key, f"must be one of {', '.join(choices)}, got {value!r}{hint}")
        return default

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if isinstance(value, bool):
            return value
        self.report(key, f"must be true or false, got {value!r}")
        return default

    def close(self, known: Iterable[str]) -> None:
        """Report every key nobody read, with a did-you-mean."""
        names = [str(k) for k in known]
        for key in self.data:
            if key in self.seen:
                continue
            hint = suggest(key, names)
            self.problems.append(Problem(self.key_path(str(key)), f"unknown key{hint}",
                                         self.line_of(key)))


def suggest(value: Any, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def range_message(low: float | None, high: float | None, low_open: bool, value: Any) -> str:
    if low is not None and high is not None:
        return f"must be between {fmt(low)} and {fmt(high)}, got {fmt(value)}"
    if low is not None:
        return f"must be {'above' if low_open else 'at least'} {fmt(low)}, got {fmt(value)}"
    return f"must be at most {fmt(high)}, got {fmt(value)}"


def fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def type_name(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)
