"""PFLlib's further methods: FedNTD, FedLC, FedPHP, FedCross, FedCAC, FedMTL, FedAS, PFL-DA, FedPAC, FedGC, FedPCL.

For each: the distinguishing part acts (the result differs from the base method on the same seed), the neutral value
reduces the method to its base exactly, and one behavioural check of the mechanism itself. All on scikit-learn's
`digits` with the small `mlp`, 4 clients and 2 rounds (tests/algorithms/helpers.py).
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedforge.algorithms import fedas, fedcac, fedcross, fedgc, fedlc, fedmtl, fedntd, fedpac, fedpcl, fedphp, mechanics
from fedforge.core.algorithm import ALGORITHMS, Update
from fedforge.core.messages import model_entries, under, with_prefix
from fedforge.core.runtime import ClientRuntime, Worker, WorkerSpec, task_seed
from tests.algorithms.helpers import _one_torch_thread, differ, fedavg, run, same_tensors, sim, strip, train  # noqa: F401  (fixtures)

GLOBAL_KEYS = ("global_acc", "global_loss", "loss", "bytes_up", "bytes_down")
needs_clarabel = pytest.mark.skipif(importlib.util.find_spec("clarabel") is None,
                                    reason="FedPAC's QP solver is not installed (pip install clarabel)")


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
    assert [fedphp.hpm_momentum(0.9, t, 4) for t in (1, 2, 3, 4)] == pytest.approx([0.0, 0.3, 0.6, 0.9])
    server = algo.init_server()
    old = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in server.items()}
    upd = train(s, server, 1, 3, state=with_prefix(old, "hpm"))
    hpm = under(upd.state, "hpm")
    for k, v in upd.upload.items():
        if v.is_floating_point():
            assert torch.allclose(hpm[k], 0.6 * old[k] + 0.4 * v, atol=1e-6)
    assert upd.metrics["hpm_momentum"] == pytest.approx(0.6)


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


# -------------------------------------------------------------------------------------------- FedMTL
@pytest.fixture(scope="module")
def local_run(_one_torch_thread):
    return run("local")


def test_fedmtl_lam0_equals_local_bit_for_bit(local_run):
    res = run("fedmtl", {"lam1": 0, "lam2": 0})
    for key in ("personalized_acc", "personalized_loss", "loss"):
        assert column(res.records, key) == column(local_run.records, key)
    for cid in range(4):
        assert same_tensors(model_entries(res.store.get(cid)), model_entries(local_run.store.get(cid)))


def test_fedmtl_default_acts_and_the_server_sum_tracks_the_clients(local_run):
    p = ALGORITHMS.get("fedmtl").Params()
    assert (p.lam1, p.lam2) == (0.5, 0.0)
    res = run("fedmtl")
    assert differ(model_entries(res.store.get(0)), model_entries(local_run.store.get(0)))
    for k, v in under(res.server, "sum").items():
        total = sum(res.store.get(c)[k] for c in range(4))
        assert torch.allclose(v, total, atol=1e-5)


def test_fedmtl_gradient_is_that_of_the_task_relationship_regulariser():
    torch.manual_seed(0)
    n, k, lam1, lam2 = 5, 2, 0.3, 0.05
    W = torch.randn(7, n, dtype=torch.float64)
    col = W[:, k].clone().requires_grad_(True)
    full = torch.cat([W[:, :k], col[:, None], W[:, k + 1:]], 1)
    omega = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    reg = lam1 * torch.trace(full @ omega @ full.T) + lam2 * (full ** 2).sum()
    (expect,) = torch.autograd.grad(reg, col)
    others = W.sum(1) - W[:, k]
    hook = fedmtl.mtl_grad_hook([others], n, lam1, lam2)
    got = hook([col.detach()], [torch.zeros_like(col)])[0]
    assert torch.allclose(got, expect)


# --------------------------------------------------------------------------------------------- FedAS
@pytest.fixture(scope="module")
def fedper_run(_one_torch_thread):
    return run("fedper")


def test_fedas_without_alignment_and_fisher_weights_keeps_fedpers_server(fedper_run):
    res = run("fedas", {"align_epochs": 0, "fim_weighting": False})
    assert same_tensors(res.server, fedper_run.server)


def test_fedas_defaults_are_the_authors_and_act(fedper_run):
    p = ALGORITHMS.get("fedas").Params()
    assert (p.align_epochs, p.align_lr, p.align_batch_size, p.fim_weighting) == (1, 0.01, 16, True)
    no_align = run("fedas", {"align_epochs": 0})
    assert differ(run("fedas").server, no_align.server)
    assert differ(no_align.server, fedper_run.server)  # Fisher weights act


def test_fedas_alignment_pulls_the_global_extractor_to_the_local_prototypes():
    s = sim("fedas", {"align_lr": 0.05})
    algo = s.algo
    server = algo.init_server()
    state = train(s, server, 0, 1).state  # the client's own model after one round
    glob = {k: v + 0.05 * torch.randn_like(v) for k, v in server.items()}  # a different global extractor
    rt = runtime(s, 0, 2)
    rt.load(state)
    protos, counts = fedas.collect_prototypes(rt)

    @torch.no_grad()
    def align_loss():
        total = 0.0
        for x, y in rt.eval_batches("train"):
            total += float(fedas.alignment_loss(rt.model.features(x), y, protos, counts > 0))
        return total

    rt.load(glob)
    before = align_loss()
    algo.align(rt, glob, state)
    assert align_loss() < before
    assert torch.equal(rt.model.head.weight, state["head.weight"])  # the client keeps its head


def test_fedas_fisher_trace_and_weighted_average():
    s = sim("fedas")
    rt = runtime(s, 1, 1)
    batches = list(rt.batches(epochs=1))
    expect = 0.0
    for x, y in batches:
        rt.model.zero_grad()
        rt.model.eval()
        F.nll_loss(F.log_softmax(rt.model(x), 1), y).backward()
        expect += sum(float((p.grad.double() ** 2).sum()) for p in rt.model.parameters())
    assert float(fedas.fisher_trace(rt, batches)) == pytest.approx(expect, rel=1e-6)
    server = s.algo.init_server()
    ups = [{**{k: v + i for k, v in server.items()}, "fim": torch.tensor(f)} for i, f in enumerate([1.0, 3.0])]
    out = s.algo.aggregate(server, [Update(u, None, 100.0) for u in ups], 1)
    k = next(iter(server))
    assert torch.allclose(out[k], server[k] + 0.75)  # (1·0 + 3·1) / 4, not the sample weights' 0.5


# -------------------------------------------------------------------------------------------- PFL-DA
def test_pflda_lam0_trains_the_personal_head_on_cross_entropy_alone():
    s = sim("pflda", {"lam": 0})
    upd = train(s, s.algo.init_server(), 0, 1)
    # the same head training through the shared mechanic, on the same task stream
    rt = runtime(s, 0, 1)
    rt.load(rt.initial_params())
    mechanics.train_head(rt)
    assert torch.equal(upd.state["head.weight"], rt.model.head.weight)


def test_pflda_penalty_acts_on_the_personal_head_only():
    s0, s1 = sim("pflda", {"lam": 0}), sim("pflda", {"lam": 5.0})
    server = s0.algo.init_server()
    glob = {k: v + 0.1 * torch.randn_like(v) for k, v in server.items()}  # a global head far from the client's
    u0, u1 = train(s0, glob, 2, 1), train(s1, glob, 2, 1)
    assert same_tensors(u0.upload, u1.upload)  # the global head (and the extractor) do not depend on λ
    assert same_tensors(select_body(u0.state), select_body(u1.state))
    d0 = sum(float(((u0.state[k] - glob[k]) ** 2).sum()) for k in glob)
    d1 = sum(float(((u1.state[k] - glob[k]) ** 2).sum()) for k in glob)
    assert d1 < d0  # the penalty keeps the personal head nearer the global one
    assert ALGORITHMS.get("pflda").Params().lam == 1.0


def select_body(d: dict) -> dict:
    return {k: v for k, v in d.items() if k.startswith("features.")}


# -------------------------------------------------------------------------------------------- FedPAC
@needs_clarabel
def test_fedpac_head_weights_are_a_convex_combination():
    rng = torch.Generator().manual_seed(0)
    v = torch.rand(5, generator=rng).double().numpy() * 0.1
    hs = torch.randn(5, 3, 4, generator=rng).double().numpy()
    for i in range(5):
        a = fedpac.combination_weights(v, hs, i)
        assert a is not None and (a >= 0).all() and a.sum() == pytest.approx(1.0, abs=1e-9)
    same = fedpac.combination_weights(np.full(4, 0.5), np.zeros((4, 3, 4)), 0)  # nothing to tell them apart: uniform
    assert same == pytest.approx(np.full(4, 0.25), abs=1e-6)
    far = hs.copy()
    far[3] += 100.0  # a client whose class statistics are far from everyone's gets no weight from the others
    assert fedpac.combination_weights(v, far, 0)[3] == 0.0


@needs_clarabel
def test_fedpac_statistics_and_head_combination():
    s = sim("fedpac")
    rt = runtime(s, 2, 1)
    rt.load(rt.initial_params())
    v, h = fedpac.feature_statistics(rt)
    xs, ys = zip(*rt.eval_batches("train"))
    with torch.no_grad():
        z = rt.model.features(torch.cat(xs)).double()
    y = torch.cat(ys)
    n = len(y)
    expect_v, expect_h = 0.0, torch.zeros_like(h)
    for c in y.unique().tolist():
        zc = z[y == c]
        py = len(zc) / n
        expect_v += py * float((zc ** 2).sum(1).mean()) - py * py * float((zc.mean(0) ** 2).sum())
        expect_h[c] = py * zc.mean(0)
    assert float(v) == pytest.approx(expect_v / n, rel=1e-9)
    assert torch.allclose(h, expect_h)
    server = s.algo.init_server()
    ups = [train(s, server, c, 1).upload for c in range(3)]
    out = s.algo.aggregate(server, [Update(u, None, 10.0, cid=c) for c, u in enumerate(ups)], 1)
    hs = np.stack([u["stat/h"].double().numpy() for u in ups])
    vv = np.array([float(u["stat/v"]) for u in ups])
    alpha = fedpac.combination_weights(vv, hs, 1)
    expect = sum(float(a) * u["head.weight"] for a, u in zip(alpha, ups))
    assert torch.allclose(out["phead/1/head.weight"], expect, atol=1e-6)
    assert {k for k in out if k.startswith("proto/")}  # global prototypes for the next round


@needs_clarabel
def test_fedpac_feature_alignment_acts():
    assert ALGORITHMS.get("fedpac").Params().lam == 1.0
    assert differ(run("fedpac").server, run("fedpac", {"lam": 0}).server)


# --------------------------------------------------------------------------------------------- FedGC
def test_fedgc_correction_is_pfllibs_regulariser_and_lowers_it():
    torch.manual_seed(0)
    w = [torch.randn(4, 3) * 0.5 for _ in range(3)]
    holds = [torch.tensor([1, 1, 0, 0], dtype=torch.bool), torch.tensor([0, 1, 1, 0], dtype=torch.bool),
             torch.tensor([0, 0, 1, 1], dtype=torch.bool)]
    e = {c: torch.stack([w[k][c] for k in range(3) if holds[k][c]]).mean(0) for c in range(4)}
    naive = 0.0
    for k in range(3):
        for c in torch.nonzero(holds[k]).flatten().tolist():
            a = torch.exp(e[c] @ e[c])
            b = sum(torch.exp(w[j][r] @ e[c]) for j in range(3) if not holds[j][c] for r in range(4) if holds[j][r])
            naive += float(-torch.log(a / (a + b)))
    assert float(fedgc.correction_loss(w, holds)) == pytest.approx(naive, rel=1e-5)
    s = sim("fedgc")
    server = s.algo.init_server()
    ups = [train(s, server, c, 1).upload for c in range(4)]
    out = s.algo.aggregate(server, [Update(u, None, 10.0, cid=c) for c, u in enumerate(ups)], 1)
    before = fedgc.correction_loss([u["head.weight"] for u in ups], [u["classes"].bool() for u in ups])
    after = fedgc.correction_loss([out[f"head/{c}/head.weight"] for c in range(4)], [u["classes"].bool() for u in ups])
    assert float(after) < float(before)
    for c, u in enumerate(ups):
        absent = ~u["classes"].bool()
        assert torch.equal(out[f"head/{c}/head.weight"][absent], u["head.weight"][absent])  # foreign rows untouched
        assert torch.equal(u["head.weight"][absent], server["head.weight"][absent])  # ... and never trained locally


def test_fedgc_lam0_keeps_the_uploaded_heads():
    s = sim("fedgc", {"lam": 0})
    server = s.algo.init_server()
    ups = [train(s, server, c, 1).upload for c in range(2)]
    out = s.algo.aggregate(server, [Update(u, None, 10.0, cid=c) for c, u in enumerate(ups)], 1)
    for c, u in enumerate(ups):
        assert torch.equal(out[f"head/{c}/head.weight"], u["head.weight"])
    assert ALGORITHMS.get("fedgc").Params().lam == 1.0
    assert differ(run("fedgc").server, run("fedgc", {"lam": 0}).server)


# -------------------------------------------------------------------------------------------- FedPCL
def test_fedpcl_first_round_only_reports_prototypes_of_normalised_features():
    s = sim("fedpcl")
    upd = train(s, s.algo.init_server(), 1, 1)
    rt = runtime(s, 1, 1)
    init = rt.initial_params()
    assert same_tensors(model_entries(upd.state), init)  # no global prototypes yet: no training
    rt.load(init)
    xs, ys = zip(*rt.eval_batches("train"))
    with torch.no_grad():
        r = F.normalize(rt.model.features(torch.cat(xs)), dim=1)
    y = torch.cat(ys)
    for c in y.unique().tolist():
        assert torch.allclose(upd.upload[f"proto/{c}"], r[y == c].mean(0), atol=1e-6)


def test_fedpcl_loss_uses_global_and_padded_client_prototypes():
    s = sim("fedpcl")
    algo = s.algo
    server = algo.init_server()
    ups = [train(s, server, c, 1) for c in range(4)]
    server = algo.aggregate(server, ups[:2], 1)  # clients 2 and 3 have not reported: their sets are the global one
    msg = algo.broadcast(server, 0, 2)
    sets, valid = algo.prototype_sets(msg, torch.device("cpu"))
    assert sets.shape[0] == 1 + 4
    assert torch.equal(sets[3], sets[0]) and torch.equal(sets[4], sets[0])
    own = ups[0].upload
    for c in range(10):
        if f"proto/{c}" in own:
            assert torch.equal(sets[1][c], own[f"proto/{c}"])
        elif bool(valid[c]):
            assert torch.equal(sets[1][c], sets[0][c])
    r = F.normalize(torch.randn(6, sets.shape[2]), dim=1)
    y = torch.nonzero(valid).flatten()[:6].repeat(2)[:6]
    tau = 0.5
    expect = torch.stack([F.cross_entropy((r @ P.T / tau).masked_fill(~valid, float("-inf")), y) for P in sets[1:]]).mean()
    assert torch.allclose(fedpcl.contrastive_loss(r, y, sets[1:], valid, tau), expect)
    upd = algo.local_update(runtime(s, 0, 2), {k: v for k, v in msg.items()}, ups[0].state)
    assert differ(model_entries(upd.state), model_entries(ups[0].state))  # now it trains


def test_fedpcl_temperature_acts_and_inference_uses_own_prototypes():
    assert ALGORITHMS.get("fedpcl").Params().tau == 0.07
    a, b = run("fedpcl"), run("fedpcl", {"tau": 1.0})
    assert differ(a.server, b.server)
    s = sim("fedpcl")
    state = a.store.get(0)
    held = {int(k.split("/")[1]) for k in state if k.startswith("proto/")}
    rt = runtime(s, 0, 2, "eval")
    counts = s.algo.evaluate(rt, {}, state)["personalized"]
    assert counts.total == rt.num_test and counts.off_class == 0  # never a class the client holds no prototype of
    assert held == set(torch.nonzero(rt.class_counts() > 0).flatten().tolist())


def test_fedpcl_runs_with_heterogeneous_models_of_one_feature_dimension():
    res = run("fedpcl", model="cnn,ht_resnet4", batch_size=20, clients=2)
    assert ALGORITHMS.get("fedpcl").heterogeneous
    assert 0.0 < res.records[-1]["personalized_acc"] <= 1.0
    assert res.records[-1]["bytes_up"] > 0 and not any(k.startswith(("features.", "head.")) for k in res.server)
