"""APFL: which mixture a client is judged with (tests/algorithms/helpers.py: digits, 4 clients, a small MLP)."""
from __future__ import annotations

import torch

from fedforge.algorithms.mechanics import mix_params
from fedforge.core.messages import model_entries, under
from fedforge.core.runtime import ClientRuntime, Task, Worker, WorkerSpec
from tests.algorithms.helpers import _one_torch_thread, run, sim, train  # noqa: F401  (fixture)

LR = 0.01  # at 0.05 α reaches 0 within the first round on digits (test_personalized.py)


def _trained(params: dict, cid: int = 1, **kw):
    s = sim("apfl", params, lr=LR, **kw)
    server = s.algo.init_server()
    upd = train(s, server, cid, 1)
    return s, server, upd


def _rt(s):
    return ClientRuntime(Worker(WorkerSpec(s.ds, s.partition, s.algo)), 0, 0, 0)


def _personal_acc(s, server, state, cid: int) -> float:
    w = Worker(WorkerSpec(s.ds, s.partition, s.algo))
    counts = w.run(Task("eval", cid, 1, s.algo.eval_message(server, cid), state)).counts["personalized"]
    return counts.correct / counts.total


def test_judged_mixture_uses_the_clients_trained_w():
    """mix_with=local (default): α·v + (1 − α)·w with w the client's model after its local training (the upload),
    not the received global model; mix_with=global keeps the received model."""
    s, server, upd = _trained({})
    a = float(upd.state["apfl/alpha"])
    assert 0.0 < a < 1.0
    w_local = under(upd.state, "w")
    for k, v in model_entries(upd.upload).items():
        assert torch.equal(w_local[k], v), k
    v = under(upd.state, "v")
    msg = s.algo.eval_message(server, 1)
    got = s.algo.personal_params(msg, upd.state)
    want = mix_params([v, w_local], [a, 1.0 - a])
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    g, _, upd_g = _trained({"mix_with": "global"})
    assert not any(k.startswith("w/") for k in upd_g.state)  # no copy of w kept
    got_g = g.algo.personal_params(msg, upd_g.state)
    want_g = mix_params([under(upd_g.state, "v"), model_entries(msg)], [a, 1.0 - a])
    assert all(torch.equal(got_g[k], want_g[k]) for k in want_g)
    assert any(not torch.equal(got[k], got_g[k]) for k in got)


def test_alpha_zero_judges_the_trained_w_and_an_untrained_client_the_global_model():
    s, server, upd = _trained({"alpha": 0.0, "adaptive": False})
    msg = s.algo.eval_message(server, 1)
    got = s.algo.personal_params(msg, upd.state)
    assert all(torch.equal(got[k], v) for k, v in model_entries(upd.upload).items())
    fresh = s.algo.init_client(_rt(s))
    got0 = s.algo.personal_params(msg, fresh)
    assert all(torch.equal(got0[k], v) for k, v in model_entries(msg).items())
    # judged with its trained w, the client scores as that w does, not as the global model
    assert _personal_acc(s, server, upd.state, 1) != _personal_acc(s, server, {**upd.state, **{
        f"w/{k}": v for k, v in model_entries(server).items()}}, 1)


def test_run_with_local_mixture_differs_from_global_mixture():
    local = run("apfl", lr=LR, rounds=2)
    glob = run("apfl", {"mix_with": "global"}, lr=LR, rounds=2)
    assert [r["global_acc"] for r in local.records] == [r["global_acc"] for r in glob.records]  # same training
    assert [r["personalized_acc"] for r in local.records][1:] != [r["personalized_acc"] for r in glob.records][1:]
