"""benchmarks/reference_runs.py: PFLlib's own main.py run unmodified on a split exported by fedforge, its output
parsed, fedforge run on the same files, and the side-by-side table written from partial and finished results."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FEDFORGE_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def rr():
    spec = importlib.util.spec_from_file_location("bench_reference_runs", REPO / "benchmarks" / "reference_runs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    yield mod
    torch.set_num_threads(n)


# PFLlib's printout for one Ditto round and FedBABU's fine-tuned evaluation (the lines its servers print)
DITTO_LIKE = """==================================================
algorithm = Ditto
-------------Round number: 0-------------

Evaluate global models
Averaged Train Loss: 2.3000
Averaged Test Accuracy: 0.1000
Averaged Test AUC: 0.5000
Std Test Accuracy: 0.0100
Std Test AUC: 0.0200

Evaluate personalized models
Averaged Train Loss: 2.2000
Averaged Test Accuracy: 0.2000
Averaged Test AUC: 0.6000
Std Test Accuracy: 0.0300
Std Test AUC: 0.0400
------------------------- time cost ------------------------- 1.0

-------------Round number: 1-------------

Evaluate global models
Averaged Train Loss: 1.3000
Averaged Test Accuracy: 0.5000
Averaged Test AUC: 0.8000
Std Test Accuracy: 0.0100
Std Test AUC: 0.0200

Evaluate personalized models
Averaged Train Loss: 1.2000
Averaged Test Accuracy: 0.7000
Averaged Test AUC: 0.9000
Std Test Accuracy: 0.0300
Std Test AUC: 0.0400

-------------Evaluate fine-tuned personalized models-------------
Averaged Train Loss: 0.9000
Averaged Test Accuracy: 0.8000
Averaged Test AUC: 0.9500
Std Test Accuracy: 0.0300
Std Test AUC: 0.0400

Best accuracy.
0.8
"""


def test_parser_keeps_each_evaluation_and_its_view(rr):
    evals = rr.parse_pfllib_stdout(DITTO_LIKE)
    assert [(e["round"], e["label"], e["acc"]) for e in evals] == [
        (0, "Evaluate global models", 0.1), (0, "Evaluate personalized models", 0.2),
        (1, "Evaluate global models", 0.5), (1, "Evaluate personalized models", 0.7),
        (1, "Evaluate fine-tuned personalized models", 0.8)]
    assert evals[-1]["stage"] == "finetune" and evals[1]["train_loss"] == 2.2 and evals[3]["acc_std"] == 0.03
    curve, ft = rr.pf_curve(evals, rr.MAPPING["ditto"])  # Ditto: only the personal evaluations
    assert curve == {0: 20.0, 1: 70.0} and ft == 80.0
    assert rr.best_last(curve, ft) == (80.0, 80.0)
    curve, ft = rr.pf_curve(evals[:4], dataclasses.replace(rr.MAPPING["ditto"], pf_label="global"))
    assert curve == {0: 10.0, 1: 50.0} and ft is None
    assert rr.best_last({0: 10.0, 1: 60.0, 2: 55.0}, None) == (60.0, 55.0)
    # the tolerance: max(1.5 points, 2 sample std of fedforge's seeds)
    assert rr.verdict(50.0, [51.0]) == ("+1.00", "yes (±1.50)")
    assert rr.verdict(50.0, [52.0]) == ("+2.00", "**no** (±1.50)")
    assert rr.verdict(50.0, [51.0, 53.0, 55.0])[1] == "yes (±4.00)"


def test_mapping_names_real_algorithms_and_pfllib_flags(rr):
    from fedforge.sweep import resolved_params

    main_py = (rr.REFERENCE / "pfllib" / "system" / "main.py")
    text = main_py.read_text() if main_py.is_file() else None
    for name, e in rr.MAPPING.items():
        resolved_params(name, e.ff_params)  # every fedforge hyper-parameter exists and is valid
        if text is not None:
            assert f'args.algorithm == "{e.pf_algo}"' in text or f"args.algorithm == '{e.pf_algo}'" in text, name
            for flag in e.pf_flags[::2]:
                assert f"'{flag}'" in text, (name, flag)


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    from fedforge.data import Dataset, load_dataset, make_partition
    from fedforge.data.export import export_pfllib

    if not (DATA / "mnist.npz").is_file():
        pytest.skip(f"mnist.npz is not in {DATA} (set FEDFORGE_DATA)")
    full = load_dataset("mnist", DATA)
    idx = np.arange(360)
    ds = Dataset("mnist-tiny", full.x[idx], full.y[idx], 10, full.mean, full.std)
    part = make_partition(ds.y, 10, "iid", 3, seed=0)
    return export_pfllib(ds, part, tmp_path_factory.mktemp("split") / "export", batch_size=10)


def test_pfllib_main_and_fedforge_on_one_exported_split(rr, tiny_split, tmp_path):
    if not (rr.REFERENCE / "pfllib" / "system" / "main.py").is_file():
        pytest.skip(f"PFLlib's code is not at {rr.REFERENCE / 'pfllib'} (set FEDFORGE_REFERENCE_CODE)")
    for m in ("h5py", "calmsize", "sklearn"):
        pytest.importorskip(m, reason=f"PFLlib's main.py imports {m}; pip install {m}")
    out = tmp_path / "runs"
    sc = rr.Scenario("tiny", "tiny matched run", "MNIST", 10, 1, ["fedavg"], [0], tmp_path / "table.md",
                     data_dir=tiny_split, num_clients=3, description="3 iid clients of 360 MNIST images")

    # before anything ran: a table with a marker, not numbers
    rr.write_report(sc, out, 1, [0], "cmd")
    text = (tmp_path / "table.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| fedavg | global"))
    assert row.count("missing") >= 2

    res = rr.run_pfllib(sc, rr.MAPPING["fedavg"], out, tiny_split, rounds=1)
    assert res["status"] == "complete", (out / "tiny" / "pfllib" / "runs" / "fedavg" / "stdout.log").read_text()[-2000:]
    evals = res["evaluations"]
    assert [e["round"] for e in evals] == [0, 1]  # -gr 1: evaluations after 0 and 1 aggregations
    assert res["precision"] == "h5 (full)"  # the h5's rs_test_acc matched the printed values, one for one
    assert all(0.0 <= e["acc"] <= 1.0 for e in evals) and evals[1]["acc"] > evals[0]["acc"] - 0.2
    # the work tree: PFLlib's own files, the split linked in under its NAME; nothing written next to the reference
    work = out / "tiny" / "pfllib"
    assert (work / "system" / "main.py").read_bytes() == (rr.REFERENCE / "pfllib" / "system" / "main.py").read_bytes()
    assert (work / "dataset" / "MNIST").resolve() == Path(tiny_split).resolve()
    again = rr.run_pfllib(sc, rr.MAPPING["fedavg"], out, tiny_split, rounds=1)  # finished: kept, not rerun
    assert again == json.loads((work / "runs" / "fedavg" / "result.json").read_text()) and again["seconds"] == res["seconds"]

    rr.run_fedforge(sc, ["fedavg"], [0], out, tiny_split, 1, "cpu", lambda: None)
    state, records, _ = rr.ff_status(out, sc, "fedavg", 0)
    assert state == "complete" and [r["round"] for r in records] == [0, 1]

    rr.write_report(sc, out, 1, [0], "cmd")
    text = (tmp_path / "table.md").read_text()
    row = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| fedavg | global")).split("|")]
    pf_best, ff_best = float(row[3]), float(row[4])
    assert pf_best == pytest.approx(100 * max(e["acc"] for e in evals), abs=0.006)
    assert ff_best == pytest.approx(100 * max(r["global_acc"] for r in records), abs=0.006)
    assert float(row[5]) == pytest.approx(ff_best - pf_best, abs=0.011) and row[6].startswith(("yes", "**no**"))
    assert "| fedavg | - | - | FedAvg | - | global |" in text  # the mapping table
    assert (tmp_path / "table.png").stat().st_size > 0
