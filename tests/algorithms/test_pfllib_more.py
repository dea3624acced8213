"""PFLlib's further methods: FedNTD, FedLC, FedPHP, FedCross, FedCAC, FedMTL, FedAS, PFL-DA, FedPAC, FedGC, FedPCL.

For each: the distinguishing part acts (the result differs from the base method on the same seed), the neutral value
reduces the method to its base exactly, and one behavioural check of the mechanism itself. All on scikit-learn's
`digits` with the small `mlp`, 4 clients and 2 rounds (tests/algorithms/helpers.py).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedforge.algorithms import fedcac, fedcross, fedlc, fedntd, fedphp
from fedforge.core.algorithm import ALGORITHMS, Update
from fedforge.core.messages import model_entries, under, with_prefix
from fedforge.core.runtime import ClientRuntime, Worker, WorkerSpec, task_seed
from tests.algorithms.helpers import differ, run, same_tensors, sim, strip, train
from tests.algorithms.helpers import _one_torch_thread, fedavg  # noqa: F401  (fixtures)

GLOBAL_KEYS = ("global_acc", "global_loss", "loss", "bytes_up", "bytes_down")


def runtime(s, cid: int, rnd: int, kind: str = "train") -> ClientRuntime:
    w = Worker(WorkerSpec(s.ds, s.partition, s.algo))
    return ClientRuntime(w, cid, rnd, task_seed(s.ctx.seed, rnd, cid, kind))


def column(records: list[dict], key: str) -> list:
    return [r.get(key) for r in records]


# -------------------------------------------------------------------------------------------- FedNTD
def test_fedntd_beta0_equals_fedavg_bit_for_bit(fedavg):
    res = run("fedntd", {"beta": 0})
    assert strip(res.records) == strip(fedavg.records)
    assert same_tensors(res.server, fedavg.server)


def test_fedntd_default_is_the_papers_and_acts(fedavg):
    p = ALGORITHMS.get("fedntd").Params()
    assert (p.beta, p.tau) == (1.0, 1.0)
    assert differ(run("fedntd").server, fedavg.server)


def test_fedntd_distills_only_the_not_true_classes():
    torch.manual_seed(0)
    z, zg = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    nt = fedntd.not_true_logits(z, y)
    assert nt.shape == (6, 4)
    assert torch.equal(nt[1], z[1, [0, 2, 3, 4]])  # the true class (1) is the one left out, order kept
    loss = fedntd.ntd_loss(z, zg, y, tau=2.0)
    z2 = z.clone()
    z2[torch.arange(6), y] += 100.0  # the true-class logit does not enter the loss
    assert torch.allclose(fedntd.ntd_loss(z2, zg, y, tau=2.0), loss)
    expect = 4.0 * F.kl_div(F.log_softmax(nt / 2, 1), F.softmax(fedntd.not_true_logits(zg, y) / 2, 1), reduction="batchmean")
    assert torch.allclose(loss, expect)
    assert float(fedntd.ntd_loss(zg, zg, y, 2.0)) == pytest.approx(0.0, abs=1e-6)  # agreeing with the teacher: no pull


# --------------------------------------------------------------------------------------------- FedLC
def test_fedlc_tau0_equals_fedavg_bit_for_bit(fedavg):
    res = run("fedlc", {"tau": 0})
    assert strip(res.records) == strip(fedavg.records)
    assert same_tensors(res.server, fedavg.server)


def test_fedlc_default_is_the_papers_and_acts(fedavg):
    p = ALGORITHMS.get("fedlc").Params()
    assert (p.tau, p.counts) == (1.0, "local")
    assert differ(run("fedlc").server, fedavg.server)
    assert differ(run("fedlc", {"counts": "global"}).server, run("fedlc").server)


def test_fedlc_calibration_shifts_logits_by_tau_n_to_the_minus_quarter():
    counts = torch.tensor([16, 1, 0, 81])
    m = fedlc.calibration(counts, tau=2.0)
    assert torch.allclose(m[[0, 1, 3]], torch.tensor([2.0 / 2, 2.0, 2.0 / 3]))
    assert math.isinf(float(m[2]))  # an absent class leaves the softmax
    logits = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([0, 3, 1])
    loss = fedlc.calibrated_cross_entropy(logits, y, m)
    keep = [0, 1, 3]
    expect = F.cross_entropy(logits[:, keep] - m[keep], torch.tensor([0, 2, 1]))
    assert torch.allclose(loss, expect)
    loss.backward()
    assert torch.all(logits.grad[:, 2] == 0)  # no gradient pushes the absent class down
    assert torch.equal(fedlc.calibration(counts, 0.0), torch.zeros(4))


def test_fedlc_global_counts_are_the_sum_over_clients():
    s = sim("fedlc", {"counts": "global"})
    rt = runtime(s, 1, 1)
    total = sum(np.bincount(s.ds.y[idx], minlength=s.ctx.num_classes) for idx in s.partition.train)
    assert s.algo.label_counts(rt).cpu().tolist() == total.tolist()
    local = sim("fedlc").algo.label_counts(rt)
    assert torch.equal(local, rt.class_counts())


# -------------------------------------------------------------------------------------------- FedPHP
def test_fedphp_lam0_mu0_is_fedavg_and_the_hpm_is_the_trained_model(fedavg):
    res = run("fedphp", {"lam": 0, "mu": 0})
    for key in GLOBAL_KEYS:
        assert column(res.records, key) == column(fedavg.records, key)
    assert same_tensors(model_entries(res.server), fedavg.server)
    s = sim("fedphp", {"lam": 0, "mu": 0})
    upd = train(s, s.algo.init_server(), 2, 1)
    assert same_tensors(under(upd.state, "hpm"), upd.upload)


def test_fedphp_defaults_are_the_authors_and_act(fedavg):
    p = ALGORITHMS.get("fedphp").Params()
    assert (p.lam, p.mu) == (0.1, 0.9)
    res = run("fedphp")
    assert differ(model_entries(res.server), fedavg.server)
    assert res.records[-1]["personalized_acc"] is not None


def test_fedphp_hpm_is_a_moving_average_with_rising_momentum():
    s = sim("fedphp", rounds=4)
    algo = s.algo
    assert [fedphp.hpm_momentum(0.9, t, 4) for t in (1, 2, 3, 4)] == pytest.approx([0.0, 0.225, 0.45, 0.675])
    server = algo.init_server()
    old = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in server.items()}
    upd = train(s, server, 1, 3, state=with_prefix(old, "hpm"))
    hpm = under(upd.state, "hpm")
    for k, v in upd.upload.items():
        if v.is_floating_point():
            assert torch.allclose(hpm[k], 0.45 * old[k] + 0.55 * v, atol=1e-6)
    assert upd.metrics["hpm_momentum"] == pytest.approx(0.45)


# ------------------------------------------------------------------------------------------ FedCross
def test_fedcross_warmup_over_all_rounds_equals_fedavg_bit_for_bit(fedavg):
    res = run("fedcross", {"warmup_rounds": 2})
    assert strip(res.records) == strip(fedavg.records)
    assert same_tensors(res.server, fedavg.server)


def test_fedcross_default_is_pfllibs_and_acts(fedavg):
    p = ALGORITHMS.get("fedcross").Params()
    assert (p.alpha, p.select, p.warmup_rounds) == (0.99, "lowest", 0)
    res = run("fedcross")
    assert differ(model_entries(res.server), fedavg.server)
    assert {k.split("/")[1] for k in res.server if k.startswith("mw/")} == {"0", "1", "2", "3"}


def test_fedcross_dispatch_is_a_permutation_and_cross_aggregation_mixes_with_the_least_similar():
    s = sim("fedcross", {"alpha": 0.7})
    algo = s.algo
    for rnd in (1, 2, 3):
        assert sorted(algo.slot(c, rnd) for c in range(4)) == [0, 1, 2, 3]  # distinct middleware model per client
    server = algo.init_server()
    torch.manual_seed(1)
    base = model_entries(server)
    # three uploads: 0 and 1 close to each other, 2 far from both (and pointing elsewhere)
    ups = [{k: v + 0.01 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    ups.append({k: -v + torch.randn_like(v) for k, v in base.items()})
    groups = algo.groups
    assert fedcross.collaborators(ups, groups, "lowest", 1) == [2, 2, 0] or \
        fedcross.collaborators(ups, groups, "lowest", 1) == [2, 2, 1]
    assert fedcross.collaborators(ups, groups, "highest", 1)[:2] == [1, 0]
    assert fedcross.collaborators(ups, groups, "in_order", 1) == [2, 0, 1]  # offset (1 mod 2) + 1 = 2
    updates = [Update(u, None, 10.0, cid=c) for c, u in enumerate(ups)]
    out = algo.aggregate(server, updates, 1)
    pairs = fedcross.collaborators(ups, groups, "lowest", 1)
    for c, u in enumerate(ups):
        mw = under(out, f"mw/{algo.slot(c, 1)}")
        k = "head.weight"
        assert torch.allclose(mw[k], 0.7 * u[k] + 0.3 * ups[pairs[c]][k])
    glob = model_entries(out)
    assert torch.allclose(glob["head.weight"], sum(u["head.weight"] for u in ups) / 3, atol=1e-6)


# -------------------------------------------------------------------------------------------- FedCAC
def test_fedcac_tau0_equals_fedavg_bit_for_bit(fedavg):
    res = run("fedcac", {"tau": 0})
    for key in ("global_acc", "global_loss", "loss", "bytes_down"):
        assert column(res.records, key) == column(fedavg.records, key)
    n_params = sum(v.numel() for k, v in fedavg.server.items() if k.startswith(("features.", "head.")))
    clients = res.records[-1]["clients"]
    assert res.records[-1]["bytes_up"] == fedavg.records[-1]["bytes_up"] + clients * n_params  # + one-byte masks
    assert column(res.records, "personalized_acc") == column(fedavg.records, "global_acc")
    assert same_tensors(res.server, fedavg.server)


def test_fedcac_defaults_are_the_authors_and_act(fedavg):
    p = ALGORITHMS.get("fedcac").Params()
    assert (p.tau, p.beta) == (0.5, 100)
    res = run("fedcac")
    assert differ(model_entries(res.server), fedavg.server)
    assert any(k.startswith("cust/") for k in res.server)
    s = sim("fedcac")
    cid = next(int(k.split("/")[1]) for k in res.server if k.startswith("cust/"))
    personal = s.algo.personal_params(s.algo.eval_message(res.server, cid), res.store.get(cid))
    assert differ(personal, model_entries(res.server))  # the critical parameters come from the customized model


@pytest.mark.parametrize("tau", [0.1, 0.5, 0.9])
def test_fedcac_critical_mask_has_the_expected_share(tau):
    torch.manual_seed(0)
    before = torch.randn(40, 25)
    after = before + 0.1 * torch.randn(40, 25)
    m = fedcac.critical_mask(before, after, tau)
    assert int(m.sum()) == int(tau * m.numel())
    c = ((after - before) * after).abs()
    assert float(c[m].min()) >= float(c[~m].max())  # the critical ones are the most sensitive


def test_fedcac_overlap_threshold_and_customized_models():
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    c = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    o = fedcac.overlap_matrix([a, b, c])
    assert float(o[0, 1]) == pytest.approx(0.5) and float(o[0, 2]) == pytest.approx(1.0)
    # round 1 of β = 2: threshold halfway between the mean and the highest overlap (2/3 and 1): 5/6
    assert fedcac.collaboration(o, 1, 2) == [[0, 2], [1], [2, 0]]
    s = sim("fedcac")
    state = with_prefix({n: torch.zeros_like(v, dtype=torch.bool) for n, v in s.algo.init_server().items()
                         if n in s.algo.param_names}, "mask")
    state["mask/head.bias"] = torch.ones_like(state["mask/head.bias"])
    glob = s.algo.init_server()
    cust = {k: v + 1.0 for k, v in glob.items()}
    start = s.algo.start_model({**glob, **with_prefix(cust, "cust")}, state)
    assert torch.equal(start["head.bias"], cust["head.bias"]) and torch.equal(start["head.weight"], glob["head.weight"])
