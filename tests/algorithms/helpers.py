"""What the algorithm tests on scikit-learn's `digits` share: the small base config, simulations on one cached
copy of the dataset, one client's train task run directly, and tensor-dict comparisons."""
from __future__ import annotations

import pytest
import torch

from fedforge.config import build_config
from fedforge.core.runtime import Task, Worker, WorkerSpec
from fedforge.core.simulation import Simulation
from fedforge.data import load_dataset

BASE = dict(dataset="digits", model="mlp", clients=4, rounds=2, batch_size=10, local_epochs=1, lr=0.05, seed=0)
TIMING = ("eval_seconds", "train_seconds", "seconds")
_DS = {}


def digits():
    if "d" not in _DS:
        _DS["d"] = load_dataset("digits", None, False, None)
    return _DS["d"]


def sim(algorithm: str, params: dict | None = None, **kw) -> Simulation:
    cfg = build_config(overrides={**BASE, **kw, "algorithm": algorithm}, params=params)
    return Simulation(cfg, run_dir=False, progress=False, dataset=digits())


def run(algorithm: str, params: dict | None = None, **kw):
    return sim(algorithm, params, **kw).run()


def strip(records: list[dict]) -> list[dict]:
    """Records without their timings (which differ from run to run)."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def train(s: Simulation, server: dict, cid: int, rnd: int, state=None, worker: Worker | None = None):
    """Client ``cid``'s train task of round ``rnd`` on ``server``'s broadcast, run on ``worker`` (or a fresh one)."""
    w = worker or Worker(WorkerSpec(s.ds, s.partition, s.algo))
    return w.run(Task("train", cid, rnd, s.algo.broadcast(server, cid, rnd), state))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def differ(a: dict, b: dict) -> bool:
    """Some entry the two have in common differs."""
    return any(not torch.equal(a[k], b[k]) for k in a.keys() & b.keys())


# fixtures: a test module that imports them gets them (module scope: once per importing module)
@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models train fastest on one thread (and the machine's cores are shared by parallel jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fedavg(_one_torch_thread):
    """FedAvg on the base config, the reference the methods are compared with."""
    return run("fedavg")
