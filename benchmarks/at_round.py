"""Accuracy (or any metric) of every run in a compare.py out-dir at the same round (for runs of unequal length, e.g.
one still running), or one metric over several rounds.

    .venv/bin/python benchmarks/at_round.py bench-runs/cifar100-dir0.1 [--round R] [--keys K1,K2,...]
    .venv/bin/python benchmarks/at_round.py bench-runs/cifar100-dir0.1 --series personalized_acc --rounds 10,20,30

Prints a markdown table. Default: for each run directory under OUT_DIR, the global and personalized accuracy (%)
evaluated at round R (default: the last round evaluated by every run), and the best of each up to R; ``--keys`` adds
columns with those metrics' values at round R (keys ending in ``_acc`` or ``_offclass`` as %). ``--series KEY``
prints KEY for each run at each of ``--rounds``. Reads only metrics.jsonl (training-stage records).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def curves(out_dir: Path) -> dict[str, list[dict]]:
    runs = {}
    for d in sorted(p for p in out_dir.iterdir() if (p / "metrics.jsonl").is_file()):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        runs[d.name] = [r for r in rows if r.get("stage", "train") == "train"
                        and (r.get("global_acc") is not None or r.get("personalized_acc") is not None)]
    return runs


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def fmt(key: str, x) -> str:
    if x is None:
        return "-"
    if key.endswith("_acc") or key.endswith("_offclass"):
        return pct(x)
    return f"{x:,}" if isinstance(x, int) else f"{x:.4g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--round", type=int, default=None, help="round to compare at (default: the latest common one)")
    ap.add_argument("--keys", default="", help="comma list of further metrics to show at that round")
    ap.add_argument("--series", default=None, help="one metric, shown at each of --rounds")
    ap.add_argument("--rounds", default="", help="comma list of rounds for --series")
    args = ap.parse_args()
    runs = curves(args.out_dir)
    if not runs:
        raise SystemExit(f"no run directory with metrics.jsonl under {args.out_dir}")
    if args.series:
        rounds = [int(r) for r in args.rounds.split(",") if r.strip()]
        if not rounds:
            raise SystemExit("--series needs --rounds R1,R2,...")
        print(f"{args.series}\n")
        print("| method | " + " | ".join(str(r) for r in rounds) + " |")
        print("|---|" + "---|" * len(rounds))
        for name, rows in runs.items():
            at = {r["round"]: r for r in rows}
            print(f"| {name} | " + " | ".join(fmt(args.series, at[r].get(args.series)) if r in at else "-"
                                              for r in rounds) + " |")
        return
    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    common = min(max(r["round"] for r in rows) for rows in runs.values())
    rnd = common if args.round is None else args.round
    print(f"round {rnd}\n")
    print("| method | global at round | pers. at round | global best up to it | pers. best up to it |"
          + "".join(f" {k} |" for k in keys))
    print("|---|---|---|---|---|" + "---|" * len(keys))
    for name, rows in runs.items():
        at = next((r for r in rows if r["round"] == rnd), None)
        upto = [r for r in rows if r["round"] <= rnd]
        best = lambda k, upto=upto: max((r[k] for r in upto if r.get(k) is not None), default=None)  # noqa: E731
        if at is None:
            print(f"| {name} | not evaluated at round {rnd} | | | |" + " |" * len(keys))
            continue
        print(f"| {name} | {pct(at.get('global_acc'))} | {pct(at.get('personalized_acc'))} | {pct(best('global_acc'))} "
              f"| {pct(best('personalized_acc'))} |" + "".join(f" {fmt(k, at.get(k))} |" for k in keys))


if __name__ == "__main__":
    main()
