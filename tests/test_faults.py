"""Client failures (injected and real) and the divergence guard, end to end on digits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedforge.algorithms.fedavg import FedAvg
from fedforge.cli import main as cli_main
from fedforge.config import build_config
from fedforge.core.checkpoint import load_checkpoint
from fedforge.core.executors import SequentialExecutor
from fedforge.core.faults import (
    ClientFailure,
    DivergenceError,
    FaultPlan,
    RunInterrupted,
    TooManyFailures,
    first_nonfinite,
    run_guarded,
)
from fedforge.core.injection import FaultInjector
from fedforge.core.runtime import Task, WorkerSpec
from fedforge.core.simulation import Simulation, resume_config
from tests.support.faults import hooks as fault_hooks

SMALL = dict(dataset="digits", model="mlp", clients=5, batch_size=16, lr=0.05, seed=0, threads=1)


def _sim(tmp_path: Path | None, hooks=None, **over) -> Simulation:
    return Simulation(build_config(overrides={**SMALL, **over}), run_dir=tmp_path if tmp_path else False, progress=False,
                      hooks=hooks)


def _log(run: Path) -> list[dict]:
    p = run / "failures.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


# ------------------------------------------------------------------------------------------- the plan
def test_fault_plan_is_a_function_of_seed_round_and_client():
    a, b = FaultPlan(7, 0.3), FaultPlan(7, 0.3)
    draws = [[a.draw(r, c) for c in range(20)] for r in range(1, 30)]
    assert draws == [[b.draw(r, c) for c in range(20)] for r in range(1, 30)]
    flat = [d for row in draws for d in row]
    share = sum(d is not None for d in flat) / len(flat)
    assert 0.2 < share < 0.4  # 580 draws at rate 0.3
    assert {d for d in flat if d} == {"exception", "timeout", "straggler"}
    assert all(FaultPlan(7, 0.0).draw(r, c) is None for r in range(5) for c in range(5))
    assert all(FaultPlan(7, 1.0).draw(r, c) is not None for r in range(5) for c in range(5))
    assert [FaultPlan(8, 0.3).draw(r, 0) for r in range(1, 30)] != [row[0] for row in draws]


def test_guard_turns_exceptions_into_values():
    def boom():
        raise ValueError("bad batch")

    f = run_guarded(3, 1, boom)
    assert (f.cid, f.round, f.kind, f.injected) == (1, 3, "error", False)
    assert f.error == "ValueError: bad batch" and "boom" in f.traceback
    assert run_guarded(3, 1, lambda: 42) == 42


def test_injector_fails_the_drawn_tasks_and_only_stragglers_do_the_work():
    """FaultInjector wraps a real executor: crashed and timed-out clients never reach it; stragglers run and lose."""
    sim = _sim(None, rounds=1)

    class Counting(SequentialExecutor):
        ran: list[int] = []

        def map(self, tasks):
            out = super().map(tasks)
            self.ran.extend(u.cid for u in out)
            return out

    plan = FaultPlan(0, 1.0)
    ex = FaultInjector(Counting(threads=1), plan)
    ex.start(WorkerSpec(sim.ds, sim.partition, sim.algo))
    tasks = [Task("train", c, r, sim.algo.broadcast(sim.algo.init_server(), c, r), None)
             for r in range(1, 9) for c in range(5)]
    out = ex.map(tasks)
    assert len(out) == len(tasks) and all(isinstance(o, ClientFailure) and o.injected for o in out)
    assert {o.kind for o in out} == {"exception", "timeout", "straggler"}
    assert [(o.round, o.cid, o.kind) for o in out] == [(t.round, t.cid, plan.draw(t.round, t.cid)) for t in tasks]
    assert len(Counting.ran) == sum(o.kind == "straggler" for o in out)  # only stragglers do the work (and lose it)
    clean = FaultInjector(SequentialExecutor(threads=1), FaultPlan(0, 0.0))
    clean.start(WorkerSpec(sim.ds, sim.partition, sim.algo))
    assert not any(isinstance(o, ClientFailure) for o in clean.map(tasks[:3]))


def test_first_nonfinite_names_the_tensor():
    assert first_nonfinite({"a": torch.ones(3), "n": torch.arange(3)}) is None
    assert first_nonfinite({"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")])}) == ("b", "Inf")
    assert first_nonfinite({"c": torch.tensor([float("nan"), float("inf")])}) == ("c", "NaN")


# ---------------------------------------------------------------------------------- injected failures
def test_fail_rate_03_completes_and_logs_every_injected_failure(tmp_path):
    run = tmp_path / "run"
    res = _sim(run, rounds=10, fail_rate=0.3).run()
    plan = FaultPlan(0, 0.3)
    expected = [(r, c, plan.draw(r, c)) for r in range(1, 11) for c in range(5) if plan.draw(r, c)]
    logged = [(f["round"], f["client"], f["kind"]) for f in _log(run)]
    assert logged == expected and len(expected) >= 5
    assert all(f["injected"] and f["error"] for f in _log(run))
    by_round = {r: sum(1 for x in expected if x[0] == r) for r in range(1, 11)}
    for rec in res.records[1:]:
        assert rec["clients"] == 5 - by_round[rec["round"]]  # failed clients are left out of the aggregation
        assert rec.get("failed", 0) == by_round[rec["round"]]
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert res.summary["failed_updates"] == len(expected)
    clean = _sim(None, rounds=10).run()
    assert [r["global_acc"] for r in clean.records] != [r["global_acc"] for r in res.records]


def test_fail_rate_09_stops_cleanly_with_a_resumable_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["run", "--dataset", "digits", "--model", "mlp", "--clients", "5", "--rounds", "3", "--threads", "1",
            "--fail-rate", "0.9", "--max-fail-fraction", "0.5", "--no-progress", "--out", str(run)]
    rc = cli_main(args)
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "clients failed, more than --max-fail-fraction 0.5" in err and f"--resume {run}" in err
    assert "Traceback" not in err
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "failed" and status["resumable"] and status["checkpoint_round"] == 0
    assert not (run / "summary.json").exists()
    assert load_checkpoint(run).round == 0 and len(_log(run)) >= 3
    # the checkpoint resumes; with a tolerant threshold the run goes to the end
    rc = cli_main(["-q", "run", "--resume", str(run), "--max-fail-fraction", "1", "--no-progress"])
    assert rc == 0
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    rounds = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]


def test_a_failed_client_keeps_its_previous_state(tmp_path):
    """With `local`, a client that fails in round 2 ends round 2 with exactly its round-1 state."""
    plan = FaultPlan(0, 0.5)
    cid = next(c for c in range(5) if plan.draw(1, c) is None and plan.draw(2, c) is not None)
    one = _sim(None, algorithm="local", rounds=1, fail_rate=0.5).run()
    two = _sim(None, algorithm="local", rounds=2, fail_rate=0.5, max_fail_fraction=1.0).run()
    s1, s2 = one.store.get(cid), two.store.get(cid)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    moved = next(c for c in range(5) if plan.draw(1, c) is None and plan.draw(2, c) is None)
    assert not all(torch.equal(one.store.get(moved)[k], two.store.get(moved)[k]) for k in s1)


# ---------------------------------------------------------------------------------------- real errors
def test_a_real_exception_is_logged_with_its_traceback_and_the_run_goes_on(tmp_path, monkeypatch):
    original = FedAvg.local_update

    def flaky(self, rt, msg, state):
        if rt.cid == 2 and rt.round == 2:
            raise RuntimeError("disk full while reading client 2's data")
        return original(self, rt, msg, state)

    monkeypatch.setattr(FedAvg, "local_update", flaky)
    run = tmp_path / "run"
    res = _sim(run, rounds=3).run()
    log = _log(run)
    assert [(f["round"], f["client"], f["kind"], f["injected"]) for f in log] == [(2, 2, "error", False)]
    assert log[0]["error"] == "RuntimeError: disk full while reading client 2's data"
    assert "flaky" in log[0]["traceback"]
    assert [r["clients"] for r in res.records[1:]] == [5, 4, 5]


def test_when_most_clients_raise_the_run_stops_and_keeps_the_cause(tmp_path, monkeypatch):
    def broken(self, rt, msg, state):
        raise KeyError("features.9.weight")

    monkeypatch.setattr(FedAvg, "local_update", broken)
    with pytest.raises(TooManyFailures) as e:
        _sim(tmp_path / "run", rounds=2).run()
    assert "5 of 5 clients failed" in str(e.value) and "KeyError" in str(e.value)
    assert isinstance(e.value.__cause__, KeyError)  # the original traceback stays reachable


# ----------------------------------------------------------------------------------- divergence guard
def test_a_nan_injected_into_one_upload_is_caught_and_named(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(DivergenceError) as e:
        _sim(run, rounds=3, checkpoint_every=1, hooks=fault_hooks(nan_at=(2, 3))).run()
    msg = str(e.value)
    assert "round 2, client 3: uploaded tensor 'features.1.weight' holds NaN" in msg
    assert "checkpoint of round 1 is kept" in msg
    assert load_checkpoint(run).round == 1
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert [(f["round"], f["client"], f["kind"]) for f in _log(run)] == [(2, 3, "nonfinite")]


def test_on_nan_skip_leaves_the_offending_client_out(tmp_path):
    run = tmp_path / "run"
    res = _sim(run, rounds=3, on_nan="skip", hooks=fault_hooks(nan_at=(2, 3))).run()
    assert [r["clients"] for r in res.records[1:]] == [5, 4, 5]
    assert all(torch.isfinite(v).all() for v in res.server.values() if v.is_floating_point())
    assert [(f["round"], f["client"], f["kind"]) for f in _log(run)] == [(2, 3, "nonfinite")]


def test_a_diverging_learning_rate_stops_with_the_loss_named(tmp_path, capsys):
    rc = cli_main(["run", "--dataset", "digits", "--model", "mlp", "--clients", "3", "--rounds", "2", "--lr", "1e30",
                   "--threads", "1", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 3
    assert "the run diverged: round 1, client 0: the training loss is NaN" in err and "Traceback" not in err


def test_a_nan_in_the_aggregated_server_state_is_named(monkeypatch):
    def poisoned(self, server, updates, rnd):
        out = FedAvg.__mro__[1].aggregate(self, server, updates, rnd)
        if rnd == 2:
            out["head.bias"] = out["head.bias"] / 0.0 * 0.0
        return out

    monkeypatch.setattr(FedAvg, "aggregate", poisoned)
    with pytest.raises(DivergenceError, match=r"round 2: the aggregated server state tensor 'head.bias' holds NaN"):
        _sim(None, rounds=3).run()


def test_resume_after_a_stop_reproduces_the_failures_of_an_uninterrupted_run(tmp_path):
    """Injected failures depend only on (seed, round, client): a resumed run injects exactly the same ones."""
    full = _sim(tmp_path / "full", rounds=4, fail_rate=0.3, checkpoint_every=2).run()
    run = tmp_path / "part"
    sim = Simulation(build_config(overrides={**SMALL, "rounds": 4, "fail_rate": 0.3, "checkpoint_every": 2}),
                     run_dir=run, progress=False, on_record=lambda r: r["round"] == 3 and sim.request_stop())
    with pytest.raises(RunInterrupted):
        sim.run()
    res = Simulation(resume_config(run), resume=run, progress=False).run()
    assert _log(run) == _log(tmp_path / "full")
    assert [r["global_acc"] for r in res.records] == [r["global_acc"] for r in full.records]
