"""Data beyond images: series, tokens and vectors in the cache format and in PFLlib's layouts, batched from one pooled
tensor, trained end to end, and bad input refused with one sentence (exit code 2 from the CLI)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fedforge
from fedforge.cli import main as cli_main
from fedforge.data import Federation, load_dataset, make_partition, read_cache, write_cache
from fedforge.data.sources import read_arrays
from fedforge.errors import ConfigError, DataError


# --------------------------------------------------------------------------------------- small real-shaped sets
def make_series(n: int = 240, c: int = 3, length: int = 64, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sensor-like windows: class j is a sine of frequency j+1 on every channel (random phase, offset and scale per
    channel), plus noise; float32 (N, C, L)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    t = np.arange(length) / length
    phase = rng.uniform(0, 2 * np.pi, (n, c, 1))
    x = np.sin(2 * np.pi * (y[:, None, None] + 1) * t[None, None, :] + phase)
    x = x * np.array([1.0, 3.0, 0.5][:c])[None, :, None] + np.array([0.0, 5.0, -2.0][:c])[None, :, None]
    x += 0.3 * rng.standard_normal(x.shape)
    return x.astype(np.float32), y.astype(np.int64)


def make_tokens(n: int = 240, length: int = 24, vocab: int = 60, k: int = 3, seed: int = 0):
    """Texts of 6..L tokens (padding 0 after them): each class draws most words from its own band of ids."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    band = (vocab - 10) // k
    lengths = rng.integers(6, length + 1, n)
    x = np.zeros((n, length), np.int64)
    for i in range(n):
        own = 10 + y[i] * band + rng.integers(0, band, lengths[i])
        common = rng.integers(1, 10, lengths[i])
        x[i, : lengths[i]] = np.where(rng.random(lengths[i]) < 0.6, own, common)
    return x, y.astype(np.int64), lengths


def make_vectors(n: int = 240, d: int = 12, k: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centres = rng.standard_normal((k, d)) * 2.0
    x = centres[y] + rng.standard_normal((n, d)) * 1.0 + 10.0
    return x.astype(np.float32), y.astype(np.int64)


def write_pfllib(base: Path, clients: list[tuple[np.ndarray, np.ndarray]], extra_config: dict | None = None) -> Path:
    """A PFLlib-layout folder: client i's first 3/4 as train/<i>.npz, the rest as test/<i>.npz (pickled dicts)."""
    stats = []
    for i, (x, y) in enumerate(clients):
        cut = int(len(y) * 0.75)
        for part, sl in (("train", slice(0, cut)), ("test", slice(cut, None))):
            (base / part).mkdir(parents=True, exist_ok=True)
            with open(base / part / f"{i}.npz", "wb") as f:
                np.savez_compressed(f, data={"x": x[sl], "y": y[sl]})
        labels, counts = np.unique(y, return_counts=True)
        stats.append([[int(a), int(b)] for a, b in zip(labels, counts)])
    cfg = {"num_clients": len(clients), "num_classes": int(max(y.max() for _, y in clients)) + 1,
           "Size of samples for labels in clients": stats, **(extra_config or {})}
    (base / "config.json").write_text(json.dumps(cfg))
    return base


# ------------------------------------------------------------------------------------------ cache format
def test_series_round_trip_and_pooled_standardisation(tmp_path):
    x, y = make_series()
    p = write_cache(tmp_path / "s.npz", x, y, modality="series")
    a = read_arrays(p)
    assert a.modality == "series" and not a.inferred and np.array_equal(a.x, x) and np.array_equal(a.y, y)
    ds = load_dataset(f"npz:{p}")
    assert ds.modality == "series" and ds.input_shape == (3, 64) and ds.num_classes == 3 and ds.x.dtype == np.float32
    np.testing.assert_allclose(ds.mean, x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-9)
    np.testing.assert_allclose(ds.std, x.astype(np.float64).std(axis=(0, 2)), rtol=1e-9)
    with pytest.raises(DataError, match="not images"):  # the image reader stays image-only
        read_cache(p)


def test_untagged_arrays_are_read_where_unambiguous(tmp_path):
    x, y = make_series()
    np.savez(tmp_path / "s.npz", x=x, y=y)
    v, vy = make_vectors()
    np.savez(tmp_path / "v.npz", x=v, y=vy)
    assert load_dataset(f"npz:{tmp_path / 's.npz'}").modality == "series"
    assert load_dataset(f"npz:{tmp_path / 'v.npz'}").modality == "vector"
    ids, ty, _ = make_tokens()
    np.savez(tmp_path / "t.npz", x=ids, y=ty)  # integers without a vocabulary: ids or counts?
    with pytest.raises(DataError, match="modality='tokens' and vocab_size"):
        load_dataset(f"npz:{tmp_path / 't.npz'}")
    np.savez(tmp_path / "t2.npz", x=ids, y=ty, vocab_size=np.int64(60))
    assert load_dataset(f"npz:{tmp_path / 't2.npz'}").modality == "tokens"


def test_token_round_trip_with_lengths(tmp_path):
    x, y, lengths = make_tokens()
    dirty = x.copy()
    dirty[:, -1] = 7  # ids past a text's length are padding, whatever the file holds there
    p = write_cache(tmp_path / "t.npz", dirty, y, modality="tokens", vocab_size=60, lengths=lengths)
    a = read_arrays(p)
    assert a.modality == "tokens" and a.vocab_size == 60 and np.array_equal(a.lengths, lengths)
    ds = load_dataset(f"npz:{p}")
    assert ds.modality == "tokens" and ds.vocab_size == 60 and ds.input_shape == (24,) and ds.mean == ()
    want = np.where(np.arange(24)[None, :] < lengths[:, None], dirty, 0)
    assert np.array_equal(ds.x, want) and ds.x.dtype == np.int32


def test_vector_stats_from_the_file(tmp_path):
    x, y = make_vectors()
    p = write_cache(tmp_path / "v.npz", x, y, modality="vector", mean=np.zeros(12), std=np.ones(12))
    ds = load_dataset(f"npz:{p}")
    assert ds.modality == "vector" and ds.input_shape == (12,) and ds.mean == (0.0,) * 12 and ds.std == (1.0,) * 12


def test_image_files_are_written_as_before(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 5, 5, 1), dtype=np.uint8)
    p = write_cache(tmp_path / "i.npz", x, np.arange(10) % 2)
    with np.load(p) as f:
        assert sorted(f.files) == ["x", "y"]  # no modality entry: image files are unchanged
    ds = load_dataset(f"npz:{p}")
    assert ds.modality == "image" and ds.input_shape == (1, 5, 5) and ds.vocab_size is None


# --------------------------------------------------------------------------------------------- batching
def _federation(ds, clients=3, seed=0, **kw):
    part = make_partition(ds.y, ds.num_classes, "iid", clients, seed)
    return Federation(ds, part, **kw)


def test_series_batches_are_standardised_views_of_one_pooled_tensor(tmp_path):
    x, y = make_series()
    ds = load_dataset(f"npz:{write_cache(tmp_path / 's.npz', x, y)}")
    fed = _federation(ds)
    assert fed.x.data_ptr() == ds.x.ctypes.data  # the pooled array itself, no copy per client
    g = torch.Generator().manual_seed(0)
    xb, yb = next(fed.train_batches(1, 8, g))
    assert xb.dtype == torch.float32 and xb.shape == (8, 3, 64) and yb.dtype == torch.int64
    idx = fed.train_idx[1]
    mean = np.array(ds.mean, np.float32)[None, :, None]
    std = np.array(ds.std, np.float32)[None, :, None]
    full, fy = fed.inputs(idx)
    np.testing.assert_allclose(full.numpy(), (x[idx.numpy()] - mean) / std, rtol=1e-5, atol=1e-5)
    assert np.array_equal(fy.numpy(), y[idx.numpy()])
    pooled = torch.cat([fed.inputs(fed.train_idx[c])[0] for c in range(3)] + [fed.inputs(fed.test_idx[c])[0] for c in range(3)])
    assert abs(float(pooled.mean())) < 1e-4 and abs(float(pooled.std()) - 1.0) < 1e-2  # standardised per channel


def test_token_and_vector_batches(tmp_path):
    ids, y, lengths = make_tokens()
    ds = load_dataset(f"npz:{write_cache(tmp_path / 't.npz', ids, y, vocab_size=60, lengths=lengths)}")
    fed = _federation(ds)
    xb, yb = fed.inputs(fed.test_idx[0])
    assert xb.dtype == torch.int64 and np.array_equal(xb.numpy(), ids[fed.test_idx[0].numpy()])
    v, vy = make_vectors()
    vs = load_dataset(f"npz:{write_cache(tmp_path / 'v.npz', v, vy)}")
    vb, _ = _federation(vs).inputs(torch.arange(5))
    assert vb.shape == (5, 12) and vb.dtype == torch.float32
    np.testing.assert_allclose(vb.numpy(), (v[:5] - np.array(vs.mean)) / np.array(vs.std), rtol=1e-5, atol=1e-5)


def test_augment_is_for_images_only(tmp_path):
    x, y = make_series()
    ds = load_dataset(f"npz:{write_cache(tmp_path / 's.npz', x, y)}")
    with pytest.raises(ConfigError, match="images only"):
        _federation(ds, augment=True)


# ------------------------------------------------------------------------------------------ PFLlib layouts
def test_pfllib_har_layout_is_a_series_split(tmp_path):
    clients = []
    for i in range(3):
        x, y = make_series(40, c=3, length=64, seed=i)
        clients.append((x.astype(np.float64)[:, :, None, :] * 1.7, y.astype(np.int32)))  # float64 (N, 9, 1, 128)-like
    base = write_pfllib(tmp_path / "HAR", clients)
    ds = load_dataset(f"pfllib:{base}")
    assert ds.modality == "series" and ds.input_shape == (3, 64) and len(ds.client_split) == 3
    assert ds.mean == (0.0,) * 3 and ds.std == (1.0,) * 3  # PFLlib feeds these values unchanged
    tr, te = ds.client_split[2]
    np.testing.assert_array_equal(ds.x[tr], clients[2][0][:30, :, 0, :].astype(np.float32))
    np.testing.assert_array_equal(ds.y[te], clients[2][1][30:])


def test_pfllib_multi_row_series_become_channels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4, 3, 32)).astype(np.float32)  # PAMAP2: signals × IMUs × time
    base = write_pfllib(tmp_path / "P", [(x, np.arange(8) % 2)])
    ds = load_dataset(f"pfllib:{base}")
    assert ds.input_shape == (12, 32)
    tr, _ = ds.client_split[0]
    np.testing.assert_array_equal(ds.x[tr][:, 2 * 3 + 1], x[:6, 2, 1])  # channel c·H + h


def test_pfllib_text_pairs_are_tokens_with_lengths(tmp_path):
    ids, y, lengths = make_tokens(40)
    pairs = np.array([(list(map(int, r)), int(n)) for r, n in zip(ids, lengths)], dtype=object)  # as PFLlib writes AG News
    assert pairs.shape == (40, 2)
    base = write_pfllib(tmp_path / "AGNews", [(pairs[:20], y[:20]), (pairs[20:], y[20:])])
    ds = load_dataset(f"pfllib:{base}")
    assert ds.modality == "tokens" and ds.vocab_size == int(ids.max()) + 1 and ds.input_shape == (24,)
    order = np.concatenate([np.arange(15), np.arange(20, 35), np.arange(15, 20), np.arange(35, 40)])
    assert np.array_equal(ds.x, ids[order])


def test_pfllib_images_are_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    u = rng.integers(0, 256, (12, 1, 6, 6)).astype(np.float32)
    base = write_pfllib(tmp_path / "M", [((u / 255 - 0.5) / 0.5, np.arange(12) % 3)])
    ds = load_dataset(f"pfllib:{base}")
    assert ds.modality == "image" and ds.x.dtype == np.uint8 and ds.input_shape == (1, 6, 6)
    assert np.array_equal(ds.x[ds.client_split[0][0]][..., 0], u[:9, 0].astype(np.uint8))


# -------------------------------------------------------------------------------------- end-to-end runs
RUNS = {
    "series": ("harcnn", lambda p: write_cache(p, *make_series(), modality="series")),
    "tokens": ("fasttext", lambda p: write_cache(p, *make_tokens()[:2], vocab_size=60, lengths=make_tokens()[2])),
    "vector": ("mlp", lambda p: write_cache(p, *make_vectors())),
}


@pytest.mark.parametrize("modality", sorted(RUNS))
def test_two_round_run_per_modality(tmp_path, modality):
    model, write = RUNS[modality]
    path = write(tmp_path / f"{modality}.npz")
    res = fedforge.run(dataset=f"npz:{path}", algorithm="fedavg", model=model, clients=4, partition="iid", rounds=2,
                       lr=0.05, local_epochs=2, batch_size=10, seed=0, run_dir=False, progress=False)
    accs = [r["global_acc"] for r in res.records if r.get("global_acc") is not None]
    assert len(accs) == 3 and all(math.isfinite(a) for a in accs)
    assert accs[-1] > 1 / 3 + 0.25, accs  # three balanced classes: well above chance after two rounds


# ---------------------------------------------------------------------------------- bad input, exit code 2
def _cli_error(args: list[str], capsys) -> str:
    rc = cli_main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("fedforge: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _run(dataset: str, *extra: str) -> list[str]:
    return ["run", "--dataset", dataset, "--rounds", "1", "--clients", "2", "--no-progress", *extra]


def test_series_of_different_lengths(tmp_path, capsys):
    a, ay = make_series(20, length=64)
    b, by = make_series(20, length=60, seed=1)
    base = write_pfllib(tmp_path / "HAR", [(a[:, :, None], ay), (b[:, :, None], by)])
    line = _cli_error(_run(f"pfllib:{base}", "--model", "harcnn"), capsys)
    assert "(C, L) = (3, 60)" in line and "(3, 64)" in line and "same shape" in line


def test_token_ids_beyond_the_vocabulary(tmp_path, capsys):
    ids, y, _ = make_tokens()
    p = tmp_path / "t.npz"
    np.savez(p, x=ids, y=y, modality=np.array("tokens"), vocab_size=np.int64(40))
    line = _cli_error(_run(f"npz:{p}", "--model", "fasttext"), capsys)
    assert f"token id {ids.max()} is beyond the vocabulary of 40 ids" in line


def test_unknown_and_mixed_modalities(tmp_path, capsys):
    x, y = make_series()
    np.savez(tmp_path / "a.npz", x=x, y=y, modality=np.array("audio"))
    assert "unknown modality 'audio'" in _cli_error(_run(f"npz:{tmp_path / 'a.npz'}"), capsys)
    ids, ty, lengths = make_tokens(20)
    pairs = np.array([(list(map(int, r)), int(n)) for r, n in zip(ids, lengths)], dtype=object)
    s, sy = make_series(20)
    base = write_pfllib(tmp_path / "mixed", [(s[:, :, None], sy), (pairs, ty)])
    assert "mixed client files" in _cli_error(_run(f"pfllib:{base}"), capsys)


def test_model_and_augment_that_do_not_fit_the_data(tmp_path, capsys):
    p = write_cache(tmp_path / "s.npz", *make_series())
    line = _cli_error(_run(f"npz:{p}", "--model", "cnn", "--out", str(tmp_path / "run")), capsys)
    assert "model 'cnn' takes images" in line and "harcnn" in line
    line = _cli_error(_run(f"npz:{p}", "--model", "harcnn", "--augment", "--out", str(tmp_path / "run2")), capsys)
    assert not (tmp_path / "run2").exists()  # refused before a run directory is made
    assert "--augment" in line and "images only" in line


@pytest.mark.parametrize("modality,group,algorithm", [("series", "htfe-sen-3", "fedproto"), ("tokens", "htfe-txt-2", "fedtgp")])
def test_heterogeneous_groups_run(tmp_path, modality, group, algorithm):
    """HtFL on sensor and text data: clients own different architectures and exchange 512-d prototypes."""
    path = RUNS[modality][1](tmp_path / f"{modality}.npz")
    if modality == "series":  # HtFLlib's stride-3 members need HAR-length windows
        x, y = make_series(length=128)
        path = write_cache(tmp_path / "long.npz", x, y)
    res = fedforge.run(dataset=f"npz:{path}", algorithm=algorithm, model=group, clients=3, partition="iid", rounds=2,
                       lr=0.05, batch_size=10, seed=0, run_dir=False, progress=False)
    accs = [r["personalized_acc"] for r in res.records if r.get("personalized_acc") is not None]
    assert len(accs) == 3 and all(math.isfinite(a) for a in accs) and accs[-1] > 1 / 3, accs


@pytest.mark.parametrize("model", ["gru", "fasttext"])
def test_vectorized_executor_on_token_models(tmp_path, model):
    """Recurrent layers cannot be vmapped: the vectorized executor trains and evaluates them one client at a time;
    either way its result is the sequential one."""
    ids, y, lengths = make_tokens(120)
    path = write_cache(tmp_path / "t.npz", ids, y, vocab_size=60, lengths=lengths)
    accs = [fedforge.run(dataset=f"npz:{path}", algorithm="fedavg", model=model, clients=3, rounds=1, lr=0.05,
                         executor=ex, seed=0, run_dir=False, progress=False).records[-1]["global_acc"]
            for ex in ("sequential", "vectorized")]
    assert accs[0] == accs[1]
