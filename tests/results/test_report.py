"""`fedforge report`: runs that differ only in their seed are one row, mean ± sample std over the seeds."""
from __future__ import annotations

import csv
import io
import json
import shutil
import statistics
from pathlib import Path

import pytest

import fedforge
from fedforge.cli import main
from fedforge.results.report import find_runs, group_runs, group_table
from fedforge.sweep import resolved_params

RUN = dict(algorithm="fedprox", dataset="digits", model="mlp", clients=4, rounds=2, batch_size=16, lr=0.05, threads=1)
ACC = {"best_global": ("best", "global_acc"), "last_global": ("last", "global_acc"),
       "mean5_global": ("mean_last5", "global_acc")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Four real runs in one folder: mu=0.5 with seeds 0 and 1, written to different places, one with its own data
    root and evaluation batch size (neither changes results); mu=0.01 (FedProx's default) set explicitly with seed 0
    and left unset with seed 1."""
    root = tmp_path_factory.mktemp("report")
    fedforge.run(**RUN, seed=0, params={"mu": 0.5}, out=str(root / "a-mu0.5-s0"))
    fedforge.run(**RUN, seed=1, params={"mu": 0.5}, out=str(root / "b-other-name"), data_root=str(root / "cache"),
                 eval_batch_size=100)
    fedforge.run(**RUN, seed=0, params={"mu": 0.01}, out=str(root / "c-default-s0"))
    fedforge.run(**RUN, seed=1, out=str(root / "d-default-s1"))
    return root


def _summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def test_grouping_ignores_where_runs_are_written_but_separates_hyper_parameters(runs):
    paths, skipped = find_runs([runs])
    assert [p.name for p in paths] == ["a-mu0.5-s0", "b-other-name", "c-default-s0", "d-default-s1"] and not skipped
    groups = group_runs(paths, resolve_params=resolved_params)
    assert [[p.name for p in g.runs] for g in groups] == [["a-mu0.5-s0", "b-other-name"],
                                                         ["c-default-s0", "d-default-s1"]]
    assert [g.seeds for g in groups] == [[0, 1], [0, 1]]
    # without resolving the hyper-parameters (the results layer alone), an explicit default is not an unset one
    assert [g.n for g in group_runs(paths)] == [2, 1, 1]
    # one row per run on request
    assert [g.n for g in group_runs(paths, by_seed=False, resolve_params=resolved_params)] == [1, 1, 1, 1]


def test_mean_and_sample_std_over_seeds_equal_the_summaries(runs):
    groups = group_runs(find_runs([runs])[0], resolve_params=resolved_params)
    columns, rows = group_table(groups)
    keys = [k for k, _ in columns]
    assert keys[:5] == ["run", "algorithm", "dataset", "model", "rounds"] and "mu" in keys and "n" in keys
    assert [r["mu"] for r in rows] == [0.5, 0.01]
    for g, row in zip(groups, rows):
        assert row["n"] == 2 and row["seeds"] == "0,1"
        for key, (part, metric) in ACC.items():
            vals = [100 * _summary(p)[part][metric] for p in g.runs]
            assert row[key] == pytest.approx(statistics.mean(vals), abs=0.005)
            assert row[f"{key}_std"] == pytest.approx(statistics.stdev(vals), abs=0.005)
        assert row["best_pers"] is None and row["best_pers_std"] is None  # FedProx has no personal models
    assert rows[0]["best_global"] != rows[1]["best_global"]


def test_report_command_on_a_folder_writes_markdown_csv_and_plot(runs, tmp_path, capsys, caplog):
    folder = tmp_path / "runs"
    shutil.copytree(runs, folder, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    unfinished = folder / "e-unfinished"
    shutil.copytree(folder / "d-default-s1", unfinished)
    (unfinished / "summary.json").unlink()
    (unfinished / "run.json").write_text(json.dumps({"status": "interrupted"}))
    md, table, png = tmp_path / "r.md", tmp_path / "r.csv", tmp_path / "r.png"

    assert main(["report", str(folder), "--markdown", str(md), "--csv", str(table), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "skipped" in caplog.text and "e-unfinished" in caplog.text and "interrupted" in caplog.text
    lines = out.splitlines()
    assert "n" in lines[0].split() and len([ln for ln in lines if "±" in ln]) == 2
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    assert [(r["mu"], r["n"]) for r in rows] == [("0.5", "2"), ("0.01", "2")]
    vals = [100 * _summary(folder / n)["best"]["global_acc"] for n in ("a-mu0.5-s0", "b-other-name")]
    assert float(rows[0]["best_global"]) == pytest.approx(statistics.mean(vals), abs=0.005)
    assert float(rows[0]["best_global_std"]) == pytest.approx(statistics.stdev(vals), abs=0.005)
    text = md.read_text()
    table_rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "±" in ln]
    assert len(table_rows) == 2
    assert f"| {float(rows[0]['best_global']):.2f} ± {float(rows[0]['best_global_std']):.2f} |" in table_rows[0]
    assert png.stat().st_size > 1000 and "](r.png)" in text

    # notes below the marker survive a rebuild
    md.write_text(text + "A remark of the lead.\n")
    assert main(["report", str(folder), "--markdown", str(md)]) == 0
    assert "A remark of the lead." in md.read_text()


def test_one_row_per_run_as_before(runs, capsys):
    assert main(["report", str(runs / "a-mu0.5-s0"), str(runs / "b-other-name"), "--no-group-by-seed",
                 "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["run"] for r in rows] == ["a-mu0.5-s0", "b-other-name"]
    assert float(rows[0]["best_global"]) == round(100 * _summary(runs / "a-mu0.5-s0")["best"]["global_acc"], 2)
    assert "n" not in rows[0]


def test_nothing_to_report_is_one_sentence(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds none" in err
