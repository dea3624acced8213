"""Dataset sources and the cache format."""
from __future__ import annotations

import numpy as np
import pytest

from fedforge.data import load_dataset, read_cache, write_cache
from fedforge.data.sources import select_classes
from fedforge.errors import DataError, UnknownNameError
from tests.conftest import require_data


def test_digits_is_offline_and_in_cache_format():
    ds = load_dataset("digits")
    assert ds.x.dtype == np.uint8 and ds.x.shape == (1797, 8, 8, 1)
    assert ds.y.dtype == np.int64 and set(np.unique(ds.y)) == set(range(10))
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.x.max() == 255  # rescaled from scikit-learn's 0..16


def test_cache_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 6, 5, 3), dtype=np.uint8)
    y = rng.integers(0, 4, size=50).astype(np.int64)
    p = write_cache(tmp_path / "toy.npz", x, y)
    x2, y2 = read_cache(p)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and y2.dtype == np.int64
    ds = load_dataset(f"npz:{p}")
    assert ds.input_shape == (3, 6, 5) and ds.num_classes == int(y.max()) + 1
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temporary file


def test_cached_sources_read_shared_data(data_root):
    require_data("mnist.npz")
    ds = load_dataset("mnist", root=data_root)
    assert ds.x.shape == (70000, 28, 28, 1) and ds.num_classes == 10


def test_missing_cache_without_download_is_one_sentence(tmp_path):
    with pytest.raises(DataError, match="missing.*--download"):
        load_dataset("cifar10", root=tmp_path)


@pytest.mark.parametrize("arrays,match", [
    (dict(x=np.zeros((4, 3, 3, 1), np.float32), y=np.zeros(4, np.int64)), "uint8"),
    (dict(x=np.zeros((4, 3, 3), np.uint8), y=np.zeros(4, np.int64)), r"\(N, H, W, C\)"),
    (dict(x=np.zeros((4, 3, 3, 1), np.uint8), y=np.zeros(5, np.int64)), "must match"),
    (dict(x=np.zeros((4, 3, 3, 1), np.uint8), y=np.array([0, 1, -1, 2])), "0..K-1"),
    (dict(x=np.zeros((4, 3, 3, 1), np.uint8)), "missing"),
])
def test_bad_cache_files(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=match):
        load_dataset(f"npz:{p}")


def test_truncated_and_garbage_npz(tmp_path):
    rng = np.random.default_rng(0)
    good = write_cache(tmp_path / "good.npz", rng.integers(0, 256, (20, 4, 4, 1), dtype=np.uint8), np.arange(20) % 3)
    data = good.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.npz").write_bytes(b"not a zip at all")
    for name in ("trunc.npz", "garbage.npz"):
        with pytest.raises(DataError, match="corrupt|truncated|readable"):
            load_dataset(f"npz:{tmp_path / name}")


def test_pickled_npz_is_refused(tmp_path):
    p = tmp_path / "pickled.npz"
    np.savez(p, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(DataError, match="pickled"):
        load_dataset(f"npz:{p}")


def test_folder_source(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "dog" / "big.png")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.x.shape == (7, 10, 12, 3) and ds.class_names == ["cat", "dog"]
    assert list(ds.y) == [0, 0, 0, 1, 1, 1, 1]


def test_unknown_dataset_suggests():
    with pytest.raises(UnknownNameError, match="did you mean: mnist"):
        load_dataset("mnsit")


def test_class_subset_relabels():
    ds = load_dataset("digits", class_subset="3-5")
    assert ds.num_classes == 3 and set(np.unique(ds.y)) == {0, 1, 2}
    full = load_dataset("digits")
    assert len(ds.y) == int(((full.y >= 3) & (full.y <= 5)).sum())
    with pytest.raises(DataError, match="up to 12"):
        select_classes(full, "5-12")
