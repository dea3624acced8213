"""`fedforge partition --export-pfllib DIR`: a fedforge split written in PFLlib's layout and read back as `pfllib:DIR`.

What is exact in the round trip: every client's labels, its samples and their order (train and test), the client
split itself, and the uint8 pixels (the exported float32 value is (u/255 − 0.5)/0.5, which rounds back to u).
What changes by design: the normalisation. A re-imported dataset is normalised as PFLlib's files are (mean 0.5,
std 0.5 per channel), where the original used its own statistics; the float inputs a model sees then agree with
the exported float32 values to float rounding (checked below), not with the original run's inputs.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedforge.cli import main
from fedforge.data import Federation, Partition, from_client_split, load_dataset, make_partition
from fedforge.data.export import MARKER, export_pfllib, pfllib_pixels
from fedforge.errors import DataError

PFLLIB_KEYS = ["num_clients", "num_classes", "non_iid", "balance", "partition",
               "Size of samples for labels in clients", "alpha", "batch_size"]


def _partition_cli(tmp_path, *extra):
    return main(["-q", "partition", "--dataset", "digits", "--clients", "5", "--partition", "dirichlet", "--alpha", "0.3",
                 "--seed", "3", "--batch-size", "10", "--out", str(tmp_path / "p"), *extra])


def test_export_round_trip_gives_identical_clients(tmp_path, capsys):
    out = tmp_path / "DIGITS"
    assert _partition_cli(tmp_path, "--export-pfllib", str(out)) == 0
    assert "PFLlib's layout" in capsys.readouterr().out
    ds = load_dataset("digits")
    part = Partition.load(tmp_path / "p" / "partition.npz")

    cfg = json.loads((out / "config.json").read_text())
    assert list(cfg) == PFLLIB_KEYS
    assert (cfg["num_clients"], cfg["num_classes"], cfg["non_iid"], cfg["partition"], cfg["alpha"], cfg["batch_size"]) == \
        (5, 10, True, "dir", 0.3, 10)
    for i in range(5):
        labels, counts = np.unique(ds.y[np.concatenate([part.train[i], part.test[i]])], return_counts=True)
        assert cfg["Size of samples for labels in clients"][i] == [[int(c), int(n)] for c, n in zip(labels, counts)]

    # the files hold exactly what PFLlib's save_file writes: a pickled dict {'x': float32 NCHW, 'y': int64}
    raw = np.load(out / "train" / "2.npz", allow_pickle=True)["data"].item()
    assert set(raw) == {"x", "y"} and raw["x"].dtype == np.float32 and raw["y"].dtype == np.int64
    assert raw["x"].shape == (len(part.train[2]), 1, 8, 8)
    assert raw["x"].min() >= -1.0 and raw["x"].max() <= 1.0
    u = ds.x[part.train[2]].transpose(0, 3, 1, 2)
    expect = ((torch.from_numpy(u).float() / 255 - 0.5) / 0.5).numpy()  # ToTensor() then Normalize([0.5], [0.5])
    assert np.array_equal(raw["x"], expect)

    back = load_dataset(f"pfllib:{out}")
    back_part = from_client_split(back.client_split, back.y)
    assert back_part.num_clients == part.num_clients
    for i in range(5):
        for mine, theirs in ((part.train[i], back_part.train[i]), (part.test[i], back_part.test[i])):
            assert np.array_equal(ds.y[mine], back.y[theirs])  # labels, in the same order
            assert np.array_equal(ds.x[mine], back.x[theirs])  # uint8 pixels exactly, in the same order
    # same split: the sizes of every client's parts, hence the same batches from the same random stream
    assert [len(a) for a in part.train] == [len(a) for a in back_part.train]
    assert [len(a) for a in part.test] == [len(a) for a in back_part.test]

    # the model input after import is PFLlib's float32 tensor up to float rounding (x·(1/(255·0.5)) − 1 vs (x/255−0.5)/0.5)
    fed = Federation(back, back_part)
    x, y = fed.inputs(fed.train_idx[2])
    torch.testing.assert_close(x, torch.from_numpy(raw["x"]), rtol=0, atol=1e-6)
    assert torch.equal(y, torch.from_numpy(raw["y"]))


def test_export_refuses_a_foreign_non_empty_directory(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _partition_cli(tmp_path, "--export-pfllib", str(out)) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and MARKER in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "p").exists()  # refused before any work was done


def test_export_overwrites_an_earlier_export(tmp_path):
    ds = load_dataset("digits")
    out = tmp_path / "e"
    export_pfllib(ds, make_partition(ds.y, 10, "iid", 6, seed=0), out)
    part = make_partition(ds.y, 10, "pathological", 3, seed=1, classes_per_client=3, balance=False)
    export_pfllib(ds, part, out)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["0.npz", "1.npz", "2.npz"]  # stale clients removed
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_clients"], cfg["partition"], cfg["balance"], cfg["non_iid"]) == (3, "pat", False, True)
    back = load_dataset(f"pfllib:{out}")
    for i, (tr, te) in enumerate(back.client_split):
        assert np.array_equal(back.y[tr], ds.y[part.train[i]]) and np.array_equal(back.x[te], ds.x[part.test[i]])


def test_export_pixels_match_pfllib_files():
    """fedforge's writer reproduces PFLlib's own float32 values bit for bit (checked on a PFLlib-written client)."""
    from tests.conftest import require_data

    d = require_data("pfllib-mnist")
    raw = np.load(d / "test" / "0.npz", allow_pickle=True)["data"].item()["x"]
    u = np.rint((raw.astype(np.float64) * 0.5 + 0.5) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(pfllib_pixels(u), raw)


def test_export_into_a_file_is_refused(tmp_path):
    ds = load_dataset("digits")
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(DataError, match="is a file"):
        export_pfllib(ds, make_partition(ds.y, 10, "iid", 2, seed=0), f)
