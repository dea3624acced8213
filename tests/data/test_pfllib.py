"""pfllib:DIR — PFLlib's own client split, loaded with a restricted unpickler."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from fedforge.data import load_dataset
from fedforge.errors import DataError
from tests.conftest import require_data


def test_pfllib_split_matches_config_json():
    d = require_data("pfllib-mnist")
    ds = load_dataset(f"pfllib:{d}")
    cfg = json.loads((d / "config.json").read_text())
    assert len(ds.client_split) == cfg["num_clients"] == 20
    for i, (tr, te) in enumerate(ds.client_split):
        want = sum(n for _, n in cfg["Size of samples for labels in clients"][i])
        assert len(tr) + len(te) == want
        labels = dict(zip(*np.unique(ds.y[np.concatenate([tr, te])], return_counts=True)))
        assert {int(k): int(v) for k, v in labels.items()} == {c: n for c, n in cfg["Size of samples for labels in clients"][i]}
    # pixels come back exactly: PFLlib stores (v/255 - 0.5)/0.5
    raw = np.load(d / "train" / "0.npz", allow_pickle=True)["data"].item()["x"]
    back = ds.x[ds.client_split[0][0]].transpose(0, 3, 1, 2).astype(np.float32) / 255.0 * 2 - 1
    assert np.abs(back - raw).max() < 1e-6


def _write_client(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, data=np.array(obj, dtype=object))


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_restricted_unpickler_refuses_code(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_clients": 1}))
    _write_client(tmp_path / "train" / "0.npz", {"x": np.zeros((2, 1, 4, 4), np.float32), "y": np.zeros(2, np.int64), "z": Evil()})
    _write_client(tmp_path / "test" / "0.npz", {"x": np.zeros((2, 1, 4, 4), np.float32), "y": np.zeros(2, np.int64)})
    with pytest.raises(DataError, match="refusing"):
        load_dataset(f"pfllib:{tmp_path}")


def test_pfllib_missing_client_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_clients": 2}))
    _write_client(tmp_path / "train" / "0.npz", {"x": np.zeros((2, 1, 4, 4), np.float32), "y": np.zeros(2, np.int64)})
    with pytest.raises(DataError, match="missing"):
        load_dataset(f"pfllib:{tmp_path}")


def test_pfllib_not_a_directory(tmp_path):
    with pytest.raises(DataError, match="config.json"):
        load_dataset(f"pfllib:{tmp_path}")
    assert pickle  # the module is used by the fixture writer above
