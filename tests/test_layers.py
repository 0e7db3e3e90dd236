"""The package's layering (docs/ARCHITECTURE.md, "Layers"), read from the source with ``ast``.

core < data < serving < training < cli: a module imports its own layer and the layers below.
No import cycles (function-level imports included), and a function-level import of a kpnet
module only where docs/ARCHITECTURE.md says why (:data:`LAZY`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kpnet"

#: Layer of each module, by longest matching prefix.
LAYERS = {
    "kpnet.fs": 0, "kpnet.graph_ops": 0, "kpnet.spec": 0, "kpnet.codec": 0, "kpnet.losses": 0,
    "kpnet.crops": 0, "kpnet.models": 0,
    "kpnet.data": 1, "kpnet.frames": 1, "kpnet.recipe": 1,
    "kpnet.inference": 2, "kpnet.export": 2, "kpnet.runner": 2, "kpnet.predict": 2,
    "kpnet.evaluate": 2, "kpnet.run_folder": 2, "kpnet.tracks": 2, "kpnet.plots": 2,
    "kpnet.outliers": 2,
    "kpnet.training": 3, "kpnet.saving": 3,
    "kpnet.cli": 4, "kpnet.__main__": 4,
}  # fmt: skip
NAMES = ("core", "data", "serving", "training", "cli")
#: Where a function-level import of a kpnet module is allowed, and why.
LAZY = {
    "kpnet.cli": "`kpnet --help` answers in < 2 s: a command imports its modules when it runs",
    "kpnet.saving": "register_keras_objects imports every layer's Keras objects when called",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported kpnet module, line, at function level) for each import in module ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target in MODULES and target != "kpnet":
                found.append((target, node.lineno, id(node) not in top))
    return found


def _layer(name: str) -> int:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def _lazy_reason(name: str) -> str | None:
    return next((why for p, why in LAZY.items() if name == p or name.startswith(p + ".")), None)


GRAPH = {name: _imports(name) for name in MODULES}


def test_every_module_has_a_layer():
    unplaced = [n for n in MODULES if n not in ("kpnet",) and not any(
        n == p or n.startswith(p + ".") for p in LAYERS)]  # fmt: skip
    assert not unplaced, f"add these modules to LAYERS (and docs/ARCHITECTURE.md): {unplaced}"


@pytest.mark.parametrize("name", [n for n in MODULES if n != "kpnet"])
def test_imports_go_down_the_layers(name):
    upward = [
        f"{name} ({NAMES[_layer(name)]}) imports {target} ({NAMES[_layer(target)]}) at line {line}"
        for target, line, _ in GRAPH[name]
        if _layer(target) > _layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_core_and_serving_rules_of_the_issue():
    """Core imports no data, recipe, training or CLI; serving imports no training."""
    core = [n for n in MODULES if n != "kpnet" and _layer(n) == 0]
    assert {"kpnet.codec", "kpnet.losses", "kpnet.spec", "kpnet.models.heads"} <= set(core)
    for name in core:
        for target, line, _ in GRAPH[name]:
            assert not target.startswith(("kpnet.data", "kpnet.training", "kpnet.cli",
                                          "kpnet.recipe")), (name, target, line)  # fmt: skip
    for name in ("kpnet.inference", "kpnet.export", "kpnet.runner", "kpnet.run_folder"):
        assert not any(t.startswith("kpnet.training") for t, _, _ in GRAPH[name]), name


def test_no_import_cycles():
    edges = {n: {t for t, _, _ in GRAPH[n]} for n in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for name in sorted(MODULES):
        if name not in state and (cycle := visit(name)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_function_level_imports_only_where_a_reason_is_given():
    hidden = [
        f"{name}:{line} imports {target} inside a function"
        for name in MODULES
        for target, line, nested in GRAPH[name]
        if nested and _lazy_reason(name) is None
    ]
    assert not hidden, "\n".join(hidden)
