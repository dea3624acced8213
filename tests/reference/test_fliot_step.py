"""Step equivalence with FL-IoT (issue 20, item 5; issue 18's FL-IoT counterparts): fedforge's fedavg, fedprox, local,
fedper, apfl, fedavg_ft, fedprox_ft, fedhome and fedprune against FL-IoT's own client and server classes, run in-process
through ``tests/reference/fliot_shim.py`` on a small sensor-like series federation (3 clients, 3 classes, 3 × 64 steps,
made at test time) with FL-IoT's HAR-CNN.

Both codes start from the same weights, train on the same batches in the same order (fedforge's, handed to FL-IoT's
clients) and, where there are random draws (FedHome's SMOTE), on the same draws (fedforge's, replayed into
imbalanced-learn). Each case runs the local update of every client and one aggregation (two rounds where a second
round adds something) and compares client models, uploads and server state to 1e-5 relative (``RTOL``). Where fedforge
departs from FL-IoT on purpose (named in the algorithm's docstring and in docs/faithfulness.md), the case shows that
the departure is the whole difference: equal once FL-IoT is given fedforge's choice, different without.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedforge.algorithms import fedhome as fedhome_mod
from fedforge.algorithms.fedprune import MASK, keep_count, masks_of, top_mask
from fedforge.core.messages import model_entries
from fedforge.data import Federation
from tests.reference.fliot_shim import (
    ATOL,
    RTOL,
    Harness,
    assert_same,
    fliot_module,
    require_fliot,
    series_federation,
    to_fliot,
)
from tests.reference.pfllib_shim import quiet

# class counts per client: sizes 26, 29, 32 (not multiples of the batch, so drop_last acts), every class ≥ 6 samples
# (imbalanced-learn's SMOTE needs K + 1 = 6), imbalanced within each client (SMOTE has work to do)
COUNTS = ([12, 8, 6], [6, 14, 9], [9, 7, 16])
EQUAL = ([8, 7, 7], [6, 9, 7], [7, 6, 9])  # 22 samples each (FedPrune's aggregation: see test_fedprune)


@pytest.fixture(scope="module")
def data():
    require_fliot()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield series_federation(COUNTS)
    torch.set_num_threads(n)


def close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k].float(), b[k].float(), rtol=RTOL, atol=ATOL) for k in b)


def two_rounds(h: Harness, what: str) -> None:
    for rnd in (1, 2):
        r = h.round(rnd)
        for cid, (fl, ff) in r.clients.items():
            assert_same(fl, ff, f"{what}, round {rnd}, client {cid} after its local update")
        assert_same(*r.server, f"{what}, round {rnd}, server after aggregation")
        h.sync()


# ----------------------------------------------------------------------------------------------- harness
def test_fliot_harcnn_holds_fedforge_weights(data):
    h = Harness("fedavg", "FedAvg", data)
    x, _ = h.fed.inputs(h.fed.train_idx[0][:5])
    with torch.no_grad():
        ours = h.worker.model("harcnn").eval()
        h.worker.model("harcnn").load_state_dict(h.init_weights)
        torch.testing.assert_close(h.fl.global_model.eval()(to_fliot(x)), ours(x), rtol=RTOL, atol=ATOL)


def test_harness_detects_a_changed_step(data):
    """A tenth of a step of difference (lr 0.011 against 0.01) fails the comparison."""
    h = Harness("fedavg", "FedAvg", data)
    h.args.local_learning_rate = 0.011
    for c in h.fl.clients:
        c.optimizer = torch.optim.SGD(c.model.parameters(), lr=0.011)
    r = h.round(1)
    with pytest.raises(AssertionError):
        assert_same(*r.clients[0], "client 0")


# ----------------------------------------------------------------------------------------- FL-IoT's baselines
def test_fedavg(data):
    two_rounds(Harness("fedavg", "FedAvg", data), "FedAvg")


@pytest.mark.parametrize("mu", [1e-5, 1.0])  # FL-IoT's scripts' -mu 1e-5, and one where the term is visible
def test_fedprox(mu, data):
    two_rounds(Harness("fedprox", "FedProx", data, {"mu": mu}, {"mu": mu}), f"FedProx mu={mu}")


def test_local(data):
    """FL-IoT's Local trains each client's own model and sends nothing (its server never calls send_models)."""
    h = Harness("local", "Local", data)
    for rnd in (1, 2):
        updates, batches = h.ff_round(rnd)
        h.fl_train(batches, send=False)
        for c in h.fl.clients:
            assert updates[c.id].upload == {}
            assert_same(h.fl_view(c.model), model_entries(updates[c.id].state), f"Local, round {rnd}, client {c.id}")


def test_fedper_differs_only_by_its_split(data):
    """FL-IoT's FedPer shares main.py's ``LocalModel.base`` (the convolutions) and keeps the whole fc block
    (fc 1024 · fc 512 · classifier) personal; fedforge's shares ``features`` (convolutions and fc 1024 · fc 512) and
    keeps the head. The local updates agree; the convolutions' average agrees; FL-IoT leaves fc 1024 · fc 512 personal
    where fedforge averages them, and once FL-IoT's clients also receive fedforge's average of those two layers,
    round 2 agrees too."""
    h = Harness("fedper", "FedPer", data)
    conv = [k for k, _ in h.pairs if k.startswith("features.0.")]
    fc = [k for k, _ in h.pairs if k.startswith("features.") and k not in conv]
    for rnd in (1, 2):
        updates, batches = h.ff_round(rnd)

        def train(cl, rnd=rnd):
            if rnd == 2:  # the alignment: fedforge's averaged fc 1024 · fc 512 as well
                h.load_fl(cl.model, {k: h.server[k] for k in fc})
            cl.train()

        h.fl_train(batches, train=train)
        for c in h.fl.clients:
            ff = {**model_entries(updates[c.id].upload), **model_entries(updates[c.id].state)}
            assert_same(h.fl_view(c.model), ff, f"FedPer, round {rnd}, client {c.id}")
            assert sorted(updates[c.id].upload) == sorted(conv + fc)  # fedforge uploads features.*
        h.fl_aggregate()
        h.ff_aggregate(updates, rnd)
        fl_server = h.fl_view(h.fl.global_model)
        assert sorted(fl_server) == sorted(conv)  # FL-IoT's global model is the convolutions alone
        assert_same(fl_server, {k: h.server[k] for k in conv}, f"FedPer, round {rnd}, server convolutions")
        if rnd == 1:  # without the alignment the clients' fc layers stay apart in FL-IoT, averaged in fedforge
            fl_fc = [h.fl_view(c.model) for c in h.fl.clients]
            assert not close(fl_fc[0], {k: h.server[k] for k in fc})
        h.sync()


def test_apfl_shares_the_global_step_and_differs_by_design(data):
    """FL-IoT's APFL (an early version of PFLlib's) trains the client's copy of the global model w exactly as FedAvg
    does, which fedforge's APFL does too: that trained w agrees. The rest is not the paper's update (fedforge's
    ``apfl`` docstring has the paper's): FL-IoT starts its personal pass from α·(w + v) (not α·v + (1 − α)·w), trains it
    on α·CE alone for another E epochs with α fixed (``-al``, default 1.0), keeps v ← v + (its change) and uploads the
    mixture (1 − α)·w + α·v instead of w. So its uploads and server state differ from fedforge's."""
    alpha = 0.5
    h = Harness("apfl", "APFL", data, {"alpha": alpha, "adaptive": False}, {"alpha": alpha})
    updates, batches = h.ff_round(1)
    trained_w = {}

    def train(cl):
        orig = cl.update_parameters

        def snapshot(model, new_params):  # its first call replaces the trained w by the personal start
            if cl.id not in trained_w:
                trained_w[cl.id] = h.fl_view(model)
            orig(model, new_params)

        cl.update_parameters = snapshot
        h.feeders[cl.id].put([[(to_fliot(x), y) for x, y in ep] for ep in batches[cl.id]])  # its second pass
        cl.train()

    h.fl_train(batches, train=train)
    for c in h.fl.clients:
        ff_w = model_entries(updates[c.id].upload)
        assert_same(trained_w[c.id], ff_w, f"APFL, client {c.id}'s trained global model w")
        uploaded = h.fl_view(c.model)
        local = {k: v for k, v in zip([a for a, _ in h.pairs], [p.detach() for p in c.w_local])}
        mixture = {k: (1 - alpha) * trained_w[c.id][k] + alpha * local[k] for k in ff_w}
        assert_same(uploaded, mixture, f"APFL, client {c.id}: FL-IoT uploads (1 − α)·w + α·v")
        assert not close(uploaded, ff_w)
    h.fl_aggregate()
    h.ff_aggregate(updates, 1)
    assert not close(h.fl_view(h.fl.global_model), model_entries(h.server))


# ------------------------------------------------------------------------------------ the fine-tuning methods
def _finetune_case(name: str, fl_name: str, ff_params: dict, fl_args: dict, data, what: str):
    """One FedAvg/FedProx round, then fine-tuning: FL-IoT's clients fine-tune with ``client.train()`` (its unit: ``-ls``
    epochs), fedforge with ``finetune``. Aligned: FL-IoT's clients first receive the final global model (its server
    never sends it: they fine-tune their last local model). Returns the harness and the round's updates."""
    h = Harness(name, fl_name, data, ff_params, fl_args)
    r = h.round(1)
    for cid, (fl, ff) in r.clients.items():
        assert_same(fl, ff, f"{what}, round 1, client {cid}")
    assert_same(*r.server, f"{what}, round 1, server")
    h.sync()
    epochs = ff_params["finetune_epochs"]
    tuned = {}
    for c in h.fl.clients:
        tuned[c.id] = h.ff_finetune(c.id)
        ft_batches = h.recorder.take()
        assert len(ft_batches) == epochs
        with h.client_data(), quiet():
            c.set_parameters(h.fl.global_model)  # the alignment
            h.feed(c.id, ft_batches)
            for _ in range(epochs):  # FL-IoT's fine-tuning passes (-ls 1 epoch each)
                c.train()
        assert h.feeders[c.id].drained
        assert_same(h.fl_view(c.model), model_entries(tuned[c.id]), f"{what}, client {c.id} fine-tuned")
        assert not close(model_entries(tuned[c.id]), model_entries(h.server))  # fine-tuning moved it
    return h, r.updates


def test_fedavg_ft(data):
    """FedAvg-FT: the round is FedAvg's, fine-tuning equal once FL-IoT starts from the final global model. FL-IoT's
    own start, each client's model after its last local update, is the single difference: fedforge's fine-tuning
    started from that model (the client's last upload) equals FL-IoT's unaligned fine-tuning."""
    h, updates = _finetune_case("fedavg_ft", "FedAvg-FT", {"finetune_epochs": 2}, {}, data, "FedAvg-FT")
    # FL-IoT as it runs: fine-tune the last local model (a fresh federation, same round)
    g = Harness("fedavg_ft", "FedAvg-FT", data, {"finetune_epochs": 2})
    r = g.round(1)
    for c in g.fl.clients:
        from_upload = g.ff_finetune(c.id, msg=model_entries(r.updates[c.id].upload))
        g.feed(c.id, g.recorder.take())
        with g.client_data(), quiet():
            for _ in range(2):
                c.train()
        assert_same(g.fl_view(c.model), model_entries(from_upload), f"FedAvg-FT as FL-IoT runs it, client {c.id}")
        assert not close(model_entries(from_upload), model_entries(h.ff_finetune(c.id)))


def test_fedprox_ft(data):
    """FedProx-FT (μ = 1 on both sides): FedProx's round and the proximal fine-tuning, anchored at the model it starts
    from, equal once FL-IoT's clients receive the final global model (which sets its anchor too)."""
    _finetune_case("fedprox_ft", "FedProx-FT", {"finetune_epochs": 2, "mu": 1.0}, {"mu": 1.0}, data, "FedProx-FT")


# ---------------------------------------------------------------------------------------------------- FedHome
class DrawRecorder:
    """Wraps a numpy Generator for fedforge's SMOTE and keeps what it drew, in order."""

    def __init__(self, rng):
        self.rng, self.draws = rng, []

    def integers(self, low, high, size):
        out = self.rng.integers(low, high, size=size)
        self.draws.append(("integers", high, out))
        return out

    def random(self, size):
        out = self.rng.random(size)
        self.draws.append(("random", None, out))
        return out


class Replay(np.random.RandomState):
    """imbalanced-learn's random_state, answering its ``randint``/``uniform`` with fedforge's draws, in order."""

    def __init__(self, draws):
        super().__init__(0)
        self.queue = list(draws)

    def _next(self, kind, high, size):
        assert self.queue, "imbalanced-learn drew more than fedforge"
        k, h, out = self.queue.pop(0)
        assert k == kind and (high is None or h == high) and out.shape == (size,), (k, h, out.shape, kind, high, size)
        return out

    def randint(self, low, high=None, size=None, dtype=int):
        return self._next("integers", high, size)

    def uniform(self, low=0.0, high=1.0, size=None):
        return self._next("random", None, size)


def test_fedhome(data, monkeypatch):
    """FedHome: the FedAvg round equal; the personalisation equal once FL-IoT (1) starts from the final global model,
    (2) computes the representations from every training sample (its drop_last loader leaves out the last partial
    batch), (3) draws SMOTE's numbers as fedforge did (replayed) and (4) trains on fedforge's (shuffled) batches of the
    balanced set: the balanced sets agree row for row, the personalised models agree, the convolutions are untouched.
    Without (2) FL-IoT's representations are fedforge's first ⌊n / B⌋·B rows."""
    clienthome = fliot_module("flcore.clients.clienthome")
    from imblearn.over_sampling import SMOTE

    epochs = 3
    h = Harness("fedhome", "FedHome", data, {"personal_epochs": epochs})
    r = h.round(1)
    for cid, (fl, ff) in r.clients.items():
        assert_same(fl, ff, f"FedHome, round 1, client {cid}")
    assert_same(*r.server, "FedHome, round 1, server")
    h.sync()

    orig_smote = fedhome_mod.smote
    for c in h.fl.clients:
        seen = {}

        def recording_smote(z, y, k, rng, seen=seen):
            rec = DrawRecorder(rng)
            seen["out"], seen["draws"] = orig_smote(z, y, k, rec), rec.draws
            return seen["out"]

        positions = []

        def record_positions(n, batch_size, generator, epochs=1, fraction=1.0, drop_last=True):
            for pos in Federation.train_positions(h.fed, n, batch_size, generator, epochs, fraction, drop_last):
                positions.append(pos)
                yield pos

        monkeypatch.setattr(fedhome_mod, "smote", recording_smote)
        recorder_methods = (h.fed.train_indices, h.fed.train_positions)
        del h.fed.train_indices
        h.fed.train_positions = record_positions
        try:
            tuned = h.ff_finetune(c.id)
        finally:
            h.fed.train_indices, h.fed.train_positions = recorder_methods
        zb, yb = seen["out"]
        assert torch.bincount(yb).tolist() == [max(COUNTS[c.id])] * 3  # balanced

        samples = h.samples(c.id)
        full = [(torch.stack([x for x, _ in samples[s:s + 10]]), torch.stack([y for _, y in samples[s:s + 10]]))
                for s in range(0, len(samples), 10)]
        with h.client_data(), quiet():
            c.set_parameters(h.fl.global_model)  # (1)
            # FL-IoT's own drop_last loader: its representations are fedforge's first rows
            c.load_train_data = lambda *a, **k: type(c).load_train_data(c, *a, **k)
            monkeypatch.setattr(clienthome, "SMOTE", lambda: SMOTE(random_state=np.random.RandomState(0)))
            c.generate_data()
            kept = len(samples) // 10 * 10
            own = torch.stack([x for x, _ in c.trainloader_rep.dataset[:kept]])
            torch.testing.assert_close(own, zb[:kept], rtol=RTOL, atol=ATOL)
            # aligned: every sample (2), fedforge's draws (3)
            c.load_train_data = lambda *a, **k: full
            monkeypatch.setattr(clienthome, "SMOTE", lambda: SMOTE(random_state=Replay(seen["draws"])))
            c.generate_data()
            fl_z = torch.stack([x for x, _ in c.trainloader_rep.dataset])
            fl_y = torch.stack([y for _, y in c.trainloader_rep.dataset])
            assert torch.equal(fl_y, yb)
            torch.testing.assert_close(fl_z, zb, rtol=RTOL, atol=ATOL)
            # (4): fedforge's batches of the balanced set, epoch by epoch
            per = len(positions) // epochs
            feeder = h.feeders[c.id]
            feeder.put([[(zb[p], yb[p]) for p in positions[e * per:(e + 1) * per]] for e in range(epochs)])
            c.trainloader_rep = FeedLoader(feeder)
            for _ in range(epochs):
                c.train_pred()
            assert feeder.drained
        assert_same(h.fl_view(c.model), model_entries(tuned), f"FedHome, client {c.id} personalised")
        conv = [k for k, _ in h.pairs if k.startswith("features.0.")]
        assert all(torch.equal(tuned[k], h.server[k]) for k in conv)
        assert not close({k: tuned[k] for k in tuned if k not in conv}, {k: h.server[k] for k in tuned if k not in conv})


class FeedLoader:
    """``for x, y in loader`` over the next epoch an EpochFeeder holds (FedHome's ``trainloader_rep``)."""

    def __init__(self, feeder):
        self.feeder = feeder

    def __iter__(self):
        return iter(self.feeder.loader())


# --------------------------------------------------------------------------------------------------- FedPrune
def _fedprune(data, ratio: float, warmup: int = 2):
    """FL-IoT's FedPrune steps (its server.train(): ``-gr + 1`` warm-up passes of every client, ``get_mask``, then per
    round ``intersection_mask``, ``send_models``, ``train``, ``receive_models``, ``aggregate_parameters``) beside
    fedforge's first round (warm-up inside it). Returns the harness, fedforge's updates and FL-IoT's server masks."""
    topk = round((1 - ratio) * 100)
    h = Harness("fedprune", "FedPrune", data, {"prune_ratio": ratio, "warmup_rounds": warmup},
                {"topk": topk, "global_rounds": warmup - 1})
    updates, batches = h.ff_round(1)
    with h.client_data(), quiet():
        for c in h.fl.clients:  # fedforge's warm-up epochs, then the round's
            h.feed(c.id, batches[c.id])
        for _ in range(warmup):
            for c in h.fl.clients:
                c.train()
        for c in h.fl.clients:
            c.get_mask()
        h.fl.selected_clients = list(h.fl.clients)
        h.fl.intersection_mask()
    return h, updates


def _fl_round(h: Harness, counts_exact: bool = True):
    with h.client_data(), quiet():
        if counts_exact:  # FL-IoT divides by (clients keeping the unit + 1e-5): the exact count where any keeps it
            for m in h.fl.mask:
                m.data = torch.where(m > 0.5, torch.round(m), m)
        h.fl.send_models()
        for c in h.fl.clients:
            c.train()
            assert h.feeders[c.id].drained
        h.fl.receive_models()
        h.fl.aggregate_parameters()


def test_fedprune(monkeypatch):
    """FedPrune, r = 0.5 (FL-IoT ``-tk 50``), 2 warm-up passes, clients of equal size: masks, masked local updates and
    the per-unit average equal once FL-IoT divides by the exact count of clients keeping a unit (it adds 1e-5, which
    scales every average by count/(count + 1e-5)); units no client keeps are 0 in FL-IoT and keep their value in
    fedforge."""
    require_fliot()
    torch.set_num_threads(1)
    h, updates = _fedprune(series_federation(EQUAL), 0.5)
    server_before = {k: v.clone() for k, v in h.server.items()}
    _fl_round(h)
    names = [a for a, _ in h.pairs]
    counts = {}
    for c in h.fl.clients:
        ff_masks = masks_of(updates[c.id].state)
        for name, m in zip(names, c.mask):
            assert torch.equal(m.bool(), ff_masks[name]), f"client {c.id}'s mask of {name}"
            assert int(ff_masks[name].sum()) >= keep_count(m.numel(), 0.5)
            counts[name] = counts.get(name, 0) + ff_masks[name].int()
        up = model_entries(updates[c.id].upload)
        assert_same(h.fl_view(c.model), up, f"FedPrune, client {c.id} after its masked update")
        assert all(torch.all(up[n][~ff_masks[n]] == 0) for n in names)  # pruned weights stay 0
    h.ff_aggregate(updates, 1)
    fl_server = h.fl_view(h.fl.global_model)
    for n in names:
        kept = counts[n] > 0
        torch.testing.assert_close(fl_server[n][kept], h.server[n][kept], rtol=RTOL, atol=ATOL)
        assert torch.all(fl_server[n][~kept] == 0)
        assert torch.equal(h.server[n][~kept], server_before[n][~kept])
    assert any(bool((c == 0).any()) for c in counts.values()) and any(bool((c == 1).any()) for c in counts.values())


def test_fedprune_fliot_weighting_and_epsilon():
    """With clients of different sizes FL-IoT's aggregate is Σ_k (n_k / N)·J·w_k / (count + 1e-5) (J clients, N their
    samples), not the sample-weighted mean over the clients keeping a unit: shown on FL-IoT's own unaligned step."""
    require_fliot()
    torch.set_num_threads(1)
    h, updates = _fedprune(series_federation(COUNTS), 0.5)
    _fl_round(h, counts_exact=False)
    h.ff_aggregate(updates, 1)
    ups = [model_entries(updates[c].upload) for c in range(3)]
    n = torch.tensor([float(updates[c].weight) for c in range(3)])
    fl_server = h.fl_view(h.fl.global_model)
    differs = False
    for name in fl_server:
        count = sum(masks_of(updates[c].state)[name].float() for c in range(3))
        formula = sum(float(n[c] / n.sum()) * 3 * ups[c][name] for c in range(3)) / (count + 1e-5)
        torch.testing.assert_close(fl_server[name], formula, rtol=RTOL, atol=ATOL)
        kept = count > 0
        differs |= not torch.allclose(fl_server[name][kept], h.server[name][kept], rtol=RTOL, atol=ATOL)
    assert differs


def test_fedprune_threshold_on_small_tensors():
    """FL-IoT's threshold ``sorted[-int(topk/100·size)]`` is ``sorted[0]`` when that count is 0: it keeps the whole
    tensor (-tk 0, its default, keeps every weight; -tk 10 keeps all 6 entries of a 6-class bias). fedforge keeps
    ⌊(1 − r)·size⌋ entries, at least one; the two agree wherever the count is at least 1."""
    clientprune = fliot_module("flcore.clients.clientprune")
    g = torch.tensor([0.3, -2.0, 0.1, 0.7, -0.05, 1.1])
    fl = lambda topk: clientprune.top_mask(g.abs().view(-1), topk, g.abs())  # noqa: E731
    assert fl(10).all() and fl(0).all()
    assert top_mask(g.abs(), 0.9).tolist() == [False, True, False, False, False, False]
    for topk in (20, 50, 70, 90):
        assert torch.equal(fl(topk), top_mask(g.abs(), 1 - topk / 100)), topk
    assert MASK == "mask/"
