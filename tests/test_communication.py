"""Communication accounting: measured counts follow each method's formula; FedKTL's CIFAR-100 counts are reproduced.

FedKTL (Zhang et al., CVPR 2024) reports per round, for CIFAR-100 and 20 clients (upload/download, parameters):
FedDistill 0.09M/0.20M, FedProto 0.46M/1.02M, LG-FedAvg 1.03M/1.03M. With N clients, C classes, feature
dimension d and |C_k| the classes client k holds:

    FedDistill  up Σ_k |C_k|·C      down N·|∪C_k|·C
    FedProto    up Σ_k |C_k|·d      down N·|∪C_k|·d
    LG-FedAvg   up = down = N·(d·C + C)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fedforge.algorithms  # noqa: F401  (registers the algorithms)
from fedforge.algorithms.mechanics import prototypes_to_message
from fedforge.config import build_config
from fedforge.core.messages import nbytes, numel
from fedforge.core.simulation import Simulation, build_partition
from fedforge.data import load_dataset
from fedforge.models import create_model
from fedforge.results.report import rows_for
from tests.conftest import require_data

N, C, D = 4, 10, 512
FAST = dict(dataset="digits", model="cnn,ht_resnet4", clients=N, rounds=2, lr=0.05, batch_size=20)


def run(algorithm: str, tmp_path=None):
    cfg = build_config(overrides={**FAST, "algorithm": algorithm, "out": str(tmp_path / algorithm) if tmp_path else None})
    sim = Simulation(cfg, run_dir=None if tmp_path else False, progress=False)
    held = [set(np.unique(sim.ds.y[idx]).tolist()) for idx in sim.partition.train]
    return sim.run(), held


@pytest.mark.parametrize("algorithm, width", [("fd", C), ("fedproto", D)])
def test_carrier_counts_follow_the_formulas(algorithm, width):
    res, held = run(algorithm)
    union = set().union(*held)
    for r in res.records[1:]:
        assert r["params_up"] == sum(len(h) for h in held) * width
        down_classes = len(union) if r["round"] > 1 else 0  # nothing to send before the first aggregation
        assert r["params_down"] == N * down_classes * width
        for way in ("up", "down"):
            assert r[f"bytes_{way}"] == 4 * r[f"params_{way}"]  # float32
            assert r[f"params_{way}_per_client"] == pytest.approx(r[f"params_{way}"] / N)
            assert r[f"bytes_{way}_per_client"] == pytest.approx(r[f"bytes_{way}"] / N)
    last = res.records[-1]
    assert last["params_up_total"] == sum(r["params_up"] for r in res.records)


def test_lgfedavg_counts_and_report_columns(tmp_path):
    res, _ = run("lgfedavg", tmp_path)
    head = D * C + C
    for r in res.records[1:]:
        assert r["params_up"] == r["params_down"] == N * head
        assert r["bytes_up_per_client"] == r["bytes_down_per_client"] == 4 * head
    row = rows_for([str(tmp_path / "lgfedavg")])[0]
    assert row["params_up_per_round"] == round(N * head / 1e6, 4)
    assert row["up_per_client"] == row["down_per_client"] == round(4 * head / 1e3, 3)
    assert row["best_pers"] is not None  # accuracy and communication side by side


def test_fedktl_cifar100_counts():
    """The paper's scenario: CIFAR-100, Dirichlet 0.1, 20 clients, 512-d features, linear heads."""
    path = require_data("cifar100.npz")
    cfg = build_config(overrides=dict(dataset="cifar100", data_root=str(path.parent), clients=20, partition="dirichlet",
                                      alpha=0.1, batch_size=10, seed=0))
    ds = load_dataset(cfg.dataset, cfg.data_root, False, None)
    part = build_partition(cfg, ds)
    n, classes, d = part.num_clients, ds.num_classes, 512
    counts = [torch.bincount(torch.as_tensor(ds.y[idx]), minlength=classes) for idx in part.train]
    # the messages the algorithms build (FedDistill's logits, FedProto's prototypes), one per client
    fd_up = [prototypes_to_message(torch.zeros(classes, classes), c, "logit") for c in counts]
    proto_up = [prototypes_to_message(torch.zeros(classes, d), c) for c in counts]
    held = sum(int((c > 0).sum()) for c in counts)
    covered = int((torch.stack(counts).sum(0) > 0).sum())
    assert sum(map(numel, fd_up)) == held * classes and sum(map(numel, proto_up)) == held * d
    assert sum(map(nbytes, proto_up)) == 4 * held * d
    head = create_model("cnn", (3, 32, 32), classes).head
    head_params = sum(p.numel() for p in head.parameters())
    # downloads and LG-FedAvg's head match the paper's counts
    assert covered == classes
    assert round(n * covered * classes / 1e6, 2) == 0.20
    assert round(n * covered * d / 1e6, 2) == 1.02
    assert round(n * head_params / 1e6, 2) == 1.03
    # uploads depend on how many classes each client holds: the paper's 0.09M and 0.46M mean ≈45 per client;
    # this Dirichlet draw gives ≈42 (0.08M and 0.43M), so the formulas are checked, the numbers stay close
    assert 35 <= held / n <= 50
    assert abs(held * classes / 1e6 - 0.09) <= 0.015 and abs(held * d / 1e6 - 0.46) <= 0.05
