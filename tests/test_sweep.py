"""`fedforge sweep`: a grid of real runs (seeds × values), resumable, with a mean ± std report."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedforge.cli import main
from fedforge.sweep import Axis, make_points, parse_axis


def run_options(rounds: int = 2, *extra: str) -> list[str]:
    return ["--algorithm", "fedprox", "--dataset", "digits", "--model", "mlp", "--clients", "4", "--rounds", str(rounds),
            "--batch-size", "16", "--lr", "0.05", "--threads", "1", *extra]


RUN = run_options()
NAMES = [f"fedprox_mu{mu}_s{s}" for s in (0, 1, 2) for mu in ("0.01", "0.5")]


def _sweep(out: Path, *extra: str, run: list[str] = RUN) -> list[str]:
    return ["sweep", "--seeds", "0,1,2", "--set", "mu=0.01,0.5", "--out-dir", str(out), "--no-progress", *extra,
            "--", *run]


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "prox"
    assert main(_sweep(out)) == 0
    return out


def test_three_seeds_by_two_values_make_six_runs_and_a_two_row_report(swept):
    assert sorted(p.name for p in swept.iterdir() if (p / "config.yaml").exists()) == sorted(NAMES)
    record = json.loads((swept / "sweep.json").read_text())
    assert [p["name"] for p in record["points"]] == NAMES  # seed by seed
    assert record["counts"] == {"complete": 6} and record["seeds"] == [0, 1, 2] and record["set"] == {"mu": [0.01, 0.5]}
    assert record["command"].startswith("fedforge sweep --seeds 0,1,2 --set mu=0.01,0.5 --out-dir ")

    rows = list(csv.DictReader(io.StringIO((swept / "report.csv").read_text())))
    assert [(r["run"], r["mu"], r["n"], r["seeds"]) for r in rows] == [("fedprox_mu0.01", "0.01", "3", "0,1,2"),
                                                                    ("fedprox_mu0.5", "0.5", "3", "0,1,2")]
    for row, mu in zip(rows, ("0.01", "0.5")):
        summaries = [json.loads((swept / f"fedprox_mu{mu}_s{s}" / "summary.json").read_text()) for s in (0, 1, 2)]
        for key, part in (("best_global", "best"), ("last_global", "last"), ("mean5_global", "mean_last5")):
            vals = [100 * s[part]["global_acc"] for s in summaries]
            assert float(row[key]) == pytest.approx(statistics.mean(vals), abs=0.005)
            assert float(row[f"{key}_std"]) == pytest.approx(statistics.stdev(vals), abs=0.005)
    md = (swept / "report.md").read_text()
    assert len([ln for ln in md.splitlines() if ln.startswith("| fedprox_mu") and " ± " in ln]) == 2
    assert (swept / "curves.png").stat().st_size > 1000


def test_runs_of_one_seed_share_one_partition_and_match_a_plain_run(swept, tmp_path):
    parts = sorted((swept / "partitions").iterdir())
    assert len(parts) == 3  # one per seed: the two values of mu share it
    for s in (0, 1, 2):
        a, b = (np.load(swept / f"fedprox_mu{mu}_s{s}" / "partition.npz") for mu in ("0.01", "0.5"))
        assert all(np.array_equal(a[k], b[k]) for k in a.files if k != "meta")
    # a point of the sweep is the run `fedforge run` makes with the same options (same numbers, digit for digit)
    assert main(["run", *RUN, "--seed", "1", "--set", "mu=0.5", "--no-progress", "--out", str(tmp_path / "plain")]) == 0
    assert _metrics(tmp_path / "plain") == _metrics(swept / "fedprox_mu0.5_s1")


def test_running_the_same_sweep_again_reruns_nothing(swept, capsys):
    files = [swept / n / f for n in NAMES for f in ("summary.json", "metrics.jsonl", "config.yaml")]
    before = [f.stat().st_mtime_ns for f in files]
    capsys.readouterr()
    assert main(_sweep(swept)) == 0
    err = capsys.readouterr().err
    assert [f.stat().st_mtime_ns for f in files] == before
    assert err.count("finished earlier, kept") == 6 and "0 run now, 6 kept from earlier" in err
    # other shared options would mix two experiments under one name: refused before anything runs
    assert main(_sweep(swept, run=run_options(3))) == 2
    assert "holds a finished run of another configuration (rounds=2 there, 3 here)" in capsys.readouterr().err
    assert [f.stat().st_mtime_ns for f in files] == before


def test_ctrl_c_stops_the_current_run_and_the_same_command_continues(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", "--seeds", "0,1", "--out-dir", str(out), "--no-progress", "--", *run_options(4, "--checkpoint-every", "1")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "fedforge", *argv], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    second = out / "fedprox_s1"
    try:
        deadline = time.monotonic() + 600
        while not (second / "metrics.jsonl").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        p.send_signal(signal.SIGINT)  # while the second run is going (its round-0 evaluation is written)
        _, err = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err
    assert "sweep stopped in run 2 of 2 (fedprox_s1)" in err and "run the same command again" in err
    record = json.loads((out / "sweep.json").read_text())
    assert [(q["name"], q["status"]) for q in record["points"]] == [("fedprox_s0", "complete"),
                                                                  ("fedprox_s1", "interrupted")]
    assert json.loads((second / "run.json").read_text())["status"] == "interrupted"
    assert not (second / "summary.json").exists()
    kept = (out / "fedprox_s0" / "summary.json").stat().st_mtime_ns

    assert main(argv) == 0
    assert "fedprox_s0: finished earlier, kept" in capsys.readouterr().err
    assert (out / "fedprox_s0" / "summary.json").stat().st_mtime_ns == kept
    status = json.loads((second / "run.json").read_text())
    assert status["status"] == "complete" and status["resumes"] == 1
    assert [r["round"] for r in _metrics(second)] == list(range(5))
    assert json.loads((out / "sweep.json").read_text())["counts"] == {"complete": 2}


def test_a_diverging_point_is_marked_failed_and_the_sweep_goes_on(tmp_path, capsys):
    out = tmp_path / "lr"
    argv = ["sweep", "--grid", "lr=1e6,0.05", "--out-dir", str(out), "--no-progress", "--",
            "--dataset", "digits", "--model", "mlp", "--clients", "3", "--rounds", "1", "--threads", "1"]
    assert main(argv) == 3  # the exit code of the run that stopped (DivergenceError)
    err = capsys.readouterr().err
    record = json.loads((out / "sweep.json").read_text())
    assert [(q["name"], q["status"]) for q in record["points"]] == [("fedavg_lr1e6_s0", "failed"),
                                                                  ("fedavg_lr0.05_s0", "complete")]
    assert "diverged" in record["points"][0]["error"] and "1 failed" in err
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert [r["run"] for r in rows] == ["fedavg_lr0.05_s0"]  # the report holds the finished runs


def test_grid_of_run_options_and_a_hyper_parameter_of_one_algorithm():
    grid = [parse_axis("algorithm=fedavg,fedprox", "--grid"), parse_axis("local-epochs=1,5", "--grid")]
    sets = [parse_axis("fedprox.mu=0.01,1e-3", "--set")]
    assert sets[0] == Axis("mu", (0.01, "1e-3"), param=True, scope="fedprox")
    points = make_points("fedavg", [0, 3], grid, sets)
    assert [p.name for p in points[:6]] == [
        "fedavg_local_epochs1_s0", "fedavg_local_epochs5_s0",
        "fedprox_local_epochs1_mu0.01_s0", "fedprox_local_epochs1_mu1e-3_s0",
        "fedprox_local_epochs5_mu0.01_s0", "fedprox_local_epochs5_mu1e-3_s0"]
    assert [p.name for p in points[6:]] == [p.name.replace("_s0", "_s3") for p in points[:6]]
    assert points[3].options == {"algorithm": "fedprox", "local_epochs": 1} and points[3].params == {"mu": "1e-3"}
    assert make_points("fedavg", [0], [parse_axis("model=cnn,mlp", "--grid")], [])[0].name == "fedavg_model-cnn_s0"


@pytest.mark.parametrize("argv, says", [
    (["--seeds", ""], "--seeds needs at least one seed"),
    (["--seeds", "0,x"], "--seeds takes comma-separated non-negative integers"),
    (["--seeds", "0,0"], "--seeds lists seed 0 twice"),
    (["--set", "mu"], "--set expects KEY=V1,V2,..."),
    (["--set", "mu="], "--set mu has no value"),
    (["--set", "mu=0.1,,0.2"], "--set mu has an empty value"),
    (["--grid", "lrr=0.1,0.2"], "unknown run option 'lrr' in --grid (did you mean: lr"),
    (["--grid", "seed=1,2"], "give the seeds with --seeds"),
    (["--set", "mu=0.1", "--", "--algorithm", "fedavg"], "fedavg has no hyper-parameter 'mu'"),
    (["--", "--lrr", "0.1"], "unknown run option '--lrr' after -- (did you mean: --lr"),
    (["--", "--out", "x"], "drop --out from the run options"),
    (["--grid", "lr=0.1,0.2", "--", "--lr", "0.3"], "lr is both swept (--grid) and fixed after --"),
    (["--lr", "0.1"], "unknown sweep option --lr (run options go after --"),
])
def test_bad_input_is_one_sentence_and_exit_code_2(tmp_path, capsys, argv, says):
    out = tmp_path / "never"
    args = ["sweep", "--out-dir", str(out), *argv]
    if "--" not in args:
        args += ["--", "--dataset", "digits"]
    try:
        code = main(args)
    except SystemExit as e:  # errors in the sweep's own options come from its argument parser
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert says in err and err.count("\n") == 0, err
    assert not out.exists()
