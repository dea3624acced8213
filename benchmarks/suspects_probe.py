"""Short diagnostic runs behind docs/benchmarks/suspects.md (a benchmark script, not a test).

Runs one registered algorithm (or one of the diagnostic variants below) on a seeded per-class subsample of a
dataset, prints one line per evaluation (global and personalized accuracy plus extra views) and, for APFL, the
per-client mixing weight α after every round. Extra views are computed by the diagnostic variants only; the
registered algorithms run unchanged.

Usage (one torch thread; wrap long ones in scripts/cpu-slot):
  FEDFORGE_DATA=/work/shared/data .venv/bin/python benchmarks/suspects_probe.py ALGORITHM \
      [--dataset fmnist] [--fraction 0.2] [--clients 20] [--rounds 10] [--lr 0.005] [--norm dataset|pfllib]
      [--set k=v ...] [--log FILE]

Diagnostic variants:
  apfl_diag   the registered APFL (its --set settings apply) plus views: ``v`` (v alone), ``w_local`` (the client's
              w after its last local training), ``mix_global`` (α·v + (1 − α)·w_global); α per client and round.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

from fedforge import algorithms  # noqa: F401  (fills the registry)
from fedforge.algorithms.apfl import APFL
from fedforge.algorithms.mechanics import mix_params
from fedforge.config import build_config
from fedforge.core.algorithm import register_algorithm
from fedforge.core.messages import model_entries, under, with_prefix
from fedforge.core.simulation import SessionHooks, Simulation
from fedforge.data import load_dataset
from fedforge.data.sources import Dataset


def subsample(ds: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """A seeded per-class subsample of ``ds`` (``fraction`` of each class), same statistics and classes."""
    if fraction >= 1.0:
        return ds
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(ds.num_classes):
        idx = np.flatnonzero(ds.y == c)
        keep.append(rng.choice(idx, size=max(1, int(round(fraction * len(idx)))), replace=False))
    keep = np.sort(np.concatenate(keep))
    return Dataset(name=f"{ds.name}-sub{fraction:g}", x=ds.x[keep], y=ds.y[keep], num_classes=ds.num_classes,
                   mean=ds.mean, std=ds.std, modality=ds.modality)


# ------------------------------------------------------------------------------------------- APFL views
@register_algorithm("apfl_diag", summary="diagnostic APFL (extra views)")
class APFLDiag(APFL):
    """The registered APFL (its settings apply) plus views: ``v`` (v alone), ``w_local`` (the client's w after its
    last local training), ``mix_global`` (α·v + (1 − α)·w_global, what fedforge judged before mix_with=local)."""

    def local_update(self, rt, msg, state):
        up = super().local_update(rt, msg, state)
        up.state = {**up.state, **with_prefix(rt.model_state(), "wdiag")}  # w after this round's local training
        return up

    def evaluate(self, rt, msg, state):
        out = super().evaluate(rt, msg, state)
        a = float(state["apfl/alpha"])
        v = under(state, "v")
        rt.load(v)
        out["v"] = rt.evaluate()
        rt.load(mix_params([v, model_entries(msg)], [a, 1.0 - a], keys=list(v)))
        out["mix_global"] = rt.evaluate()
        wl = under(state, "wdiag")
        if wl:
            rt.load(wl)
            out["w_local"] = rt.evaluate()
        return out


class AlphaLog:
    """Engine listener: the per-client metrics ``alpha`` of every round's updates."""

    def __init__(self):
        self.rounds: dict[int, dict[int, float]] = {}

    def updates_received(self, rnd, updates, failures):
        got = {u.cid: round(float(u.metrics["alpha"]), 3) for u in updates if "alpha" in u.metrics}
        if got:
            self.rounds[rnd] = got


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("algorithm")
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--fraction", type=float, default=0.2, help="per-class share of the dataset kept (seeded)")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--model", default="cnn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--norm", choices=("dataset", "pfllib"), default="dataset",
                   help="input normalisation: the dataset's mean/std (fedforge's) or 0.5/0.5 (PFLlib's scripts)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--log", help="append one JSON line with the records and α to this file")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    params = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        try:
            params[k] = json.loads(v)
        except ValueError:
            params[k] = v
    ds = load_dataset(a.dataset, os.environ.get("FEDFORGE_DATA"), False, None) if ":" not in a.dataset else None
    if ds is None:
        ds = load_dataset(a.dataset, None, False, None)
    ds = subsample(ds, a.fraction, a.seed)
    if a.norm == "pfllib":
        ds = dataclasses.replace(ds, mean=(0.5,) * len(ds.mean), std=(0.5,) * len(ds.std))
    cfg = build_config(overrides=dict(algorithm=a.algorithm, dataset=a.dataset, model=a.model, clients=a.clients,
                                      partition="dirichlet", alpha=a.alpha, rounds=a.rounds, lr=a.lr,
                                      batch_size=a.batch_size, local_epochs=a.local_epochs, eval_every=a.eval_every,
                                      seed=a.seed, threads=1), params=params)
    alog = AlphaLog()
    t0 = time.time()

    def show(rec):
        views = {k[:-4]: round(100 * v, 2) for k, v in rec.items()
                 if k.endswith("_acc") and v is not None and not k.startswith(("group", "new")) and "ownclass" not in k}
        line = {"round": rec["round"], **views}
        if rec["round"] in alog.rounds:
            al = alog.rounds[rec["round"]]
            line["alpha_min_mean_max"] = [min(al.values()), round(sum(al.values()) / len(al), 3), max(al.values())]
        print(json.dumps(line), f"{time.time() - t0:.0f}s", flush=True)

    sim = Simulation(cfg, run_dir=False, progress=False, dataset=ds, on_record=show,
                     hooks=SessionHooks(listeners=[alog]))
    res = sim.run()
    if a.log:
        with open(a.log, "a") as f:
            f.write(json.dumps({"argv": sys.argv[1:], "records": res.records, "alpha": alog.rounds}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
