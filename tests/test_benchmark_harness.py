"""benchmarks/compare.py: one run directory per algorithm, resumable, table rebuilt from every finished run."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("bench_compare", REPO / "benchmarks" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield mod
    torch.set_num_threads(n)


def test_compare_runs_skips_restarts_and_rebuilds(compare, tmp_path, capsys):
    out, table = tmp_path / "runs", tmp_path / "table.md"
    common = ["--dataset", "digits", "--model", "mlp", "--clients", "3", "--rounds", "1", "--lr", "0.05",
              "--out-dir", str(out), "--table", str(table)]
    assert compare.main(["--algorithms", "fedavg,fedper", *common]) == 0
    text = table.read_text()
    assert "python benchmarks/compare.py --algorithms fedavg,fedper" in text
    rows = [line for line in text.splitlines() if line.startswith("| fed")]
    assert [r.split("|")[1].strip() for r in rows] == ["fedavg", "fedper"]
    assert table.with_suffix(".png").stat().st_size > 0
    assert (out / "partition.npz").exists()

    # notes below the marker survive; a finished run is kept; an unfinished one is run again; a new one is added
    table.write_text(text + "A sentence of the lead.\n")
    kept = (out / "fedavg" / "summary.json").stat().st_mtime_ns
    (out / "fedper" / "summary.json").unlink()
    assert compare.main(["--algorithms", "fedavg,fedper,lgfedavg", *common]) == 0
    assert (out / "fedavg" / "summary.json").stat().st_mtime_ns == kept
    assert (out / "fedper" / "summary.json").exists() and (out / "lgfedavg" / "summary.json").exists()
    text = table.read_text()
    assert "A sentence of the lead." in text
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")][1:] == \
        ["fedavg", "fedper", "lgfedavg"]

    # a shorter list still tables every finished run; another scenario or other hyper-parameters are refused
    assert compare.main(["--algorithms", "fedavg", "--no-run", *common]) == 0
    assert "| lgfedavg |" in table.read_text()
    capsys.readouterr()
    assert compare.main(["--algorithms", "fedavg", *common[:-6], "--lr", "0.01", *common[-4:]]) == 2
    assert "another scenario (lr=0.05 there, 0.01 here)" in capsys.readouterr().err
    assert compare.main(["--algorithms", "fedper", "--set", "fedper.mu=1", *common]) == 2
    assert "fedper has no hyper-parameter 'mu'" in capsys.readouterr().err
