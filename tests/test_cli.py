"""The `fedforge` command: run, partition, list, report, and what bad input gets."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from fedforge.cli import main
from tests.conftest import require_data

FAST = ["--clients", "4", "--rounds", "2", "--lr", "0.05", "--batch-size", "20", "--no-progress"]


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_without_arguments_is_the_quick_start(tmp_path, monkeypatch):
    """`fedforge run` alone: FedAvg, local and Ditto side by side on digits, offline, into runs/quickstart_*; in a
    subprocess like a user. The table it prints is the runs' own numbers."""
    monkeypatch.chdir(tmp_path)
    env = {k: v for k, v in __import__("os").environ.items() if k != "FEDFORGE_DATA"}
    env["FEDFORGE_DATA"] = str(tmp_path / "empty-cache")  # nothing cached: digits needs no file
    p = subprocess.run([sys.executable, "-m", "fedforge", "run", "--no-progress"], capture_output=True, text=True,
                       env=env, timeout=1800)
    assert p.returncode == 0, p.stderr
    (root,) = list((tmp_path / "runs").iterdir())
    assert root.name.startswith("quickstart_")
    assert sorted(d.name for d in root.iterdir() if d.is_dir()) == ["ditto", "fedavg", "local"]
    summaries = {a: json.loads((root / a / "summary.json").read_text()) for a in ("fedavg", "local", "ditto")}
    assert "algorithm: fedavg" in (root / "fedavg" / "config.yaml").read_text()
    assert all(s["rounds"] == 20 for s in summaries.values())
    assert summaries["fedavg"]["last"]["global_acc"] > 0.85  # FedAvg learns digits properly here
    for algo, view in (("fedavg", "global_acc"), ("local", "personalized_acc"), ("ditto", "personalized_acc")):
        assert f"| {algo} |" in p.stdout and f"{100 * summaries[algo]['last'][view]:.1f} %" in p.stdout
    assert (root / "comparison.png").is_file() and (root / "comparison.md").read_text().strip() in p.stdout


def test_yaml_config_and_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("algorithm: local\nclients: 3\nrounds: 5\nparams: {}\n")
    code, out, err = run_cli(["run", "--config", str(cfg), "--rounds", "1", "--out", str(tmp_path / "r"), "--no-progress"], capsys)
    assert code == 0, err
    written = (tmp_path / "r" / "config.yaml").read_text()
    assert "algorithm: local" in written and "rounds: 1" in written and "clients: 3" in written


def test_list(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    for word in ("algorithms:", "fedavg", "datasets:", "digits", "pfllib", "models:", "cnn", "partitioners:", "dirichlet"):
        assert word in out
    code, out, _ = run_cli(["list", "algorithms", "fed*"], capsys)
    lines = out.splitlines()[1:]
    names = [line.split()[0] for line in lines if line.startswith("    ") and not line.strip().startswith("paper:")]
    assert "fedavg" in names and "local" not in names and all(n.startswith("fed") for n in names)
    # grouped by family, each algorithm with its paper
    families = [line.strip() for line in lines if line.startswith("  ") and not line.startswith("    ")]
    assert families[:2] == ["Traditional FL (one global model):", "Personalized FL (each client judged with its own model):"]
    assert "Generator-assisted FL (a pretrained generator on the server lends knowledge):" in families
    assert "paper: McMahan et al., Communication-Efficient Learning" in out


def test_partition_command(tmp_path, capsys):
    out_dir = tmp_path / "p"
    code, out, err = run_cli(["partition", "--dataset", "digits", "--clients", "6", "--partition", "pathological",
                              "--classes-per-client", "2", "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert {"partition.npz", "partition_stats.json", "partition.png"} <= {p.name for p in out_dir.iterdir()}
    assert "samples per client" in out and out.count("\n") > 6
    # the saved partition is reused by a run
    code, _, err = run_cli(["run", "--partition-file", str(out_dir / "partition.npz"), *FAST, "--clients", "6",
                            "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    a = np.load(out_dir / "partition.npz")
    b = np.load(tmp_path / "r" / "partition.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a.files if k != "meta")


def test_report_text_and_csv(tmp_path, capsys):
    for alg in ("fedavg", "local"):
        assert main(["run", "--algorithm", alg, *FAST, "--out", str(tmp_path / alg)]) == 0
    capsys.readouterr()
    code, out, _ = run_cli(["report", str(tmp_path / "fedavg"), str(tmp_path / "local"), "--csv", str(tmp_path / "t.csv"),
                            "--plot", str(tmp_path / "c.png")], capsys)
    assert code == 0
    assert "fedavg" in out and "local" in out and "best global" in out
    csv = (tmp_path / "t.csv").read_text().splitlines()
    assert csv[0].startswith("run,algorithm") and len(csv) == 3
    assert (tmp_path / "c.png").stat().st_size > 1000
    code, out, _ = run_cli(["report", str(tmp_path / "fedavg"), "--format", "csv"], capsys)
    assert out.startswith("run,algorithm")


def _bad(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    return [
        (["--algorithm", "fedavgg"], "unknown algorithm 'fedavgg' (did you mean: fedavg"),
        (["--dataset", "mnsit"], "unknown dataset 'mnsit' (did you mean: mnist"),
        (["--model", "cnnn"], "unknown model 'cnnn' (did you mean: cnn"),
        (["--partition", "dirichlett"], "unknown partitioner 'dirichlett' (did you mean: dirichlet"),
        (["--clients", "40", "--min-samples", "100"], "lower --clients"),
        (["--dataset", "cifar10", "--data-root", str(tmp_path / "none")], "--download"),
        (["--dataset", f"npz:{corrupt}"], "corrupt"),
        (["--lr", "0"], "lr must be > 0"),
        (["--lr", "-0.1"], "lr must be > 0"),
        (["--clients", "5000"], "at most 1797 clients"),
        (["--rounds", "two"], "rounds must be an int"),
        (["--set", "mu=0.1"], "fedavg has no hyper-parameter 'mu'"),
    ]


def test_bad_input_one_sentence_exit_2_no_run_directory(tmp_path, capsys):
    for args, message in _bad(tmp_path):
        out = tmp_path / "out"
        code, _, err = run_cli(["run", *args, "--out", str(out), "--no-progress", "--rounds", "1"]
                               if "--rounds" not in args else ["run", *args, "--out", str(out), "--no-progress"], capsys)
        assert code == 2, (args, err)
        lines = [l for l in err.strip().splitlines() if l.startswith("fedforge: error:")]
        assert len(lines) == 1 and message in lines[0], (args, err)
        assert "Traceback" not in err
        assert not (out / "summary.json").exists() and not out.exists(), args


def test_unknown_config_key_suggests(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("algoritm: fedavg\n")
    code, _, err = run_cli(["run", "--config", str(cfg)], capsys)
    assert code == 2 and "unknown config key 'algoritm' (did you mean: algorithm" in err


def test_cli_on_shared_mnist(tmp_path, capsys, data_root):
    require_data("mnist.npz")
    code, _, err = run_cli(["run", "--dataset", "mnist", "--data-root", str(data_root), "--clients", "100",
                            "--join-ratio", "0.03", "--rounds", "1", "--partition", "iid", "--no-progress",
                            "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "summary.json").read_text())["last"]["global_acc"] > 0.2
