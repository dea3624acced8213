"""Exact resume: a run killed (SIGKILL) or stopped (SIGINT/SIGTERM) at any point and resumed gives the same metrics,
bit for bit, as an uninterrupted run with the same seed.

The runs are real `fedforge run` processes, started through ``tests/support/faults.py``, which wraps the run
session's executor and checkpoint writer to stop them at a named point: ``--die-at checkpoint-write:2`` kills the
process with SIGKILL half-way through its second checkpoint write, ``client:K`` before its K-th local update,
``checkpoint-rename:N`` after the N-th checkpoint file is in place but before the manifest points at it;
``--pause-at client:K`` pauses there so that a signal can be sent.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fedforge.algorithms  # noqa: F401  (registers the algorithms)
from fedforge.cli import main as cli_main
from fedforge.core.checkpoint import load_checkpoint


def _timing(key: str) -> bool:
    """Wall-clock measurements (seconds, eval_seconds, server_seconds, ...) differ from run to run."""
    return key.endswith("seconds")

ARGS = ["--dataset", "digits", "--model", "mlp", "--clients", "4", "--rounds", "6", "--checkpoint-every", "2",
        "--batch-size", "16", "--lr", "0.05", "--seed", "5", "--threads", "1", "--no-progress"]
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _cmd(*args: str, die_at: str | None = None, pause_at: str | None = None) -> list[str]:
    hooks = [*(["--die-at", die_at] if die_at else []), *(["--pause-at", pause_at] if pause_at else [])]
    if not hooks:  # a plain run
        return [sys.executable, "-m", "fedforge", "run", *args]
    return [sys.executable, "-m", "tests.support.faults", *hooks, "run", *args]


def _run(args: list[str], cwd: Path, die_at: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.Popen(_cmd(*args, die_at=die_at), cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=300)
    finally:
        _reap(p)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _reap(p: subprocess.Popen) -> None:
    """Kill whatever the run left in its session (e.g. pool workers orphaned by a SIGKILL of their parent)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if p.poll() is None:
        p.wait(timeout=30)


def _signal_at(args: list[str], cwd: Path, point: str, sig: int, group: bool = False) -> subprocess.CompletedProcess:
    """Run until the pause point, send ``sig`` to the run's process (``group``: to its whole process group, as Ctrl-C
    in a terminal does), and wait for it to stop."""
    p = subprocess.Popen(_cmd(*args, pause_at=point), cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    try:
        for line in p.stderr:
            lines.append(line)
            if line.startswith("fedforge-test: paused at"):
                os.killpg(p.pid, sig) if group else p.send_signal(sig)
                break
        out, err = p.communicate(timeout=300)
    finally:
        _reap(p)
    return subprocess.CompletedProcess(p.args, p.returncode, out, "".join(lines) + err)


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not _timing(k)} for r in rows]


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _ckpt_round(run_dir: Path) -> int | None:
    ck = load_checkpoint(run_dir)
    return None if ck is None else ck.round


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run must reproduce."""
    cwd = tmp_path_factory.mktemp("baseline")
    r = _run([*ARGS, "--out", "run"], cwd)
    assert r.returncode == 0, r.stderr
    return cwd / "run"


@pytest.fixture(scope="module")
def baseline(baseline_dir) -> list[dict]:
    rows = _metrics(baseline_dir)
    assert [x["round"] for x in rows] == list(range(7))
    return rows


def test_provenance_says_where_a_result_came_from(baseline_dir):
    import fedforge

    prov = json.loads((baseline_dir / "provenance.json").read_text())
    assert prov["fedforge"] == fedforge.__version__
    assert prov["python"] == sys.version.split()[0]
    import torch

    assert prov["torch"] == torch.__version__ and prov["numpy"] and prov["platform"] and prov["packages"]["safetensors"]
    assert prov["executable"] == sys.executable
    assert prov["command_line"].startswith(f"{sys.executable} -m fedforge run --dataset digits")
    assert prov["command"][1:] == ["run", *ARGS, "--out", "run"]
    assert prov["cwd"] == str(baseline_dir.parent)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(fedforge.__file__).parent, capture_output=True, text=True)
    if head.returncode == 0 and "site-packages" not in fedforge.__file__:
        assert prov["git_commit"].split("-")[0] == head.stdout.strip()
    else:
        assert prov["git_commit"] is None


def test_killed_and_stopped_at_many_points_resumes_bit_for_bit(baseline, tmp_path):
    run = tmp_path / "run"
    resume = ["--resume", str(run), "--no-progress"]

    # 1. SIGKILL in round 1, before the first checkpoint: nothing to resume from but the run directory
    r = _run([*ARGS, "--out", str(run)], tmp_path, die_at="client:2")
    assert r.returncode == -signal.SIGKILL
    assert _status(run)["status"] == "running" and not (run / "summary.json").exists()
    assert _ckpt_round(run) is None

    # 2. resumed from the start; SIGKILL half-way through writing the checkpoint of round 4
    r = _run(resume, tmp_path, die_at="checkpoint-write:2")
    assert r.returncode == -signal.SIGKILL
    assert _ckpt_round(run) == 2  # the previous checkpoint is intact
    assert list((run / "checkpoints").glob("*.tmp")), "the half-written file should be left behind by the kill"
    assert len(_metrics(run)) == 5  # the log ran ahead of the checkpoint (rounds 0-4)

    # 3. SIGTERM before the first client of round 4: round 3 is done, its checkpoint is written, exit code 143
    r = _signal_at(resume, tmp_path, "client:5", signal.SIGTERM)
    assert r.returncode == 143, r.stderr
    assert f"resume with: fedforge run --resume {run}" in r.stderr
    assert _status(run)["status"] == "interrupted" and _ckpt_round(run) == 3
    assert not list((run / "checkpoints").glob("*.tmp"))  # a completed write cleans up the kill's leftovers

    # 4. SIGKILL after the round-4 file is in place but before the manifest points at it
    r = _run(resume, tmp_path, die_at="checkpoint-rename:1")
    assert r.returncode == -signal.SIGKILL
    assert _ckpt_round(run) == 3

    # 5. Ctrl-C (SIGINT) in the middle of round 5: exit code 130, the round is redone on resume
    r = _signal_at(resume, tmp_path, "client:6", signal.SIGINT)
    assert r.returncode == 130, r.stderr
    assert _ckpt_round(run) == 4 and _status(run)["status"] == "interrupted"

    # 6. to the end
    r = _run(resume, tmp_path)
    assert r.returncode == 0, r.stderr
    assert _status(run)["status"] == "complete" and (run / "summary.json").is_file()
    assert _metrics(run) == baseline
    assert _status(run)["resumes"] == 5
    prov = json.loads((run / "provenance.json").read_text())
    assert len(prov["resumes"]) == 5 and "--resume" in prov["resumes"][-1]["command"]

    # 7. a completed run is not run again
    r = _run(resume, tmp_path)
    assert r.returncode == 0 and "already complete" in r.stderr
    assert _metrics(run) == baseline


def test_process_executor_killed_mid_round_resumes_bit_for_bit(baseline, tmp_path):
    from fedforge.core.executors import EXECUTORS

    if "process" not in EXECUTORS:
        pytest.skip("the process executor is not registered in this build")
    run = tmp_path / "run"
    args = [*ARGS, "--executor", "process", "--workers", "2"]
    resume = ["--resume", str(run), "--no-progress"]
    # Ctrl-C in a terminal reaches the pool workers too; the main process still stops cleanly with a checkpoint
    r = _signal_at([*args, "--out", str(run)], tmp_path, "client:10", signal.SIGINT, group=True)
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and _ckpt_round(run) == 2
    r = _run(resume, tmp_path, die_at="round:2")  # SIGKILL at the start of round 4
    assert r.returncode == -signal.SIGKILL
    assert _ckpt_round(run) == 2
    r = _run(resume, tmp_path)
    assert r.returncode == 0, r.stderr
    assert _metrics(run) == baseline  # and equal to the sequential executor's


# ---------------------------------------------------------------------------------- in-process checks
def _small_run(tmp_path: Path, *extra: str) -> Path:
    run = tmp_path / "small"
    rc = cli_main(["-q", "run", "--dataset", "digits", "--model", "mlp", "--clients", "3", "--rounds", "2",
                   "--threads", "1", "--no-progress", "--out", str(run), *extra])
    assert rc == 0
    return run


def test_resume_refuses_a_different_config_and_names_the_difference(tmp_path, capsys):
    run = _small_run(tmp_path)
    (run / "run.json").write_text(json.dumps({"status": "failed"}))  # pretend it stopped, so that resume is allowed
    (run / "summary.json").unlink()
    rc = cli_main(["run", "--resume", str(run), "--rounds", "3", "--lr", "0.1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "rounds: 2 in the run, 3 given" in err and "lr: 0.005 in the run, 0.1 given" in err
    assert "Traceback" not in err
    # options that do not change results may differ
    rc = cli_main(["-q", "run", "--resume", str(run), "--max-fail-fraction", "0.9", "--checkpoint-every", "1", "--no-progress"])
    assert rc == 0


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli_main(["run", "--resume", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["run", "--resume", str(tmp_path / "empty")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing", "metadata"])
def test_damaged_checkpoint_is_refused_with_one_sentence(tmp_path, capsys, damage):
    run = _small_run(tmp_path)
    (run / "run.json").write_text(json.dumps({"status": "interrupted"}))
    (run / "summary.json").unlink()
    ck = next((run / "checkpoints").glob("round-*.safetensors"))
    data = ck.read_bytes()
    if damage == "truncate":
        ck.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        ck.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    elif damage == "manifest":
        (run / "checkpoints" / "latest.json").write_text('{"format": "fedforge-checkpoint/1", "file": "../../x"')
    elif damage == "missing":
        ck.unlink()
    else:  # a well-formed file whose JSON part is not what a run writes
        from fedforge.core.checkpoint import save_checkpoint

        save_checkpoint(run, 1, {}, lambda: [], {"records": "not a list"})
    rc = cli_main(["run", "--resume", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert {"truncate": "truncated", "flip": "SHA-256", "manifest": "unreadable", "missing": "missing",
            "metadata": "malformed metadata"}[damage] in err
    assert "to restart the run from round 0" in err


def test_stop_request_in_process_writes_a_checkpoint(tmp_path):
    """The Python API: request_stop() (what the signal handler calls) stops after the current client."""
    from fedforge.config import build_config
    from fedforge.core.faults import RunInterrupted
    from fedforge.core.simulation import Simulation, resume_config

    cfg = dict(dataset="digits", model="mlp", clients=3, rounds=3, threads=1, checkpoint_every=0)
    full = Simulation(build_config(overrides=cfg), run_dir=False, progress=False).run()
    run = tmp_path / "stopped"
    sim = Simulation(build_config(overrides=cfg), run_dir=run, progress=False,
                     on_record=lambda r: r["round"] == 1 and sim.request_stop(signal.SIGTERM))
    with pytest.raises(RunInterrupted) as e:
        sim.run()
    assert e.value.exit_code == 143 and "after round 1 of 3" in str(e.value)
    assert _ckpt_round(run) == 1  # checkpoint_every=0 writes none on schedule, but a stop always does
    res = Simulation(resume_config(run), resume=run, progress=False).run()
    strip = lambda rows: [{k: v for k, v in r.items() if not _timing(k)} for r in rows]  # noqa: E731
    assert strip(res.records) == strip(full.records)


def test_a_run_directory_in_use_is_not_resumed_twice(tmp_path, capsys):
    from fedforge.core.simulation import _RunLock

    run = _small_run(tmp_path)
    (run / "run.json").write_text(json.dumps({"status": "running"}))
    (run / "summary.json").unlink()
    lock = _RunLock(run)  # as if another process were still working in it
    try:
        assert cli_main(["run", "--resume", str(run), "--no-progress"]) == 2
        assert f"is in use by fedforge process {os.getpid()}" in capsys.readouterr().err
    finally:
        lock.release()
    assert cli_main(["-q", "run", "--resume", str(run), "--no-progress"]) == 0


def test_resume_with_a_disk_state_store_discards_states_written_after_the_checkpoint(tmp_path):
    """A kill leaves the disk store ahead of the checkpoint (and holding clients the checkpoint never saw); the resumed
    run must start from the checkpoint's states alone."""
    import shutil

    from fedforge.config import build_config
    from fedforge.core.simulation import Simulation, resume_config

    cfg = dict(dataset="digits", model="mlp", algorithm="local", clients=6, join_ratio=0.5, rounds=4, threads=1,
               checkpoint_every=2, state_store="disk", seed=2)
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"

    def snapshot(rec: dict) -> None:
        if rec["round"] == 3:
            shutil.copytree(full_dir, part_dir)

    full = Simulation(build_config(overrides=cfg), run_dir=full_dir, progress=False, on_record=snapshot).run()
    ck = load_checkpoint(part_dir)
    assert ck.round == 2 and len(list((part_dir / "client_states").glob("client-*"))) > len(ck.client_ids)
    res = Simulation(resume_config(part_dir), resume=part_dir, progress=False).run()
    strip = lambda rows: [{k: v for k, v in r.items() if not _timing(k)} for r in rows]  # noqa: E731
    assert strip(res.records) == strip(full.records)
    assert res.store.cids() == full.store.cids()
    for cid in full.store.cids():
        a, b = full.store.get(cid), res.store.get(cid)
        assert all(torch.equal(a[k], b[k]) for k in a)
