"""Downstream evaluation: syn / mix / real training sets, linear head or full model, accuracy and macro-F1."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedforge.data.sources import select_classes
from fedforge.errors import ConfigError
from fedforge.synth import DownstreamEvaluator, EvalSettings
from fedforge.synth.evaluate import _batches, macro_f1
from fedforge.synth.run import split_private


@pytest.fixture
def three_digits(digits):
    ds = select_classes(digits, "0-2")
    pi, ti = split_private(ds, 5, 0)
    return ds, pi, ti


def test_mix_batches_join_private_batches():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.arange(10.0).view(10, 1), torch.zeros(10, dtype=torch.long)
    px, py = torch.full((3, 1), -1.0), torch.ones(3, dtype=torch.long)
    batches = list(_batches(x, y, 4, gen, (px, py)))
    assert [len(b[1]) for b in batches] == [8, 8, 4]
    assert all(int(b[1].sum()) == len(b[1]) // 2 for b in batches)  # half of every batch is private
    assert sorted(torch.cat([b[0][b[1] == 0] for b in batches]).flatten().tolist()) == list(range(10))


def test_linear_and_full_model(three_digits, digits_encoder):
    ds, pi, ti = three_digits
    priv, test = (ds.x[pi], ds.y[pi]), (ds.x[ti], ds.y[ti])
    # "synthetic" data here: real held-out images with true labels (a perfect generator) vs shuffled labels
    rng = np.random.default_rng(0)
    some = rng.choice(ti, 60, replace=False)
    good = (ds.x[some], ds.y[some])
    bad = (good[0], rng.permutation(good[1]))
    ev = DownstreamEvaluator(digits_encoder, priv, test, 3, EvalSettings())
    real = ev.evaluate("real")
    assert real["acc"] > 0.8 and 0 <= real["macro_f1"] <= 1
    assert ev.evaluate("syn", good)["acc"] > ev.evaluate("syn", bad)["acc"] + 0.3
    assert ev.evaluate("mix", good)["acc"] >= ev.evaluate("mix", bad)["acc"]
    full = DownstreamEvaluator(digits_encoder, priv, test, 3, EvalSettings(classifier="mlp", epochs=15, lr=0.05))
    assert full.evaluate("syn", good)["acc"] > 0.6
    with pytest.raises(ConfigError, match="unknown evaluation mode"):
        ev.evaluate("both", good)
    with pytest.raises(ConfigError, match="unknown model"):
        DownstreamEvaluator(digits_encoder, priv, test, 3, EvalSettings(classifier="nosuchnet"))


def test_macro_f1_counts_missing_classes():
    assert macro_f1(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0]), 3) == pytest.approx((2 / 3) / 3)
