"""FedAvg and Local on PFLlib's own MNIST split, compared with PFLlib's published curve (issue 2 acceptance).

Usage:  python benchmarks/pfllib_mnist.py [--seeds 0 1 2] [--rounds 5] [--out docs/benchmarks/pfllib-mnist.md]

Runs FedAvg (4-layer CNN, batch 10, 1 local epoch, lr 0.005, full participation) for each seed and Local once,
and writes a markdown table of the global accuracy per round beside PFLlib's 0.220, 0.356, 0.594, 0.660, 0.692.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import fedforge

PFLLIB_CURVE = [0.220, 0.356, 0.594, 0.660, 0.692]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("FEDFORGE_DATA", "../shared/data"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="docs/benchmarks/pfllib-mnist.md")
    a = ap.parse_args()
    ds = f"pfllib:{Path(a.data) / 'pfllib-mnist'}"
    common = dict(dataset=ds, model="cnn", batch_size=10, local_epochs=1, lr=0.005, join_ratio=1.0, rounds=a.rounds,
                  run_dir=False, progress=True)
    curves, times = {}, {}
    for s in a.seeds:
        t = time.perf_counter()
        res = fedforge.run(algorithm="fedavg", seed=s, **common)
        times[s] = (time.perf_counter() - t, res.summary["seconds_per_round"])
        curves[s] = [r["global_acc"] for r in res.records if r["round"] >= 1]
        print(f"fedavg seed {s}: {[f'{v:.3f}' for v in curves[s]]}", file=sys.stderr)
    loc = fedforge.run(algorithm="local", seed=a.seeds[0], **common)
    local_curve = [r["personalized_acc"] for r in loc.records if r["round"] >= 1]
    mean = [statistics.mean(c[i] for c in curves.values()) for i in range(a.rounds)]
    lines = [
        "# FedAvg and Local on PFLlib's MNIST split (`../shared/data/pfllib-mnist`)",
        "",
        f"Command: `python benchmarks/pfllib_mnist.py --seeds {' '.join(map(str, a.seeds))} --rounds {a.rounds}`",
        "",
        "20 clients (PFLlib's own Dirichlet-0.1 split, used as-is), 4-layer CNN, batch 10, 1 local epoch, lr 0.005, "
        "full participation, sequential executor, fp32. Accuracy of the global model over all clients' test data "
        "after each aggregation round (Local: personalized accuracy).",
        "",
        "| round | PFLlib FedAvg | " + " | ".join(f"fedforge FedAvg seed {s}" for s in a.seeds) + " | fedforge FedAvg mean | fedforge Local |",
        "|---|---|" + "---|" * (len(a.seeds) + 2),
    ]
    for i in range(a.rounds):
        ref = f"{PFLLIB_CURVE[i]:.3f}" if i < len(PFLLIB_CURVE) else "-"
        lines.append(f"| {i + 1} | {ref} | " + " | ".join(f"{curves[s][i]:.3f}" for s in a.seeds)
                     + f" | {mean[i]:.3f} | {local_curve[i]:.3f} |")
    lines += ["", f"Mean over seeds after round {a.rounds}: **{mean[-1]:.3f}** (PFLlib: 0.692; acceptance band ±0.08). "
              f"Local after round {a.rounds}: **{local_curve[-1]:.3f}** (acceptance: ≥ 0.95).", "",
              f"Seconds per round (training + evaluation, sequential executor, {torch.get_num_threads()} torch thread(s), "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end): "
              + ", ".join(f"seed {s}: {times[s][1]:.1f}" for s in a.seeds)
              + ". These are not speed measurements (see docs/performance.md for those)."]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
