"""Heterogeneous-model algorithms (issue 5) and the prototype/logit/generator methods of issue 3, on `digits`.

Each runs end to end on a two-architecture group (a 4-layer CNN and ResNet-4, both with 512-d features); uploads
hold only the method's carrier; FedTGP's margin follows its formula; FedKD's SVD codec keeps the energy threshold.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedforge
import fedforge.algorithms  # noqa: F401  (registers the algorithms)
from fedforge.algorithms.fedkd import compress, decompress, energy_threshold, svd_rank
from fedforge.algorithms.fedtgp import TrainablePrototypes, acl_loss, adaptive_margin
from fedforge.algorithms.mechanics import message_to_prototypes
from fedforge.config import build_config
from fedforge.core.messages import numel
from fedforge.core.simulation import Simulation
from fedforge.errors import ConfigError

PAIR = "cnn,ht_resnet4"
FAST = dict(dataset="digits", model=PAIR, clients=4, rounds=2, lr=0.05, batch_size=20)
HTFL = ["fd", "fml", "fedproto", "fedkd", "fedgh", "fedtgp", "fedmrl", "fedgen", "lgfedavg", "local"]
FEATURE_DIM, CLASSES = 512, 10


def simulate(algorithm: str, params: dict | None = None, **options):
    """A Simulation whose aggregate also records every round's updates (the real uploads, unchanged)."""
    cfg = build_config(overrides={**FAST, **options, "algorithm": algorithm}, params=params or {})
    sim = Simulation(cfg, run_dir=False, progress=False)
    seen: dict[int, list] = {}
    aggregate = sim.algo.aggregate

    def recording(server, updates, rnd):
        seen[rnd] = list(updates)
        return aggregate(server, updates, rnd)

    sim.algo.aggregate = recording
    return sim, seen


def classes_held(sim) -> list[set[int]]:
    y = sim.ds.y
    return [set(np.unique(y[idx]).tolist()) for idx in sim.partition.train]


def fast_params(algorithm: str) -> dict:
    return {"server_epochs": 5} if algorithm == "fedtgp" else {}


@pytest.mark.parametrize("algorithm", HTFL)
def test_runs_end_to_end_on_two_architectures(algorithm):
    sim, _ = simulate(algorithm, fast_params(algorithm))
    assert set(sim.ctx.archs) == {"cnn", "ht_resnet4"}
    res = sim.run()
    last = res.records[-1]
    acc = last["personalized_acc"]
    assert acc is not None and math.isfinite(acc) and acc > 0.3, (algorithm, acc)
    assert all(r["loss"] is None or math.isfinite(r["loss"]) for r in res.records)
    assert last["bytes_up"] > 0 or algorithm == "local"


@pytest.mark.parametrize("algorithm, prefix, width", [("fedproto", "proto", FEATURE_DIM), ("fedtgp", "proto", FEATURE_DIM),
                                                      ("fd", "logit", CLASSES), ("fedgh", "proto", FEATURE_DIM)])
def test_uploads_hold_only_the_carrier(algorithm, prefix, width):
    sim, seen = simulate(algorithm, fast_params(algorithm))
    res = sim.run()
    held = classes_held(sim)
    for rnd, updates in seen.items():
        for u in updates:
            assert set(u.upload) == {f"{prefix}/{c}" for c in held[u.cid]}, "only per-class vectors, no weights"
            assert all(v.shape == (width,) for v in u.upload.values())
        assert res.records[rnd]["params_up"] == sum(len(h) for h in held) * width
        assert res.records[rnd]["bytes_up"] == 4 * res.records[rnd]["params_up"]


def test_lgfedavg_heterogeneous_uploads_the_head_only():
    sim, seen = simulate("lgfedavg")
    res = sim.run()
    head = FEATURE_DIM * CLASSES + CLASSES
    for rnd, updates in seen.items():
        for u in updates:
            assert set(u.upload) == {"head.weight", "head.bias"}
        assert res.records[rnd]["params_up"] == res.records[rnd]["params_down"] == 4 * head


def test_fedtgp_margin_follows_its_formula_and_server_loss_is_recorded():
    sim, seen = simulate("fedtgp", {"server_epochs": 5, "margin_threshold": 1e6})
    res = sim.run()
    for rnd, updates in seen.items():
        pairs = [(v, c) for u in updates for c, v in message_to_prototypes(u.upload, -1).items()]
        protos = torch.stack([v for v, _ in pairs]).double()
        labels = [c for _, c in pairs]
        centres = {c: protos[[i for i, l in enumerate(labels) if l == c]].mean(0) for c in set(labels)}
        gaps = [min(float(torch.dist(centres[c], centres[o])) for o in centres if o != c) for c in centres]
        assert res.records[rnd]["margin"] == pytest.approx(min(max(gaps), 1e6), rel=1e-5)
        assert math.isfinite(res.records[rnd]["server_loss"])
    # τ caps the margin
    protos = torch.randn(12, 8) * 10
    labels = torch.arange(12) % 3
    assert adaptive_margin(protos, labels, 0.5) == 0.5
    assert adaptive_margin(protos, labels, 1e9) > 0.5
    assert adaptive_margin(protos, torch.zeros(12, dtype=torch.long), 1e9) == 0.0


def test_fedtgp_acl_training_separates_prototypes():
    torch.manual_seed(0)
    labels = torch.arange(40) % 4
    protos = torch.randn(4, 16)[labels] * 3 + torch.randn(40, 16) * 0.3
    tgp = TrainablePrototypes(4, 16, 16)
    before = acl_loss(tgp, protos, labels, 1.0).item()
    opt = torch.optim.SGD(tgp.parameters(), lr=0.05)
    for _ in range(200):
        loss = acl_loss(tgp, protos, labels, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert acl_loss(tgp, protos, labels, 1.0).item() < 0.5 * before
    # each trained global prototype is nearest to its own class's uploads
    with torch.no_grad():
        assert (torch.cdist(protos, tgp()).argmin(1) == labels).all()


def test_fedtgp_reports_nearest_prototype_and_head_accuracy():
    res = fedforge.run(algorithm="fedtgp", run_dir=False, params={"server_epochs": 5}, **FAST)
    last = res.records[-1]
    assert last["personalized_acc"] is not None and last["head_acc"] is not None
    assert last["personalized_acc"] != last["head_acc"]  # two different predictors


@pytest.mark.parametrize("algorithm", ["fedgh", "fedgen", "lgfedavg"])
def test_shared_head_methods_also_report_the_clients_own_head(algorithm):
    res = fedforge.run(algorithm=algorithm, run_dir=False, **FAST)
    last = res.records[-1]
    assert last["personalized_acc"] is not None and last["head_acc"] is not None
    assert last["personalized_acc"] != last["head_acc"]  # the shared head vs the client's own trained head
    if algorithm == "lgfedavg":  # the own head is kept in the state but never sent
        state = res.store.get(0)
        assert any(k.startswith("own_head/head.") for k in state)
        assert not any(k.startswith("head.") for k in state)


def test_fedkd_svd_codec_keeps_the_energy_threshold():
    torch.manual_seed(0)
    low_rank = torch.randn(64, 6) @ torch.randn(6, 80) + 0.05 * torch.randn(64, 80)
    conv = torch.randn(32, 16, 3, 3)
    bias = torch.randn(32)
    for t in (0.95, 0.98):
        packed = compress({"w": low_rank, "c": conv, "b": bias}, t)
        out = decompress(packed, {"w": low_rank.shape, "c": conv.shape, "b": bias.shape})
        assert numel({k: v for k, v in packed.items() if "/w/" in k}) < low_rank.numel()  # compressed
        for k, ref in (("w", low_rank), ("c", conv)):
            err = float(((out[k] - ref) ** 2).sum() / (ref ** 2).sum())
            assert err <= 1 - t + 1e-5, (k, t, err)
        assert torch.equal(out["b"], bias)  # vectors go as they are
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert svd_rank(s, 9 / 14) == 1 and svd_rank(s, 0.92) == 2 and svd_rank(s, 0.93) == 3 and svd_rank(torch.zeros(3), 0.9) == 0
    assert energy_threshold(1, 50, 0.95, 0.98) == 0.95 and energy_threshold(50, 50, 0.95, 0.98) == pytest.approx(0.98)
    assert energy_threshold(25, 50, 0.95, 0.98) < energy_threshold(26, 50, 0.95, 0.98)


def test_fedkd_compressed_upload_is_smaller_than_the_mentee():
    sim, seen = simulate("fedkd")
    res = sim.run()
    mentee = sum(v.numel() for v in sim.ctx.build_model("cnn").state_dict().values())
    for updates in seen.values():
        for u in updates:
            assert all(k.startswith(("delta/svd/", "delta/raw/")) for k in u.upload)
            assert any("/svd/" in k for k in u.upload)
            assert numel(u.upload) < mentee
    assert res.records[2]["params_down"] < 4 * mentee  # in-sync clients receive the compressed global update
    assert res.records[-1]["global_acc"] is not None  # the mentee is judged as the global model


# ------------------------------------------------------------------ issue 3: the same modules on one architecture
HOMO = dict(FAST, model="cnn", rounds=2)


def accs(res, key="personalized_acc"):
    return [r[key] for r in res.records]


def test_fedproto_lambda_acts_and_zero_reduces_to_local():
    local = fedforge.run(algorithm="local", run_dir=False, **HOMO)
    zero = fedforge.run(algorithm="fedproto", run_dir=False, params={"lam": 0.0}, **HOMO)
    on = fedforge.run(algorithm="fedproto", run_dir=False, params={"lam": 1.0}, **HOMO)
    assert accs(zero, "head_acc") == accs(local)  # λ = 0: each client trains alone, as Local
    assert accs(on, "head_acc") != accs(zero, "head_acc")
    assert accs(on) != accs(on, "head_acc")  # nearest-prototype inference is its own predictor


def test_fd_lambda_acts_and_zero_reduces_to_local():
    local = fedforge.run(algorithm="local", run_dir=False, **HOMO)
    zero = fedforge.run(algorithm="fd", run_dir=False, params={"lam": 0.0}, **HOMO)
    on = fedforge.run(algorithm="fd", run_dir=False, **HOMO)
    assert accs(zero) == accs(local)
    assert accs(on) != accs(zero)


def test_fedgen_homogeneous_is_fedavg_plus_generator():
    fedavg = fedforge.run(algorithm="fedavg", run_dir=False, **HOMO)
    zero = fedforge.run(algorithm="fedgen", run_dir=False, params={"alpha": 0.0}, **HOMO)
    on = fedforge.run(algorithm="fedgen", run_dir=False, **{**HOMO, "rounds": 3})
    assert accs(zero, "global_acc") == accs(fedavg, "global_acc")  # α = 0: FedAvg exactly
    assert accs(on, "global_acc")[:3] != accs(fedavg, "global_acc")
    assert math.isfinite(on.records[-1]["generator_loss"])


def test_state_survives_between_rounds():
    sim, seen = simulate("fedgen")
    res = sim.run()
    # label counts go up once: the client's state remembers that they were sent
    assert all("labels/count" in u.upload for u in seen[1])
    assert not any("labels/count" in u.upload for u in seen[2])
    assert res.records[1]["params_up"] - res.records[2]["params_up"] == 4 * CLASSES
    # FedProto keeps each client's own model: round-2 training starts from the round-1 model
    sim, _ = simulate("fedproto")
    res = sim.run()
    for cid in range(4):
        state = res.store.get(cid)
        init = sim.ctx.build_model(sim.ctx.arch(cid)).state_dict()
        assert set(init) <= set(state)
        assert any(not torch.equal(state[k], init[k]) for k in init if init[k].is_floating_point())


def test_bad_input_is_one_clear_sentence():
    with pytest.raises(ConfigError, match="feature dimension"):
        fedforge.run(algorithm="fedproto", run_dir=False, **{**FAST, "model": "cnn,mlp"})
    with pytest.raises(ConfigError, match="same head"):
        fedforge.run(algorithm="fedgh", run_dir=False, **{**FAST, "model": "cnn,ht_resnet18-h128"})
    with pytest.raises(ConfigError, match="t_end"):
        fedforge.run(algorithm="fedkd", run_dir=False, params={"t_start": 0.99, "t_end": 0.9}, **FAST)
    with pytest.raises(ConfigError, match="small_dim"):
        fedforge.run(algorithm="fedmrl", run_dir=False, params={"small_dim": 512}, **FAST)
    with pytest.raises(ConfigError, match="lam"):
        fedforge.run(algorithm="fedtgp", run_dir=False, params={"lam": -1}, **FAST)
    with pytest.raises(ConfigError, match="share=model"):
        fedforge.run(algorithm="fedgen", run_dir=False, params={"share": "model"}, **FAST)
