"""FedALA, FedCP, GPFL and FedDBE: each mechanism in isolation on small tensors, end to end on digits, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

import fedforge
from fedforge.algorithms import fedala, fedcp, feddbe, gpfl
from fedforge.algorithms._pfl4_common import require_split
from fedforge.config import build_config
from fedforge.core.messages import model_entries
from fedforge.core.runtime import ClientRuntime, Worker, WorkerSpec, task_seed
from fedforge.core.simulation import Simulation
from fedforge.errors import ConfigError
from fedforge.models import MODELS, FedModel

# mlp keeps the end-to-end runs fast; lr 0.01 with batch 10 is stable for every method on digits
FAST = dict(dataset="digits", model="mlp", clients=5, rounds=4, lr=0.01, batch_size=10, alpha=0.1)


def simulation(algorithm: str, params: dict | None = None, **over) -> Simulation:
    cfg = build_config(overrides={**FAST, "algorithm": algorithm, "params": params or {}, **over})
    return Simulation(cfg, run_dir=False, progress=False)


def runtime(sim: Simulation, cid: int, rnd: int, kind: str = "train", worker: Worker | None = None) -> ClientRuntime:
    w = worker or Worker(WorkerSpec(sim.ds, sim.partition, sim.algo))
    return ClientRuntime(w, cid, rnd, task_seed(sim.ctx.seed, rnd, cid, kind))


def digits_batches(n: int = 200, batch: int = 20) -> list[tuple[torch.Tensor, torch.Tensor]]:
    d = load_digits()
    x = torch.tensor(d.data[:n] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[:n], dtype=torch.long)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def tiny_model(seed: int) -> FedModel:
    torch.manual_seed(seed)
    return FedModel(nn.Sequential(nn.Linear(64, 16), nn.ReLU()), nn.Linear(16, 10), 16, "tiny")


# ------------------------------------------------------------------------------------------------ FedALA
def test_ala_weights_start_at_one_and_stay_in_the_unit_interval():
    model = tiny_model(0)
    names = fedala.ala_names(model, 2)
    assert names == ["head.weight", "head.bias"]
    glob = {k: v.detach().clone() for k, v in model.named_parameters()}
    local = {k: v.detach() + torch.randn_like(v) for k, v in glob.items()}  # a client model far from the global one
    ones = {n: torch.ones_like(glob[n]) for n in names}
    assert fedala.ala_combine(local, glob, ones)["head.weight"].equal(glob["head.weight"])  # W = 1: θ̂ = Θ
    new, losses = fedala.learn_ala_weights(model, {n: local[n] for n in names}, {n: glob[n] for n in names}, ones,
                                           digits_batches(), eta=50.0, until_converged=False)
    assert len(losses) == 1
    for w in new.values():
        assert w.min() >= 0 and w.max() <= 1
    flat = torch.cat([w.flatten() for w in new.values()])
    assert (flat < 1).any() and (flat == 0).any()  # it learned, and the projection was active
    # a later one-pass update starts from the kept weights, not from ones
    again, _ = fedala.learn_ala_weights(model, {n: local[n] for n in names}, {n: glob[n] for n in names}, new,
                                        digits_batches(), eta=50.0, until_converged=False)
    assert not torch.equal(torch.cat([w.flatten() for w in again.values()]), torch.ones_like(flat))


def test_ala_convergence_loop_is_bounded():
    model = tiny_model(1)
    names = fedala.ala_names(model, 2)
    glob = {k: v.detach().clone() for k, v in model.named_parameters()}
    local = {k: v + 0.5 * torch.randn_like(v) for k, v in glob.items()}
    args = ({n: local[n] for n in names}, {n: glob[n] for n in names}, {n: torch.ones_like(glob[n]) for n in names},
            digits_batches())
    _, losses = fedala.learn_ala_weights(model, *args, eta=1.0, until_converged=True, threshold=1e-12,
                                         num_pre_loss=3, max_epochs=7)
    assert len(losses) == 7  # never "converges" at this threshold: stops at the cap
    _, losses = fedala.learn_ala_weights(model, *args, eta=1.0, until_converged=True, threshold=10.0,
                                         num_pre_loss=3, max_epochs=50)
    assert len(losses) == 4  # converged as soon as the test can look at num_pre_loss losses


def test_ala_changes_only_the_top_tensors_and_evaluates_the_next_rounds_model():
    sim = simulation("fedala", {"layer_idx": 2}, model="cnn")
    algo = sim.algo
    server = algo.init_server()
    msg = algo.broadcast(server, 0, 1)
    rt = runtime(sim, 0, 1)
    skipped = algo.initialise(rt, msg, {}, 1)[0]
    assert all(torch.equal(skipped[k], v) for k, v in model_entries(msg).items())  # no local model yet: no ALA
    upd = algo.local_update(rt, msg, {})
    state = upd.state
    assert not any(k.startswith("ala/") for k in state)
    glob = {k: v + 0.01 * torch.randn_like(v) for k, v in model_entries(msg).items()}  # a "new" global model
    msg2 = dict(glob)
    params, w, epochs = algo.initialise(runtime(sim, 0, 2), msg2, state, 2)
    assert epochs > 1  # the first ALA trains W to convergence
    assert set(w) == {"head.weight", "head.bias"}
    for k, v in params.items():
        if k in w:
            assert torch.allclose(v, state[k] + (glob[k] - state[k]) * w[k], atol=1e-6)
            assert not torch.equal(v, glob[k])
        else:
            assert torch.equal(v, glob[k])  # lower layers (and buffers) take the global model
    # the personalized evaluation after round 1 sees exactly the model round 2 starts from
    wk = Worker(WorkerSpec(sim.ds, sim.partition, algo))
    ev = algo.evaluate(runtime(sim, 0, 1, "eval", wk), msg2, state)["personalized"]
    rt2 = runtime(sim, 0, 1, "eval", wk)
    rt2.load(params)
    assert ev.correct == rt2.evaluate().correct and ev.loss_sum == pytest.approx(rt2.evaluate().loss_sum)
    # W is kept; the next ALA runs one pass only
    upd2 = algo.local_update(runtime(sim, 0, 2), msg2, state)
    assert {k for k in upd2.state if k.startswith("ala/")} == {"ala/head.weight", "ala/head.bias"}
    assert upd2.metrics["ala_epochs"] > 1
    upd3 = algo.local_update(runtime(sim, 0, 3), msg2, upd2.state)
    assert upd3.metrics["ala_epochs"] == 1


def test_fedala_neutral_values_reduce_to_fedavg():
    base = fedforge.run(algorithm="fedavg", run_dir=False, **{**FAST, "rounds": 2})
    for params in ({"layer_idx": 0}, {"eta": 0.0}):
        res = fedforge.run(algorithm="fedala", run_dir=False, params=params, **{**FAST, "rounds": 2})
        assert [r["global_acc"] for r in res.records] == [r["global_acc"] for r in base.records]
        assert [r["personalized_acc"] for r in res.records] == [r["global_acc"] for r in base.records]


def test_fedala_bad_input():
    with pytest.raises(ConfigError, match="layer_idx is 9, but model 'mlp' has only 6 parameter tensors"):
        simulation("fedala", {"layer_idx": 9})
    for bad in (0, -5, 100.5, 150):
        with pytest.raises(ConfigError, match="rand_percent must be > 0 and <= 100"):
            simulation("fedala", {"rand_percent": bad})


# ------------------------------------------------------------------------------------------------- FedCP
def test_fedcp_policies_sum_to_one_per_feature():
    d = 16
    cpn = fedcp.init_cpn(d, seed=3)
    rep = torch.relu(torch.randn(7, d))
    context = fedcp.client_context({"weight": torch.randn(10, d), "bias": torch.zeros(10)})
    assert context.shape == (1, d) and torch.allclose(context.norm(), torch.tensor(1.0))
    for gen in (torch.Generator().manual_seed(0), None):
        pm, gm = fedcp.policies(cpn, rep, context, 1.0, gen)
        assert pm.shape == gm.shape == (7, d)
        assert torch.allclose(pm + gm, torch.ones_like(pm), atol=1e-6)
        assert (pm > 0).all() and (gm > 0).all()
    # per-sample and per-client: other samples or another client's head give other policies
    assert not torch.allclose(pm[0], pm[1])
    other = fedcp.client_context({"weight": torch.randn(10, d)})
    assert not torch.allclose(fedcp.policies(cpn, rep, other)[0], pm)


def test_fedcp_global_head_gets_no_gradient_and_uploads_what_the_paper_says():
    sim = simulation("fedcp")
    algo = sim.algo
    server = algo.init_server()
    msg = algo.broadcast(server, 0, 1)
    rt = runtime(sim, 0, 1)
    state = algo.init_client(rt)
    upd = algo.local_update(rt, msg, state)
    g = rt.aux_model("fedcp/global")
    assert all(not p.requires_grad for p in g.head.parameters())
    assert torch.equal(g.head.weight, msg["head.weight"])  # the frozen global head did not move
    assert not torch.equal(upd.state["head.weight"], state["head.weight"])  # the personal head did
    assert set(upd.state) == {"head.weight", "head.bias"}
    body = {k for k in msg if k.startswith("features.")}
    cpn = {k for k in msg if k.startswith("cpn/")}
    assert set(upd.upload) == body | cpn | {"head.weight", "head.bias"}
    assert torch.allclose(upd.upload["head.weight"], 0.5 * (upd.state["head.weight"] + msg["head.weight"]))
    assert not torch.equal(upd.upload["cpn/fc.weight"], msg["cpn/fc.weight"])  # the policy net is trained
    # the MMD term acts: without it the feature extractor ends elsewhere
    sim0 = simulation("fedcp", {"lam": 0.0})
    upd0 = sim0.algo.local_update(runtime(sim0, 0, 1), msg, state)
    assert not torch.allclose(upd0.upload["features.1.weight"], upd.upload["features.1.weight"])


def test_mmd_gradient_is_finite_and_zero_when_the_features_agree():
    x = torch.relu(torch.randn(10, 16)).requires_grad_(True)
    g, = torch.autograd.grad(fedcp.mechanics.mmd_rbf(x, x.detach(), fedcp.MMD_BANDWIDTHS), x)
    assert torch.isfinite(g).all() and g.abs().max() < 1e-6
    g, = torch.autograd.grad(fedcp.mechanics.mmd_rbf(x, x.detach() + 1.0, fedcp.MMD_BANDWIDTHS), x)
    assert g.abs().max() > 1e-4


# -------------------------------------------------------------------------------------------------- GPFL
def test_gpfl_cov_is_conditioned_on_the_client():
    sim = simulation("gpfl")
    algo = sim.algo
    server = algo.init_server()
    emb = server["gce/embedding"]
    cov = {k[4:]: v for k, v in server.items() if k.startswith("cov/")}
    counts = [runtime(sim, c, 1).class_counts() for c in range(2)]
    assert not torch.equal(counts[0], counts[1])
    gen0, p0 = gpfl.conditional_inputs(emb, counts[0])
    gen1, p1 = gpfl.conditional_inputs(emb, counts[1])
    assert torch.equal(gen0, gen1) and torch.allclose(gen0, emb.mean(0))
    assert torch.allclose(p0, (counts[0].float() / counts[0].sum()) @ emb)
    f = torch.relu(torch.randn(4, emb.shape[1]))
    out0, out1 = gpfl.cov(cov, f, p0), gpfl.cov(cov, f, p1)
    assert out0.shape == f.shape and not torch.allclose(out0, out1)  # personalized features differ per client
    assert torch.equal(gpfl.cov(cov, f, gen0), gpfl.cov(cov, f, gen1))  # generic ones do not


def test_gpfl_losses_and_weight_decay_act_and_the_head_stays_local():
    emb = torch.randn(10, 8, requires_grad=True)
    f = torch.randn(5, 8)
    y = torch.arange(5)
    loss = gpfl.gce_loss(emb, f, y)
    assert torch.autograd.grad(loss, emb)[0].abs().sum() > 0
    hook = gpfl.weight_decay_hook(1, mu=0.1)
    params = [torch.ones(3), torch.full((2,), 2.0)]
    grads = hook(params, [torch.zeros(3), torch.zeros(2)])
    assert torch.equal(grads[0], torch.zeros(3)) and torch.allclose(grads[1], torch.full((2,), 0.2))
    sim = simulation("gpfl")
    algo = sim.algo
    server = algo.init_server()
    assert not any(k.startswith("head.") for k in server)
    msg = algo.broadcast(server, 0, 1)
    rt = runtime(sim, 0, 1)
    upd = algo.local_update(rt, msg, algo.init_client(rt))
    assert set(upd.state) == {"head.weight", "head.bias"}
    assert set(upd.upload) == set(server) and not any(k.startswith("head.") for k in upd.upload)
    assert not torch.equal(upd.upload["gce/embedding"], msg["gce/embedding"])
    # the magnitude-level term and the weight decay change training
    for params in ({"lam": 0.0}, {"mu": 0.0}):
        sim0 = simulation("gpfl", params)
        upd0 = sim0.algo.local_update(runtime(sim0, 0, 1), msg, algo.init_client(rt))
        assert not torch.allclose(upd0.upload["cov/gamma.fc.weight"], upd.upload["cov/gamma.fc.weight"])


# ------------------------------------------------------------------------------------------------ FedDBE
def test_dbe_mean_regulariser_gradient():
    z = torch.randn(6, 8, requires_grad=True)
    running = feddbe.running_mean(torch.zeros(8), z, momentum=1.0)
    assert torch.allclose(running, z.mean(0))
    g, = torch.autograd.grad(feddbe.mean_regulariser(running, torch.zeros(8), kappa=50.0), z)
    assert g.abs().max() > 0
    running = feddbe.running_mean(torch.zeros(8), z, momentum=1.0)
    g, = torch.autograd.grad(feddbe.mean_regulariser(running, z.mean(0).detach(), kappa=50.0), z)
    assert g.abs().max() == 0
    # momentum < 1 keeps part of the (detached) previous mean
    prev = torch.ones(8)
    assert torch.allclose(feddbe.running_mean(prev, z, 0.1), 0.9 * prev + 0.1 * z.mean(0))


def test_dbe_bias_never_leaves_the_client_and_warm_up_sets_the_global_mean():
    res = fedforge.run(algorithm="feddbe", run_dir=False, **FAST)
    fedavg = fedforge.run(algorithm="fedavg", run_dir=False, **FAST)
    dim = res.server[feddbe.GLOBAL_MEAN].numel()
    # round 1 (warm-up) uploads the model and the d-vector mean; later rounds exactly FedAvg's bytes
    assert res.records[1]["bytes_up"] == fedavg.records[1]["bytes_up"] + 5 * dim * 4
    assert [r["bytes_up"] for r in res.records[2:]] == [r["bytes_up"] for r in fedavg.records[2:]]
    assert res.records[1]["global_acc"] == fedavg.records[1]["global_acc"]  # the warm-up round is a FedAvg round
    for cid in range(5):
        bias = res.store.get(cid)[feddbe.BIAS]
        assert bias.abs().sum() > 0  # the personal bias was trained...
    sim = simulation("feddbe")
    algo = sim.algo
    server = algo.init_server()
    rt = runtime(sim, 0, 1)
    upd = algo.local_update(rt, algo.broadcast(server, 0, 1), algo.init_client(rt))
    assert feddbe.BIAS not in upd.upload and feddbe.MEAN in upd.upload  # ...but is never uploaded
    assert torch.equal(upd.state[feddbe.BIAS], torch.zeros(dim))  # no DBE during the warm-up
    agg = algo.aggregate(server, [upd], 1)
    assert torch.allclose(agg[feddbe.GLOBAL_MEAN], upd.upload[feddbe.MEAN])
    msg = algo.broadcast(agg, 0, 2)
    upd2 = algo.local_update(runtime(sim, 0, 2), msg, upd.state)
    assert feddbe.MEAN not in upd2.upload and upd2.state[feddbe.BIAS].abs().sum() > 0
    assert torch.equal(algo.aggregate(agg, [upd2], 2)[feddbe.GLOBAL_MEAN], agg[feddbe.GLOBAL_MEAN])  # sent once, kept
    # the mean regulariser acts on training: without it (kappa = 0) the same round ends elsewhere
    sim0 = simulation("feddbe", {"kappa": 0.0})
    upd0 = sim0.algo.local_update(runtime(sim0, 0, 2), msg, upd.state)
    assert not torch.allclose(upd0.upload["features.1.weight"], upd2.upload["features.1.weight"])


# --------------------------------------------------------------------------------------- end to end, input
@pytest.fixture(scope="module")
def fedavg_digits():
    return fedforge.run(algorithm="fedavg", run_dir=False, **FAST)


@pytest.mark.parametrize("algorithm", ["fedala", "fedcp", "gpfl", "feddbe"])
def test_end_to_end_on_digits_beats_fedavg(algorithm, fedavg_digits):
    base = fedavg_digits
    res = fedforge.run(algorithm=algorithm, run_dir=False, **FAST)
    again = fedforge.run(algorithm=algorithm, run_dir=False, **FAST)
    accs = [r["personalized_acc"] for r in res.records]
    assert accs == [r["personalized_acc"] for r in again.records]  # same seed, same numbers
    assert all(np.isfinite(a) for a in accs) and all(np.isfinite(r["loss"]) for r in res.records[1:])
    assert accs[-1] > accs[0] + 0.1
    assert accs[-1] > base.records[-1]["global_acc"]


def test_methods_that_need_a_head_refuse_a_model_without_one():
    def headless(input_shape, num_classes):
        c, h, w = input_shape
        return FedModel(nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes)), nn.Identity(), num_classes)

    MODELS.add("_test_headless", headless)
    try:
        for algorithm in ("fedcp", "gpfl", "feddbe"):
            with pytest.raises(ConfigError, match=f"{algorithm} trains a personal head, but model '_test_headless' has a head without parameters"):
                simulation(algorithm, model="_test_headless")
    finally:
        MODELS._entries.pop("_test_headless", None)
    bad = tiny_model(0)
    bad.feature_dim = 99
    sim = simulation("fedcp")
    ctx = sim.ctx

    class Ctx:
        archs, input_shape = ("tiny",), (64,)

        @staticmethod
        def build_model(arch=None):
            return bad

    with pytest.raises(ConfigError, match="features\\(x\\) to return vectors of feature_dim=99"):
        require_split(Ctx, "fedcp")
    assert require_split(ctx, "fedcp").feature_dim == 200
