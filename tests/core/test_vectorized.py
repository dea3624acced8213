"""The vectorized executor gives what the sequential executor gives, up to float rounding, for every algorithm whose
local update is an objective (core/objective.py): uploads, client states and each round's metrics; plus its parts
(vmapped evaluation counts, batched AUC, fallbacks with their reasons, memory budget, host reads per chunk).

The runs use ``$FEDFORGE_TEST_DEVICE`` (default ``cpu``): ``FEDFORGE_TEST_DEVICE=cuda pytest
tests/core/test_vectorized.py`` checks the same equalities on a GPU."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

import fedforge
import fedforge.algorithms  # noqa: F401  (registers the algorithms)
from fedforge.core import Task
from fedforge.core.algorithm import ALGORITHMS
from fedforge.core.executors import SequentialExecutor
from fedforge.core.runtime import WorkerSpec
from fedforge.core.simulation import Simulation
from fedforge.core.training import EvalCounts, eval_loop, micro_auc
from fedforge.core.vectorized import (
    VectorizedExecutor,
    batched_eval_counts,
    batched_micro_auc,
    vectorizable_class,
    why_not_vector_eval,
    why_not_vectorized,
)
from tests.conftest import TEST_DEVICE

COMMON = dict(dataset="digits", clients=4, rounds=2, seed=7, join_ratio=0.75, batch_size=32)
# hyper-parameters that keep the runs short and every mechanism on (FedRep's head epochs, FedALA's ALA)
PARAMS = {"fedrep": {"head_epochs": 2}, "fedala": {"max_init_epochs": 3}, "fedprox": {"mu": 0.1}}
VECTORIZED = ["fedavg", "local", "fedprox", "ditto", "fedper", "fedrep", "lgfedavg", "fedbabu", "fedrod", "fedala",
              "moon", "fedproto", "fd", "scaffold"]
# evaluation is "load weights, run the model" for these (the others evaluate one client at a time)
VECTOR_EVAL = {"fedavg", "local", "fedprox", "ditto", "fedper", "fedrep", "fedbabu", "moon", "fd", "scaffold"}
SKIP_RECORD = ("seconds",)
TOL = dict(rtol=1e-5, atol=1e-5)


def run(algo: str, model: str, **kw):
    return fedforge.run(run_dir=False, algorithm=algo, model=model, params=PARAMS.get(algo, {}), device=TEST_DEVICE,
                        **{**COMMON, **kw})


def notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "vectorized executor" in r.getMessage()]


def assert_same_run(seq, vec):
    assert len(seq.records) == len(vec.records)
    for a, b in zip(seq.records, vec.records):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if any(s in k for s in SKIP_RECORD):
                continue
            w = b[k]
            if isinstance(v, float) and isinstance(w, float):
                assert (math.isnan(v) and math.isnan(w)) or v == pytest.approx(w, rel=1e-5, abs=1e-5), (a["round"], k)
            else:
                assert v == w, (a["round"], k)
    assert seq.server.keys() == vec.server.keys()
    for k in seq.server:
        torch.testing.assert_close(vec.server[k], seq.server[k], **TOL, msg=lambda m, k=k: f"server {k}: {m}")
    assert seq.store.cids() == vec.store.cids()
    for cid, state in seq.store.items():
        other = vec.store.get(cid)
        assert state.keys() == other.keys()
        for k, v in state.items():
            torch.testing.assert_close(other[k], v, **TOL, msg=lambda m, k=k, c=cid: f"client {c} {k}: {m}")


# every algorithm with the mlp; the cnn (convolutions vmapped) for one of each kind of objective: one model, two
# models (Ditto), parameter subsets with cached features (FedRep), frozen models run by the loss (MOON)
CASES = [(a, "mlp") for a in VECTORIZED] + [(a, "cnn") for a in ("fedavg", "ditto", "fedrep", "moon")]


@pytest.mark.parametrize("algo,model", CASES)
def test_vectorized_round_equals_sequential(algo, model, caplog):
    """Two rounds (the second with the message's regularisers: prototypes, logits, control variates, previous models)
    of 3 of 4 clients: every upload (through the server state), state and metric equals the sequential run's."""
    seq = run(algo, model)
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        vec = run(algo, model, executor="vectorized")
    told = notices(caplog)
    assert not [m for m in told if "training" in m], told  # trained vmapped, not one at a time
    assert bool([m for m in told if "evaluating" in m]) == (algo not in VECTOR_EVAL), told
    assert_same_run(seq, vec)


def test_algorithms_that_vectorize_declare_it():
    """The registry's vectorizable algorithms are the tested ones plus FedAvg's declared descendants (training is
    FedAvg's); a descendant that changes a client-side hook without declaring again is refused."""
    declared = {name for name in ALGORITHMS.names() if vectorizable_class(ALGORITHMS.get(name)) is None}
    assert set(VECTORIZED) <= declared
    # FedAvg's (or FedProx's) training with their own server or fine-tuning stage (run one client at a time)
    assert declared - set(VECTORIZED) <= {"cfl", "knnper", "fedavg_ft", "fedprox_ft", "fedhome"}
    reason = vectorizable_class(ALGORITHMS.get("fedtgp"))  # FedProto with another regulariser, not re-declared
    assert reason and "changes regulariser of FedProto" in reason
    assert "not declared" in vectorizable_class(ALGORITHMS.get("fedbn"))


def test_models_with_buffers_or_dropout_fall_back_with_a_reason(caplog):
    """BatchNorm statistics cannot be updated per client inside vmap: training falls back, one notice, same result;
    evaluation (BatchNorm in eval mode reads the statistics) stays vectorized."""
    kw = dict(rounds=1, clients=3, join_ratio=1.0)
    seq = run("fedavg", "cnn_bn", **kw)
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        vec = run("fedavg", "cnn_bn", executor="vectorized", **kw)
    told = notices(caplog)
    assert len(told) == 1 and "buffers" in told[0] and "training those clients one at a time" in told[0]
    assert_same_run(seq, vec)
    drop = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    sim = Simulation(fedforge.build_config(overrides=dict(COMMON, rounds=0, model="mlp")), run_dir=False, progress=False)
    assert "dropout" in why_not_vectorized(sim.algo, drop)
    assert why_not_vector_eval(sim.algo, drop) is None


def test_augmentation_and_lr_decay_follow_the_sequential_path():
    """Augmented batches (crops drawn from each task's stream, batch by batch) and a per-round learning rate."""
    kw = dict(augment=True, lr_decay=0.5, rounds=2)
    assert_same_run(run("ditto", "mlp", **kw), run("ditto", "mlp", executor="vectorized", **kw))


def test_clients_smaller_than_a_batch_and_a_memory_budget():
    """Batch 100 is larger than some clients' data (their batches are smaller, a vmapped group of their own); a tiny
    --gpu-memory budget makes every chunk one client: results do not change."""
    kw = dict(batch_size=100, rounds=1)
    seq = run("fedprox", "mlp", **kw)
    peak = seq.summary["peak_gpu_memory_mb"]  # summary.json's field: null on a CPU run
    assert peak is None if TEST_DEVICE == "cpu" else peak > 0
    assert_same_run(seq, run("fedprox", "mlp", executor="vectorized", **kw))
    assert_same_run(seq, run("fedprox", "mlp", executor="vectorized", gpu_memory=1e-6, **kw))


def test_gpu_memory_option():
    cfg = fedforge.build_config(overrides={"gpu_memory": 4.6, "executor": "vectorized"})
    assert cfg.gpu_memory == 4.6 and "gpu_memory" not in cfg.identity()  # where work runs, not what it computes
    with pytest.raises(fedforge.ConfigError, match="gpu_memory"):
        fedforge.build_config(overrides={"gpu_memory": 0})
    from fedforge.core.executors import make_executor

    assert make_executor(cfg).gpu_memory == 4.6


def test_host_reads_do_not_grow_with_the_steps(monkeypatch):
    """The step loop never reads the device: the values read back per chunk (losses, uploads) do not depend on the
    number of local steps."""
    reads = {"n": 0}
    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            reads["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def train_reads(epochs: int) -> int:
        cfg = fedforge.build_config(overrides=dict(COMMON, rounds=0, model="mlp", algorithm="fedprox",
                                                   local_epochs=epochs))
        sim = Simulation(cfg, run_dir=False, progress=False)
        server = sim.algo.init_server()
        tasks = [Task("train", c, 1, sim.algo.broadcast(server, c, 1), None) for c in range(4)]
        vec = VectorizedExecutor()
        vec.start(WorkerSpec(sim.ds, sim.partition, sim.algo))
        vec.map(tasks[:1])  # warm-up (activation sizes are measured once)
        reads["n"] = 0
        vec.map(tasks)
        return reads["n"]

    assert train_reads(1) == train_reads(3)


# ---------------------------------------------------------------------------------------- evaluation
def _random_eval(c: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(c, n, k, generator=g)
    logits[0, :3] = 0.0  # ties: equal scores within and across rows
    y = torch.randint(0, k, (c, n), generator=g)
    lengths = [n, n // 2, 1, 0][:c]
    valid = torch.zeros(c, n, dtype=torch.bool)
    for i, m in enumerate(lengths):
        valid[i, :m] = True
    absent = torch.rand(c, k, generator=g) < 0.3
    absent[1] = True  # a client without training data: nothing is called off-class
    absent[2] = False
    return logits, y, valid, absent, lengths


def test_batched_micro_auc_equals_scikit_learn():
    logits, y, valid, _, lengths = _random_eval(4, 40, 6, 1)
    probs = logits.softmax(2)
    got = batched_micro_auc(probs, y, valid)
    for i, m in enumerate(lengths):
        want = micro_auc(probs[i, :m].numpy(), y[i, :m].numpy())
        assert (math.isnan(want) and math.isnan(got[i])) or got[i].item() == pytest.approx(want, abs=1e-12)


def test_batched_eval_counts_equal_the_one_client_loop():
    """Every field of EvalCounts as eval_loop counts it (with the absent-class diagnostics, confusion and AUC)."""
    logits, y, valid, absent, lengths = _random_eval(4, 40, 6, 2)
    got = batched_eval_counts(logits, y, valid, absent, num_classes=6)
    for i, m in enumerate(lengths):
        ab = None if bool(absent[i].all()) else absent[i]
        batches = [(logits[i, s:min(s + 7, m)], y[i, s:min(s + 7, m)]) for s in range(0, m, 7)]
        want = eval_loop(lambda z: z, batches, absent=ab, num_classes=6)
        g: EvalCounts = got[i]
        assert (g.correct, g.total, g.off_class, g.own_correct, g.own_total) == \
               (want.correct, want.total, want.off_class, want.own_correct, want.own_total)
        assert g.loss_sum == pytest.approx(want.loss_sum, rel=1e-6, abs=1e-9)
        if want.confusion is None:
            assert g.confusion is None and math.isnan(g.auc)
        else:
            np.testing.assert_array_equal(g.confusion, want.confusion)
            assert g.auc == pytest.approx(want.auc, abs=1e-12) or (math.isnan(g.auc) and math.isnan(want.auc))


def test_vectorized_evaluation_equals_one_client_at_a_time():
    """Evaluation tasks of a personalized method (global and personalized views) straight through both executors."""
    res = run("ditto", "mlp", rounds=1)
    sim = Simulation(fedforge.build_config(overrides=dict(COMMON, rounds=0, model="mlp", algorithm="ditto")),
                     run_dir=False, progress=False)
    tasks = [Task("eval", c, 1, sim.algo.eval_message(res.server, c), res.store.get(c)) for c in range(4)]
    seq, vec = SequentialExecutor(), VectorizedExecutor(workers=3)
    for ex in (seq, vec):
        ex.start(WorkerSpec(sim.ds, sim.partition, sim.algo))
    for a, b in zip(seq.map(tasks), vec.map(tasks)):
        assert a.cid == b.cid and a.counts.keys() == b.counts.keys() == {"global", "personalized"}
        for view in a.counts:
            x, z = a.counts[view], b.counts[view]
            assert (x.correct, x.total, x.off_class, x.own_correct, x.own_total) == \
                   (z.correct, z.total, z.off_class, z.own_correct, z.own_total)
            assert z.loss_sum == pytest.approx(x.loss_sum, rel=1e-5)
            np.testing.assert_array_equal(z.confusion, x.confusion)
            assert z.auc == pytest.approx(x.auc, abs=1e-5)
