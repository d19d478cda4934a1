"""The package's shape: no import cycle among lib's modules, and no import from a lower layer to a higher one
(types <- core <- data <- builtin <- models <- methods <- workflows). Imports inside functions count too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[2] / "lib"

# module prefix -> layer; the longest matching prefix wins; anything else in lib is a method (layer 5)
LAYERS = {"lib.types": 0, "lib.core": 1, "lib.data": 2, "lib.data_gen": 2, "lib.builtin": 3, "lib.models": 4}
METHODS = 5
OUTSIDE = ("workflows", "bench", "tests", "ndif")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in LIB.rglob("*.py"):
        name = ".".join(path.relative_to(LIB.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _layer(module: str) -> int:
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(matches, key=len)] if matches else METHODS


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {t for t in _imports(p) if t in mods and t != m and t != "lib"} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(u, stack):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif not state.get(v):
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [])
    return cycles


def test_no_import_cycle_among_lib_modules():
    graph = _graph()
    assert len(graph) > 20  # the test really read the package
    assert _cycles(graph) == []


def test_the_cycle_check_catches_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_lower_layer_imports_a_higher_one():
    upward = [(m, t) for m, targets in _graph().items() if m != "lib" for t in targets if _layer(t) > _layer(m)]
    assert upward == []


@pytest.mark.parametrize("package", OUTSIDE)
def test_lib_never_imports_scripts_tests_or_the_server(package):
    offenders = [m for m, p in _modules().items() if any(t == package or t.startswith(package + ".")
                                                          for t in _imports(p))]
    assert offenders == []
