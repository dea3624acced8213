"""Partitioners: sizes, minimum per client, determinism by seed, class statistics; train/test split; IO."""
from __future__ import annotations

import time

import numpy as np
import pytest

from fedforge.data import Partition, make_partition
from fedforge.data.partition import PARTITIONERS, default_min_samples, split_train_test
from fedforge.errors import PartitionError

RNG = np.random.default_rng(123)
LABELS = np.repeat(np.arange(10), 300)[RNG.permutation(3000)]  # 3,000 samples, 10 balanced classes

CASES = {
    "iid": {},
    "dirichlet": {"alpha": 0.1, "min_samples": 40},
    "pathological": {"classes_per_client": 2},
    "exdir": {"classes_per_client": 3, "alpha": 1.0, "min_samples": 40},
    "shards": {"shards_per_client": 2},
    "domains": {"num_domains": 4, "within": "dirichlet", "alpha": 0.5, "min_samples": 20},  # tests/data/test_domains.py
}


def test_every_registered_partitioner_is_tested():
    assert set(PARTITIONERS.names()) <= set(CASES) | {"fewshot"}


@pytest.mark.parametrize("scheme", list(CASES))
def test_partition_covers_disjoint_and_deterministic(scheme):
    p1 = make_partition(LABELS, 10, scheme, 20, seed=7, **CASES[scheme])
    p2 = make_partition(LABELS, 10, scheme, 20, seed=7, **CASES[scheme])
    p3 = make_partition(LABELS, 10, scheme, 20, seed=8, **CASES[scheme])
    assert p1.num_clients == 20
    all_idx = np.concatenate(p1.train + p1.test)
    assert len(all_idx) == len(np.unique(all_idx))  # disjoint
    if scheme != "pathological":  # pathological may leave classes without holders; here every class has 4
        assert len(all_idx) == len(LABELS)
    for a, b in zip(p1.train + p1.test, p2.train + p2.test):
        assert np.array_equal(a, b)  # same seed → same split
    assert any(not np.array_equal(a, b) for a, b in zip(p1.train, p3.train))  # other seed → other split
    stats = p1.stats(LABELS, 10)
    counts = np.array(stats["train_counts"]) + np.array(stats["test_counts"])
    assert counts.sum() == len(all_idx) and counts.shape == (20, 10)
    for i in range(20):
        assert np.array_equal(counts[i], np.bincount(LABELS[np.concatenate([p1.train[i], p1.test[i]])], minlength=10))


def test_dirichlet_respects_minimum_and_is_skewed():
    p = make_partition(LABELS, 10, "dirichlet", 20, seed=0, alpha=0.1, min_samples=40)
    sizes = np.array([len(a) + len(b) for a, b in zip(p.train, p.test)])
    assert sizes.min() >= 40
    classes = (p.counts(LABELS, 10, "train") + p.counts(LABELS, 10, "test") > 0).sum(1)
    assert classes.mean() < 6  # alpha = 0.1 concentrates each client on few classes


def test_dirichlet_hard_case_ends_quickly():
    """PFLlib's retry loop can hang for many clients / small alpha; ours is bounded and repairs."""
    labels = np.repeat(np.arange(100), 600)
    t = time.perf_counter()
    p = make_partition(labels, 100, "dirichlet", 1000, seed=0, alpha=0.01, min_samples=40)
    assert time.perf_counter() - t < 120  # a hang guard, not a speed measurement
    sizes = np.array([len(a) + len(b) for a, b in zip(p.train, p.test)])
    assert sizes.min() >= 40 and sizes.sum() == len(labels)


def test_pathological_gives_k_classes():
    p = make_partition(LABELS, 10, "pathological", 20, seed=3, classes_per_client=2, balance=True)
    held = (p.counts(LABELS, 10, "train") + p.counts(LABELS, 10, "test")) > 0
    assert (held.sum(1) == 2).all()
    assert (held.sum(0) == 4).all()  # 20 clients × 2 classes / 10 classes, spread evenly
    sizes = np.array([len(a) + len(b) for a, b in zip(p.train, p.test)])
    assert sizes.max() - sizes.min() <= 2  # balanced
    unbalanced = make_partition(LABELS, 10, "pathological", 20, seed=3, classes_per_client=2, balance=False)
    sizes_u = np.array([len(a) + len(b) for a, b in zip(unbalanced.train, unbalanced.test)])
    assert sizes_u.max() - sizes_u.min() > 20


def test_exdir_limits_labels_per_client():
    p = make_partition(LABELS, 10, "exdir", 20, seed=1, classes_per_client=3, alpha=1.0, min_samples=40)
    held = (p.counts(LABELS, 10, "train") + p.counts(LABELS, 10, "test")) > 0
    assert (held.sum(1) <= 3).all()
    assert min(len(a) + len(b) for a, b in zip(p.train, p.test)) >= 40


def test_shards_give_few_classes():
    p = make_partition(LABELS, 10, "shards", 20, seed=1, shards_per_client=2)
    held = (p.counts(LABELS, 10, "train") + p.counts(LABELS, 10, "test")) > 0
    assert held.sum(1).max() <= 4
    sizes = [len(a) + len(b) for a, b in zip(p.train, p.test)]
    assert max(sizes) - min(sizes) <= 2


def test_train_test_split_is_stratified():
    rng = np.random.default_rng(0)
    idx = np.arange(400)
    labels = np.repeat([0, 1, 2, 3], 100)
    tr, te = split_train_test(idx, labels, 0.75, rng)
    assert len(te) == 100 and len(tr) == 300
    assert np.array_equal(np.bincount(labels[te]), [25, 25, 25, 25])
    tr1, te1 = split_train_test(np.array([5]), labels, 0.75, rng)
    assert len(tr1) == 1 and len(te1) == 0  # a single sample trains


@pytest.mark.parametrize("scheme,kw", [("iid", {"min_samples": 200}), ("dirichlet", {"alpha": 0.5, "min_samples": 200})])
def test_impossible_minimum_is_one_sentence(scheme, kw):
    with pytest.raises(PartitionError, match="lower --clients"):
        make_partition(LABELS, 10, scheme, 20, seed=0, **kw)


def test_more_clients_than_samples():
    with pytest.raises(PartitionError, match="at most 3000 clients"):
        make_partition(LABELS, 10, "iid", 5000, seed=0)


def test_bad_parameters():
    with pytest.raises(PartitionError, match="alpha must be > 0"):
        make_partition(LABELS, 10, "dirichlet", 5, seed=0, alpha=0)
    with pytest.raises(PartitionError, match="classes per client"):
        make_partition(LABELS, 10, "pathological", 5, seed=0, classes_per_client=11)
    with pytest.raises(PartitionError, match="train_ratio"):
        make_partition(LABELS, 10, "iid", 5, seed=0, train_ratio=1.0)


def test_save_load_round_trip_and_checks(tmp_path):
    p = make_partition(LABELS, 10, "dirichlet", 10, seed=4, alpha=0.3, min_samples=40)
    path = p.save(tmp_path / "partition.npz")
    q = Partition.load(tmp_path)  # a run directory works too
    assert q.scheme == "dirichlet" and q.seed == 4 and q.params["alpha"] == 0.3
    for a, b in zip(p.train + p.test, q.train + q.test):
        assert np.array_equal(a, b)
    q.check(LABELS)
    with pytest.raises(PartitionError, match="other labels"):
        q.check(np.roll(LABELS, 1))
    with pytest.raises(PartitionError, match="another dataset"):
        q.check(LABELS[:100])
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(PartitionError, match="corrupt"):
        Partition.load(path)
    with pytest.raises(PartitionError, match="does not exist"):
        Partition.load(tmp_path / "nope.npz")


def test_default_min_samples_follows_pfllib():
    assert default_min_samples(70000, 20, 10, 0.75) == 40
    assert default_min_samples(1797, 10, 10, 0.75) == 40
    assert default_min_samples(300, 10, 10, 0.75) == 15
