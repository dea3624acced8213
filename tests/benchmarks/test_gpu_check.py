"""benchmarks/gpu_check.py on the CPU at its smallest settings: the JSON it writes, a failing algorithm reported (not
raised), a missing optional dependency reported as a skip, the time budget, and PFLlib's main.py run beside
fedforge with its round times read from its own output. No timings are asserted."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
import types
from pathlib import Path

import pytest

from tests.conftest import require_data

REPO = Path(__file__).resolve().parents[2]
PFLLIB = REPO.parent / "shared" / "reference-code" / "pfllib"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", REPO / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(mod)
    return mod


def test_json_schema_and_a_failing_algorithm_is_reported_not_raised(gc, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    rc = gc.main(["--device", "cpu", "--quick", "--algorithms", "fedavg,no-such-algorithm", "--rounds", "1",
                  "--rows", "synth500", "--synth-clients", "4", "--speed-rounds", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["schema"] == gc.SCHEMA and res["device"] == "cpu"
    for key in ("machine", "settings", "algorithms", "algorithm_counts", "speed", "targets", "all_targets_met",
                "skipped", "markdown", "seconds", "budget_s"):
        assert key in res, key
    assert res["machine"]["torch"] and res["machine"]["gpu"] is None
    by = {a["algorithm"]: a for a in res["algorithms"]}
    assert by["fedavg"]["status"] == "pass" and by["fedavg"]["rounds"] == 1
    bad = by["no-such-algorithm"]
    assert bad["status"] == "fail" and "unknown algorithm 'no-such-algorithm'" in bad["error"]
    assert res["algorithm_counts"] == {"pass": 1, "fail": 1, "skipped": 0}

    (row,) = res["speed"]
    assert row["key"] == "synth500" and row["status"] == "ok"
    ff = row["measurements"]["fedforge"]
    assert len(ff["round_seconds"]) == 2 and ff["steady_s"] == ff["round_seconds"][1]  # rounds 2..N
    assert ff["config"]["executor"] == "vectorized" and ff["config"]["clients"] == 4
    assert row["measurements"]["pfllib"] is None  # no --pfllib given
    assert {t["key"] for t in res["targets"]} == {"synth500-time", "synth500-memory"}
    mem = next(t for t in res["targets"] if t["key"] == "synth500-memory")
    assert mem["met"] == "not measured"  # no CUDA memory on a CPU: never reported as met
    assert all(t["met"] in ("met", "not met", "not measured") for t in res["targets"])
    assert res["all_targets_met"] is False  # a CPU run never meets the GPU targets as a whole
    assert "| workload | fedforge | PFLlib (same CPU) | ratio | targets |" in res["markdown"]
    printed = capsys.readouterr().out
    assert res["markdown"] in printed and "no-such-algorithm (cnn): fail" in printed


def test_whole_model_algorithm_on_a_group_is_a_reported_failure(gc):
    row = gc.check_algorithm("fedavg", "cpu", model="cnn,mlp", rounds=1)
    assert row["status"] == "fail" and "exchanges whole models" in row["error"]


def test_missing_optional_dependency_is_a_skip(gc):
    from fedforge.algorithms.fedpac import INSTALL_HINT
    from fedforge.errors import ConfigError

    assert gc.missing_dependency(ModuleNotFoundError("No module named 'clarabel'", name="clarabel")) == "clarabel"
    assert gc.missing_dependency(ConfigError(INSTALL_HINT)) == "clarabel"
    assert gc.missing_dependency(ConfigError("lr must be > 0 (local learning rate).")) is None
    assert gc.missing_dependency(RuntimeError("shape mismatch")) is None


def test_budget_skips_what_does_not_fit_and_says_so(gc, tmp_path):
    b = gc.Budget(0)
    assert not b.fits("synth500", 20)
    assert b.skipped and "synth500: skipped (needs about 20 s" in b.skipped[0]
    rows = gc.speed_table("cpu", gc.QUICK, b, None, None, tmp_path, ("synth500", "bf16"))
    assert [r.status for r in rows] == ["skipped", "skipped"]
    assert [t["met"] for r in rows for t in r.targets] == ["not measured"] * 3
    assert gc.steady([5.0, 1.0, 2.0, 3.0]) == 2.0 and gc.steady([4.0]) == 4.0 and gc.steady([]) is None


def test_pfllib_stand_ins_and_round_times(gc, tmp_path):
    import numpy as np

    pf = gc._pfllib
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        for t in (3.25, 1.5):  # the line PFLlib's servers print after each loop iteration
            print("-" * 25, "time cost", "-" * 25, t)
    assert pf.parse_round_seconds(buf.getvalue() + "Averaged Test Accuracy: 0.5\n") == [3.25, 1.5]
    h5 = types.ModuleType("h5py_standin")
    exec(pf.H5PY_STANDIN, h5.__dict__)  # what PFLlib's save_results and average_data do with h5py
    path = tmp_path / "MNIST_FedAvg_test_0.h5"
    with h5.File(path, "w") as hf:
        hf.create_dataset("rs_test_acc", data=[0.1, 0.5])
        hf.create_dataset("rs_train_loss", data=[2.3, 1.1])
    with h5.File(path, "r") as hf:
        assert np.array(hf.get("rs_test_acc")).tolist() == [0.1, 0.5]
        assert hf["rs_train_loss"][()].tolist() == [2.3, 1.1]
    calmsize = types.ModuleType("calmsize_standin")
    exec(pf.CALMSIZE_STANDIN, calmsize.__dict__)
    assert f"{calmsize.size(1536):.2f}" == "1536.00"


@pytest.mark.slow
def test_pfllib_runs_beside_fedforge_on_the_same_split(gc, tmp_path):
    require_data("pfllib-mnist")
    if not (PFLLIB / "system" / "main.py").is_file():
        pytest.skip(f"PFLlib's code is not at {PFLLIB}")
    split, name = gc.mnist_split(require_data("pfllib-mnist").parent, 0.01, tmp_path)
    assert name == "MNIST-0.01" and (split / "config.json").is_file()
    from fedforge.data import load_dataset

    ds = load_dataset(f"pfllib:{split}", None)
    assert len(ds.client_split) == 20 and all(len(a) >= 20 for a, _ in ds.client_split)
    r = gc.time_pfllib(PFLLIB, tmp_path / "pfllib", split, name,
                       ["-algo", "FedAvg", "-ncl", "10", "-nc", "20", "-gr", "1", "-jr", "1", "-lbs", "10"], "cpu", 300)
    assert r["returncode"] == 0, r.get("error")
    assert len(r["round_seconds"]) == 2 and r["steady_s"] == r["round_seconds"][1]  # iterations 0 and 1
    assert "-data MNIST-0.01" in r["command"] and "-dev cpu" in r["command"]
