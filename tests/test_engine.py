"""The round loop end to end: run directory, metrics, determinism, sampling, bytes, FedAvg and Local."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

import fedforge
from fedforge.config import build_config
from fedforge.core.messages import nbytes
from fedforge.core.simulation import Simulation
from fedforge.errors import ConfigError
from fedforge.models import create_model
from tests.conftest import require_data

FAST = dict(dataset="digits", clients=5, rounds=3, lr=0.05, batch_size=20)


def test_fedavg_digits_writes_a_complete_run_directory(tmp_path):
    out = tmp_path / "run"
    res = fedforge.run(algorithm="fedavg", out=str(out), **FAST)
    files = {p.name for p in out.iterdir()}
    assert {"config.yaml", "partition.npz", "partition_stats.json", "partition.png", "metrics.jsonl", "summary.json",
            "curves.png", "run.json", "provenance.json"} <= files
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [0, 1, 2, 3]
    for r in recs:
        assert {"round", "global_acc", "personalized_acc", "loss", "bytes_up", "bytes_down", "seconds"} <= set(r)
        assert r["personalized_acc"] is None  # FedAvg has no separate personal model
    assert recs[-1]["global_acc"] > recs[0]["global_acc"]  # it learns
    summary = json.loads((out / "summary.json").read_text())
    for key in ("best", "last", "mean_last5"):
        assert {"global_acc", "personalized_acc"} <= set(summary[key])
    assert {"rounds", "seconds_per_round", "wall_seconds"} <= set(summary)
    assert summary["last"]["global_acc"] == recs[-1]["global_acc"]
    assert summary["best"]["global_acc"] == max(r["global_acc"] for r in recs)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["algorithm"] == "fedavg" and cfg["clients"] == 5
    assert res.summary == summary


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    a = fedforge.run(algorithm="fedavg", out=str(tmp_path / "a"), seed=3, **FAST)
    b = fedforge.run(algorithm="fedavg", out=str(tmp_path / "b"), seed=3, **FAST)
    c = fedforge.run(algorithm="fedavg", run_dir=False, seed=4, **FAST)
    acc = lambda res: [(r["global_acc"], r["global_loss"], r["loss"]) for r in res.records]  # noqa: E731
    assert acc(a) == acc(b)
    assert (tmp_path / "a" / "partition.npz").read_bytes() == (tmp_path / "b" / "partition.npz").read_bytes()
    assert acc(a) != acc(c)


def test_bytes_and_sampling():
    res = fedforge.run(algorithm="fedavg", run_dir=False, join_ratio=0.4, **{**FAST, "clients": 10})
    model_bytes = nbytes(create_model("cnn", (1, 8, 8), 10).state_dict())
    for r in res.records[1:]:
        assert r["clients"] == 4
        assert r["bytes_up"] == r["bytes_down"] == 4 * model_bytes
    assert res.records[-1]["bytes_up_total"] == 3 * 4 * model_bytes


def test_client_selection_is_seeded_and_drop_out_acts():
    cfg = build_config(overrides=dict(FAST, clients=10, join_ratio=0.5, drop_rate=0.5))
    sim = Simulation(cfg, run_dir=False, progress=False)
    rounds = [sim.select_clients(r) for r in range(1, 30)]
    assert rounds == [sim.select_clients(r) for r in range(1, 30)]
    assert all(len(a) + len(d) == 5 for a, d in rounds)
    assert 0 < sum(len(d) for _, d in rounds) < 29 * 5
    assert len({tuple(a) for a, _ in rounds}) > 5


def test_eval_schedule():
    res = fedforge.run(algorithm="fedavg", run_dir=False, eval_every=2, **{**FAST, "rounds": 5})
    assert [r["round"] for r in res.records] == [0, 2, 4, 5]


def test_local_is_personalized_and_sends_nothing():
    res = fedforge.run(algorithm="local", run_dir=False, **FAST)
    last = res.records[-1]
    assert last["global_acc"] is None and last["personalized_acc"] > 0.5
    assert last["bytes_up_total"] == 0 and last["bytes_down_total"] == 0
    # the per-client state carries over: more rounds keep improving the personal models
    assert res.records[1]["loss"] > res.records[-1]["loss"]


def test_whole_model_methods_refuse_heterogeneous_models():
    with pytest.raises(ConfigError, match="same architecture"):
        fedforge.run(algorithm="fedavg", run_dir=False, model="cnn,mlp", **FAST)


def test_mnist_end_to_end(data_root):
    require_data("mnist.npz")
    res = fedforge.run(algorithm="fedavg", run_dir=False, dataset="mnist", data_root=str(data_root), clients=100,
                       join_ratio=0.05, rounds=2, partition="iid", lr=0.05)
    accs = [r["global_acc"] for r in res.records]
    assert accs[-1] > 0.5 > accs[0]
    assert res.records[-1]["clients"] == 5


def test_pfllib_split_drives_the_clients(data_root):
    d = require_data("pfllib-mnist")
    cfg = build_config(overrides=dict(dataset=f"pfllib:{d}", rounds=0))
    sim = Simulation(cfg, run_dir=False, progress=False)
    cfgj = json.loads((d / "config.json").read_text())
    assert sim.ctx.num_clients == 20
    sizes = [a + b for a, b in zip(sim.ctx.train_sizes, sim.ctx.test_sizes)]
    assert sizes == [sum(n for _, n in c) for c in cfgj["Size of samples for labels in clients"]]
    assert np.array_equal(sim.partition.train[3], sim.ds.client_split[3][0])


def test_curves_plot_the_server_side_metrics_of_algorithms_that_have_them(tmp_path):
    """FedTGP records its server prototype loss and margin: curves.png gets a third panel (a wider image);
    FedAvg has no server-side metric and keeps two panels."""
    import struct

    def png_width(path):
        return struct.unpack(">I", path.read_bytes()[16:20])[0]

    tgp = fedforge.run(algorithm="fedtgp", out=str(tmp_path / "tgp"), model="cnn", params={"server_epochs": 5},
                       **{**FAST, "rounds": 2})
    assert any(r.get("server_loss") is not None for r in tgp.records)
    fedforge.run(algorithm="fedavg", out=str(tmp_path / "avg"), **{**FAST, "rounds": 1})
    assert png_width(tmp_path / "tgp" / "curves.png") > 1.3 * png_width(tmp_path / "avg" / "curves.png")
