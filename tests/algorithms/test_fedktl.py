"""FedKTL: ETF/ArcFace clients, prototype-only uploads, server alignment, generated pairs, KTL with one edge client."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fedforge.algorithms  # noqa: F401  (registers fedktl)
from fedforge.algorithms.fedktl import FedKTL, arcface_loss, etf_cosine, simplex_etf
from fedforge.config import build_config
from fedforge.core.runtime import ClientRuntime, Task, Worker, WorkerSpec
from fedforge.core.simulation import Simulation
from fedforge.data import make_partition
from fedforge.errors import ConfigError


def make_sim(**options) -> Simulation:
    base = dict(algorithm="fedktl", dataset="digits", model="cnn,mlp", clients=4, rounds=2, seed=0)
    return Simulation(build_config(overrides={**base, **options}), run_dir=False, progress=False)


@pytest.fixture(scope="module")
def sim() -> Simulation:
    return make_sim(params={"server_epochs": 20})


@pytest.fixture(scope="module")
def worker(sim) -> Worker:
    return Worker(WorkerSpec(sim.ds, sim.partition, sim.algo))


def test_simplex_etf_and_arcface():
    etf = simplex_etf(10, 3)
    assert torch.allclose(etf.norm(dim=1), torch.ones(10), atol=1e-5)
    off = (etf @ etf.T)[~torch.eye(10, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / 9), atol=1e-5), "equiangular, maximally separated"
    assert torch.equal(etf, simplex_etf(10, 3)) and not torch.equal(etf, simplex_etf(10, 4))
    proj, y = torch.randn(6, 10), torch.tensor([0, 1, 2, 3, 4, 5])
    # no margin: plain cross-entropy over s·cos; a margin makes the true class harder, so the loss grows
    plain = F.cross_entropy(64 * etf_cosine(proj, etf), y)
    assert torch.allclose(arcface_loss(proj, y, etf, 0.0, 64.0), plain)
    assert arcface_loss(proj, y, etf, 0.5, 64.0) > plain
    # on the class vectors themselves the margin-free loss is near zero
    assert arcface_loss(etf * 3, torch.arange(10), etf, 0.0, 64.0) < 1e-6


def test_defaults_follow_the_generator_kind(sim):
    s = sim.algo.settings()
    assert (s["kind"], s["lam"], s["mu"], s["server_lr"], s["latent_dim"]) == ("builtin", 1.0, 50.0, 0.01, 256)
    assert make_sim().algo.hp.server_epochs == 100
    algo = make_sim(params={"lam": 0.1, "mu": 0}).algo
    assert (algo.lam, algo.mu) == (0.1, 0.0)
    for bad in ({"lam": -1}, {"mu": "lots"}, {"server_lr": 0}, {"margin": 4.0}, {"server_batch_size": 1},
                {"centroid_stats": "eval"}):
        with pytest.raises(ConfigError, match="fedktl"):
            make_sim(params=bad)


def test_uploads_are_only_normalised_class_prototypes(sim, worker):
    algo, C = sim.algo, sim.ds.num_classes
    server = algo.init_server()
    assert algo.broadcast(server, 0, 1) == {}, "nothing to send before the first generation"
    updates = [worker.run(Task("train", cid, 1, algo.broadcast(server, cid, 1), None)) for cid in range(4)]
    for u in updates:
        held = set(np.flatnonzero(np.bincount(sim.ds.y[sim.partition.train[u.cid]], minlength=C)).tolist())
        assert set(u.upload) == {f"proto/{c}" for c in held}, "one prototype per class the client holds, nothing else"
        for v in u.upload.values():
            assert v.shape == (C,) and v.dtype == torch.float32
            assert math.isclose(float(v.norm()), 1.0, rel_tol=1e-5)
    # the server aligns, generates one image per class at the clients' input shape, and sends the C pairs
    new = algo.aggregate(server, updates, 1)
    msg = algo.broadcast(new, 0, 2)
    assert set(msg) == {"gen/images", "gen/latents"}
    assert msg["gen/images"].shape == (C, 8, 8, 1) and msg["gen/images"].dtype == torch.uint8
    assert msg["gen/latents"].shape == (C, sim.algo.generator.latent_dim) == (C, 256)
    assert msg["gen/images"].float().std() > 0
    m = algo.server_metrics(new)
    assert {"server_mmd", "server_centroid_mse", "server_seconds"} <= set(m) and all(math.isfinite(v) for v in m.values())
    assert algo.artifacts(new)["generated"].ndim == 3
    # with generated pairs, the upload is still only prototypes
    u2 = worker.run(Task("train", 1, 2, msg, updates[1].state))
    assert all(re.fullmatch(r"proto/\d+", k) for k in u2.upload)


def test_server_alignment_losses_fall_on_fixed_prototypes(sim):
    algo, C = sim.algo, sim.ds.num_classes
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(C, C, generator=g), dim=1)
    protos = torch.cat([F.normalize(base + 0.3 * torch.randn(C, C, generator=g), dim=1) for _ in range(4)])
    labels = torch.arange(C).repeat(4)
    _, hist = algo.align(algo.init_server(), protos, labels, rnd=1, epochs=60)
    mmd, mse = hist["mmd"], hist["mse"]
    total = [a + algo.lam * b for a, b in zip(mmd, mse)]
    assert mmd[-1] < 0.5 * mmd[0], "transformed prototypes move towards the generator's prior"
    assert total[-1] < 0.6 * total[0]
    assert mse[-1] < max(mse), "the centroid term falls once the transformer has found the prior's scale"
    assert all(a >= b - 0.05 for a, b in zip(total[::10], total[10::10])), "the alignment loss keeps falling"


def test_mu_zero_removes_the_generated_data_task(sim, worker):
    algo = sim.algo
    server = algo.aggregate(algo.init_server(), [worker.run(Task("train", c, 1, {}, None)) for c in range(2)], 1)
    msg = algo.broadcast(server, 0, 2)
    rt = ClientRuntime(worker, 0, 2, 0)
    rt.load({k: v for k, v in algo.init_client(rt).items() if "/" not in k})
    proj_fc = algo._proj_fc(rt)
    gen_x, gen_z = rt.fed.to_input(msg["gen/images"]), msg["gen/latents"]
    x, y = next(iter(rt.batches()))
    params = list(rt.model.parameters()) + list(proj_fc.parameters())

    def grads(mu):
        algo.mu = mu
        loss = algo.client_loss(algo.etf, proj_fc, gen_x, gen_z, FedKTL._cycle(len(gen_x), 4, torch.Generator().manual_seed(0)))(rt.model, x, y)
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    try:
        loss0, g0 = grads(0.0)
        loss50, g50 = grads(50.0)
    finally:
        algo.mu = 50.0
    ref = arcface_loss(rt.model(x), y, algo.etf, algo.hp.margin, algo.hp.scale)
    assert torch.allclose(loss0, ref), "μ = 0: the loss is the ArcFace term alone"
    assert all(g is None or float(g.abs().max()) == 0 for g in g0[-2:]), "μ = 0: h' gets no gradient"
    assert all(g is not None and float(g.abs().max()) > 0 for g in g50[-2:]), "μ > 0: h' learns the latents"
    assert loss50 > loss0
    # and a whole local update with μ = 0 leaves h' where it was even when generated pairs arrive
    algo0 = make_sim(params={"mu": 0, "server_epochs": 5}).algo
    w0 = Worker(WorkerSpec(sim.ds, sim.partition, algo0))
    st = algo0.init_client(ClientRuntime(w0, 0, 2, 0))
    u = w0.run(Task("train", 0, 2, msg, st))
    assert all(torch.equal(u.state[k], st[k]) for k in st if k.startswith("proj_fc/"))
    assert not torch.equal(u.state["head.weight"], st["head.weight"])


def test_two_rounds_heterogeneous_on_digits(tmp_path):
    cfg = build_config(overrides=dict(algorithm="fedktl", dataset="digits", model="cnn,mlp", clients=4, rounds=2,
                                      seed=0, out=str(tmp_path / "run"), params={"server_epochs": 20}))
    res = Simulation(cfg, run_dir=cfg.out, progress=False).run()
    last = res.records[-1]
    assert last["personalized_acc"] > 0.5 and last["global_acc"] is None
    assert {"server_mmd", "server_centroid_mse", "server_seconds"} <= set(last)
    # upload bytes: one C-float prototype per (client, held class), nothing else
    stats = res.path / "partition_stats.json"
    import json

    held = (np.asarray(json.loads(stats.read_text())["train_counts"]) > 0).sum()
    C = 10
    assert all(r["bytes_up"] == held * C * 4 and r["params_up"] == held * C for r in res.records[1:])
    # round 2 downloads the C generated pairs: C images of 8×8×1 bytes and C latents of 256 floats (v2: noise 128 + class 128), per client
    assert res.records[2]["bytes_down"] == 4 * (C * 64 + C * 256 * 4)
    assert (res.path / "artifacts" / "generated_round0002.png").is_file()


def test_fewshot_partition_and_single_edge_client():
    labels = np.repeat(np.arange(5), 20)
    part = make_partition(labels, 5, "fewshot", 1, seed=0, shots=3)
    tr, te = part.train[0], part.test[0]
    assert np.array_equal(np.bincount(labels[tr], minlength=5), [3] * 5)
    assert np.array_equal(np.bincount(labels[te], minlength=5), [17] * 5)
    assert not set(tr) & set(te)
    two = make_partition(labels, 5, "fewshot", 2, seed=0, shots=3)
    assert not set(two.train[0]) & set(two.train[1])
    from fedforge.errors import PartitionError

    with pytest.raises(PartitionError, match="lower --shots"):
        make_partition(labels, 5, "fewshot", 1, seed=0, shots=21)
    # KTL with one few-shot edge client and the server's generator, through the same code (a homogeneous model)
    res = make_sim(model="cnn", clients=1, partition="fewshot", shots=5, rounds=2, local_epochs=10, lr=0.01,
                   params={"server_epochs": 20}).run()
    assert res.records[-1]["personalized_acc"] > 0.3
    assert res.records[-1]["bytes_up"] == 10 * 10 * 4
