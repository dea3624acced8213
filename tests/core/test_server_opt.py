"""Server optimisers composed with any weight-sharing algorithm (--server-opt, Reddi et al. ICLR 2021)."""
from __future__ import annotations

import pytest
import torch

from fedforge.config import build_config
from fedforge.core.server_opt import ServerOptimizer
from fedforge.core.simulation import Simulation
from fedforge.errors import ConfigError
from tests.support.resume import stop_and_resume

BASE = dict(dataset="digits", model="mlp", clients=4, rounds=2, threads=1, lr=0.05, seed=3)


def _run(**over):
    return Simulation(build_config(overrides={**BASE, **over}), run_dir=False, progress=False).run()


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "scaffold", "ditto"])
def test_sgd_at_server_lr_1_is_plain_aggregation_bit_for_bit(algorithm):
    plain = _run(algorithm=algorithm)
    composed = _run(algorithm=algorithm, server_opt="sgd", server_lr=1.0)
    assert _strip(composed.records) == _strip(plain.records)
    assert plain.server.keys() == composed.server.keys()
    assert all(torch.equal(plain.server[k], composed.server[k]) for k in plain.server)


@pytest.mark.parametrize("kind", ["avgm", "adagrad", "adam", "yogi"])
def test_each_optimiser_acts_and_keeps_its_state_out_of_the_messages(kind):
    plain = _run()
    res = _run(server_opt=kind, server_lr=0.05 if kind != "avgm" else 1.0)
    assert _strip(res.records) != _strip(plain.records)
    assert not any(k.startswith("server_opt/") for k in res.server)  # the algorithm's view of the state
    assert [r["bytes_down"] for r in res.records] == [r["bytes_down"] for r in plain.records]  # nothing extra is sent


def test_adam_step_is_the_papers_formula():
    opt = ServerOptimizer("adam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
    agg = {"w": torch.tensor([1.5, -2.5]), "b": torch.tensor([0.0])}
    out = opt.step(x, agg, {"w"})
    d = agg["w"] - x["w"]
    m = 0.1 * d
    v = 0.99 * 1e-6 + 0.01 * d * d
    torch.testing.assert_close(out["w"], x["w"] + 0.1 * m / (v.sqrt() + 1e-3))
    assert torch.equal(out["b"], agg["b"])  # entries it does not step keep the aggregate
    out2 = opt.step(out, {"w": out["w"] + d, "b": agg["b"]}, {"w"})
    torch.testing.assert_close(out2["server_opt/m/w"], 0.9 * m + 0.1 * d)  # the state carries over


def test_avgm_without_momentum_at_lr_1_is_plain_and_a_method_without_weights_is_refused():
    a, b = _run(server_opt="avgm", server_momentum=0.0), _run()
    for k in b.server:  # x + 1·(x̄ − x) is x̄ up to float rounding
        torch.testing.assert_close(a.server[k], b.server[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="server state holds none"):
        _run(algorithm="fedproto", server_opt="adam")


def test_server_optimiser_state_resumes_bit_for_bit(tmp_path):


    over = dict(server_opt="yogi", server_lr=0.05, rounds=3, checkpoint_every=0)
    full = _run(**over)
    run = tmp_path / "stopped"
    res = stop_and_resume({**BASE, **over}, run)
    assert _strip(res.records) == _strip(full.records)
