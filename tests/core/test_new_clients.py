"""Unseen clients (--new-clients N --fine-tune-epochs E, PFLlib's -nnc/-ften): kept out of every round, they
fine-tune the final global model after the last round and are evaluated before and after."""
from __future__ import annotations

import json

import pytest

from fedforge.cli import main as cli_main
from fedforge.config import build_config
from fedforge.core.faults import RunInterrupted
from fedforge.core.simulation import SessionHooks, Simulation
from fedforge.data import Partition
from fedforge.errors import ConfigError

BASE = dict(dataset="digits", model="mlp", lr=0.05, batch_size=16, seed=3, eval_every=1)


def _cfg(**kw):
    return build_config(overrides={**BASE, **kw})


def _strip(records):
    """Records without wall-clock measurements (they differ from run to run)."""
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


class _Selections:
    def __init__(self):
        self.seen: set[int] = set()

    def round_started(self, rnd, active, dropped):
        self.seen |= set(active) | set(dropped)


def test_participants_train_exactly_as_a_run_on_their_own_partition(tmp_path):
    """25 clients of which 5 are new train, select, aggregate and score exactly as a run on the 20 participants' part
    of the same partition (SCAFFOLD divides by the number of clients; half of them join each round)."""
    sel = _Selections()
    cfg = _cfg(algorithm="scaffold", clients=12, new_clients=4, fine_tune_epochs=1, rounds=2, join_ratio=0.5,
               partition="dirichlet", alpha=0.5)
    sim = Simulation(cfg, run_dir=tmp_path / "with", progress=False, hooks=SessionHooks(listeners=[sel]))
    res = sim.run()
    assert sim.ctx.num_clients == 8 and sel.seen <= set(range(8)) and len(sel.seen) > 4
    full = sim.partition
    own = Partition(full.train[:8], full.test[:8], full.scheme, full.params, full.seed, full.fingerprint)
    own.save(tmp_path / "own.npz")
    alone = Simulation(_cfg(algorithm="scaffold", clients=8, rounds=2, join_ratio=0.5,
                            partition_file=str(tmp_path / "own.npz")), run_dir=tmp_path / "alone", progress=False).run()
    participants = [r for r in res.records if r.get("stage") != "new_clients"]
    assert _strip(participants) == _strip(alone.records)  # bit for bit, test samples counted over participants only
    for key in ("best", "last", "mean_last5"):
        assert res.summary[key] == alone.summary[key]
    assert res.summary["clients"] == 8
    (rec,) = [r for r in res.records if r.get("stage") == "new_clients"]
    assert rec["new_clients"] == [8, 9, 10, 11] and rec["round"] == 2
    logged = [json.loads(line) for line in (res.path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["stage"] == "new_clients" and _strip(logged) == _strip(res.records)
    summary = json.loads((res.path / "summary.json").read_text())
    assert summary["new_clients"]["clients"] == [8, 9, 10, 11]
    assert summary["new_clients"]["before"] == rec["before_acc"] and summary["new_clients"]["after"] == rec["after_acc"]


def test_new_clients_never_train_and_fine_tuning_raises_their_accuracy():
    """A label-skewed split (two classes per client): the global model fits a new client's classes poorly; five
    epochs on its own data fit them better. New clients keep no state (Ditto's participants keep personal models)."""
    res = Simulation(_cfg(algorithm="ditto", clients=10, new_clients=3, fine_tune_epochs=5, rounds=3,
                          partition="pathological", classes_per_client=2), run_dir=False, progress=False).run()
    assert sorted(res.store.cids()) == list(range(7))
    rec = res.records[-1]
    assert rec["stage"] == "new_clients" and rec["new_clients"] == [7, 8, 9] and rec["fine_tune_epochs"] == 5
    assert rec["after_acc"] > rec["before_acc"]
    assert rec["after_acc_clients"] != rec["before_acc_clients"]
    assert res.summary["new_clients"]["per_client"]["after"] == rec["after_acc_clients"]
    assert res.summary["last"]["round"] == 3 and "stage" not in res.summary["last"]  # the participants' last record


def test_without_fine_tuning_after_equals_before_and_domains_are_reported():
    res = Simulation(_cfg(algorithm="fedavg", clients=8, new_clients=2, rounds=1, partition="domains",
                          domains="rotate:0,90", domain_label_skew="pathological", classes_per_client=3),
                     run_dir=False, progress=False).run()
    rec = res.records[-1]
    assert rec["new_clients"] == [6, 7] and rec["fine_tune_epochs"] == 0
    assert rec["after_acc"] == rec["before_acc"] and rec["after_acc_clients"] == rec["before_acc_clients"]
    assert rec["before_acc_domain/rot0"] == rec["before_acc_clients"][0]  # client 6: rot0, client 7: rot90
    assert rec["before_acc_domain/rot90"] == rec["before_acc_clients"][1]
    assert res.summary["new_clients"]["domains"]["after_acc_domain/rot90"] == rec["after_acc_domain/rot90"]


def test_zero_new_clients_changes_nothing():
    plain = build_config(overrides={**BASE, "rounds": 2, "clients": 5})
    zero = _cfg(rounds=2, clients=5, new_clients=0, fine_tune_epochs=0)
    assert plain.identity() == zero.identity()
    assert not {"new_clients", "fine_tune_epochs", "domains", "clients_per_domain", "domain_label_skew"} & set(zero.identity())
    a = Simulation(plain, run_dir=False, progress=False).run()
    b = Simulation(zero, run_dir=False, progress=False).run()
    assert _strip(a.records) == _strip(b.records)
    assert all(r.get("stage") != "new_clients" for r in b.records) and "new_clients" not in b.summary
    assert not any("_acc_domain/" in k for r in b.records for k in r)


def test_resume_between_the_last_round_and_the_new_client_stage(tmp_path):
    kw = dict(algorithm="fedavg", clients=6, new_clients=2, fine_tune_epochs=2, rounds=2)
    whole = Simulation(_cfg(**kw), run_dir=tmp_path / "whole", progress=False).run()

    class StopAfterLastRound:
        sim: Simulation

        def round_finished(self, rnd, prog):
            if rnd == 2:
                self.sim.request_stop()

    stopper = StopAfterLastRound()
    sim = Simulation(_cfg(**kw), run_dir=tmp_path / "cut", progress=False, hooks=SessionHooks(listeners=[stopper]))
    stopper.sim = sim
    with pytest.raises(RunInterrupted):
        sim.run()
    logged = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in logged] == [0, 1, 2] and all("stage" not in r for r in logged)
    again = Simulation(_cfg(**kw), resume=tmp_path / "cut", progress=False).run()
    assert _strip(again.records) == _strip(whole.records)
    assert again.summary["new_clients"] == whole.summary["new_clients"]


def test_refusals_are_one_sentence(tmp_path, capsys):
    with pytest.raises(ConfigError, match="leaves none of the 4 clients"):
        Simulation(_cfg(clients=4, new_clients=4, rounds=1), run_dir=False, progress=False)
    rc = cli_main(["run", "--algorithm", "fedper", "--dataset", "digits", "--clients", "4", "--new-clients", "1",
                   "--rounds", "1", "--model", "mlp", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fedforge: error:")]
    assert rc == 2 and len(lines) == 1 and "keeps no global model" in lines[0], err
