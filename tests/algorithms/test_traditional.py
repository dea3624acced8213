"""Traditional FL methods (one global model): FedProx, SCAFFOLD, MOON, FedDyn.

Each test runs on scikit-learn's `digits` with the small `mlp`, 4 clients and 1-2 rounds, and checks that the
method's mechanism acts (results differ from FedAvg on the same seed), reduces to FedAvg at its neutral value,
keeps its per-client state between rounds, and sends the bytes it should.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fedforge.algorithms  # noqa: F401  (registers the algorithms)
from fedforge.core.algorithm import ALGORITHMS
from fedforge.core.messages import model_entries, nbytes, under
from fedforge.core.runtime import Worker, WorkerSpec
from fedforge.errors import ConfigError
from tests.algorithms.helpers import BASE, _one_torch_thread, differ, fedavg, run, same_tensors, sim, strip, train  # noqa: F401  (fixtures)


def sq_dist(a: dict, b: dict) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b))


# ------------------------------------------------------------------------------------------- FedProx
def test_fedprox_mu0_equals_fedavg_bit_for_bit(fedavg):
    res = run("fedprox", {"mu": 0})
    assert strip(res.records) == strip(fedavg.records)
    assert same_tensors(res.server, fedavg.server)


def test_fedprox_default_mu_is_the_papers_and_acts(fedavg):
    res = run("fedprox")
    assert ALGORITHMS.get("fedprox").Params().mu == 0.01
    assert differ(res.server, fedavg.server)


def test_fedprox_keeps_local_model_near_the_global_one():
    s_avg, s_prox = sim("fedavg"), sim("fedprox", {"mu": 10.0})
    server = s_avg.algo.init_server()
    u_avg = train(s_avg, server, 0, 1)
    u_prox = train(s_prox, server, 0, 1)
    assert sq_dist(u_prox.upload, server) < 0.5 * sq_dist(u_avg.upload, server)


# ------------------------------------------------------------------------------------------ SCAFFOLD
def test_scaffold_first_step_is_fedavg_and_control_variate_is_option_ii():
    s, s_avg = sim("scaffold"), sim("fedavg")
    server = s.algo.init_server()
    assert same_tensors(model_entries(server), s_avg.algo.init_server())
    u = train(s, server, 1, 1)
    u_avg = train(s_avg, model_entries(server), 1, 1)
    assert same_tensors(model_entries(u.upload), u_avg.upload)  # c = c_i = 0: plain SGD
    k, lr = u.metrics["steps"], BASE["lr"]
    assert k > 0
    for n, c_i in under(u.state, "control").items():
        expected = (server[n] - u.upload[n]) / (k * lr)
        torch.testing.assert_close(c_i, expected)
        torch.testing.assert_close(under(u.upload, "control")[n], expected)  # Δc_i = c_i⁺ − 0


def test_scaffold_server_update_state_and_correction():
    s = sim("scaffold", {"server_lr": 0.5})
    server = s.algo.init_server()
    w = Worker(WorkerSpec(s.ds, s.partition, s.algo))
    ups = [train(s, server, cid, 1, worker=w) for cid in range(4)]
    new = s.algo.aggregate(server, ups, 1)
    x = model_entries(server)
    for k in x:
        mean_y = sum(u.upload[k] for u in ups) / 4
        torch.testing.assert_close(new[k], x[k] + 0.5 * (mean_y - x[k]))
    for n in under(server, "control"):
        torch.testing.assert_close(new[f"control/{n}"], sum(under(u.upload, "control")[n] for u in ups) / 4)
    # round 2: the client's own control variate (its state) and the server's correct the local steps
    with_state = train(s, new, 0, 2, state=ups[0].state, worker=w)
    zero_c = {**new, **{f"control/{n}": torch.zeros_like(v) for n, v in under(new, "control").items()}}
    plain = train(s, zero_c, 0, 2, state=None, worker=w)
    assert differ(model_entries(with_state.upload), model_entries(plain.upload))


def test_scaffold_state_survives_and_bytes_are_model_plus_controls():
    res = run("scaffold")
    for cid in range(4):
        c_i = under(res.store.get(cid), "control")
        assert c_i and any(v.abs().sum() > 0 for v in c_i.values())
    model = sim("scaffold").ctx.build_model()
    per_client = nbytes(model.state_dict()) + nbytes(dict(model.named_parameters()))
    assert res.records[-1]["bytes_up"] == 4 * per_client
    assert res.records[-1]["bytes_down"] == 4 * per_client


# ---------------------------------------------------------------------------------------------- MOON
def test_moon_mu0_equals_fedavg_bit_for_bit(fedavg):
    res = run("moon", {"mu": 0})
    assert strip(res.records) == strip(fedavg.records)
    assert same_tensors(res.server, fedavg.server)


def test_moon_contrastive_loss_prefers_the_positive():
    from fedforge.algorithms.moon import model_contrastive_loss

    g = torch.Generator().manual_seed(0)
    z, pos, neg = (torch.randn(8, 16, generator=g) for _ in range(3))
    near = model_contrastive_loss(z, z + 0.01 * pos, neg, 0.5)
    far = model_contrastive_loss(z, neg, z + 0.01 * pos, 0.5)
    assert near < math.log(2) < far
    assert math.isclose(float(model_contrastive_loss(z, pos, pos, 0.5)), math.log(2), rel_tol=1e-6)


def test_moon_keeps_previous_model_and_differs_from_fedavg(fedavg):
    s = sim("moon")
    assert (s.algo.hp.mu, s.algo.hp.tau) == (1.0, 0.5)
    u = train(s, s.algo.init_server(), 2, 1)
    assert same_tensors(under(u.state, "prev"), u.upload)
    res = s.run()
    assert differ(res.server, fedavg.server)
    assert set(under(res.store.get(0), "prev")) == set(res.server)


# -------------------------------------------------------------------------------------------- FedDyn
def test_feddyn_client_and_server_states_follow_the_paper():
    s = sim("feddyn")
    alpha = s.algo.hp.alpha
    assert alpha == 0.01
    server = s.algo.init_server()
    theta = model_entries(server)
    w = Worker(WorkerSpec(s.ds, s.partition, s.algo))
    ups = [train(s, server, cid, 1, worker=w) for cid in (0, 2)]  # partial participation: 2 of 4 clients
    for u in ups:
        for n, g in under(u.state, "grad").items():
            torch.testing.assert_close(g, -alpha * (u.upload[n] - theta[n]))
    new = s.algo.aggregate(server, ups, 1)
    mean = {k: (ups[0].upload[k] + ups[1].upload[k]) / 2 for k in theta}
    for n, h in under(new, "h").items():
        torch.testing.assert_close(h, -alpha * (2 / 4) * (mean[n] - theta[n]))
        torch.testing.assert_close(new[n], mean[n] - h / alpha)
    assert same_tensors(s.algo.eval_message(new, 0), {k: new[f"avg/{k}"] for k in theta})
    torch.testing.assert_close(s.algo.eval_message(new, 0)["features.1.weight"], mean["features.1.weight"])
    # the linear term of the next round uses the kept gradient state
    again = train(s, new, 0, 2, state=ups[0].state, worker=w)
    fresh = train(s, new, 0, 2, state=None, worker=w)
    assert differ(again.upload, fresh.upload)


def test_feddyn_acts_and_tiny_alpha_is_close_to_fedavg(fedavg):
    res = run("feddyn")
    assert differ(model_entries(res.server), fedavg.server)
    assert all(under(res.store.get(cid), "grad") for cid in range(4))
    s, s_avg = sim("feddyn", {"alpha": 1e-9}), sim("fedavg")
    server = s.algo.init_server()
    u, u_avg = train(s, server, 3, 1), train(s_avg, model_entries(server), 3, 1)
    for k in u_avg.upload:
        torch.testing.assert_close(u.upload[k], u_avg.upload[k], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("algo,params,name,rng,default", [
    ("fedprox", {"mu": -0.1}, "mu", ">= 0", "0.01"),
    ("moon", {"mu": -1}, "mu", ">= 0", "1.0"),
    ("moon", {"tau": 0}, "tau", "> 0", "0.5"),
    ("feddyn", {"alpha": 0}, "alpha", "> 0", "0.01"),
    ("scaffold", {"server_lr": -1}, "server_lr", "> 0", "1.0"),
])
def test_bad_hyper_parameter_names_range_and_default(algo, params, name, rng, default):
    with pytest.raises(ConfigError) as e:
        ALGORITHMS.get(algo).Params.from_dict(params, owner=algo)
    msg = str(e.value)
    assert name in msg and rng in msg and f"default is {default}" in msg
    assert msg.count("\n") == 0


def test_bad_hyper_parameter_on_the_command_line_exits_2():
    p = subprocess.run([sys.executable, "-m", "fedforge", "run", "--algorithm", "fedprox", "--set", "mu=-1",
                        "--rounds", "1", "--clients", "2", "--threads", "1", "--no-progress"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2
    assert "mu must be >= 0" in p.stderr and "Traceback" not in p.stderr
