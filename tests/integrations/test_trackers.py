"""Experiment trackers (TensorBoard, W&B offline, MLflow) driven with a real run's config, metrics.jsonl records and
curves.png, and read back with each library's own reader. A backend's tests skip when its library is absent."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedforge
from fedforge.config import build_config, load_yaml
from fedforge.errors import ConfigError, UnknownNameError
from fedforge.integrations.trackers import TRACKERS, open_trackers, record_scalars, record_step


def needs(*modules: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed (pip install 'fedforge[{modules[0]}]' to run this test)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished FedBABU run (two rounds, then fine-tuning: its last record has "stage": "finetune")."""
    path = tmp_path_factory.mktemp("trackers") / "source"
    fedforge.run(algorithm="fedbabu", dataset="digits", clients=4, rounds=2, run_dir=path, progress=False)
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    stages = [r.get("stage") for r in records]
    assert stages == [None, None, None, "finetune"], (
        f"metrics.jsonl of a 2-round FedBABU run should hold rounds 0-2 and one finetune-stage record, got stages {stages}")
    assert (path / "curves.png").is_file()
    return {"path": path, "config": build_config(load_yaml(path / "config.yaml")).to_dict(), "records": records,
            "summary": json.loads((path / "summary.json").read_text())}


def copy_run(run: dict, dst: Path) -> Path:
    """The run's files that trackers read, in a fresh folder (each test gets its own trackers/)."""
    dst.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png"):
        shutil.copy(run["path"] / name, dst / name)
    return dst


def expected(records: list[dict]) -> dict[tuple[str, int], float]:
    """{(tag, step): value}: every number of every record at step = round; a finetune-stage record under
    finetune/<field> at round + 1. None, text and booleans are not metrics; "round" is the step."""
    out: dict[tuple[str, int], float] = {}
    for r in records:
        late = r.get("stage") == "finetune"
        step, prefix = r["round"] + (1 if late else 0), ("finetune/" if late else "")
        for k, v in r.items():
            if k in ("round", "stage") or v is None or isinstance(v, (bool, str, list, dict)):
                continue
            assert (prefix + k, step) not in out
            out[(prefix + k, step)] = float(v)
    return out


def drive(name: str, run: dict, run_dir: Path, records=None, resumed=False, status="complete", summary=True, config=None):
    (tracker,) = open_trackers([name])
    tracker.start(config or run["config"], run_dir, resumed)
    for r in run["records"] if records is None else records:
        tracker.log(r)
    if status is not None:
        tracker.finish(run["summary"] if summary else None, run_dir, status)
    return tracker


# ------------------------------------------------------------------------------------------------ generic
def test_record_scalars_and_steps():
    rec = {"round": 3, "global_acc": 0.5, "personalized_acc": None, "clients": 4, "flag": True, "note": "x",
           "hist": [1, 2], "nan": float("nan"), "stage": "finetune"}
    assert record_scalars(rec) == {"global_acc": 0.5, "clients": 4.0}
    assert record_step(rec) == (4, "finetune/")
    assert record_step({"round": 3}) == (3, "")


def test_unknown_tracker_name_suggests_the_closest():
    assert set(TRACKERS.names()) == {"tensorboard", "wandb", "mlflow"}
    with pytest.raises(UnknownNameError, match=r"tensorbord.*did you mean: tensorboard"):
        open_trackers(["tensorbord"])


@pytest.mark.parametrize("name,modules", [("tensorboard", ["tensorboard", "torch.utils.tensorboard"]),
                                          ("wandb", ["wandb"]), ("mlflow", ["mlflow"])])
def test_missing_library_names_the_extra(monkeypatch, name, modules):
    for m in modules:  # a None entry makes `import m` fail as if m were not installed
        monkeypatch.setitem(sys.modules, m, None)
    with pytest.raises(ConfigError, match=rf"pip install 'fedforge\[{name}\]'"):
        open_trackers([name])


def test_a_tracker_needs_a_run_directory():
    needs("tensorboard")
    (tracker,) = open_trackers(["tensorboard"])
    with pytest.raises(ConfigError, match="run directory"):
        tracker.start({"rounds": 1}, None, False)


# ------------------------------------------------------------------------------------------------ TensorBoard
def read_tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "trackers" / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def tensorboard_scalars(acc) -> dict[tuple[str, int], list[float]]:
    out: dict[tuple[str, int], list[float]] = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            out.setdefault((tag, e.step), []).append(e.value)
    return out


def test_tensorboard_logs_every_number_the_config_and_the_curves(run, tmp_path):
    needs("tensorboard")
    from PIL import Image
    from tensorboard.plugins.hparams import api_pb2, metadata

    run_dir = copy_run(run, tmp_path / "digits_fedbabu")
    drive("tensorboard", run, run_dir)
    acc = read_tensorboard(run_dir)

    want = expected(run["records"])
    got = tensorboard_scalars(acc)
    assert set(got) == set(want)
    for key, value in want.items():  # TensorBoard scalars are float32
        assert got[key] == [np.float32(value)], key
    assert ("finetune/personalized_acc", 3) in got and ("personalized_acc", 2) in got

    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "algorithm: fedbabu" in text and "rounds: 2" in text

    (image,) = acc.Images("curves")
    with Image.open(run_dir / "curves.png") as im:
        assert (image.width, image.height) == im.size
    assert image.step == 3  # the last step logged

    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["algorithm"].string_value == "fedbabu"
    assert start.hparams["lr"].number_value == run["config"]["lr"]
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_SUCCESS


def test_tensorboard_resumed_run_logs_each_step_once(run, tmp_path):
    """A session killed after round 2 (checkpoint at round 1): the resumed session re-logs round 2 and the finetune
    record; TensorBoard shows each step once."""
    needs("tensorboard")
    run_dir = copy_run(run, tmp_path / "digits_fedbabu")
    first = drive("tensorboard", run, run_dir, records=run["records"][:3], status=None)  # killed: no finish
    try:
        drive("tensorboard", run, run_dir, records=run["records"][2:], resumed=True)
        got = tensorboard_scalars(read_tensorboard(run_dir))
        want = expected(run["records"])
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key] == [np.float32(value)], key
    finally:
        first.writer.close()


# ------------------------------------------------------------------------------------------------ W&B
def inspect_wandb(folder: Path, summary: bool = False):
    """W&B's own reader of a .wandb transaction log (`wandb leet inspect --json`)."""
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *(["--summary"] if summary else []), str(folder)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out) if summary else [json.loads(line) for line in out.splitlines() if line.strip()]


def wandb_history(folder: Path) -> dict[tuple[str, int], float]:
    out = {}
    for rec in inspect_wandb(folder):
        if rec["type"] == "history":
            step = rec["history"]["step"]["num"]
            for k, v in rec["history"]["item"].items():
                if not k.startswith(("_", "curves")):
                    assert (k, step) not in out, (k, step)
                    out[(k, step)] = v
    return out


@pytest.fixture
def offline_only(monkeypatch, tmp_path):
    """An environment that asks W&B for online mode against a server that does not exist, with no API key."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    for k in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(k, raising=False)


def test_wandb_offline_run_holds_every_number_the_config_and_the_curves(run, tmp_path, offline_only):
    needs("wandb")
    run_dir = copy_run(run, tmp_path / "digits_fedbabu")
    hooks, stdout, env = (sys.excepthook, sys.exit), sys.stdout, {k: v for k, v in os.environ.items() if k.startswith("WANDB_")}
    (tracker,) = open_trackers(["wandb"])
    tracker.start(run["config"], run_dir, False)
    assert sys.stdout is stdout  # no console capture
    for r in run["records"]:
        tracker.log(r)
    tracker.finish(run["summary"], run_dir, "complete")
    # W&B's process-wide hooks and variables are put back
    assert (sys.excepthook, sys.exit) == hooks
    assert {k: v for k, v in os.environ.items() if k.startswith("WANDB_")} == env

    run_id = (run_dir / "trackers" / "wandb_run_id").read_text().strip()
    (folder,) = (run_dir / "trackers" / "wandb").glob(f"offline-run-*-{run_id}")
    assert (folder / f"run-{run_id}.wandb").is_file()
    assert wandb_history(folder) == expected(run["records"])  # float64 all the way: exact

    info = inspect_wandb(folder, summary=True)
    assert info["state"] == "finished" and info["run_id"] == run_id and info["name"] == "digits_fedbabu"
    assert info["project"] == "fedforge"
    assert info["config"]["algorithm"] == "fedbabu" and info["config"]["rounds"] == 2
    assert info["summary"]["fedforge"]["best"]["personalized_acc"] == run["summary"]["best"]["personalized_acc"]
    image = info["summary"]["curves"]
    assert image["_type"] == "image-file" and (folder / "files" / image["path"]).is_file()


def test_wandb_resumed_run_continues_the_same_run_id(run, tmp_path, offline_only):
    """Interrupted after round 1, resumed from its checkpoint: a second offline segment of the same run, which
    `wandb sync` uploads after the first; together they hold every step once."""
    needs("wandb")
    run_dir = copy_run(run, tmp_path / "digits_fedbabu")
    drive("wandb", run, run_dir, records=run["records"][:2], status="interrupted", summary=False)
    drive("wandb", run, run_dir, records=run["records"][2:], resumed=True)
    run_id = (run_dir / "trackers" / "wandb_run_id").read_text().strip()
    folders = sorted((run_dir / "trackers" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(run_id) for f in folders), folders
    first, second = (inspect_wandb(f, summary=True) for f in folders)
    assert (first["exit_code"], second["state"]) == (255, "finished")
    before, after = (wandb_history(f) for f in folders)
    assert not set(before) & set(after)  # no step logged twice
    assert {**before, **after} == expected(run["records"])


# ------------------------------------------------------------------------------------------------ MLflow
def mlflow_client(uri: str, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store without it
    return MlflowClient(tracking_uri=uri)


def mlflow_metrics(client, run_id: str) -> dict[tuple[str, int], list[float]]:
    out: dict[tuple[str, int], list[float]] = {}
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            out.setdefault((key, m.step), []).append(m.value)
    return out


def test_mlflow_run_holds_params_metrics_and_artifacts(run, tmp_path, monkeypatch):
    needs("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run_dir = copy_run(run, tmp_path / "digits_fedbabu")
    drive("mlflow", run, run_dir)
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # set around the tracker's own calls only

    trackers = run_dir / "trackers"
    client = mlflow_client((trackers / "mlruns").resolve().as_uri(), monkeypatch)
    assert (trackers / "mlflow_tracking_uri").read_text().strip() == (trackers / "mlruns").resolve().as_uri()
    run_id = (trackers / "mlflow_run_id").read_text().strip()
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "digits_fedbabu"
    assert client.get_experiment(mlrun.info.experiment_id).name == "fedforge"

    got = mlflow_metrics(client, run_id)
    want = expected(run["records"])
    assert got == {k: [v] for k, v in want.items()}

    params = mlrun.data.params
    assert params["algorithm"] == "fedbabu" and params["lr"] == "0.005" and params["rounds"] == "2"
    assert params["min_samples"] == "null" and params["balance"] == "true"
    assert {a.path for a in client.list_artifacts(run_id)} == {"curves.png", "config.yaml", "summary.json"}
    local = Path(client.download_artifacts(run_id, "summary.json", str(tmp_path)))
    assert json.loads(local.read_text())["best"] == run["summary"]["best"]


def test_mlflow_resumed_run_continues_without_duplicates(run, tmp_path, monkeypatch):
    """Killed after round 2 with a checkpoint at round 1: the resumed session (which may change fields that do not
    affect results) continues the same MLflow run and does not log round 2 twice."""
    needs("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = copy_run(run, tmp_path / "digits_fedbabu")
    drive("mlflow", run, run_dir, records=run["records"][:3], status=None)  # killed: still RUNNING
    run_id = (run_dir / "trackers" / "mlflow_run_id").read_text().strip()
    changed = {**run["config"], "max_fail_fraction": 0.25}
    drive("mlflow", run, run_dir, records=run["records"][2:], resumed=True, config=changed)
    assert (run_dir / "trackers" / "mlflow_run_id").read_text().strip() == run_id

    client = mlflow_client((run_dir / "trackers" / "mlruns").resolve().as_uri(), monkeypatch)
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED"
    assert len(client.search_runs([mlrun.info.experiment_id])) == 1
    assert mlflow_metrics(client, run_id) == {k: [v] for k, v in expected(run["records"]).items()}
    assert mlrun.data.params["max_fail_fraction"] == "0.5"  # MLflow params are immutable: the first value stays


def test_mlflow_uses_the_users_tracking_uri_and_experiment(run, tmp_path, monkeypatch):
    needs("mlflow")
    shared = (tmp_path / "shared-mlruns").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sweep")
    run_dir = copy_run(run, tmp_path / "digits_fedbabu")
    long_note = {**run["config"], "params": {"note": "x" * 10_000}}
    drive("mlflow", run, run_dir, config=long_note)
    assert not (run_dir / "trackers" / "mlruns").exists()

    client = mlflow_client(shared, monkeypatch)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert mlrun.info.run_id == (run_dir / "trackers" / "mlflow_run_id").read_text().strip()
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    note = mlrun.data.params["params.note"]
    assert len(note) <= MAX_PARAM_VAL_LENGTH and note.startswith("xxx") and note.endswith("...")


def test_a_failing_tracker_warns_and_never_raises(run, tmp_path, monkeypatch, caplog):
    """The MLflow run is deleted under the tracker: logging and finishing fail, as warnings."""
    needs("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = copy_run(run, tmp_path / "digits_fedbabu")
    (tracker,) = open_trackers(["mlflow"])
    tracker.start(run["config"], run_dir, False)
    client = mlflow_client((run_dir / "trackers" / "mlruns").resolve().as_uri(), monkeypatch)
    client.delete_run(tracker.run_id)
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        tracker.log(run["records"][0])
        tracker.finish(run["summary"], run_dir, "complete")
    warnings = [r.getMessage() for r in caplog.records if r.name == "fedforge"]
    assert any("mlflow tracker: could not log the record of round 0" in w for w in warnings), warnings
    assert any("mlflow tracker: could not finish" in w for w in warnings), warnings
    tracker.log(run["records"][1])  # after finish: nothing, and no error


# --------------------------------------------------------------------------------------------- end to end
def test_a_real_cli_run_writes_all_three_trackers(tmp_path, monkeypatch, offline_only):
    """`fedforge run --tracker tensorboard --tracker wandb --tracker mlflow`: the run session hands every record, the
    config and curves.png to each back-end, and each library reads back what metrics.jsonl holds."""
    needs("tensorboard")
    needs("wandb")
    needs("mlflow")
    from fedforge.cli import main as cli_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "digits_fedavg"
    rc = cli_main(["-q", "run", "--dataset", "digits", "--model", "mlp", "--clients", "3", "--rounds", "2",
                   "--threads", "1", "--no-progress", "--out", str(run_dir), "--tracker", "tensorboard",
                   "--tracker", "wandb,mlflow"])
    assert rc == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    want = expected(records)
    acc = read_tensorboard(run_dir)
    assert {k: v[-1] for k, v in tensorboard_scalars(acc).items()} == pytest.approx(want)
    run_id = (run_dir / "trackers" / "wandb_run_id").read_text().strip()
    (folder,) = (run_dir / "trackers" / "wandb").glob(f"offline-run-*-{run_id}")
    assert wandb_history(folder) == want
    client = mlflow_client((run_dir / "trackers" / "mlruns").resolve().as_uri(), monkeypatch)
    ml_id = (run_dir / "trackers" / "mlflow_run_id").read_text().strip()
    assert mlflow_metrics(client, ml_id) == {k: [v] for k, v in want.items()}
    assert "curves.png" in {a.path for a in client.list_artifacts(ml_id)}
