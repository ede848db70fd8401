"""The package's layering, read from the source (ast): what a maintainer would break first.

1. The pure modules (where a request is decided, answers compared, guards judged, and the
   config modelled) and every proxy module they import use no aiohttp, sockets, event loop
   or files.
2. Imports run one way through the folders: config < telemetry < state < datapath <
   control < app.py, workers.py < offline (the CLI starts the app); tasks.py is below all.
3. The handler and the shadow speak to backends through the transport seam, never to h1.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxy"
PURE = ("proxy.datapath.decide", "proxy.telemetry.compare", "proxy.telemetry.guards",
        "proxy.config.model", "proxy.config.fields", "proxy.telemetry.families")
IMPURE_IMPORTS = ("aiohttp", "socket", "asyncio", "ssl", "httptools", "uvloop", "redis",
                  "multidict", "yarl")
FILE_CALLS = frozenset({"open", "fdopen", "mkstemp"})  # called by name, or as os.open
PATH_CALLS = frozenset({"open", "read_text", "read_bytes", "write_text", "write_bytes"})
ORDER = {"tasks": 0, "config": 1, "telemetry": 2, "state": 3, "datapath": 4, "control": 5,
         "app": 6, "workers": 6, "offline": 7}  # the CLI serves: it starts proxy.app


def module_path(name: str) -> Path:
    relative = Path(*name.split("."))
    path = ROOT / relative.with_suffix(".py")
    return path if path.exists() else ROOT / relative / "__init__.py"


def modules() -> list[str]:
    return sorted(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(
        ".__init__") for path in PACKAGE.rglob("*.py"))


@cache
def imports(name: str) -> tuple[tuple[str, int], ...]:
    """Every module `name` imports (with the line), at the top, in functions, or for types."""
    tree = ast.parse(module_path(name).read_text(), str(module_path(name)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names
                      if module_path(f"{node.module}.{alias.name}").exists()]
    return tuple(found)


def file_calls(name: str) -> list[tuple[str, int]]:
    tree = ast.parse(module_path(name).read_text())
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FILE_CALLS:
                calls.append((func.id, node.lineno))
            elif isinstance(func, ast.Attribute) and func.attr in PATH_CALLS | FILE_CALLS:
                calls.append((func.attr, node.lineno))
    return calls


def reached(name: str) -> set[str]:
    """`name` and every proxy module it imports, however indirectly."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo += [imported for imported, _ in imports(current)
                 if imported.startswith("proxy.") and module_path(imported).exists()]
    return seen


def layer(name: str) -> int:
    parts = name.split(".")
    return ORDER[parts[1]] if len(parts) > 1 else ORDER["app"]


@pytest.mark.parametrize("pure", PURE)
def test_the_pure_modules_use_no_network_no_event_loop_and_no_files(pure: str) -> None:
    problems = []
    for name in sorted(reached(pure)):
        problems += [f"{name}:{line} imports {imported}" for imported, line in imports(name)
                     if imported.split(".")[0] in IMPURE_IMPORTS]
        problems += [f"{name}:{line} calls {called}()" for called, line in file_calls(name)]
    assert not problems, f"{pure} must stay pure, but:\n" + "\n".join(problems)


def test_every_import_runs_down_the_folders() -> None:
    problems = [f"{name}:{line} imports {imported} (a higher layer)"
                for name in modules() for imported, line in imports(name)
                if imported.startswith("proxy.") and module_path(imported).exists()
                and layer(imported) > layer(name)]
    assert not problems, "imports must run config < telemetry < state < datapath < " \
        "control < app < offline:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", ["proxy.datapath.handler", "proxy.datapath.shadow"])
def test_the_handler_and_the_shadow_never_touch_h1(name: str) -> None:
    assert not [imported for imported, _ in imports(name)
                if imported.startswith("proxy.datapath.h1")], \
        f"{name} imports h1: speak to backends through proxy.datapath.upstream"


def test_the_rules_see_the_package() -> None:
    """The checks above read real modules: a rename must not leave them checking nothing."""
    names = modules()
    assert set(PURE) <= set(names)
    assert {name.split(".")[1] for name in names if name.count(".") >= 1} <= set(ORDER)
    assert any(imported == "proxy.datapath.transport"
               for imported, _ in imports("proxy.datapath.upstream"))
