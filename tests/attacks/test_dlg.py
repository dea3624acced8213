"""``fedforge attack dlg``: DLG/iDLG recovers a client's image from a 1-image, 1-step update of a real run (replayed
from its config), and client-level DP (ε = 1) defeats it."""
from __future__ import annotations

import json

import numpy as np
import pytest

import fedforge
from fedforge.cli import main
from fedforge.data import load_dataset
from fedforge.data.partition import Partition, labels_fingerprint

pytest.importorskip("skimage", reason="SSIM is scikit-image's (pip install 'fedforge[attack]')")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """digits: client 0 trains on one image, client 1 on eight (a 1-image, 1-step update at batch size 1)."""
    ds = load_dataset("digits")
    idx = np.random.default_rng(0).permutation(len(ds.y))
    path = tmp_path_factory.mktemp("dlg") / "partition.npz"
    Partition([idx[:1], idx[1:9]], [idx[100:130], idx[130:160]], "custom", {}, 0, labels_fingerprint(ds.y)).save(path)
    return path, int(ds.y[idx[0]])


def _run(path, out, **over):
    fedforge.run(algorithm="fedavg", dataset="digits", model="mlp", partition_file=str(path), batch_size=1, rounds=1,
                 lr=0.05, seed=0, threads=1, run_dir=out, **over)


def _attack(capsys, run, *extra):
    code = main(["attack", "dlg", "--run", str(run), "--client", "0", "--round", "1", "--iterations", "60", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dlg_reconstructs_the_image_and_dp_defeats_it(tmp_path, split, capsys):
    path, label = split
    _run(path, tmp_path / "plain")
    code, out, err = _attack(capsys, tmp_path / "plain")
    assert code == 0, err
    info = json.loads((tmp_path / "plain" / "attacks" / "dlg-c0-r1" / "dlg.json").read_text())
    assert info["replay_matches_log"] is True  # the replay is the run
    assert info["images"] == 1 and info["local_steps"] == 1
    assert info["psnr_mean"] > 30 and info["ssim_mean"] > 0.9
    assert info["labels"] == info["inferred_labels"] == [label] and info["label_inference"] == "idlg"
    assert (tmp_path / "plain" / "attacks" / "dlg-c0-r1" / "dlg.png").stat().st_size > 1000
    assert "PSNR" in out

    _run(path, tmp_path / "dp", dp_epsilon=1.0)
    code, out, err = _attack(capsys, tmp_path / "dp", "--out", str(tmp_path / "dp-attack"))
    assert code == 0, err
    dp = json.loads((tmp_path / "dp-attack" / "dlg.json").read_text())
    assert dp["dp_epsilon"] == 1.0 and dp["replay_matches_log"] is True
    assert dp["psnr_mean"] <= info["psnr_mean"] - 10


def test_the_attack_refuses_what_it_cannot_attack_with_one_sentence(tmp_path, split, capsys):
    path, _ = split
    _run(path, tmp_path / "r")
    for extra, needle in ((["--round", "3"], "--round must be between 1 and the run's 1 rounds"),
                          (["--client", "5"], "--client must be one of the run's training clients 0..1"),
                          (["--client", "1"], "trained on 8 images")):
        code = main(["attack", "dlg", "--run", str(tmp_path / "r"), "--client", "0", "--round", "1", "--max-images",
                     "4", *extra])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    code = main(["attack", "dlg", "--run", str(tmp_path), "--client", "0", "--round", "1"])
    assert code == 2 and "not a fedforge run directory" in capsys.readouterr().err
