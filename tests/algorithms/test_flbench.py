"""FL-bench's most used personalized methods on `digits`: pFedHN, pFedLA, CFL, FedEM, kNN-Per, CCVR, FedAP, pFedSim.

For each: its distinguishing part acts (it differs from its base on the same seed), it reduces to its base at the
neutral setting where one exists, and one cheap check specific to the method (pFedHN generates a different model per
client and moves it towards what the client learned; CFL splits clients with opposite label maps; ...).
"""
from __future__ import annotations

import numpy as np
import torch

from fedforge.core.messages import model_entries, under

from .helpers import _one_torch_thread, differ, run, sim, train  # noqa: F401


def accs(res, key="personalized_acc"):
    return [r[key] for r in res.records]


def sq_dist(a: dict, b: dict, keys) -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)


# ------------------------------------------------------------------------------------------------ pFedHN
def test_pfedhn_generates_one_model_per_client_and_learns_towards_the_clients_updates():
    s = sim("pfedhn", {"hn_lr": 1e-4})  # a small step: the direction is what is checked
    server = s.algo.init_server()
    m0, m1 = s.algo.broadcast(server, 0, 1), s.algo.broadcast(server, 1, 1)
    assert set(m0) == set(s.ctx.build_model().state_dict()) and differ(m0, m1), "each embedding gives its own model"
    upd = train(s, server, 2, 1)
    sent = s.algo.broadcast(server, 2, 1)
    trained = {k: sent[k] - v for k, v in under(upd.upload, "delta").items()}
    after = s.algo.aggregate(server, [upd], 1)
    keys = list(sent)
    assert sq_dist(s.algo.broadcast(after, 2, 2), trained, keys) < sq_dist(sent, trained, keys), \
        "the hypernetwork step moves the client's generated model towards the model it trained"
    assert differ(s.algo.broadcast(after, 0, 2), m0), "the shared hypernetwork moves the other clients' models too"


def test_pfedhn_learns_and_differs_from_fedavg_and_is_frozen_without_a_learning_rate():
    res = run("pfedhn", rounds=3)
    fedavg = run("fedavg", rounds=3)
    assert accs(res)[1:] != accs(fedavg, "global_acc")[1:]
    assert res.records[-1]["personalized_acc"] > res.records[0]["personalized_acc"] + 0.3
    frozen = run("pfedhn", {"hn_lr": 0.0}, rounds=2)
    assert len(set(accs(frozen))) == 1, "with β = 0 every client keeps its initial generated model"
    assert frozen.records[-1]["bytes_up"] == fedavg.records[1]["bytes_up"], "Δθ has the size of the model"


# ------------------------------------------------------------------------------------------------ kNN-Per
def test_knnper_without_interpolation_is_fedavgs_model_and_with_it_differs():
    fedavg = run("fedavg")
    none = run("knnper", {"weight": 0.0})
    assert accs(none, "global_acc") == accs(fedavg, "global_acc")
    assert accs(none) == accs(fedavg, "global_acc"), "λ = 0: the personalized prediction is the global model's"
    res = run("knnper")
    assert accs(res, "global_acc") == accs(fedavg, "global_acc"), "training is FedAvg's"
    assert accs(res)[1:] != accs(res, "global_acc")[1:]


def test_knnper_memorises_the_clients_training_data():
    """λ = 1, k = 1 and a datastore holding every training sample: each training sample finds itself."""
    from fedforge.core.runtime import ClientRuntime, Worker, WorkerSpec

    s = sim("knnper", {"weight": 1.0, "k": 1, "capacity": 10_000})
    w = Worker(WorkerSpec(s.ds, s.partition, s.algo))
    rt = ClientRuntime(w, 0, 1, seed=0)
    rt.load(s.algo.init_server())
    counts = rt.evaluate(s.algo.personalized_predictor(rt), part="train")
    assert counts.correct == counts.total == rt.num_train
    assert rt.evaluate(part="train").acc < 0.5, "the untrained model alone is far from that"


# ------------------------------------------------------------------------------------------------ FedEM
def test_fedem_with_one_component_is_fedavg():
    fedavg = run("fedavg")
    one = run("fedem", {"components": 1})
    assert accs(one) == accs(fedavg, "global_acc")
    comp = under(one.server, "comp/0")
    for k, v in model_entries(fedavg.server).items():
        torch.testing.assert_close(comp[k], v, rtol=1e-6, atol=1e-7)


def test_fedem_mixture_weights_are_learned_per_client_and_differ_from_fedavg():
    fedavg = run("fedavg")
    res = run("fedem")
    assert accs(res)[1:] != accs(fedavg, "global_acc")[1:]
    pis = torch.stack([res.store.get(c)["fedem/pi"] for c in range(4)])
    assert pis.shape == (4, 3) and torch.allclose(pis.sum(1), torch.ones(4))
    assert not torch.allclose(pis, torch.full_like(pis, 1 / 3), atol=1e-3), "the EM step moves π from uniform"
    assert float(torch.cdist(pis, pis).max()) > 1e-3, "clients end with different mixtures"
    assert set(res.server) == {f"comp/{m}/{k}" for m in range(3) for k in model_entries(fedavg.server)}


# ------------------------------------------------------------------------------------------------ CFL
def flipped_digits():
    """`digits` twice: clients 0-2 hold samples with the true labels, clients 3-5 the same images with y → 9 − y."""
    import dataclasses

    from .helpers import digits

    ds = digits()
    n = len(ds.y)
    rng = np.random.default_rng(0)
    split = []
    for half in (0, 1):
        for part in np.array_split(rng.permutation(n) + half * n, 3):
            k = int(len(part) * 0.75)
            split.append((part[:k], part[k:]))
    return dataclasses.replace(ds, name="digits-flipped", x=np.concatenate([ds.x, ds.x]),
                               y=np.concatenate([ds.y, 9 - ds.y]), client_split=split)


def run_on(dataset, algorithm: str, params: dict | None = None, **kw):
    from fedforge.config import build_config
    from fedforge.core.simulation import Simulation

    from .helpers import BASE

    cfg = build_config(overrides={**BASE, **kw, "algorithm": algorithm}, params=params)
    return Simulation(cfg, run_dir=False, progress=False, dataset=dataset).run()


def test_cfl_without_splits_is_fedavg():
    fedavg = run("fedavg")
    res = run("cfl", {"start_round": 0, "eps_2": 1e9})
    assert accs(res) == accs(fedavg, "global_acc")
    assert [r["clusters"] for r in res.records] == [1] * len(res.records)
    for k, v in model_entries(fedavg.server).items():
        assert torch.equal(res.server[f"cluster/0/{k}"], v), k


def test_cfl_splits_clients_with_opposite_label_maps():
    flipped = flipped_digits()
    params = {"start_round": 1, "eps_1": 1.0, "eps_2": 0.5, "min_cluster_size": 3}
    res = run_on(flipped, "cfl", params, clients=6, rounds=3)
    assign = res.server["cfl/cluster"].tolist()
    assert res.records[-1]["clusters"] == 2
    assert assign[0] == assign[1] == assign[2] != assign[3] == assign[4] == assign[5], assign
    unsplit = run_on(flipped, "cfl", {**params, "eps_2": 1e9}, clients=6, rounds=3)
    assert res.records[-1]["personalized_acc"] > unsplit.records[-1]["personalized_acc"] + 0.2


# ------------------------------------------------------------------------------------------------ pFedSim
def test_pfedsim_with_a_full_warm_up_is_fedavg():
    fedavg = run("fedavg")
    res = run("pfedsim", {"warm_up": 1.0})
    assert accs(res) == accs(fedavg, "global_acc")


def test_pfedsim_weighs_clients_by_classifier_similarity():
    flipped = flipped_digits()
    res = run_on(flipped, "pfedsim", {"warm_up": 0.25}, clients=6, rounds=4)
    sim_ = res.server["pfedsim/similarity"]
    same = [float(sim_[i, j]) for i in range(6) for j in range(6) if i != j and (i < 3) == (j < 3)]
    other = [float(sim_[i, j]) for i in range(6) for j in range(6) if (i < 3) != (j < 3)]
    assert min(same) > max(other), (same, other)
    fedavg = run_on(flipped, "fedavg", clients=6, rounds=4)
    assert res.records[-1]["personalized_acc"] > fedavg.records[-1]["global_acc"] + 0.2
    # the body a client receives mixes the others' bodies; its head stays its own
    msg = sim("pfedsim", {"warm_up": 0.25}, clients=6, rounds=4).algo.broadcast(res.server, 0, 5)
    own = under(res.server, "client/0")
    assert torch.equal(msg["head.weight"], own["head.weight"])
    assert not torch.equal(msg["features.1.weight"], own["features.1.weight"])


# ------------------------------------------------------------------------------------------------ pFedLA
def test_pfedla_learns_layer_weights_towards_the_clients_updates():
    s = sim("pfedla", {"hn_lr": 1e-3})
    server = s.algo.init_server()
    ups = [train(s, server, c, 1) for c in range(4)]
    server = s.algo.aggregate(server, ups, 1)  # the clients' models now differ
    for c in range(4):  # θ_c ← θ_c − Δθ_c
        assert differ(under(server, f"client/{c}"), under(s.algo.init_server(), f"client/{c}"))
    sent = s.algo.broadcast(server, 1, 2)
    upd = train(s, server, 1, 2)
    trained = {k: sent[k] - v for k, v in under(upd.upload, "delta").items()}
    after = s.algo.aggregate(server, [upd], 2)
    keys = list(trained)
    # with the clients' models held fixed, the new layer weights give an aggregate nearer the trained model
    moved = {**after, **{k: v for k, v in server.items() if k.startswith("client/")}}
    assert sq_dist(s.algo.broadcast(moved, 1, 3), trained, keys) < sq_dist(sent, trained, keys)
    assert not torch.equal(after["hn/1/heads.0.weight"], server["hn/1/heads.0.weight"])
    assert torch.equal(after["hn/0/heads.0.weight"], server["hn/0/heads.0.weight"]), "only the client's own HN moves"


def test_pfedla_differs_from_fedavg_and_local():
    res = run("pfedla", rounds=3)
    assert accs(res)[1:] != accs(run("fedavg", rounds=3), "global_acc")[1:]
    assert accs(res)[1:] != accs(run("local", rounds=3))[1:]
    assert res.records[-1]["personalized_acc"] > 0.5


# ------------------------------------------------------------------------------------------------ CCVR
def test_ccvr_trains_as_fedavg_and_calibrates_the_classifier_of_the_round_model():
    fedavg = run("fedavg")
    res = run("ccvr")
    assert accs(res, "uncalibrated_acc") == accs(fedavg, "global_acc")
    for k, v in model_entries(fedavg.server).items():
        assert torch.equal(res.server[k], v), k
    plain = run("ccvr", {"samples_per_class": 0})
    # without virtual features the judged model is the round's broadcast model, one round behind FedAvg's
    assert accs(plain, "global_acc")[1:] == accs(fedavg, "global_acc")[:-1]
    assert accs(res, "global_acc")[1:] != accs(fedavg, "global_acc")[:-1]
    cal = under(res.server, "calibrated")
    before = under(plain.server, "calibrated")
    assert all(torch.equal(cal[k], before[k]) for k in cal if k.startswith("features."))
    assert differ({k: cal[k] for k in cal if k.startswith("head.")}, before)


def test_ccvr_pools_client_statistics_into_the_union_statistics():
    from fedforge.algorithms.ccvr import class_statistics, pooled_statistics

    torch.manual_seed(0)
    z = torch.randn(300, 6, dtype=torch.float64) * 3 + 1
    y = torch.randint(0, 4, (300,))
    cuts = [0, 40, 170, 300]
    uploads = [class_statistics(z[a:b], y[a:b], 4) for a, b in zip(cuts, cuts[1:])]
    pooled = pooled_statistics(uploads)
    for c in range(4):
        zc = z[y == c]
        n, mu, cov = pooled[c]
        assert n == zc.shape[0]
        torch.testing.assert_close(mu, zc.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cov, torch.cov(zc.T), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ FedAP
def inverted_digits():
    """`digits` twice: clients 0-2 hold the images as they are, clients 3-5 the inverted images (a feature shift)."""
    import dataclasses

    ds = flipped_digits()
    return dataclasses.replace(ds, name="digits-inverted", x=np.concatenate([ds.x[: len(ds.x) // 2],
                                                                          255 - ds.x[len(ds.x) // 2:]]),
                               y=np.concatenate([ds.y[: len(ds.y) // 2]] * 2))


def test_fedap_with_a_full_warm_up_is_fedavg_without_normalisation_layers():
    fedavg = run("fedavg")
    res = run("fedap", {"warm_up": 1.0})
    assert accs(res) == accs(fedavg, "global_acc")
    default = run("fedap", rounds=4)
    assert accs(default)[3:] != accs(run("fedavg", rounds=4), "global_acc")[3:]


def test_fedap_weighs_clients_with_similar_feature_statistics_more():
    shifted = inverted_digits()
    res = run_on(shifted, "fedap", {"warm_up": 0.5}, clients=6, rounds=4, model="cnn_bn")
    s = sim("fedap", {"warm_up": 0.5}, clients=6, rounds=4, model="cnn_bn")
    W = s.algo.weights(res.server)  # from the statistics the clients sent (the same architecture and settings)
    assert torch.allclose(W.sum(1), torch.ones(6, dtype=W.dtype)) and torch.allclose(torch.diagonal(W), torch.full((6,), 0.5, dtype=W.dtype))
    for i in range(6):
        same = [float(W[i, j]) for j in range(6) if j != i and (j < 3) == (i < 3)]
        other = [float(W[i, j]) for j in range(6) if (j < 3) != (i < 3)]
        assert min(same) > max(other), (i, same, other)
    # normalisation layers never leave the clients
    assert not any("running_mean" in k for k in res.server)
