"""Rewrite the algorithm table of README.md from the registry (keeps the README true).

Usage: python scripts/readme_algorithms.py [--check]
"""
from __future__ import annotations

import sys
from pathlib import Path

START, END = "<!-- algorithms:start -->", "<!-- algorithms:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"

def table() -> str:
    """One table per family, in the registry's family order (``fedforge.core.algorithm.FAMILIES``)."""
    from fedforge.algorithms import ALGORITHMS
    from fedforge.core.algorithm import FAMILIES, family_of

    out = []
    for key, title in FAMILIES:
        # only the library's own algorithms (a test or a user plugin may register more in the same process)
        rows = [e for e in ALGORITHMS.entries() if e.obj.__module__.startswith("fedforge.") and family_of(e.obj) == key]
        if not rows:
            continue
        out += [f"**{title}**", "", "| name | what it does | paper |", "|---|---|---|"]
        for e in rows:
            summary = e.summary.replace("|", "\\|")
            out.append(f"| `{e.name}` | {summary} | {getattr(e.obj, 'paper', '') or '-'} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}{END}{tail}"


def main() -> int:
    text = README.read_text()
    new = render(text)
    if "--check" in sys.argv:
        if new != text:
            print("README.md's algorithm table is out of date: run python scripts/readme_algorithms.py")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
