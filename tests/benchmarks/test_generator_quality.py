"""benchmarks/generator_quality.py at tiny sizes: its metrics on known cases, and the whole evaluation on CIFAR-100
classes 40-49 with the shipped built-in generator and with a generator that returns real held-out-class images (a
perfect class-conditional generator whose answers are known). No timings are asserted."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedforge.errors import ConfigError
from fedforge.generative.base import Generator, as_generator
from tests.conftest import require_data

REPO = Path(__file__).resolve().parents[2]
CLASSES = "40-49"  # lo > 0, so a dataset class id mistaken for a classifier label shows
N = 500


@pytest.fixture(scope="module")
def gq():
    spec = importlib.util.spec_from_file_location("bench_generator_quality", REPO / "benchmarks" / "generator_quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ctx(gq, tmp_path_factory):
    root = require_data("cifar100.npz").parent
    base = tmp_path_factory.mktemp("generator-quality")
    return gq.prepare(str(root), CLASSES, out=base / "out", table=base / "docs" / "generator-quality.md", n=N, seed=0,
                      epochs=1, train_limit=1000)


class RealImages(Generator):
    """A perfect class-conditional generator: the latent u ∈ [0, 1) picks one of the real images of the asked class."""

    kind = "real-images"
    conditional = True
    latent_dim = 1
    resolution = 32

    def __init__(self, x: np.ndarray, class_ids: np.ndarray):
        self.pools = {int(c): x[class_ids == c] for c in np.unique(class_ids)}
        self.classes = sorted(self.pools)

    def sample_prior(self, n, rng=None):
        return torch.rand(int(n), 1, generator=as_generator(rng))

    def synthesize(self, latents, condition=None):
        pool = self.pools[int(condition)]
        idx = (self.check_latents(latents)[:, 0] * len(pool)).long().clamp(max=len(pool) - 1).numpy()
        return pool[idx]


def _unseen_real(ctx) -> RealImages:
    """Train-split images the classifier did not learn from."""
    seen = ctx.fed.train_idx[0].numpy()
    pos = np.setdiff1d(ctx.train_pos, seen)
    return RealImages(ctx.dataset.x[pos], ctx.class_id(pos))


# ---------------------------------------------------------------------------------------------- metrics alone
def test_fid_and_precision_recall_on_known_cases(gq):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(600, 8, generator=g, dtype=torch.float64)
    b = torch.randn(600, 8, generator=g, dtype=torch.float64)
    assert abs(gq.fid(a, a)) < 1e-6
    shift = torch.zeros(8, dtype=torch.float64)
    shift[0] = 3.0
    # same covariance, mean moved by 3: FID = 9 exactly
    assert gq.fid(a, a + shift) == pytest.approx(9.0, abs=1e-6)
    # scaling by 2: ‖μ − 2μ‖² + tr(Σ + 4Σ − 2·2Σ) = ‖μ‖² + tr(Σ)
    assert gq.fid(a, 2 * a) == pytest.approx(float(a.mean(0).square().sum() + torch.cov(a.T).trace()), rel=1e-6)
    assert gq.precision_recall(a, a) == (1.0, 1.0)
    # far away samples are outside the real manifold and the real ones outside theirs
    assert gq.precision_recall(a, b + 100.0) == (0.0, 0.0)
    # a collapsed generator (all samples near one real point) is precise but has no recall
    p, r = gq.precision_recall(a, a[:1].repeat(50, 1) + 1e-3 * torch.randn(50, 8, generator=g, dtype=torch.float64))
    assert p == 1.0 and r < 0.05
    # the k-NN radius: the k-th nearest *other* row, chunking does not change it
    x = torch.randn(50, 5, generator=g, dtype=torch.float64)
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    assert torch.allclose(gq.knn_radii(x, 3, chunk=7), d.sort(1).values[:, 2])
    probs = torch.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]].double()
    st = gq.prediction_stats(probs, 4)
    assert st["pred_entropy"] == pytest.approx(math.log(4)) and st["mean_confidence"] == 1.0 and st["classes_predicted"] == 4
    assert gq.prediction_stats(torch.eye(4)[[2] * 8].double(), 4)["pred_entropy"] == 0.0


def test_heldout_split_is_per_class_and_disjoint(gq):
    y = np.repeat(np.arange(5), 20)[np.random.default_rng(1).permutation(100)]
    tr, te = gq.heldout_split(y, [1, 2, 3], 4, seed=0)
    assert len(np.intersect1d(tr, te)) == 0 and np.bincount(y[te], minlength=5).tolist() == [0, 4, 4, 4, 0]
    assert len(tr) == 3 * 16
    _, te2 = gq.heldout_split(y, [2], 4, seed=0)  # a class's held-out images do not depend on the other classes
    assert set(te2) == set(te[y[te] == 2])


def test_held_out_images_are_the_generator_splits(gq):
    """The reference and the classifier's held-out images are those no built-in generator v2 trains on."""
    split = pytest.importorskip("fedforge.generative.split", reason="fedforge.generative.split (issue 23) is not here")
    with np.load(require_data("cifar100.npz")) as f:
        y = f["y"]
    assert (gq.HELD_OUT_PER_CLASS, gq.SPLIT_SEED) == (split.HELD_OUT_PER_CLASS, split.SEED)
    train, held = gq.heldout_split(y, range(100))
    assert np.array_equal(held, split.held_out_positions(y))
    assert np.array_equal(train, split.generator_positions(y))
    # on a class subset (positions relabelled within it) the same images are held out
    keep = np.flatnonzero((y >= 40) & (y <= 49))
    _, held_sub = gq.heldout_split(y[keep], range(40, 50))
    assert np.array_equal(keep[held_sub], np.intersect1d(split.held_out_positions(y), keep))


# -------------------------------------------------------------------------------------------- on CIFAR-100
def test_real_vs_real_is_far_better_than_the_builtin_generator(gq, ctx):
    res = gq.evaluate_generator(ctx, "builtin")
    base = res["reference"]["real_baseline"]
    assert res["n"] == base["n"] == N and res["reference"]["n"] == 10 * gq.HELD_OUT_PER_CLASS
    assert base["fid"] < 0.5 * res["fid"], (base, res["fid"])
    assert base["precision"] > 0.6 and base["recall"] > 0.6, base
    assert res["recall"] < base["recall"] - 0.3, (res["recall"], base)
    # the shipped generator (v2, classes 0-49) is conditional: judged on the classifier's classes 40-49 only
    assert res["conditional"] is True and 0.0 <= res["class_conditional_acc"] <= 1.0
    assert len(res["per_class_acc"]) == 10
    assert 0.1 <= res["mean_confidence"] <= 1.0
    assert 0.0 <= res["pred_entropy"] <= math.log(10) + 1e-9 and res["pred_entropy_max"] == pytest.approx(math.log(10))
    # the classifier learnt something from its slice (chance is 10 %)
    assert ctx.real_eval["acc"] > 0.2


def test_a_perfect_conditional_generator_scores_like_real_images(gq, ctx):
    gen = _unseen_real(ctx)
    res = gq.evaluate_generator(ctx, "real-images", generator=gen)
    assert res["conditional"] and res["generator_classes"] == list(range(40, 50))
    # the classifier judges unseen real images as well as its held-out ones: the condition reached the right label
    assert abs(res["class_conditional_acc"] - ctx.real_eval["acc"]) < 0.1, (res["class_conditional_acc"], ctx.real_eval)
    assert set(res["per_class_acc"]) == {str(c) for c in range(40, 50)}
    base = res["reference"]["real_baseline"]
    assert res["fid"] < 1.5 * base["fid"] and res["precision"] > 0.6 and res["recall"] > 0.6, (res, base)
    assert res["grid_rows"] == list(range(40, 50)) and res["_grid"].shape == (10 * 34 + 2, 8 * 34 + 2, 3)
    # each grid row holds images of its class
    assert all(any((img == res["_grid"][2 + r * 34 : 34 + r * 34, 2:34]).all() for img in gen.pools[c])
               for r, c in enumerate(res["grid_rows"]))


def test_samples_are_seeded(gq, ctx):
    from fedforge.generative import load_generator

    g = load_generator("builtin")
    a, la = gq.draw_samples(g, 20, seed=3)
    b, _ = gq.draw_samples(g, 20, seed=3)
    c, _ = gq.draw_samples(g, 20, seed=4)
    assert la is None and np.array_equal(a, b) and not np.array_equal(a, c)
    x, lx = gq.draw_samples(_unseen_real(ctx), 23, seed=0, class_ids=[40, 41, 42])
    assert lx.tolist() == [40] * 8 + [41] * 8 + [42] * 7 and len(x) == 23


def test_conditional_generator_outside_the_classes_is_refused(gq, ctx):
    pos = ctx.train_pos[:50]
    gen = RealImages(ctx.dataset.x[pos], np.full(50, 3))
    with pytest.raises(ConfigError, match="--classes"):
        gq.evaluate_generator(ctx, "elsewhere", generator=gen)


def test_records_table_and_cached_classifier(gq, ctx):
    js1 = gq.record(gq.evaluate_generator(ctx, "builtin", n=40), ctx, command="first")
    js2 = gq.record(gq.evaluate_generator(ctx, "real-images", n=40, generator=_unseen_real(ctx)), ctx)
    folder = gq.assets_dir(ctx.table)
    for js in (js1, js2):
        res = json.loads(js.read_text())
        assert res["schema"] == gq.SCHEMA and "_grid" not in res
        assert (folder / js.name).read_text() == js.read_text() and (folder / res["grid"]).is_file()
    table = ctx.table.read_text()
    assert "| `builtin` |" in table and "| `real-images` |" in table and "**real**" in table
    assert "[builtin.png](generator-quality/builtin.png)" in table and "`first`" in table
    # notes below the marker survive a rebuild
    ctx.table.write_text(table + "A sentence of the lead.\n")
    gq.write_table(ctx.table)
    assert ctx.table.read_text() == table + "A sentence of the lead.\n"
    # the classifier is cached: loading it again gives the same weights without training
    model, info = gq.load_or_train_classifier(ctx.fed, ctx.classifier_info["settings"], ctx.out / "classifier")
    assert info["cached"] is True
    assert all(torch.equal(v, ctx.classifier.state_dict()[k]) for k, v in model.state_dict().items())
