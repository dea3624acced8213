"""Where FedKTL's latent centroids land: BatchNorm statistics of the uploaded prototypes vs last round's running ones.

One few-shot client (CIFAR-100 classes 50-99, 2 shots, 4-layer CNN) and the shipped built-in generator (prior
N(0, I), root-mean-square 1). After every round it prints the root-mean-square of the C latent centroids the server
generates from, and the client's training loss, for ``centroid_stats=prototypes`` (fedforge) and ``running`` (the
authors' code: F in eval mode).

    scripts/cpu-slot .venv/bin/python benchmarks/ktl_centroid_probe.py --data-root /work/shared/data
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    from fedforge import algorithms  # noqa: F401
    from fedforge.config import build_config
    from fedforge.core.simulation import Simulation
    from fedforge.data import load_dataset

    ds = load_dataset("cifar100", args.data_root, False, "50-99")
    for mode in ("prototypes", "running"):
        cfg = build_config(overrides=dict(algorithm="fedktl", dataset="cifar100", class_subset="50-99", model="cnn",
                                          clients=1, partition="fewshot", shots=2, rounds=args.rounds, eval_every=1000,
                                          lr=0.01, data_root=args.data_root, checkpoint_every=0,
                                          params={"centroid_stats": mode}))
        sim = Simulation(cfg, run_dir=False, progress=False, dataset=ds)
        aggregate = sim.algo.aggregate

        def probe(server, updates, rnd, aggregate=aggregate, mode=mode):
            new = aggregate(server, updates, rnd)
            rms = float(new["gen/latents"].pow(2).mean().sqrt())
            print(f"centroid_stats={mode:<10} round {rnd}: client loss {updates[0].metrics['loss']:10.1f}, "
                  f"latent centroid RMS {rms:6.2f} (prior 1.00)", flush=True)
            return new

        sim.algo.aggregate = probe
        sim.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
