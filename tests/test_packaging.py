"""Packaging: the declared dependencies are exactly what ``src/`` imports at module level or in functions; every
optional import (imported only where it is used) belongs to an extra; Python 3.10 and later are allowed."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def _imports() -> dict[str, set[str]]:
    """Top-level third-party module → files of src/fedforge that import it."""
    out: dict[str, set[str]] = {}
    for p in (ROOT / "src" / "fedforge").rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            mods = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module] if isinstance(n, ast.ImportFrom) and not n.level and n.module else []
            for m in mods:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top != "fedforge":
                    out.setdefault(top, set()).add(p.relative_to(ROOT).as_posix())
    return out


def _distribution(module: str) -> str:
    """The distribution that provides ``module`` (an optional one not installed here: its own name)."""
    dists = importlib.metadata.packages_distributions().get(module)
    return (dists[0] if dists else module).lower().replace("_", "-")


def test_dependencies_are_exactly_what_src_imports():
    declared = {_name(r) for r in PROJECT["dependencies"]}
    extras = {_name(r) for reqs in PROJECT["optional-dependencies"].values() for r in reqs} - {"fedforge"}
    needed, optional = set(), set()
    for module in _imports():
        dist = _distribution(module)
        (optional if dist in extras and dist not in declared else needed).add(dist)
    assert needed == declared, f"imported but not declared: {needed - declared}; declared but not imported: {declared - needed}"
    assert optional <= extras


def test_python_310_and_later_are_allowed():
    assert PROJECT["requires-python"] == ">=3.10"
