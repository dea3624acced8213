"""Personalized FL methods with personal models: Per-FedAvg, pFedMe, Ditto, APFL, FedFomo, FedAMP, APPLE.

Each runs end to end on scikit-learn's ``digits`` (4 clients, a small MLP, a few rounds); its mechanism acts
(results differ from FedAvg's on the same seed, and at its neutral setting it reduces to what its paper says);
its per-client state survives the rounds a client sits out and changes when it trains; bytes count what it sends.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from fedforge.algorithms import ALGORITHMS  # importing the package registers every algorithm
from fedforge.config import build_config
from fedforge.core.executors import SequentialExecutor
from fedforge.core.messages import model_entries, nbytes, under
from fedforge.core.simulation import Simulation
from fedforge.errors import ConfigError

PERSONAL = ["per_fedavg", "pfedme", "ditto", "apfl", "fedfomo", "fedamp", "apple"]
BASE = dict(dataset="digits", model="mlp", clients=4, rounds=3, lr=0.05, batch_size=10, seed=3, threads=1)
# Per-FedAvg's paper β (0.001) barely moves a model in 3 rounds; a larger outer step makes its effect visible here.
EXTRA = {"per_fedavg": {"beta": 0.05}}
# APFL's α takes steps of the run's lr: at 0.05 on digits it reaches 0 within the first round on every client, and
# α = 0 is absorbing (v's gradient is α·∇f); at 0.01 it stays near its initial 0.5 and the mechanism shows.
LR = {"apfl": 0.01}


class RecordingExecutor(SequentialExecutor):
    """The default executor, keeping each train task's incoming client state and the state it returned."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.trained: list[tuple[int, int, dict, dict]] = []  # (round, cid, state in, state out)

    def map(self, tasks):
        tasks = list(tasks)
        out = super().map(tasks)
        for t, r in zip(tasks, out):
            if t.kind == "train":
                self.trained.append((t.round, t.cid, t.state, r.state))
        return out


@functools.cache
def _run(algorithm: str, params: tuple = (), **over):
    cfg = build_config(overrides={**BASE, **over, "algorithm": algorithm, "params": dict(params)})
    ex = RecordingExecutor(threads=1)
    sim = Simulation(cfg, run_dir=False, progress=False, executor=ex)
    res = sim.run()
    return res, sim, ex


def run(algorithm: str, lr: float | None = None, **params):
    lr = lr or LR.get(algorithm, BASE["lr"])
    return _run(algorithm, tuple(sorted({**EXTRA.get(algorithm, {}), **params}.items())), lr=lr)


def run_partial(algorithm: str, **params):
    """Half the clients per round: some clients sit rounds out, so state survival can be checked."""
    return _run(algorithm, tuple(sorted({**EXTRA.get(algorithm, {}), **params}.items())), join_ratio=0.5, rounds=4,
                lr=LR.get(algorithm, BASE["lr"]))


def accs(res, key):
    return [r[key] for r in res.records]


def model_bytes(sim) -> int:
    return nbytes(sim.ctx.build_model().state_dict())


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", PERSONAL)
def test_runs_end_to_end_and_personal_models_learn(name):
    res, sim, _ = run(name)
    cls = ALGORITHMS.get(name)
    assert cls.personalized
    first, last = res.records[0], res.records[-1]
    assert last["round"] == BASE["rounds"]
    assert last["personalized_acc"] is not None and math.isfinite(last["personalized_acc"])
    assert (last["global_acc"] is not None) == cls.has_global
    # on digits every method's personal models clearly beat chance (0.1) and their own start
    assert last["personalized_acc"] > 0.3
    assert last["personalized_acc"] > first["personalized_acc"] + 0.1


@pytest.mark.parametrize("name", PERSONAL)
def test_differs_from_fedavg_on_the_same_seed(name):
    fedavg, _, _ = run("fedavg", lr=LR.get(name))
    res, _, _ = run(name)
    assert accs(res, "personalized_acc")[1:] != accs(fedavg, "global_acc")[1:]


def test_ditto_and_apfl_global_models_are_fedavg():
    """Both papers train their global model exactly as FedAvg does; only the personal side differs."""
    for name in ("ditto", "apfl"):
        fedavg, _, _ = run("fedavg", lr=LR.get(name))
        res, _, _ = run(name)
        assert accs(res, "global_acc") == accs(fedavg, "global_acc"), name
        assert accs(res, "personalized_acc")[1:] != accs(res, "global_acc")[1:], name
        for k, v in model_entries(fedavg.server).items():
            assert torch.equal(res.server[k], v), (name, k)


# ---------------------------------------------------------------------------------------- neutral values
def test_per_fedavg_without_inner_step_has_no_personalisation():
    res, _, _ = run("per_fedavg", alpha=0.0)
    assert accs(res, "personalized_acc") == accs(res, "global_acc")
    default, _, _ = run("per_fedavg")
    assert accs(default, "personalized_acc")[1:] != accs(default, "global_acc")[1:]


def test_pfedme_reduces_to_fedavg_with_one_exact_envelope_step():
    """K = 1, η_p = η, λ = 1/η, β = 1: θ̃ = w − η∇f(w) and w ← θ̃, i.e. FedAvg's local SGD and average."""
    lr = BASE["lr"]
    res, _, _ = run("pfedme", K=1, personal_lr=lr, lamda=1.0 / lr, beta=1.0)
    fedavg, _, _ = run("fedavg")
    for k, v in model_entries(fedavg.server).items():
        torch.testing.assert_close(res.server[k], v, rtol=1e-4, atol=1e-5)
    default, _, _ = run("pfedme")
    assert not torch.allclose(default.server["head.weight"], fedavg.server["head.weight"], atol=1e-3)


def test_pfedme_beta_moves_the_global_model_further():
    b1, _, _ = run("pfedme")
    b2, _, _ = run("pfedme", beta=2.0)
    assert accs(b1, "global_acc") != accs(b2, "global_acc")


def test_ditto_lambda_zero_gives_local_personal_models():
    res, _, _ = run("ditto", lamda=0.0)
    local, _, _ = run("local")
    assert accs(res, "personalized_acc") == accs(local, "personalized_acc")
    default, _, _ = run("ditto")
    assert accs(default, "personalized_acc") != accs(local, "personalized_acc")


def test_apfl_alpha_zero_is_the_global_model_and_alpha_is_learned():
    # α = 0 mixed with the received global model is FedAvg's global model (mixed with the client's own trained w, it
    # is that w: tests/algorithms/test_apfl.py)
    fixed, _, _ = run("apfl", alpha=0.0, adaptive=False, mix_with="global")
    fedavg, _, _ = run("fedavg", lr=LR["apfl"])
    assert accs(fixed, "personalized_acc") == accs(fixed, "global_acc") == accs(fedavg, "global_acc")
    res, _, _ = run("apfl")
    alphas = [float(res.store.get(c)["apfl/alpha"]) for c in range(BASE["clients"])]
    assert all(0.0 <= a <= 1.0 for a in alphas)
    assert all(a != 0.5 for a in alphas)  # adaptive α moved from its initial value on every client
    top, _, _ = run("apfl", alpha=1.0)
    assert all(0.0 <= float(top.store.get(c)["apfl/alpha"]) <= 1.0 for c in range(BASE["clients"]))


def test_fedfomo_without_downloads_is_local():
    res, _, _ = run("fedfomo", M=0, val_ratio=0.0)
    local, _, _ = run("local")
    assert accs(res, "personalized_acc") == accs(local, "personalized_acc")
    default, _, _ = run("fedfomo")
    assert accs(default, "personalized_acc") != accs(local, "personalized_acc")


def test_fedamp_without_message_passing_is_local():
    res, _, _ = run("fedamp", alphaK=0.0, lamda=0.0)
    local, _, _ = run("local")
    assert accs(res, "personalized_acc") == accs(local, "personalized_acc")
    default, _, _ = run("fedamp")
    assert accs(default, "personalized_acc") != accs(local, "personalized_acc")


def test_apple_relationship_vector_is_learned_only_with_its_learning_rate():
    res, sim, _ = run("apple")
    frozen, _, _ = run("apple", dr_lr=0.0)
    p0 = sim.algo.prior
    assert torch.isclose(p0.sum(), torch.tensor(1.0))
    for c in range(BASE["clients"]):
        assert torch.equal(frozen.store.get(c)["apple/p"], p0)  # PFLlib's dr_lr = 0 default: p never moves
        assert not torch.equal(res.store.get(c)["apple/p"], p0)
    assert accs(res, "personalized_acc") != accs(frozen, "personalized_acc")


def test_apple_personal_model_is_the_p_weighted_mixture_of_cores():
    res, sim, ex = run("apple")
    rnd, cid, _, state = ex.trained[-1]
    # every client trains every round here: the cores client `cid` downloaded in round `rnd` are the ones the
    # others uploaded (kept as "own/...") in round rnd − 1; its own core is the one it just trained
    downloaded = {c: under(s, "own") for r, c, _, s in ex.trained if r == rnd - 1}
    own = under(state, "own")
    p = state["apple/p"]
    for k, v in model_entries(state).items():
        expect = sum(p[j] * (own[k] if j == cid else downloaded[j][k]) for j in range(BASE["clients"]))
        torch.testing.assert_close(v, expect, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res.server[f"core/{cid}/{k}"], own[k])  # the upload is the own core


# -------------------------------------------------------------------------------- mechanism unit checks
def _tiny_model():
    torch.manual_seed(0)
    from fedforge.models import create_model

    return create_model("mlp", (1, 4, 4), 3, seed=0)


def _batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_per_fedavg_fo_step_is_the_gradient_at_the_adapted_model():
    from fedforge.algorithms.per_fedavg import _MetaStep

    model = _tiny_model()
    step = _MetaStep(model, alpha=0.1, variant="fo", delta=1e-3)
    x, y = _batch(8, 1)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(step.loss(model, x, y), params)
    # by hand: w̃ = w − α∇f(w; D), then ∇f(w̃; D′)
    x1, x2, y1, y2 = x[:4], x[4:], y[:4], y[4:]
    g1 = torch.autograd.grad(F.cross_entropy(model(x1), y1), params)
    adapted = _tiny_model()
    with torch.no_grad():
        for q, p, g in zip(adapted.parameters(), params, g1):
            q.copy_(p - 0.1 * g)
    expect = torch.autograd.grad(F.cross_entropy(adapted(x2), y2), list(adapted.parameters()))
    for a, b in zip(grads, expect):
        torch.testing.assert_close(a, b)


def test_per_fedavg_hf_hook_subtracts_the_hessian_vector_product():
    from fedforge.algorithms.per_fedavg import _MetaStep

    model = _tiny_model().double()
    step = _MetaStep(model, alpha=0.1, variant="hf", delta=1e-4)
    x, y = _batch(9, 2)
    x = x.double()
    params = list(model.parameters())
    v = list(torch.autograd.grad(step.loss(model, x, y), params))
    out = step.hook(params, [t.clone() for t in v])
    # exact Hessian-vector product on D″ by double backward
    x3, y3 = x[6:], y[6:]
    g = torch.autograd.grad(F.cross_entropy(model(x3), y3), params, create_graph=True)
    hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)
    for o, vi, h in zip(out, v, hv):
        torch.testing.assert_close(o, vi - 0.1 * h, rtol=1e-4, atol=1e-7)
    assert any(h.abs().max() > 1e-6 for h in hv)  # the correction is not trivially zero


def test_fedamp_penalty_has_a_gradient_towards_the_cloud_model():
    res, sim, _ = run("fedamp")
    algo = sim.algo
    w = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    u = [torch.randn(5, 3), torch.randn(3)]
    pen = algo.penalty(w, u)
    grads = torch.autograd.grad(pen, w)
    k = algo.hp.lamda / algo.hp.alphaK
    for g, wi, ui in zip(grads, w, u):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, k * (wi.detach() - ui))
    torch.testing.assert_close(pen, 0.5 * k * sum(((a.detach() - b) ** 2).sum() for a, b in zip(w, u)))
    same = [t.detach().clone().requires_grad_(True) for t in u]
    assert all(g.abs().sum() == 0 for g in torch.autograd.grad(algo.penalty(same, u), same))


def test_fedamp_cloud_model_is_the_attention_weighted_sum_and_is_used():
    res, sim, ex = run("fedamp")
    algo = sim.algo
    server = res.server
    n = BASE["clients"]
    models = [under(server, f"client/{j}") for j in range(n)]
    xi = algo.attention(server)
    torch.testing.assert_close(xi.sum(1), torch.ones(n, dtype=xi.dtype))
    d01 = sum(((models[0][k].double() - models[1][k].double()) ** 2).sum() for k in models[0])
    a, s = algo.hp.alphaK, algo.hp.sigma
    assert float(xi[0, 1]) == pytest.approx(a * math.exp(-float(d01) / s) / s, rel=1e-6)
    u0 = algo.broadcast(server, 0, 99)
    for k in u0:
        torch.testing.assert_close(u0[k].double(), sum(float(xi[0, j]) * models[j][k].double() for j in range(n)),
                                   rtol=1e-4, atol=1e-5)
    # the cloud model is where the client's solve starts: with a zero step size it is what the client keeps
    rt = _runtime(sim, cid=0)
    rt.lr = 0.0
    own = model_entries(res.store.get(0))
    upd = algo.local_update(rt, u0, own)
    assert same_state(model_entries(upd.state), {k: v.float() for k, v in u0.items()})
    assert not same_state(model_entries(upd.state), own)


def _runtime(sim, cid: int):
    from fedforge.core.runtime import ClientRuntime, Worker, WorkerSpec

    return ClientRuntime(Worker(WorkerSpec(sim.ds, sim.partition, sim.algo)), cid, 1, 123)


def test_fedfomo_weights_follow_validation_loss_and_fill_the_affinity_matrix():
    # with Dirichlet(0.1) label skew and 4 clients no other client's model ever helps (all weights 0); with
    # i.i.d. clients other models do lower a client's validation loss
    res, sim, _ = _run("fedfomo", (), partition="iid")
    skewed, _, _ = run("fedfomo")
    assert float(skewed.server["fomo/affinity"].sum()) == 0.0
    aff = res.server["fomo/affinity"]
    assert aff.shape == (BASE["clients"], BASE["clients"])
    assert float(aff.sum()) > 0  # some downloaded models lowered some client's validation loss
    assert torch.all(aff >= 0) and torch.all(torch.diagonal(aff) == 0)
    # one client's weights: a peer better on its validation split gets a positive weight, a worse one none
    from fedforge.algorithms.fedfomo import split_positions
    from fedforge.core.context import derive_seed

    rt = _runtime(sim, cid=0)
    own = model_entries(res.store.get(0))
    init = rt.initial_params()
    val, _ = split_positions(rt.num_train, 0.2, derive_seed(sim.ctx.seed, 0, "fomo-val"))
    w = sim.algo.weights(rt, init, {1: own, 2: init}, val)  # from the untrained model: a trained one helps
    assert w[1] == pytest.approx(1.0) and w[2] == 0.0
    w = sim.algo.weights(rt, own, {1: init}, val)  # from the trained model: the initial one does not
    assert w[1] == 0.0


# ------------------------------------------------------------------------------------ state and bytes
@pytest.mark.parametrize("name", ["pfedme", "ditto", "apfl", "fedfomo", "fedamp", "apple"])
def test_client_state_survives_rounds_out_and_changes_when_training(name):
    res, sim, ex = run_partial(name)
    last_out: dict[int, dict] = {}
    survived = changed = 0
    for rnd, cid, state_in, state_out in ex.trained:
        if cid in last_out:  # the state it gets is the one it left with, however many rounds ago
            assert same_state(state_in, last_out[cid]), (name, rnd, cid)
            survived += 1
        if state_in is not None:  # and training changes it
            assert not same_state(state_in, state_out), (name, rnd, cid)
            changed += 1
        last_out[cid] = state_out
    for cid, s in last_out.items():
        assert same_state(res.store.get(cid), s)
    assert survived >= 2 and changed >= 2
    rounds_out = [c for c in range(BASE["clients"]) if c not in sim.select_clients(4)[0] and c in last_out]
    assert rounds_out  # some client sat out the last round and still kept its state


def test_bytes_count_what_each_method_sends():
    mb = None
    for name in PERSONAL:
        res, sim, _ = run(name)
        mb = mb or model_bytes(sim)
        n = BASE["clients"]
        for rec in res.records[1:]:
            if name == "fedfomo":
                m = sim.algo.hp.M
                peers = 0 if rec["round"] == 1 else min(m, n - 1)  # nothing uploaded before round 1
                assert rec["bytes_down"] == n * peers * mb
                assert rec["bytes_up"] == n * (mb + 4 * peers)  # the model + one float32 weight per download
            elif name == "apple":
                assert rec["bytes_down"] == n * (n - 1) * mb  # every other client's core model
                assert rec["bytes_up"] == n * mb
            else:
                assert rec["bytes_down"] == n * mb, name
                assert rec["bytes_up"] == n * mb, name


def test_fedfomo_download_is_per_client_and_top_m():
    res, sim, _ = run("fedfomo", M=2, epsilon=0.0)
    server = res.server
    n = BASE["clients"]
    for cid in range(n):
        chosen = sim.algo.choose(server, cid, 10)
        assert len(chosen) == 2 and cid not in chosen
        row = server["fomo/affinity"][cid]
        others = sorted((j for j in range(n) if j != cid), key=lambda j: -float(row[j]))
        assert min(float(row[j]) for j in chosen) >= float(row[others[1]])
    msg = sim.algo.broadcast(server, 0, 10)
    assert nbytes(msg) == 2 * model_bytes(sim)


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name,params,words", [
    ("apfl", {"alpha": 1.5}, ["alpha", "<= 1", "0.5"]),
    ("apfl", {"alpha": -0.1}, ["alpha", ">= 0", "0.5"]),
    ("pfedme", {"K": 0}, ["K", ">= 1", "5"]),
    ("pfedme", {"beta": 0}, ["beta", "> 0", "1.0"]),
    ("pfedme", {"lamda": -1}, ["lamda", ">= 0", "15"]),
    ("ditto", {"lamda": -0.5}, ["lamda", ">= 0", "1.0"]),
    ("per_fedavg", {"beta": 0}, ["beta", "> 0", "0.001"]),
    ("per_fedavg", {"variant": "so"}, ["variant", "hf", "fo"]),
    ("fedfomo", {"val_ratio": 0.0}, ["val_ratio", "0.2"]),
    ("fedfomo", {"M": -1}, ["M", ">= 0", "5"]),
    ("fedamp", {"alphaK": 0.0}, ["alphaK", "lamda", "0.05"]),
    ("fedamp", {"sigma": 0}, ["sigma", "> 0"]),
    ("apple", {"dr_lr": -1}, ["dr_lr", ">= 0", "0.001"]),
    ("apple", {"L": 2}, ["L", "<= 1", "0.1"]),
])
def test_bad_hyper_parameters_stop_with_one_sentence(name, params, words):
    cls = ALGORITHMS.get(name)
    with pytest.raises(ConfigError) as e:
        cls.Params.from_dict(params, owner=name)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(name)
    for w in words:
        assert w in msg, (w, msg)


def test_fedamp_warns_when_the_message_passing_step_can_extrapolate(caplog):
    _, sim, _ = run("fedamp")
    cls = ALGORITHMS.get("fedamp")
    with caplog.at_level("WARNING", logger="fedforge"):
        cls.create({}, sim.ctx)
    assert not caplog.records  # defaults: α_K (N − 1) / σ = 0.15 ≤ 1
    with caplog.at_level("WARNING", logger="fedforge"):
        cls.create({"alphaK": 1.0, "lamda": 1.0}, sim.ctx)  # PFLlib's values: ξ_ii can reach 1 − 3 = −2
    assert any("sigma/(N-1)" in r.getMessage() for r in caplog.records)
