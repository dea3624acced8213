"""FedL2G on `digits`: the guiding vectors act on local training, the clients' meta gradients move them in the
direction that lowers the quiz loss, warm-up rounds train nothing but the guide, uploads are per-class gradients only,
and it runs across two architectures (the step equivalence with HtFLlib is in tests/reference/)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedforge.algorithms.fedl2g import FedL2G, client_loss, meta_gradient
from fedforge.algorithms.mechanics import features_and_logits
from fedforge.core.messages import model_entries
from fedforge.core.runtime import Worker, WorkerSpec

from .helpers import _one_torch_thread, differ, run, sim, train  # noqa: F401

NO_WARMUP = {"warm_up_rounds": 0}


@pytest.mark.parametrize("target", ["feat", "logit"])
def test_guide_changes_local_training_compared_with_local(target):
    s = sim("fedl2g", {**NO_WARMUP, "target": target})
    server = s.algo.init_server()
    upd = train(s, server, 0, 1)
    local = sim("local")
    base = train(local, local.algo.init_server(), 0, 1)
    assert differ(model_entries(upd.state), model_entries(base.state)), "the guide term changes the trained model"
    assert set(upd.upload) and all(k.startswith("grad/") for k in upd.upload), "only per-class gradients go up"
    held = set(np.unique(s.ds.y[s.partition.train[0]]).tolist())
    assert {int(k.split("/")[1]) for k in upd.upload} <= held
    dim = s.algo.dim
    assert all(v.shape == (dim,) for v in upd.upload.values())


def test_meta_gradient_step_lowers_the_quiz_loss():
    """The server's step G − η∇_G lowers the quiz loss after the virtual step (first order, small η)."""
    s = sim("fedl2g", NO_WARMUP)
    torch.manual_seed(0)
    model = s.ctx.build_model()
    w = Worker(WorkerSpec(s.ds, s.partition, s.algo))
    idx = w.fed.train_idx[1]
    study = [w.fed.inputs(idx[i:i + 10]) for i in (10, 20)]
    quiz = [w.fed.inputs(idx[:10])]
    G = s.algo.init_server()[FedL2G.GUIDE]
    lr = 0.05

    def quiz_loss(guide):
        params = dict(model.named_parameters())
        loss = sum(client_loss("feat", guide)(model, x, y) for x, y in study) / len(study)
        grads = torch.autograd.grad(loss, list(params.values()))
        virtual = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
        return float(sum(F.cross_entropy(features_and_logits(model, virtual, x)[1], y) for x, y in quiz).detach())

    g = meta_gradient(model, G, study, quiz, lr, "feat")
    assert float(g.abs().sum()) > 0
    before = quiz_loss(G)
    assert quiz_loss(G - 0.5 * g / g.norm()) < before < quiz_loss(G + 0.5 * g / g.norm())


def test_warm_up_rounds_train_only_the_guide():
    res = run("fedl2g", {"warm_up_rounds": 2}, rounds=2)
    accs = [r["personalized_acc"] for r in res.records]
    assert accs[0] == accs[1] == accs[2], "no local training during warm-up"
    init = sim("fedl2g").algo.init_server()[FedL2G.GUIDE]
    assert not torch.equal(res.server[FedL2G.GUIDE], init), "the guide is learned during warm-up"
    trained = run("fedl2g", NO_WARMUP, rounds=2)
    assert trained.records[-1]["personalized_acc"] > accs[-1] + 0.3


def test_guided_run_differs_from_local_and_learns_across_architectures():
    res = run("fedl2g", NO_WARMUP, model="cnn,ht_resnet4")
    local = run("local", model="cnn,ht_resnet4")
    last = res.records[-1]
    assert math.isfinite(last["personalized_acc"]) and last["personalized_acc"] > 0.5
    assert [r["personalized_acc"] for r in res.records] != [r["personalized_acc"] for r in local.records]
    # per round: C·d floats at most per client down, per-class gradients up
    assert last["params_down"] == 4 * 10 * 512
    assert 0 < last["params_up"] <= 4 * 10 * 512


def test_server_lr_defaults_to_the_papers_per_target():
    assert sim("fedl2g").algo.server_lr == 100.0
    assert sim("fedl2g", {"target": "logit"}).algo.server_lr == 0.1
    assert sim("fedl2g", {"server_lr": 3.0}).algo.server_lr == 3.0
