"""`fedforge synth` on the command line: a whole run, and bad input answered with one sentence and exit code 2."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fedforge.cli import main
from fedforge.data import load_dataset, write_cache


def run_cli(args, capsys):
    code = main(["-q", "synth", "--no-progress", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_run_writes_a_loadable_dataset(tmp_path, capsys, registered_pca, digits_checkpoint):
    out = tmp_path / "syn"
    code, stdout, err = run_cli(["--private", "digits", "--class-subset", "0-1", "--shots", "3", "--generator", registered_pca,
                                 "--encoder", f"checkpoint:{digits_checkpoint}", "--selector", "pe", "--epsilon", "2",
                                 "--iterations", "2", "--per-class", "8", "--out", str(out), "--eval-epochs", "5"], capsys)
    assert code == 0, err
    assert "privacy: ε = " in stdout and "ε = 4 by basic composition" in stdout and "syn" in stdout and "mix" in stdout
    ds = load_dataset(f"npz:{out / 'synthetic.npz'}")
    assert len(ds) == 16 and ds.num_classes == 2
    s = json.loads((out / "summary.json").read_text())
    assert s["privacy"]["delta_total"] == pytest.approx(2 / 6)  # δ = 1/(private images) per iteration, 2 iterations
    p = s["privacy"]  # the additive budget, Opacus's PRV accountant when installed, and the smaller of the two claimed
    assert p["epsilon_additive"] == pytest.approx(4.0)
    assert p["epsilon_total"] == min(4.0, p["epsilon_accountant"] if p["epsilon_accountant"] is not None else 4.0)
    assert s["pe_sigma"] > 0


def _one_sentence_error(code, err):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedforge: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("extra, needle", [
    (["--shots", "0"], "--shots must be >= 1, got 0"),
    (["--epsilon", "0"], "--epsilon must be > 0, got 0.0"),
    (["--epsilon", "-1"], "--epsilon must be > 0, got -1.0"),
    (["--encoder", "torchvision:resnet18"], "not in the local torch cache"),
    (["--encoder", "checkpoint:/nonexistent/enc.safetensors"], "does not exist"),
    (["--generator", "nosuch"], "unknown generator"),
])
def test_bad_input_one_sentence_exit_2(tmp_path, capsys, registered_pca, digits_checkpoint, extra, needle, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch cache
    args = ["--private", "digits", "--class-subset", "0-1", "--shots", "3", "--generator", registered_pca,
            "--encoder", f"checkpoint:{digits_checkpoint}", "--iterations", "1", "--per-class", "4",
            "--out", str(tmp_path / "o"), *extra]
    line = _one_sentence_error(*run_cli(args, capsys)[::2])
    assert needle in line


def test_class_without_private_images(tmp_path, capsys, registered_pca, digits_checkpoint, digits):
    keep = np.flatnonzero(digits.y != 1)[:300]
    path = write_cache(tmp_path / "gap.npz", digits.x[keep], digits.y[keep])  # labels 0, 2, ... : class 1 is empty
    line = _one_sentence_error(*run_cli(["--private", f"npz:{path}", "--class-subset", "0-2", "--shots", "3",
                                         "--generator", registered_pca, "--encoder", f"checkpoint:{digits_checkpoint}",
                                         "--iterations", "1", "--out", str(tmp_path / "o")], capsys)[::2])
    assert "class 1" in line and "no" in line and "private images" in line


def test_encoder_input_shape_mismatch(tmp_path, capsys, registered_pca):
    from fedforge.models import create_model
    from fedforge.synth import save_checkpoint

    w, _ = save_checkpoint(tmp_path / "rgb32", create_model("cnn", (3, 32, 32), 5, seed=0), "cnn", (3, 32, 32), 5,
                           (0.5,) * 3, (0.25,) * 3)
    line = _one_sentence_error(*run_cli(["--private", "digits", "--class-subset", "0-1", "--shots", "3",
                                         "--generator", registered_pca, "--encoder", f"checkpoint:{w}",
                                         "--out", str(tmp_path / "o")], capsys)[::2])
    assert "expects 3x32x32 inputs" in line and "1x8x8" in line
