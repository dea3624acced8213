"""Choose FedKTL's settings for the single-edge-client benchmark on validation data, never on test accuracy.

The client of `benchmarks/ktl_single_client.py` (k shots of each CIFAR-100 class 50-99, seed s) keeps ``--val-per-class``
of its own k training images per class aside as a validation set, trains on the other k − v, and each candidate
setting is scored by its accuracy on those held-back images (the last evaluation of the run). The test images of the
benchmark are never loaded into these runs. The best setting is printed as ``--set`` flags for the benchmark.

Selection is made once at the largest k (at k = 2 there is nothing to hold back) and used for every k, as the paper
tunes one setting per task. Usage (resumable: finished candidates are kept):

    scripts/cpu-slot .venv/bin/python benchmarks/ktl_select.py --data-root /work/shared/data --shots 23 --val-per-class 5 \\
        --grid mu=0,5,50 --grid lam=0.1,1 --out-dir bench-runs/ktl-select --table docs/benchmarks/fedktl-single-select.md
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path


def parse_grid(items: list[str]) -> list[dict]:
    from fedforge.config import parse_value

    axes = []
    for item in items:
        key, _, values = item.partition("=")
        if not key or not values:
            raise SystemExit(f"--grid takes KEY=V1,V2,...; got {item!r}")
        axes.append([(key, parse_value(v)) for v in values.split(",")])
    return [dict(c) for c in itertools.product(*axes)] if axes else [{}]


def tag(params: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in sorted(params.items())) or "defaults"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--shots", type=int, default=23)
    p.add_argument("--val-per-class", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-subset", default="50-99")
    p.add_argument("--generator", default=None)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="FedKTL hyper-parameter values; repeatable (product)")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--out-dir", default="bench-runs/ktl-select")
    p.add_argument("--table", default="docs/benchmarks/fedktl-single-select.md")
    args = p.parse_args(argv)
    if not 0 < args.val_per_class < args.shots:
        p.error(f"--val-per-class must lie in 1..{args.shots - 1} (the client needs training images too)")

    from fedforge import algorithms  # noqa: F401
    from fedforge.config import build_config
    from fedforge.core.simulation import Simulation, build_partition
    from fedforge.data import load_dataset

    ds = load_dataset("cifar100", args.data_root, False, args.class_subset)
    base = dict(algorithm="fedktl", dataset="cifar100", class_subset=args.class_subset, model="cnn", clients=1,
                partition="fewshot", rounds=args.rounds, eval_every=args.eval_every, lr=args.lr,
                batch_size=args.batch_size, local_epochs=1, seed=args.seed, data_root=args.data_root,
                generator=args.generator, checkpoint_every=0)
    # the benchmark client's own k training images (the same draw as ktl_single_client.py) ...
    own = build_partition(build_config(overrides={**base, "shots": args.shots, "out": "unused"}), ds).train[0]
    # ... of which k − v per class train and v per class validate
    val_ds = replace(ds, x=ds.x[own], y=ds.y[own], name=f"{ds.name}:client-train")
    candidates = parse_grid(args.grid)
    rows = []
    for i, params in enumerate(candidates, 1):
        out = Path(args.out_dir) / f"k{args.shots}v{args.val_per_class}_s{args.seed}" / tag(params)
        if not (out / "summary.json").exists():
            if out.exists():
                shutil.rmtree(out)
            cfg = build_config(overrides={**base, "params": dict(params), "shots": args.shots - args.val_per_class, "out": str(out)})
            t0 = time.perf_counter()
            Simulation(cfg, run_dir=out, progress=False, dataset=val_ds).run()
            print(f"[{i}/{len(candidates)}] {tag(params)} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        s = json.loads((out / "summary.json").read_text())
        rows.append({"params": params, "val_last": 100 * s["last"]["personalized_acc"],
                     "val_best": 100 * s["best"]["personalized_acc"], "run": str(out)})
    best = max(rows, key=lambda r: r["val_last"])
    flags = " ".join(f"--set {k}={v}" for k, v in sorted(best["params"].items()))
    lines = ["# FedKTL settings for the single edge client, chosen on validation data", "",
             "Written by `benchmarks/ktl_select.py`:", "", "```",
             "scripts/cpu-slot .venv/bin/python benchmarks/ktl_select.py --data-root DATA --shots "
             f"{args.shots} --val-per-class {args.val_per_class} --seed {args.seed}"
             + "".join(f" --grid {g}" for g in args.grid) + f" --rounds {args.rounds} --eval-every {args.eval_every}"
             + (f" --generator {args.generator}" if args.generator else ""), "```", "",
             f"The benchmark client's own {args.shots} images per class of CIFAR-100 {args.class_subset} (seed {args.seed}) "
             f"are split into {args.shots - args.val_per_class} training and {args.val_per_class} validation images per "
             f"class; each setting trains on the first and is scored on the second (last evaluation, %). No test image "
             f"is used. Generator: `{args.generator or 'builtin'}`.", "",
             "| setting | validation acc (last) | validation acc (best) |", "|---|---|---|"]
    lines += [f"| {tag(r['params'])}{' **(chosen)**' if r is best else ''} | {r['val_last']:.2f} | {r['val_best']:.2f} |" for r in rows]
    lines += ["", f"Chosen: `{flags or '(defaults)'}`, passed to `benchmarks/ktl_single_client.py` for every k.", ""]
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text("\n".join(lines))
    (Path(args.out_dir) / "chosen.json").write_text(json.dumps({"params": best["params"], "rows": rows}, indent=2) + "\n")
    print(flags)
    return 0


if __name__ == "__main__":
    sys.exit(main())
