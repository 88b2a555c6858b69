"""The layering of docs/architecture.md, enforced: imports go downwards only, no cycles, no
method names compared outside models/methods/, and train/ reads in short functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "tunelab"

#: Each package's layer; a module may import its own package and lower layers only.
LAYERS = {
    "errors": 0,
    "config": 1, "files": 1,
    "data": 2, "models": 2, "checkpoint": 2,
    "train": 3, "evaluate": 3,
    "workflow": 4, "serve": 4,
    "cli": 5, "__main__": 6, "testing": 6,
}  # fmt: skip
METHOD_NAMES = {"full", "freeze", "lora", "qlora"}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def imports(tree: ast.AST, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported tunelab module) for every import in ``tree`` (function bodies too,
    unless ``top_level_only``)."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunelab"):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("tunelab")]
    return found


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer():
    assert {package(m) for m in modules()} - {"__init__"} <= set(LAYERS)


def test_imports_only_go_down_the_layers():
    wrong = []
    for name, tree in modules().items():
        source = package(name)
        for line, target in imports(tree):
            to = package(target)
            if source == "__init__" or to in (source, "__init__"):
                continue
            if LAYERS[to] >= LAYERS[source]:
                wrong.append(f"{name}:{line} imports {target} ({source} is layer "
                             f"{LAYERS[source]}, {to} layer {LAYERS[to]})")  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules():
    all_modules = modules()
    graph = {
        name: {t for _, t in imports(tree, top_level_only=True) if t in all_modules and t != name}
        for name, tree in all_modules.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            assert cycle is None, " -> ".join(cycle)


def test_method_names_are_compared_only_inside_models_methods():
    wrong = []
    for name, tree in modules().items():
        if name.startswith("tunelab.models.methods"):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            values = []
            for side in (node.left, *node.comparators):
                elts = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
                values += [e.value for e in elts if isinstance(e, ast.Constant)]
            if METHOD_NAMES & {v for v in values if isinstance(v, str)}:
                wrong.append(f"{name}:{node.lineno}")
    assert not wrong, "method names compared outside models/methods/: " + ", ".join(wrong)


@pytest.mark.parametrize("limit", [60])
def test_train_functions_fit_on_a_screen(limit):
    long = []
    for name, tree in modules().items():
        if not name.startswith("tunelab.train"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)
