"""User-level DP-FedAvg around aggregation (--server-dp-noise; core/privacy.py): the clip bound on every update, the
neutral setting equal to plain aggregation bit for bit, the noise scale, adaptive clipping, Opacus's accountant,
resume, and what is refused."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("opacus", reason="differential privacy needs Opacus (pip install 'fedforge[dp]')")
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")

from opacus.accountants import RDPAccountant  # noqa: E402

from fedforge.config import build_config  # noqa: E402
from fedforge.core.privacy import CLIP, CLIP_LR, Privacy, ServerDP  # noqa: E402
from fedforge.core.runtime import Task, Worker, WorkerSpec  # noqa: E402
from fedforge.core.simulation import Simulation  # noqa: E402
from fedforge.errors import ConfigError  # noqa: E402
from tests.support.resume import stop_and_resume  # noqa: E402

# digits split iid among 3 clients: 449 training samples each, so sample weights are equal weights
BASE = dict(dataset="digits", model="mlp", partition="iid", clients=3, rounds=2, threads=1, lr=0.05, seed=4,
            batch_size=16)


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


def _sim(**over) -> Simulation:
    return Simulation(build_config(overrides={**BASE, **over}), run_dir=False, progress=False)


@pytest.fixture(scope="module")
def round_one():
    """The server state and the three real uploads of round 1 (FedAvg on digits, dirichlet: unequal sizes)."""
    sim = _sim(partition="dirichlet", alpha=0.5)
    worker = Worker(WorkerSpec(sim.ds, sim.partition, sim.algo))
    server = sim.algo.init_server()
    updates = [worker.run(Task("train", cid, 1, sim.algo.broadcast(server, cid, 1), None)) for cid in range(3)]
    names = set(server)
    return sim, server, updates, names


def _norm(upload, server):
    return math.sqrt(sum(float(((upload[k] - server[k]).double() ** 2).sum()) for k in upload
                         if upload[k].is_floating_point()))


def _privacy(names, **kw) -> Privacy:
    return Privacy(server=ServerDP(**kw), client=None, num_clients=3, delta=1e-5, sample_rate=1.0, seed=0,
                   model_names=names)


def test_clip_bounds_every_update_and_leaves_the_others_untouched(round_one):
    _, server, updates, names = round_one
    norms = sorted(_norm(u.upload, server) for u in updates)
    s = (norms[0] + norms[1]) / 2  # one update within the clip, two above it
    clipped, within, uploaded = _privacy(names, noise=0.0, clip=s).clip(server, updates, s)
    assert within == 1 and uploaded == {k for k in server if server[k].is_floating_point()}
    for u, c in zip(updates, clipped):
        assert c.weight == 1.0 and c.cid == u.cid
        assert _norm(c.upload, server) <= s * (1 + 1e-6)
        if _norm(u.upload, server) <= s:
            assert all(c.upload[k] is u.upload[k] for k in u.upload)  # handed on as it was
        else:
            assert _norm(c.upload, server) == pytest.approx(s, rel=1e-5)
    assert all(u.weight != 1.0 for u in updates)  # the real updates are not changed in place


def test_no_noise_and_a_huge_clip_is_the_algorithms_aggregate_bit_for_bit(round_one):
    sim, server, updates, names = round_one
    out = _privacy(names, noise=0.0, clip=1e12).aggregate(sim.algo.aggregate, server, server, updates, 1)
    plain = sim.algo.aggregate(server, [dataclasses.replace(u, weight=1.0) for u in updates], 1)
    assert all(torch.equal(out[k], plain[k]) for k in plain) and set(out) == set(plain) | {CLIP}


@pytest.mark.parametrize("algorithm", ["fedavg", "ditto"])
def test_neutral_user_level_dp_equals_a_plain_run_bit_for_bit(algorithm):
    plain = _sim(algorithm=algorithm).run()
    dp = _sim(algorithm=algorithm, server_dp_noise=0.0, server_dp_clip=1e12).run()
    assert [{k: v for k, v in r.items() if not k.startswith("server_dp")} for r in _strip(dp.records)] \
        == _strip(plain.records)
    assert plain.server.keys() == dp.server.keys() and all(torch.equal(plain.server[k], dp.server[k]) for k in plain.server)
    assert all(math.isinf(r["server_dp_epsilon"]) for r in dp.records[1:])  # no noise: no guarantee


def test_noise_has_standard_deviation_z_clip_over_clients(round_one):
    sim, server, updates, names = round_one
    clean = _privacy(names, noise=0.0, clip=0.3).aggregate(sim.algo.aggregate, server, server, updates, 1)
    noisy = _privacy(names, noise=1.7, clip=0.3).aggregate(sim.algo.aggregate, server, server, updates, 1)
    diff = torch.cat([(noisy[k] - clean[k]).flatten() for k in clean if k != CLIP and clean[k].is_floating_point()])
    assert diff.numel() > 50_000
    assert float(diff.std()) == pytest.approx(1.7 * 0.3 / 3, rel=0.02)
    again = _privacy(names, noise=1.7, clip=0.3).aggregate(sim.algo.aggregate, server, server, updates, 1)
    assert all(torch.equal(noisy[k], again[k]) for k in noisy)  # drawn from the round's seed


def test_adaptive_clip_follows_the_quantile_geometrically(round_one):
    sim, server, updates, names = round_one
    norms = [_norm(u.upload, server) for u in updates]
    s0, gamma = sorted(norms)[1] * 1.001, 0.2  # two of three within the clip, aiming at the 20 % quantile
    p = _privacy(names, noise=0.0, clip=s0, quantile=gamma)
    out = p.aggregate(sim.algo.aggregate, server, server, updates, 1)
    assert float(out[CLIP]) == pytest.approx(s0 * math.exp(-CLIP_LR * (2 / 3 - gamma)), rel=1e-12)
    assert float(out[CLIP]) < s0  # too many updates within the clip: it shrinks
    # with noise, the count is noised too and z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)
    sd = ServerDP(noise=1.0, clip=1.0, quantile=0.5, cohort=100)
    assert sd.count_noise == 5.0 and sd.update_noise == pytest.approx((1.0 - 0.01) ** -0.5)
    with pytest.raises(ConfigError, match="below 2·σ_b"):
        ServerDP(noise=0.5, clip=1.0, quantile=0.5, cohort=3).check()


def test_epsilon_is_opacus_rdp_over_rounds_at_the_join_ratio():
    res = _sim(server_dp_noise=1.1, server_dp_clip=0.5, join_ratio=0.67, clients=3, rounds=2).run()
    for r in res.records:
        acc = RDPAccountant()
        acc.history = [(1.1, 0.67, r["round"])] if r["round"] else []
        want = acc.get_epsilon(delta=1e-5) if r["round"] else 0.0
        assert r["server_dp_epsilon"] == pytest.approx(want, rel=1e-12)
    assert res.records[-1]["server_dp_clip"] == 0.5


def test_adaptive_clipping_resumes_bit_for_bit(tmp_path):
    over = dict(server_dp_noise=0.05, server_dp_clip=0.2, server_dp_quantile=0.5, clients=3, checkpoint_every=0,
                rounds=2)
    full = _sim(**over).run()
    clips = [r["server_dp_clip"] for r in full.records]
    assert clips[0] == 0.2 and clips[1] != 0.2
    assert not any(k.startswith("privacy/") for k in full.server)  # kept out of the algorithm's view
    run = tmp_path / "stopped"
    res = stop_and_resume({**BASE, **over}, run)
    assert _strip(res.records) == _strip(full.records)
    assert all(torch.equal(full.server[k], res.server[k]) for k in full.server)


@pytest.mark.parametrize("over,match", [
    (dict(server_dp_clip=2.0), "--server-dp-clip belongs to --server-dp-noise"),
    (dict(server_dp_quantile=0.5), "--server-dp-quantile belongs to --server-dp-noise"),
    (dict(dp_delta=1e-3), "--dp-delta belongs to --dp-epsilon or --server-dp-noise"),
    (dict(server_dp_noise=-0.1), "server_dp_noise must be >= 0"),
    (dict(server_dp_noise=1.0, server_dp_quantile=1.0), "server_dp_quantile must be > 0 and < 1"),
])
def test_bad_options_are_refused(over, match):
    with pytest.raises(ConfigError, match=match):
        build_config(overrides={**BASE, **over})


def test_an_algorithm_that_aggregates_its_own_way_is_refused_before_the_run():
    with pytest.raises(ConfigError, match="scaffold aggregates its own way"):
        _sim(algorithm="scaffold", server_dp_noise=1.0)
