"""Client-level DP-SGD (--dp-epsilon; core/dp.py): Opacus's accountant, per-sample clipping, the noise scale, the
neutral setting, resume, and what is refused before a run starts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("opacus", reason="client-level DP needs Opacus (pip install 'fedforge[dp]')")
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # Opacus's own calls in the tests

from opacus.accountants import RDPAccountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402

from fedforge.config import build_config  # noqa: E402
from fedforge.core.dp import (  # noqa: E402
    DPSGD,
    STEPS,
    client_dp,
    clip_per_sample,
    epsilon_spent,
    noisy_mean,
    per_sample_gradients,
    sample_rate,
    steps_per_pass,
)
from fedforge.core.simulation import Simulation  # noqa: E402
from fedforge.core.training import train_loop  # noqa: E402
from fedforge.data import Federation, load_dataset, make_partition  # noqa: E402
from fedforge.errors import ConfigError  # noqa: E402
from fedforge.models import create_model  # noqa: E402
from tests.support.resume import stop_and_resume  # noqa: E402

BASE = dict(dataset="digits", model="mlp", partition="iid", clients=3, rounds=2, threads=1, lr=0.05, seed=2,
            batch_size=16)


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


def _run(**over):
    return Simulation(build_config(overrides={**BASE, **over}), run_dir=False, progress=False).run()


@pytest.fixture(scope="module")
def batch():
    """A real batch of 16 digits and the mlp that trains on them."""
    ds = load_dataset("digits")
    part = make_partition(ds.y, ds.num_classes, "iid", 2, 0)
    fed = Federation(ds, part, torch.device("cpu"))
    x, y = next(fed.train_batches(0, 16, torch.Generator().manual_seed(0)))
    model = create_model("mlp", ds.input_shape, ds.num_classes, seed=0)
    return model, x, y


# ------------------------------------------------------------------------------------------ accountant
def test_noise_and_epsilon_are_opacus_values_for_a_known_setting():
    sizes, b, rounds, epochs = (300, 120, 8), 10, 20, 2
    spec = client_dp(4.0, 1e-5, 1.5, sizes, b, rounds, epochs)
    for cid, n in enumerate(sizes):
        q = min(1.0, b / n)
        steps = rounds * epochs * (n // b if n > b else 1)
        assert spec.sample_rates[cid] == q and spec.planned_steps[cid] == steps
        want = get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=q, steps=steps, accountant="rdp")
        assert spec.sigmas[cid] == want
        acc = RDPAccountant()
        acc.history = [(want, q, steps // 4)]  # Opacus's record of steps // 4 steps at (σ, q)
        assert spec.epsilon_after(cid, steps // 4) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
        assert spec.epsilon_after(cid, steps) <= 4.0 + 1e-9  # the calibrated σ keeps the target
        assert spec.epsilon_after(cid, steps) >= 4.0 - 0.011  # ... within Opacus's tolerance
    # client 2 holds fewer samples than a batch: one step a pass at sampling rate 1 (no amplification)
    assert spec.sample_rates[2] == 1.0 and steps_per_pass(8, 10) == 1 and sample_rate(8, 10) == 1.0
    assert epsilon_spent(1.0, 0.1, 0, 1e-5) == 0.0 and math.isinf(epsilon_spent(0.0, 0.1, 5, 1e-5))


def test_epsilon_grows_with_steps_as_opacus_counts_them_one_by_one():
    acc = RDPAccountant()
    for _ in range(50):
        acc.step(noise_multiplier=1.1, sample_rate=0.05)
    assert epsilon_spent(1.1, 0.05, 50, 1e-5) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
    assert epsilon_spent(1.1, 0.05, 25, 1e-5) < epsilon_spent(1.1, 0.05, 50, 1e-5)


# --------------------------------------------------------------------------------- per-sample gradients
def test_per_sample_gradients_are_each_samples_own(batch):
    model, x, y = batch
    params = list(model.parameters())
    losses, per = per_sample_gradients(model, params, lambda m, a, b: F.cross_entropy(m(a), b), x, y)
    assert losses.shape == (16,) and [g.shape for g in per] == [(16, *p.shape) for p in params]
    for i in (0, 7, 15):
        want = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        for g, w in zip(per, want):
            torch.testing.assert_close(g[i], w, rtol=1e-5, atol=1e-6)
    # a loss through the model's parts (features, head) and a parameter subset (the head alone) work too
    head = list(model.head.parameters())
    _, per_head = per_sample_gradients(model, head, lambda m, a, b: F.cross_entropy(m.head(m.features(a)), b), x, y)
    for g, w in zip(per_head, per[-len(head):]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_clipping_bounds_every_per_sample_gradient(batch):
    model, x, y = batch
    params = list(model.parameters())
    _, per = per_sample_gradients(model, params, lambda m, a, b: F.cross_entropy(m(a), b), x, y)
    norms = torch.stack([g.reshape(16, -1).norm(dim=1) for g in per], 1).norm(dim=1)
    srt = norms.sort().values
    c = float(srt[7] + srt[8]) / 2  # half the samples are clipped, half are not
    clipped, factor = clip_per_sample(per, c)
    after = torch.stack([g.reshape(16, -1).norm(dim=1) for g in clipped], 1).norm(dim=1)
    assert bool((after <= c * (1 + 1e-6)).all())
    big = norms > c
    assert int(big.sum()) == 8
    torch.testing.assert_close(after[big], torch.full_like(after[big], c), rtol=1e-5, atol=0)  # clipped to C exactly
    for g, h in zip(per, clipped):  # the others keep their gradient (factor 1)
        torch.testing.assert_close(h[~big], g[~big], rtol=1e-5, atol=1e-8)
    assert bool((factor[~big] == 1).all())


def test_noise_has_standard_deviation_sigma_times_c():
    b, n, sigma, c = 4, 1_000_000, 1.3, 0.7
    zero = torch.zeros(b, n)
    gen = torch.Generator().manual_seed(11)
    (out,) = noisy_mean([zero], c, sigma, gen)
    noise = out * b  # the mean divides the noisy sum by the batch size
    assert abs(float(noise.mean())) < 5 * sigma * c / math.sqrt(n)
    assert float(noise.std()) == pytest.approx(sigma * c, rel=5e-3)  # std error ~ 1/√(2n) = 0.07 %
    (again,) = noisy_mean([zero], c, sigma, torch.Generator().manual_seed(11))
    assert torch.equal(out, again)  # drawn from the generator it is handed
    (none,) = noisy_mean([torch.ones(b, 3)], c, 0.0, None)
    assert torch.equal(none, torch.ones(3))


def test_neutral_dp_sgd_equals_plain_training_to_float_rounding(batch):
    model, x, y = batch
    a = create_model("mlp", (1, 8, 8), 10, seed=0)
    b = create_model("mlp", (1, 8, 8), 10, seed=0)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    sa = train_loop(a, batches, 0.1)
    sb = train_loop(b, batches, 0.1, dp=DPSGD(max_grad_norm=1e12, noise_multiplier=0.0))
    assert sa.steps == sb.steps == 2 and sa.loss == pytest.approx(sb.loss, rel=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    c = create_model("mlp", (1, 8, 8), 10, seed=0)  # a real clip makes a difference
    train_loop(c, batches, 0.1, dp=DPSGD(max_grad_norm=1e-3, noise_multiplier=0.0))
    assert not torch.allclose(next(c.parameters()), next(a.parameters()), atol=1e-6)


# ------------------------------------------------------------------------------------------- in runs
def test_dp_run_records_epsilon_and_resumes_bit_for_bit(tmp_path):
    over = dict(dp_epsilon=2.0, dp_max_grad_norm=0.5, rounds=2, checkpoint_every=0)
    full = _run(**over)
    plain = _run(rounds=2)
    assert [r["global_acc"] for r in full.records] != [r["global_acc"] for r in plain.records]
    eps = [r["dp_epsilon"] for r in full.records]
    assert eps[0] == 0.0 and all(a < b for a, b in zip(eps, eps[1:])) and eps[-1] <= 2.0 + 1e-9
    steps = [int(full.store.get(c)[STEPS]) for c in range(3)]
    assert full.records[-1]["dp_steps_max"] == max(steps) and min(steps) > 0
    run = tmp_path / "stopped"
    res = stop_and_resume({**BASE, **over}, run)
    assert _strip(res.records) == _strip(full.records)
    for cid in range(3):
        a, b = full.store.get(cid), res.store.get(cid)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(full.server[k], res.server[k]) for k in full.server)
    import json

    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["dp_epsilon"] for r in logged] == eps


def test_every_algorithm_trains_privately_without_knowing(tmp_path):
    """Ditto trains two models a round: both passes are DP-SGD steps, counted in the client's dp/steps."""
    fed = _run(algorithm="fedavg", dp_epsilon=8.0, rounds=1)
    ditto = _run(algorithm="ditto", dp_epsilon=8.0, rounds=1)
    f_steps = [int(fed.store.get(c)[STEPS]) for c in range(3)]
    d_steps = [int(ditto.store.get(c)[STEPS]) for c in range(3)]
    assert d_steps == [2 * s for s in f_steps]
    calibrated = _run(algorithm="ditto", dp_epsilon=8.0, dp_epochs=2, rounds=1)
    assert calibrated.records[-1]["dp_epsilon"] < ditto.records[-1]["dp_epsilon"]  # more noise for two passes


@pytest.mark.parametrize("over,match", [
    (dict(dp_epsilon=0.0), "dp_epsilon must be > 0"),
    (dict(dp_epsilon=-1.0), "dp_epsilon must be > 0"),
    (dict(dp_epsilon=1.0, dp_delta=1.0), "dp_delta must be > 0 and < 1"),
    (dict(dp_epsilon=1.0, dp_delta=0.0), "dp_delta must be > 0 and < 1"),
    (dict(dp_epsilon=1.0, dp_max_grad_norm=0.0), "dp_max_grad_norm must be > 0"),
    (dict(dp_max_grad_norm=2.0), "--dp-max-grad-norm belongs to --dp-epsilon"),
    (dict(dp_epsilon=1.0, executor="vectorized"), "vectorized executor"),
])
def test_bad_values_are_refused_with_one_sentence(over, match):
    with pytest.raises(ConfigError, match=match):
        build_config(overrides={**BASE, **over})


def test_cli_refuses_bad_values_and_batchnorm_before_the_run_starts(tmp_path, capsys):
    from fedforge.cli import main

    for extra, match in ((["--dp-epsilon", "1", "--dp-delta", "2"], "dp_delta must be > 0 and < 1"),
                         (["--dp-epsilon", "1", "--model", "cnn_bn"], "BatchNorm")):
        out = tmp_path / f"run{len(extra)}{extra[-1]}"
        code = main(["run", "--dataset", "digits", "--clients", "3", "--rounds", "1", "--no-progress", "--out",
                     str(out), *extra])
        err = capsys.readouterr().err
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1
        assert not out.exists()  # nothing was started, nothing half-written
