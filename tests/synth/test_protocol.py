"""The client/server protocol: filter, calibrator, exponential mechanism, PE votes, messages, end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedforge.data import load_dataset
from fedforge.data.sources import select_classes
from fedforge.synth import Client, Selection, Server, SynthConfig, run_synth
from fedforge.synth.protocol import calibrated_utility, contrastive_filter, pcevolve_pick, strength_schedule
from fedforge.synth.run import split_private


def two_class(digits, shots=3, seed=0):
    ds = select_classes(digits, "0-1")
    pi, ti = split_private(ds, shots, seed)
    return ds, pi, ti


# ------------------------------------------------------------------------------------- mechanisms
def test_exponential_mechanism_frequencies_match_exp_eps_u_over_2():
    u = np.array([0.0, 0.2, 0.5, 0.8, 1.0])
    eps = 3.0
    rng = np.random.default_rng(1234)
    draws = 40000
    picks = dict(pcevolve_pick(u, eps, draws, rng))
    observed = np.array([picks.get(i, 0.0) for i in range(len(u))])
    expected = np.exp(eps * u / 2)
    expected = expected / expected.sum() * draws
    assert stats.chisquare(observed, expected).pvalue > 0.01
    # and the test has power: the same counts are far from uniform and from exp(ε·u) (a missing 1/2)
    assert stats.chisquare(observed, np.full(len(u), draws / len(u))).pvalue < 1e-12
    wrong = np.exp(eps * u)
    assert stats.chisquare(observed, wrong / wrong.sum() * draws).pvalue < 1e-12


def test_infinite_epsilon_selects_the_argmax():
    u = np.array([0.1, 0.9, 0.3, 0.95, 0.0])
    for seed in range(20):
        assert pcevolve_pick(u, math.inf, 1, np.random.default_rng(seed)) == [(3, 1.0)]


def test_contrastive_filter_and_calibrator():
    # candidates' distances to 3 centres; class 0 keeps only rows whose nearest centre is centre 0
    dist = torch.tensor([[1.0, 2.0, 3.0], [2.0, 1.0, 3.0], [0.5, 0.6, 0.7], [3.0, 3.0, 0.1], [4.0, 5.0, 6.0]])
    keep = contrastive_filter(dist, 0)
    assert keep.tolist() == [True, False, True, False, True]
    u = calibrated_utility(dist[:, 0], keep, tau=10.0)
    assert u[1] == 0 and u[3] == 0  # dropped candidates get utility 0
    assert u[2] == pytest.approx(1.0)  # the closest kept one
    assert u[4] == pytest.approx(math.exp(-10.0))  # the farthest kept one
    assert u[0] == pytest.approx(math.exp(-10.0 * (1.0 - 0.5) / (4.0 - 0.5)))


def test_strength_schedule():
    assert [round(strength_schedule(t), 4) for t in (0, 1, 5, 10, 11, 50)] == [0.8, 0.78, 0.7, 0.6, 0.6, 0.6]


# ------------------------------------------------------------------------------------------ client
def test_filter_drops_candidates_nearest_another_class(digits, digits_encoder):
    ds, pi, ti = two_class(digits)
    client = Client(ds.x[pi], ds.y[pi], 2, digits_encoder, "pcevolve", math.inf, seed=0)
    # offer class 0 a mix of real held-out 0s and 1s; the filter must keep exactly those nearest centre 0
    zeros, ones = ti[ds.y[ti] == 0][:10], ti[ds.y[ti] == 1][:10]
    imgs = np.concatenate([ds.x[zeros], ds.x[ones]])
    from fedforge.synth.protocol import Candidates

    cands = Candidates(0, imgs, {0: np.arange(20), 1: np.arange(20)}, shared=True)
    emb = digits_encoder.embed(imgs)
    centres = torch.stack([digits_encoder.embed(ds.x[pi][ds.y[pi] == c]).mean(0) for c in range(2)])
    nearest = torch.cdist(emb, centres).argmin(1).numpy()
    assert (nearest[:10] == 0).mean() >= 0.8 and (nearest[10:] == 1).mean() >= 0.8  # the encoder separates them
    sel = client.respond(cands)
    assert client.local_log[-1]["kept"] == 20  # each candidate is kept by exactly one class
    (i0, _), = sel.picks[0]
    (i1, _), = sel.picks[1]
    assert nearest[i0] == 0 and nearest[i1] == 1
    # ε = ∞: the pick is the kept candidate closest to its own centre
    d0 = torch.cdist(emb, centres)[:, 0].numpy()
    assert i0 == int(np.flatnonzero(nearest == 0)[np.argmin(d0[nearest == 0])])


def test_bad_private_data(digits, digits_encoder):
    from fedforge.errors import ConfigError, DataError

    ds, pi, _ = two_class(digits)
    with pytest.raises(DataError, match="class 1 has no private images"):
        Client(ds.x[pi][ds.y[pi] == 0], ds.y[pi][ds.y[pi] == 0], 2, digits_encoder, "pcevolve", 1.0)
    rgb = np.repeat(np.repeat(np.repeat(ds.x[pi], 3, 3), 4, 1), 4, 2)
    with pytest.raises(ConfigError, match="expects 1x8x8 inputs"):
        Client(rgb, ds.y[pi], 2, digits_encoder, "pcevolve", 1.0)


# ---------------------------------------------------------------------------------------- messages
def test_selection_holds_only_indices_and_weights():
    s = Selection(3, {0: [(1, 1.0)], 1: [(0, 2.0), (4, 0.5)]})
    assert s.numbers() == 6 and s.picks[1] == ((0, 2.0), (4, 0.5))
    for bad in ({0: np.array([1, 2])}, {0: [(torch.zeros(3), 1.0)]}, {0: [(1, np.ones(2))]}, {0: [(1.5, 1.0)]},
                {0: [(1, -1.0)]}, {0: [(1, float("nan"))]}, {"a": [(1, 1.0)]}, {0: [(1, 2.0, 3.0)]}):
        with pytest.raises((TypeError, ValueError)):
            Selection(0, bad)
    with pytest.raises(AttributeError):
        s.extra = torch.zeros(3)  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        s.picks[0] = ((0, 1.0),)  # type: ignore[index]
    assert not hasattr(s, "__dict__")


def test_server_output_is_a_function_of_the_selections_only(digits, digits_encoder, pca_generator):
    """Replay: a server fed only the recorded messages (no client, no private data) ends with the same dataset."""
    ds, pi, _ = two_class(digits)
    received = []

    class Spy(Server):
        def receive(self, sel):
            received.append(sel)
            super().receive(sel)

    def fresh(cls):
        return cls(pca_generator, 2, 6, ds.input_shape, seed=7)

    for selector, eps in (("pcevolve", 1.0), ("pe", 1.0)):
        received.clear()
        client = Client(ds.x[pi], ds.y[pi], 2, digits_encoder, selector, eps, seed=3)
        server = fresh(Spy)
        for _ in range(3):
            server.receive(client.respond(server.propose()))
        x_live, y_live = server.dataset()
        assert all(type(m) is Selection for m in received) and len(received) == 3
        if selector == "pcevolve":
            assert all(m.numbers() == 2 * 2 for m in received)  # one (index, weight) pair per class
        replay = fresh(Server)
        for m in received:
            replay.propose()
            replay.receive(Selection(m.iteration, dict(m.picks)))
        x_rep, y_rep = replay.dataset()
        assert np.array_equal(x_live, x_rep) and np.array_equal(y_live, y_rep)
        # and the server keeps no reference to anything private
        private_bytes = {ds.x[i].tobytes() for i in pi}
        for v in vars(server).values():
            if isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 4:
                assert not any(img.tobytes() in private_bytes for img in v)
        assert not any(isinstance(v, Client) for v in vars(server).values())


def test_pe_votes_follow_private_images(digits, digits_encoder):
    """PE without noise: every private image's vote lands on its nearest candidate of its class."""
    ds, pi, ti = two_class(digits)
    client = Client(ds.x[pi], ds.y[pi], 2, digits_encoder, "pe", math.inf, seed=0)
    assert client.sigma == 0
    from fedforge.synth.protocol import Candidates

    # candidates: the private images themselves plus held-out ones; each private image votes for itself
    imgs = np.concatenate([ds.x[pi], ds.x[ti[:6]]])
    sel = client.respond(Candidates(0, imgs, {0: np.arange(len(imgs)), 1: np.arange(len(imgs))}, shared=True))
    for c in range(2):
        own = np.flatnonzero(ds.y[pi] == c)
        assert sorted(i for i, _ in sel.picks[c]) == sorted(own.tolist())
        assert all(w == 1.0 for _, w in sel.picks[c])


# -------------------------------------------------------------------------------------- end to end
def test_end_to_end_two_classes_three_shots(tmp_path, digits, digits_encoder, pca_generator):
    out = tmp_path / "run"
    cfg = SynthConfig(private="digits", class_subset="0-1", shots=3, selector="pcevolve", epsilon=1.0, iterations=2,
                      per_class=12, seed=0, out=str(out), eval_every=1, eval_epochs=10)
    res = run_synth(cfg, dataset=digits, generator=pca_generator, encoder=digits_encoder)
    for f in ("synthetic.npz", "metrics.jsonl", "summary.json", "messages.jsonl", "config.json",
              "grids/iteration-000.png", "grids/iteration-001.png", "grids/iteration-002.png"):
        assert (out / f).is_file(), f
    loaded = load_dataset(f"npz:{out / 'synthetic.npz'}")
    assert loaded.x.shape == (24, 8, 8, 1) and loaded.num_classes == 2 and np.bincount(loaded.y).tolist() == [12, 12]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    assert [r["epsilon_spent"] for r in recs] == [0.0, 1.0, 2.0]
    assert recs[0]["kept"] is None and all(0 <= r["kept"] <= r["candidates"] for r in recs[1:])
    assert recs[1]["candidates"] == 2 * 24  # iteration 0 is one shared pool of N·C seen by both classes
    assert all(0 <= r["syn_acc"] <= 1 and 0 <= r["mix_macro_f1"] <= 1 for r in recs)
    s = json.loads((out / "summary.json").read_text())
    assert s["privacy"]["epsilon_total"] == 2.0 and s["privacy"]["epsilon_per_class"] == 0.5
    assert s["privacy"]["private"] is True and "sequential" in s["privacy"]["composition"]
    assert s["messages"] == {"count": 2, "numbers": 8}
    assert len((out / "messages.jsonl").read_text().splitlines()) == 2
    assert s["final"]["real"]["acc"] > 0.6  # two digit classes from 3 shots each, on a digits encoder
    # same seed, same dataset
    res2 = run_synth(SynthConfig(**{**cfg.to_dict(), "out": None}), dataset=digits, generator=pca_generator,
                     encoder=digits_encoder)
    assert np.array_equal(res.x, res2.x)


def test_none_and_infinite_epsilon_summaries(digits, digits_encoder, pca_generator):
    base = dict(private="digits", class_subset="0-1", shots=3, iterations=2, per_class=5, eval_modes=())
    r = run_synth(SynthConfig(selector="none", **base), dataset=digits, generator=pca_generator, encoder=digits_encoder)
    assert r.summary["iterations"] == 0 and r.summary["privacy"]["epsilon_total"] == 0 and len(r.records) == 1
    assert r.messages == [] and len(r.y) == 10
    r = run_synth(SynthConfig(selector="pcevolve", epsilon=math.inf, **base), dataset=digits, generator=pca_generator,
                  encoder=digits_encoder)
    assert r.summary["privacy"]["private"] is False and "noise is off" in r.summary["privacy"]["note"]
    r = run_synth(SynthConfig(selector="rf", **base), dataset=digits, generator=pca_generator, encoder=digits_encoder)
    assert r.summary["privacy"]["private"] is False and "no differential privacy" in r.summary["privacy"]["note"]


def test_text_conditioned_backend_gets_class_prompts(digits, digits_encoder, pca_conditional):
    gen = pca_conditional
    cfg = SynthConfig(private="digits", class_subset="0-1", shots=3, iterations=1, per_class=4, eval_modes=(),
                      domain="handwritten digit", labels=("zero", "one"))
    r = run_synth(cfg, dataset=digits, generator=gen, encoder=digits_encoder)
    assert set(gen.conditions) == {"A handwritten digit image of zero", "A handwritten digit image of one"}
    assert r.records[1]["candidates"] == 8  # per-class candidates, no shared pool


def test_image_to_image_backends_get_the_selected_images(digits, pca_img2img):
    gen = pca_img2img
    ds, pi, _ = two_class(digits)
    server = Server(gen, 2, 5, ds.input_shape, seed=0)
    cands = server.propose()
    assert cands.shared and len(cands.images) == 10
    server.receive(Selection(0, {0: [(3, 1.0)], 1: [(7, 2.0), (8, 0.0)]}))
    (seeds0, s0, _), (seeds1, s1, _) = gen.img2img_calls
    assert s0 == s1 == pytest.approx(0.8)
    assert all(np.array_equal(img, cands.images[3]) for img in seeds0)  # every new class-0 candidate grows from #3
    assert all(np.array_equal(img, cands.images[7]) for img in seeds1)  # weight 0 is never drawn
    nxt = server.propose()
    assert nxt.iteration == 1 and not nxt.shared and len(nxt.images) == 10
    server.receive(Selection(1, {0: [(0, 1.0)], 1: [(4, 1.0)]}))
    assert gen.img2img_calls[-1][1] == pytest.approx(0.78)
    assert np.array_equal(gen.img2img_calls[-1][0][0], nxt.of(1)[4])
