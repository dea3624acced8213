"""Accuracy of every run in a compare.py out-dir at the same round (for runs of unequal length, e.g. one still running).

    .venv/bin/python benchmarks/at_round.py bench-runs/cifar100-dir0.1 [--round R]

Prints a markdown table: for each run directory under OUT_DIR, the global and personalized accuracy (%) evaluated at
round R (default: the last round evaluated by every run), and the best of each up to R. Reads only metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def curves(out_dir: Path) -> dict[str, list[dict]]:
    runs = {}
    for d in sorted(p for p in out_dir.iterdir() if (p / "metrics.jsonl").is_file()):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        runs[d.name] = [r for r in rows if r.get("global_acc") is not None or r.get("personalized_acc") is not None]
    return runs


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--round", type=int, default=None, help="round to compare at (default: the latest common one)")
    args = ap.parse_args()
    runs = curves(args.out_dir)
    if not runs:
        raise SystemExit(f"no run directory with metrics.jsonl under {args.out_dir}")
    common = min(max(r["round"] for r in rows) for rows in runs.values())
    rnd = common if args.round is None else args.round
    print(f"round {rnd}\n")
    print("| method | global at round | pers. at round | global best up to it | pers. best up to it |")
    print("|---|---|---|---|---|")
    for name, rows in runs.items():
        at = next((r for r in rows if r["round"] == rnd), None)
        upto = [r for r in rows if r["round"] <= rnd]
        best = lambda k: max((r[k] for r in upto if r.get(k) is not None), default=None)  # noqa: E731
        if at is None:
            print(f"| {name} | not evaluated at round {rnd} | | | |")
            continue
        print(f"| {name} | {pct(at.get('global_acc'))} | {pct(at.get('personalized_acc'))} | {pct(best('global_acc'))} "
              f"| {pct(best('personalized_acc'))} |")


if __name__ == "__main__":
    main()
