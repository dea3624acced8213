"""Local optimisers (--optimizer sgd|momentum|adam, --weight-decay, --lr-decay): state persists across rounds in the
client's state, survives a stop and resume bit for bit, and plain SGD stays exactly what it was."""
from __future__ import annotations

import pytest
import torch

from fedforge.config import build_config
from fedforge.core.simulation import Simulation
from fedforge.core.training import Optimizer, train_loop
from tests.support.resume import stop_and_resume

BASE = dict(dataset="digits", model="mlp", clients=3, rounds=3, threads=1, lr=0.05, seed=1)


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


def _run(**over):
    return Simulation(build_config(overrides={**BASE, **over}), run_dir=False, progress=False).run()


@pytest.mark.parametrize("optimizer,lr", [("momentum", 0.05), ("adam", 0.001)])
def test_stopped_and_resumed_runs_equal_uninterrupted_ones(tmp_path, optimizer, lr):
    over = dict(optimizer=optimizer, lr=lr, weight_decay=1e-4, lr_decay=0.9, checkpoint_every=0)
    full = _run(**over)
    assert any(k.startswith("optim/") for k in full.store.get(0))  # the optimiser state is part of the client's state
    run = tmp_path / "stopped"
    res = stop_and_resume({**BASE, **over}, run)
    assert _strip(res.records) == _strip(full.records)
    for cid in range(3):
        a, b = full.store.get(cid), res.store.get(cid)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_state_carries_over_rounds_and_each_choice_acts():
    sgd = _run()
    assert not any(k.startswith("optim/") for c in range(3) for k in sgd.store.get(c))
    mom = _run(optimizer="momentum")
    adam = _run(optimizer="adam", lr=0.001)
    accs = {r.records[-1]["global_acc"] for r in (sgd, mom, adam)}
    assert len(accs) == 3
    decay = _run(lr_decay=0.5)
    assert decay.records[-1]["global_acc"] != sgd.records[-1]["global_acc"]
    assert _strip(_run(lr_decay=1.0).records) == _strip(sgd.records)  # lr_decay 1 is no decay


def test_momentum_buffer_persists_between_calls_like_torch_sgd():
    """Two train_loop calls with the state handed over equal one torch.optim.SGD run over both batch lists."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ref = torch.nn.Linear(4, 3)
    ref.load_state_dict(model.state_dict())
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(4)]
    spec = Optimizer("momentum", momentum=0.9, weight_decay=0.01)
    state: dict = {}
    train_loop(model, batches[:2], 0.1, optimizer=spec, opt_state=state)
    assert set(state) == {0, 1} and "momentum_buffer" in state[0]
    train_loop(model, batches[2:], 0.1, optimizer=spec, opt_state=state)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_bad_optimizer_options_are_refused():
    from fedforge.errors import ConfigError

    with pytest.raises(ConfigError, match="optimizer must be one of sgd, momentum, adam"):
        build_config(overrides={"optimizer": "adamw"})
    with pytest.raises(ConfigError, match="lr_decay must be > 0 and <= 1"):
        build_config(overrides={"lr_decay": 1.5})
