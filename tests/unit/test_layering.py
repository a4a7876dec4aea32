"""The package's folders are the data path: no import points up the list, and no import cycles.

Order, top to bottom (a module may import its own level and any level below it):
entry points (cli, server, bench, api) -> engine (rank 0) -> executor (every rank) -> protocol
(the messages both sides speak) -> config and sampling parameters -> models -> parallel ->
kernels -> weights -> launcher.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "meshlm"

LEVELS = [
    {"__init__", "__main__", "cli", "server", "bench", "api"},
    {"engine"},
    {"executor"},
    {"protocol"},
    {"config", "sampling_params", "structured_outputs", "step_limits"},
    {"models"},
    {"parallel"},
    {"kernels"},
    {"weights"},
    {"launcher"},
]


def _level(top: str) -> int:
    for index, names in enumerate(LEVELS):
        if top in names:
            return index
    raise AssertionError(f"meshlm/{top} is in no level of LEVELS; add it where it belongs")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every meshlm module this file imports, at any depth of the file (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("meshlm"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("meshlm"):
            for alias in node.names:  # "from meshlm.engine import outputs" imports a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else node.module)
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@functools.cache
def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_checker_sees_an_upward_import():
    assert _level("engine") < _level("executor") < _level("protocol") < _level("models")
    assert _top("meshlm.engine.scheduler") == "engine" and _top("meshlm") == "__init__"


@pytest.mark.parametrize("module", sorted(_graph()))
def test_no_import_points_up(module):
    level = _level(_top(module))
    upward = [m for m in sorted(_graph()[module]) if _level(_top(m)) < level]
    assert not upward, f"{module} (level {level}) imports higher levels: {upward}"


def test_no_import_cycles():
    graph = {m: {d for d in deps if d in _graph_modules()} for m, deps in _graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep == node:
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def _graph_modules() -> set[str]:
    return set(_graph())
