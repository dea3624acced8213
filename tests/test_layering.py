"""The import graph of the package: no import circle, and no module imports a higher layer.

Every ``import`` is counted, module-level or inside a function, except those under ``if TYPE_CHECKING:`` (which never
run). Registries that a lower layer owns name the modules that fill them (``populate=``), as strings; those are not
imports and are checked separately: each named module exists.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedforge"

# lowest first; a module may import its own layer or any layer below it, never one above
LAYERS: list[set[str]] = [
    {"errors", "_version", "_io", "registry", "options", "commands", "provenance"},
    {"data", "models"},
    {"config"},
    {"results"},
    {"core"},
    {"generative"},
    {"algorithms"},
    {"integrations", "synth", "attacks"},
    {"sweep", "quickstart", "cli", "__init__", "__main__"},
]
# sub-commands live with the package that owns them but compose like the tool itself
TOP = {"fedforge.generative.cli", "fedforge.synth.cli", "fedforge.attacks.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(mod: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node) if n is not node.test}
    pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")[: len(mod.split(".")) - (0 if pkg else 1)]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [f"{target}.{a.name}" for a in node.names] + [target]
        for t in targets:
            if not t.startswith("fedforge"):
                continue
            while t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t != mod:
                out.add(t)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(mod: str) -> int:
    if mod in TOP:
        return len(LAYERS) - 1
    name = mod.split(".")[1] if "." in mod else "__init__"
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"module {mod} is in no layer; add its package to LAYERS in {__file__}")


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


def test_no_module_imports_a_higher_layer():
    upward = sorted(f"{m} → {d}" for m, deps in GRAPH.items() for d in deps if _layer(d) > _layer(m))
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_circle():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
    """The checks could fail: a function-level import back up is an edge like any other."""
    fake = tmp_path / "fedforge" / "data"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("def f():\n    from ..core import engine\n")
    MODULES["fedforge.data.x"] = fake / "x.py"
    try:
        deps = _imports("fedforge.data.x", fake / "x.py")
        assert "fedforge.core.engine" in deps and _layer("fedforge.core.engine") > _layer("fedforge.data.x")
    finally:
        del MODULES["fedforge.data.x"]


@pytest.mark.parametrize("registry", ["fedforge.core.algorithm:ALGORITHMS", "fedforge.core.executors:EXECUTORS",
                                      "fedforge.core.tracking:TRACKERS", "fedforge.data.sources:SOURCES",
                                      "fedforge.models.zoo:MODELS", "fedforge.models.groups:GROUPS",
                                      "fedforge.generative.base:GENERATORS", "fedforge.commands:COMMANDS"])
def test_registries_name_existing_modules(registry):
    mod, name = registry.split(":")
    reg = getattr(importlib.import_module(mod), name)
    for m in reg.populated_by:
        assert importlib.util.find_spec(m) is not None, f"{registry} names {m}, which does not exist"
