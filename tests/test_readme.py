"""README.md stays true: its algorithm table is the registry's, its set-up commands exist."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("readme_algorithms", ROOT / "scripts" / "readme_algorithms.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_algorithm_table_matches_registry():
    mod = _script()
    text = (ROOT / "README.md").read_text()
    assert mod.render(text) == text, "run `python scripts/readme_algorithms.py` to refresh README.md"


def test_setup_commands_exist_in_makefile():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_linked_docs_exist():
    readme = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)]+)\)", readme):
        assert (ROOT / link).exists(), f"README links to missing {link}"
