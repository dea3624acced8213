"""Matched runs against the reference code: PFLlib's own ``main.py`` and fedforge on the same split, side by side.

Usage (issue 18, item 3):

    scripts/cpu-slot .venv/bin/python benchmarks/reference_runs.py --scenario mnist [--only pfllib|fedforge]
        [--algorithms fedavg,ditto] [--seeds 0,1,2] [--rounds N] [--no-run]

Scenarios: ``mnist`` is PFLlib's MNIST split (``$FEDFORGE_DATA/pfllib-mnist``, already in PFLlib's layout), 20
rounds, 14 algorithms; ``cifar100`` is CIFAR-100 Dir(0.1) over 20 clients (seed-0 partition) exported with
``fedforge partition ... --export-pfllib DIR``, 50 rounds, 7 algorithms, fedforge with seeds 0, 1, 2. Both: the
4-layer CNN, batch 10, lr 0.005, one local epoch, every client every round, one evaluation per round.

**PFLlib** runs unmodified, as a subprocess, from a scratch work tree outside the repository's tracked files
(``OUT/<scenario>/pfllib/``): ``system/`` is a copy of ``$FEDFORGE_REFERENCE_CODE/pfllib/system`` (refreshed on
every call, ``__pycache__`` left out), and ``dataset/<NAME>`` a symbolic link to the split (PFLlib reads
``../dataset/<NAME>/{train,test}/<i>.npz`` from its working directory ``system/``; ``NAME`` decides the CNN's first
linear layer: ``MNIST`` → 1024, ``Cifar100`` → 1600). It needs ``h5py`` and ``calmsize`` (its memory reporter
runs at the end of ``main.py``); ``cvxpy`` (imported by FedPAC's server only, which is not run here) is given a
stand-in module on ``PYTHONPATH`` when it is not installed. Per-round accuracies are parsed from its stdout (which
evaluation each line belongs to) and taken at full precision from its ``results/*.h5`` when the two agree in
length; ``OUT/<scenario>/pfllib/runs/<algo>/result.json`` holds them. PFLlib cannot resume: an interrupted PFLlib
run starts again from round 0 on the next call; a finished one (``result.json``) is kept.

**fedforge** runs through :class:`fedforge.sweep.Sweep` on ``pfllib:DIR`` (the same files; the ``pfllib:`` source
normalises with 0.5/0.5 as PFLlib does), one run directory per algorithm and seed under ``OUT/<scenario>/fedforge``;
finished runs are kept, interrupted ones resume from their last checkpoint.

**Same evaluation.** PFLlib evaluates at the start of each loop iteration ``i = 0 … gr``, after ``send_models``
and before training: its "Round number: i" judges the model after ``i`` aggregations, which is fedforge's record
``round = i`` (fedforge records round 0 before training and one record after each of its ``R`` rounds). So both
codes are compared on evaluations 0 … R (PFLlib trains an (R+1)-th round that it never evaluates). Both pool
accuracy over all clients' test samples (Σ correct / Σ samples: PFLlib's ``Server.evaluate``, fedforge's
``summarize_counts``). The statistic is the best and the last of those pooled accuracies, in one view per method:
the global model for FedAvg, FedProx and SCAFFOLD, each client's personal model for the pFL methods (PFLlib's
Ditto appends its global and personal evaluations to one list: only its personal ones are used; FedBABU's
evaluation after fine-tuning counts as its last, in both codes).

The script writes ``docs/benchmarks/reference-<...>.md`` (rebuilt from whatever has finished, with a
"running"/"missing" marker for the rest, so it can be committed as results arrive; text below ``<!-- notes -->``
is kept) and one PNG of the curves of both codes per method. ``--no-run`` only rebuilds them.
Thread use: one torch thread per process (``scripts/cpu-slot`` sets ``OMP_NUM_THREADS=1``, which PFLlib's torch
honours; fedforge runs with ``torch.set_num_threads(1)``). Run two scenarios (or ``--only`` sides) at once in two
``scripts/cpu-slot`` slots.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

import _pfllib  # noqa: E402  (PFLlib's main.py as a subprocess, shared with gpu_check.py)
from _pfllib import CVXPY_STANDIN, _importable, parse_pfllib_stdout, read_h5_acc  # noqa: E402,F401

DATA = Path(os.environ.get("FEDFORGE_DATA", REPO.parent / "shared" / "data"))
REFERENCE = Path(os.environ.get("FEDFORGE_REFERENCE_CODE", REPO.parent / "shared" / "reference-code"))
TOLERANCE = 1.5  # points: fedforge must lie within max(TOLERANCE, 2 std of its seeds) of PFLlib


# ------------------------------------------------------------------------------------------ the mapping
@dataclass(frozen=True)
class Entry:
    """One algorithm in both codes: fedforge's name, hyper-parameters (and run options, where one differs), PFLlib's
    ``-algo`` name and flags, the view compared, and why the two are not the same computation where they are not."""

    name: str
    pf_algo: str
    view: str  # "global" or "personalized"
    ff_params: dict = field(default_factory=dict)
    pf_flags: tuple = ()
    ff_options: dict = field(default_factory=dict)
    pf_label: str = ""  # substring of PFLlib's "Evaluate ..." line to use when a round has several evaluations
    note: str = ""


MAPPING: dict[str, Entry] = {e.name: e for e in [
    Entry("fedavg", "FedAvg", "global",
          note="fedforge averages BatchNorm buffers with the weights; the 4-layer CNN has none, so nothing differs."),
    Entry("fedprox", "FedProx", "global", {"mu": 0.01}, ("-mu", "0.01"),
          note="PFLlib's default -mu 0 is FedAvg; both run fedforge's μ = 0.01."),
    Entry("scaffold", "SCAFFOLD", "global", {"server_lr": 1.0}, ("-slr", "1.0")),
    Entry("ditto", "Ditto", "personalized", {"lamda": 1.0}, ("-mu", "1.0", "-pls", "1"), pf_label="personalized",
          note="PFLlib's -mu is Ditto's λ; one personal epoch per local epoch in both (fedforge replays the round's "
               "batches for the personal model, PFLlib draws its own). PFLlib appends global and personal accuracies "
               "to one list; only the personal ones are compared."),
    Entry("fedrep", "FedRep", "personalized", {"head_epochs": 10}, ("-pls", "10"),
          note="10 head epochs (the FedRep paper's, fedforge's default) in both; PFLlib's default is -pls 1."),
    Entry("fedper", "FedPer", "personalized"),
    Entry("fedbabu", "FedBABU", "personalized", {"finetune_epochs": 5, "finetune_part": "full"}, ("-fte", "5"),
          note="5 fine-tuning epochs of the whole model (the paper's; PFLlib's default is 10). PFLlib fine-tunes after "
               "its (R+1)-th training round, fedforge after its R-th."),
    Entry("apfl", "APFL", "personalized", {"alpha": 0.5, "adaptive": True}, ("-al", "0.5"),
          note="Departure on purpose (apfl.py): fedforge trains v and α through the mixture α·v + (1−α)·w as the "
               "paper does; PFLlib trains v on its own loss, adds 0.02·α to α's gradient and overwrites v with the "
               "mixture. The global model w is the same computation."),
    Entry("per_fedavg", "PerAvg", "personalized", {"variant": "fo", "alpha": 0.005, "beta": 0.005}, ("-bt", "0.005"),
          ff_options={"local_epochs": 2},
          note="PFLlib's Per-FedAvg ignores -bt (its outer step is -lr, #106), is first-order, and trains twice per "
               "round (#237). fedforge's defaults (HF, α 0.01, β 0.001, one pass) cannot be passed to it, so fedforge "
               "runs PFLlib's computation: variant fo, α = β = 0.005, local_epochs 2 (as its step-equivalence test)."),
    Entry("fedproto", "FedProto", "personalized", {"lam": 1.0}, ("-lam", "1.0"),
          note="fedforge computes the uploaded prototypes with the trained model in eval mode (the paper); PFLlib "
               "collects them during training."),
    Entry("fedala", "FedALA", "personalized", {"eta": 1.0, "rand_percent": 80.0, "layer_idx": 2},
          ("-et", "1.0", "-p", "2", "-s", "80"),
          note="Both evaluate after the next round's ALA. fedforge draws D_s as a uniform random subset and bounds the "
               "first ALA at 50 epochs with epoch-mean losses; PFLlib takes a random contiguous slice and stops on "
               "last-batch losses."),
    Entry("fedcp", "FedCP", "personalized", {"lam": 5.0, "tau": 1.0}, ("-lam", "5.0"),
          note="fedforge evaluates the noise-free policy (PFLlib samples Gumbel noise at test time) and derives a "
               "client's first context vector from its initial head (PFLlib: uniform random)."),
    Entry("gpfl", "GPFL", "personalized", {"lam": 0.01, "mu": 0.1}, ("-lam", "0.01", "-mu", "0.1"),
          note="Two documented differences (gpfl.py): the conditional inputs come from the received GCE (PFLlib: the "
               "client's previous GCE, zeros before its first aggregation), and the magnitude term is the batch mean "
               "of per-sample L2 distances (PFLlib: one norm over the batch, ≈ √B larger)."),
    Entry("feddbe", "FedDBE", "personalized", {"kappa": 50.0, "momentum": 1.0}, ("-mo", "1.0", "-klw", "50.0"),
          note="PFLlib's defaults (-mo 0.1, -klw 0) switch the mean regulariser off; both run the authors' -mo 1 "
               "-klw 50. PFLlib runs the warm-up in its server's constructor and discards its models; fedforge's "
               "warm-up is its round 1, so at round r fedforge has had one DBE round fewer."),
]}


@dataclass
class Scenario:
    name: str
    title: str
    pf_name: str  # PFLlib's dataset NAME (decides its CNN's input size)
    num_classes: int
    rounds: int
    algorithms: list[str]
    seeds: list[int]
    table: Path
    data_dir: Path | None = None  # a folder in PFLlib's layout; None: made by ``export``
    export: list[str] | None = None  # `fedforge partition` options that make the split (cifar100)
    num_clients: int = 20
    batch_size: int = 10
    lr: float = 0.005
    local_epochs: int = 1
    description: str = ""
    beats: tuple = ()  # (methods that should beat, the methods they should beat)

    @property
    def plot(self) -> Path:
        return self.table.with_suffix(".png")


def scenarios(out: Path) -> dict[str, Scenario]:
    return {
        "mnist": Scenario(
            "mnist", "Matched runs: PFLlib and fedforge on PFLlib's MNIST split", "MNIST", 10, 20,
            ["fedavg", "fedprox", "scaffold", "ditto", "fedrep", "fedper", "fedbabu", "apfl", "per_fedavg", "fedproto",
             "fedala", "fedcp", "gpfl", "feddbe"], [0], REPO / "docs/benchmarks/reference-pfllib-mnist.md",
            data_dir=DATA / "pfllib-mnist",
            description="PFLlib's own MNIST split (`$FEDFORGE_DATA/pfllib-mnist`: 20 clients, Dirichlet 0.1, 75/25 "
                        "train/test per client), used as-is by both codes"),
        "cifar100": Scenario(
            "cifar100", "Matched runs: PFLlib and fedforge on CIFAR-100 Dir(0.1)", "Cifar100", 100, 50,
            ["fedavg", "ditto", "fedrep", "fedala", "fedcp", "gpfl", "feddbe"], [0, 1, 2],
            REPO / "docs/benchmarks/reference-cifar100.md",
            export=["--dataset", "cifar100", "--partition", "dirichlet", "--alpha", "0.1", "--clients", "20",
                    "--seed", "0", "--batch-size", "10"],
            description="CIFAR-100, Dirichlet(0.1) over 20 clients (fedforge's seed-0 partition, 75/25 train/test per "
                        "client), exported once with `fedforge partition --export-pfllib` and read by both codes "
                        "from that folder",
            beats=(("fedala", "fedcp", "gpfl", "feddbe"), ("ditto", "fedrep"))),
    }


# ------------------------------------------------------------------------------------------ the split
def export_split(sc: Scenario, out: Path) -> Path:
    """The scenario's folder in PFLlib's layout: given, or exported once by `fedforge partition` (kept after)."""
    if sc.data_dir is not None:
        if not (Path(sc.data_dir) / "config.json").is_file():
            raise SystemExit(f"reference_runs: {sc.data_dir} holds no PFLlib split (config.json); set FEDFORGE_DATA.")
        return Path(sc.data_dir)
    target = out / sc.name / "export"
    if (target / "config.json").is_file():
        return target
    cmd = [sys.executable, "-m", "fedforge", "partition", *sc.export, "--data-root", str(DATA),
           "--out", str(out / sc.name / "partition"), "--export-pfllib", str(target)]
    print("export: " + shlex.join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=REPO)
    return target


def split_clients(data_dir: Path) -> int:
    """How many clients a split in PFLlib's layout has (its config.json; PFLlib's -nc must say the same)."""
    return int(json.loads((Path(data_dir) / "config.json").read_text())["num_clients"])


# ------------------------------------------------------------------------------------------ PFLlib's side
# PFLlib's work tree, its stand-in modules and the parsing of its output are shared with benchmarks/gpu_check.py:
# they live in benchmarks/_pfllib.py (the names below keep working here).
def pfllib_system() -> Path:
    return _pfllib.pfllib_system(REFERENCE)


def setup_worktree(work: Path, data_dir: Path, pf_name: str) -> Path:
    """``work/{system, dataset/<pf_name>, results, standins}`` for PFLlib; returns ``work/system`` (its cwd). PFLlib
    needs h5py and calmsize here (its results file is read back); cvxpy gets a stand-in when missing."""
    return _pfllib.setup_worktree(work, data_dir, pf_name, reference=REFERENCE, standins=("cvxpy",))


def pfllib_command(sc: Scenario, e: Entry, rounds: int, device: str = "cpu") -> list[str]:
    return ["main.py", "-data", sc.pf_name, "-ncl", str(sc.num_classes), "-m", "CNN", "-algo", e.pf_algo,
            "-gr", str(rounds), "-nc", str(sc.num_clients), "-jr", "1.0", "-lbs", str(sc.batch_size),
            "-lr", str(sc.lr), "-ls", str(sc.local_epochs), "-eg", "1", "-dev", device, "-t", "1",
            "-go", sc.name, "-sfn", f"items/{e.pf_algo}", *e.pf_flags]


def select_view(evals: list[dict], e: Entry) -> list[dict]:
    """The evaluations of one view: per round the one whose label holds ``e.pf_label`` (or the only one), plus a
    fine-tuned one."""
    out = []
    for ev in evals:
        if ev.get("stage") == "finetune" or not e.pf_label or e.pf_label in ev["label"]:
            out.append(ev)
    return out


def pf_paths(out: Path, sc: Scenario, algo: str) -> Path:
    return out / sc.name / "pfllib" / "runs" / algo


def run_pfllib(sc: Scenario, e: Entry, out: Path, data_dir: Path, rounds: int, device: str = "cpu") -> dict:
    """Run PFLlib's main.py for ``e`` (unless its result.json exists); returns the result."""
    run = pf_paths(out, sc, e.name)
    result_file = run / "result.json"
    if result_file.is_file():
        res = json.loads(result_file.read_text())
        if res.get("status") == "complete" and res.get("rounds") == rounds:
            print(f"pfllib {e.name}: finished earlier, kept ({result_file})", file=sys.stderr)
            return res
    work = out / sc.name / "pfllib"
    system = setup_worktree(work, data_dir, sc.pf_name)
    run.mkdir(parents=True, exist_ok=True)
    h5 = work / "results" / f"{sc.pf_name}_{e.pf_algo}_{sc.name}_0.h5"
    if h5.exists():
        h5.unlink()
    cmd = [sys.executable, *pfllib_command(sc, e, rounds, device)]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    standins = work / "standins"
    if standins.is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(standins), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    log = run / "stdout.log"
    (run / "pid").write_text(f"{os.getpid()}\n")
    print(f"pfllib {e.name}: running (cd {system} && {shlex.join(cmd)}) > {log}", file=sys.stderr)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=system, stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        try:
            rc = proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
    seconds = time.time() - t0
    (run / "pid").unlink(missing_ok=True)
    evals = parse_pfllib_stdout(log.read_text(errors="replace"))
    h5_acc = read_h5_acc(h5)
    full = h5_acc is not None and len(h5_acc) == len(evals) and \
        all(abs(a - ev["acc"]) <= 6e-5 for a, ev in zip(h5_acc, evals))
    if full:
        for a, ev in zip(h5_acc, evals):
            ev["acc"] = a
    res = {"algorithm": e.name, "pfllib_algorithm": e.pf_algo, "status": "complete" if rc == 0 else "failed",
           "returncode": rc, "rounds": rounds, "seconds": round(seconds, 1),
           "command": f"cd {system} && {shlex.join(cmd)}", "pfllib_code": str(pfllib_system()),
           "precision": "h5 (full)" if full else "stdout (4 decimals)", "evaluations": evals,
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    result_file.write_text(json.dumps(res, indent=1) + "\n")
    print(f"pfllib {e.name}: {res['status']} in {seconds / 60:.1f} min", file=sys.stderr)
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        print("\n".join(tail), file=sys.stderr)
    return res


def _die_with_parent() -> None:
    """In PFLlib's process, before exec: ask Linux to end it when this script dies (SIGKILL included), so that a
    killed script never leaves a PFLlib run writing into the log of the run that replaces it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def pfllib_status(out: Path, sc: Scenario, e: Entry, rounds: int) -> tuple[str, dict | None]:
    """('complete', result) | ('failed', result) | ('running', partial) | ('missing', None)."""
    run = pf_paths(out, sc, e.name)
    f = run / "result.json"
    if f.is_file():
        res = json.loads(f.read_text())
        if res.get("rounds") == rounds:
            return res["status"], res
    log = run / "stdout.log"
    pid = run / "pid"
    if pid.is_file() and log.is_file():
        try:
            os.kill(int(pid.read_text().strip()), 0)
            alive = True
        except (ValueError, ProcessLookupError, PermissionError):
            alive = False
        evals = parse_pfllib_stdout(log.read_text(errors="replace"))
        return ("running" if alive else "interrupted"), {"evaluations": evals}
    return "missing", None


# ------------------------------------------------------------------------------------------ fedforge's side
def ff_overrides(sc: Scenario, data_dir: Path, rounds: int, device: str) -> dict:
    return {"dataset": f"pfllib:{Path(data_dir).resolve()}", "model": "cnn", "clients": sc.num_clients,
            "batch_size": sc.batch_size, "lr": sc.lr, "local_epochs": sc.local_epochs, "rounds": rounds,
            "join_ratio": 1.0, "eval_every": 1, "threads": 1, "device": device, "checkpoint_every": 5,
            "data_root": str(DATA)}


def ff_dir(out: Path, sc: Scenario) -> Path:
    return out / sc.name / "fedforge"


def run_fedforge(sc: Scenario, algos: list[str], seeds: list[int], out: Path, data_dir: Path, rounds: int,
                 device: str, on_finish: Callable[[], None]) -> None:
    import torch

    from fedforge.sweep import Point, Sweep

    torch.set_num_threads(1)
    points = [Point(f"{a}_s{s}", s, {"algorithm": a, **MAPPING[a].ff_options}, dict(MAPPING[a].ff_params))
              for s in seeds for a in algos]
    sweep = Sweep(ff_dir(out, sc), points, overrides=ff_overrides(sc, data_dir, rounds, device), bar=False,
                  say=lambda m: print(f"fedforge {m}", file=sys.stderr))
    results = sweep.run(on_finish=lambda r: on_finish())
    for r in results:
        if r.status == "failed":
            print(f"fedforge {r.point.name}: failed: {r.error}", file=sys.stderr)


def ff_status(out: Path, sc: Scenario, algo: str, seed: int) -> tuple[str, list[dict], dict]:
    """('complete' | 'running' | 'interrupted' | 'failed' | 'missing', records, summary)."""
    from fedforge.results.rundir import RunDir, load_run
    from fedforge.sweep import run_state

    path = ff_dir(out, sc) / f"{algo}_s{seed}"
    state = run_state(path) if path.exists() else "fresh"
    if state == "complete":
        _, summary, records = load_run(path)
        return "complete", records, summary
    if state in ("fresh", "stale"):
        return "missing", [], {}
    rd = RunDir(path)
    try:
        records = rd.read_metrics()
    except Exception:
        records = []
    status = rd.status or "interrupted"
    if status == "failed":
        return status, records, {}
    return ("running" if _locked(path / ".lock") else "interrupted"), records, {}


def _locked(lock: Path) -> bool:
    """Whether a process holds the run directory's flock (fedforge's run lock) now."""
    import fcntl

    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


# ------------------------------------------------------------------------------------------ curves and table
def pf_curve(evals: list[dict], e: Entry) -> tuple[dict[int, float], float | None]:
    """{round: accuracy in %} of the compared view, and the fine-tuned accuracy (FedBABU) or None."""
    curve, ft = {}, None
    for ev in select_view(evals, e):
        if ev.get("stage") == "finetune":
            ft = 100 * ev["acc"]
        else:
            curve[ev["round"]] = 100 * ev["acc"]
    return curve, ft


def ff_curve(records: list[dict], e: Entry) -> tuple[dict[int, float], float | None]:
    key = "global_acc" if e.view == "global" else "personalized_acc"
    curve, ft = {}, None
    for r in records:
        v = r.get(key)
        if v is None:
            continue
        if r.get("stage") == "finetune":
            ft = 100 * v
        else:
            curve[int(r["round"])] = 100 * v
    return curve, ft


def best_last(curve: dict[int, float], ft: float | None) -> tuple[float | None, float | None]:
    vals = list(curve.values()) + ([ft] if ft is not None else [])
    if not vals:
        return None, None
    last = ft if ft is not None else curve[max(curve)]
    return max(vals), last


def mean_std(vals: list[float]) -> tuple[float | None, float]:
    if not vals:
        return None, 0.0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


@dataclass
class Row:
    algo: str
    pf_state: str
    pf_best: float | None = None
    pf_last: float | None = None
    pf_rounds: int = 0
    pf_minutes: float | None = None
    pf_curve: dict = field(default_factory=dict)
    pf_ft: float | None = None
    ff_states: dict = field(default_factory=dict)  # seed -> state
    ff_best: list = field(default_factory=list)
    ff_last: list = field(default_factory=list)
    ff_curves: list = field(default_factory=list)  # of (curve, ft) of complete seeds
    ff_minutes: list = field(default_factory=list)
    ff_partial_rounds: dict = field(default_factory=dict)


def collect(sc: Scenario, out: Path, rounds: int, seeds: list[int], algos: list[str]) -> list[Row]:
    rows = []
    for a in algos:
        e = MAPPING[a]
        state, res = pfllib_status(out, sc, e, rounds)
        row = Row(a, state)
        if res is not None:
            curve, ft = pf_curve(res.get("evaluations", []), e)
            row.pf_curve, row.pf_ft = curve, ft
            row.pf_rounds = max(curve) if curve else 0
            if state == "complete":
                row.pf_best, row.pf_last = best_last(curve, ft)
                row.pf_minutes = res.get("seconds", 0) / 60
        for s in seeds:
            st, records, summary = ff_status(out, sc, a, s)
            row.ff_states[s] = st
            curve, ft = ff_curve(records, e)
            if st == "complete":
                b, l = best_last(curve, ft)
                row.ff_best.append(b)
                row.ff_last.append(l)
                row.ff_curves.append((curve, ft))
                secs = (records[-1].get("seconds") if records else None) or summary.get("seconds")
                if secs:
                    row.ff_minutes.append(secs / 60)
            elif curve:
                row.ff_partial_rounds[s] = max(curve)
        rows.append(row)
    return rows


def _f(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def pf_cell(row: Row, key: str, rounds: int) -> str:
    if row.pf_state == "complete":
        return _f(getattr(row, key))
    if row.pf_state == "failed":
        return "failed"
    if row.pf_state in ("running", "interrupted"):
        return f"{row.pf_state} (round {row.pf_rounds}/{rounds})" if row.pf_curve else row.pf_state
    return "missing"


def ff_cell(row: Row, vals: list[float], seeds: list[int], rounds: int) -> str:
    m, s = mean_std(vals)
    pending = [(f"s{k}: " if len(seeds) > 1 else "") + st
               + (f" (round {row.ff_partial_rounds[k]}/{rounds})" if k in row.ff_partial_rounds else "")
               for k, st in row.ff_states.items() if st != "complete"]
    if m is None:
        states = {st for st in row.ff_states.values()}
        if len(states) == 1 and not row.ff_partial_rounds:  # e.g. every seed missing
            return states.pop() + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else "")
        return "; ".join(pending) if pending else "missing"
    text = f"{m:.2f} ± {s:.2f}" if len(vals) > 1 else f"{m:.2f}"
    if len(seeds) > 1:
        text += f" (n={len(vals)})"
    if pending:
        text += " [" + "; ".join(pending) + "]"
    return text


def verdict(pf: float | None, vals: list[float]) -> tuple[str, str]:
    m, s = mean_std(vals)
    if pf is None or m is None:
        return "-", "-"
    d = m - pf
    tol = max(TOLERANCE, 2 * s)
    return f"{d:+.2f}", ("yes" if abs(d) <= tol else "**no**") + f" (±{tol:.2f})"


def beats_table(sc: Scenario, rows: list[Row]) -> list[str]:
    if not sc.beats:
        return []
    by = {r.algo: r for r in rows}
    winners, losers = sc.beats
    heads = ["method"] + [f"PFLlib > {MAPPING[b].pf_algo}" for b in losers] + \
        [f"fedforge > {MAPPING[b].pf_algo}" for b in losers]
    lines = ["", f"**Do {', '.join(MAPPING[w].pf_algo for w in winners)} beat "
             f"{' and '.join(MAPPING[b].pf_algo for b in losers)} at {sc.rounds} rounds?** Best personalized accuracy "
             "(fedforge: mean over its finished seeds); the margin in points. Where the reference itself does not, "
             "that is a finding about the setting, not about fedforge.", "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]

    def cmp(a: float | None, b: float | None) -> str:
        if a is None or b is None:
            return "pending"
        return ("yes" if a > b else "**no**") + f" ({a - b:+.2f})"

    for w in winners:
        r = by.get(w)
        if r is None:
            continue
        cells = [MAPPING[w].pf_algo]
        cells += [cmp(r.pf_best, by[b].pf_best if b in by else None) for b in losers]
        cells += [cmp(mean_std(r.ff_best)[0], mean_std(by[b].ff_best)[0] if b in by else None) for b in losers]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def mapping_table(algos: list[str]) -> list[str]:
    lines = ["| method | fedforge hyper-parameters | fedforge run options | PFLlib `-algo` | PFLlib flags | view |",
             "|---|---|---|---|---|---|"]
    for a in algos:
        e = MAPPING[a]
        hp = ", ".join(f"{k}={v}" for k, v in e.ff_params.items()) or "-"
        opts = ", ".join(f"{k}={v}" for k, v in e.ff_options.items()) or "-"
        flags = f"`{' '.join(e.pf_flags)}`" if e.pf_flags else "-"
        view = e.view + (f" (PFLlib's \"{e.pf_label}\" evaluations)" if e.pf_label else "")
        lines.append(f"| {a} | {hp} | {opts} | {e.pf_algo} | {flags} | {view} |")
    return lines


def build_markdown(sc: Scenario, rows: list[Row], rounds: int, seeds: list[int], command: str, pf_example: str) -> str:
    lines = [f"# {sc.title}", "",
             f"Command: `{command}` (resumable: finished runs are kept; `--no-run` only rebuilds this page).", "",
             f"Scenario: {sc.description}; 4-layer CNN (PFLlib's `FedAvgCNN`, fedforge's `cnn`), batch {sc.batch_size}, "
             f"lr {sc.lr}, {sc.local_epochs} local epoch, all {sc.num_clients} clients every round, {rounds} rounds, "
             f"plain SGD, CPU, fp32. PFLlib: one run per method (its `main.py` seeds torch with 0 and nothing else); "
             f"fedforge: seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}.", "",
             f"PFLlib runs unmodified (`{pf_example}` from a scratch work tree whose `dataset/{sc.pf_name}` is the split; "
             "see the script's docstring); fedforge reads the same files through `pfllib:DIR`.", "",
             "**Evaluation, the same in both.** Accuracy in % over all clients' test samples, pooled "
             "(Σ correct / Σ samples in both codes). PFLlib evaluates at the start of each round, after `send_models`, "
             "so its \"Round number: i\" judges the model after i aggregations: that is fedforge's record of round i. "
             "Both are compared on evaluations 0 … R: *best* is the highest, *last* the one after R aggregations "
             "(FedBABU: after fine-tuning, in both). View: the global model for FedAvg, FedProx and SCAFFOLD, each "
             "client's personal model for the others. "
             f"*Within*: |fedforge − PFLlib| ≤ max({TOLERANCE} points, 2 × the sample std of fedforge's seeds).", "",
             "| method | view | PFLlib best | fedforge best | difference | within? | PFLlib last | fedforge last | "
             "difference | within? |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = MAPPING[r.algo]
        db, wb = verdict(r.pf_best, r.ff_best)
        dl, wl = verdict(r.pf_last, r.ff_last)
        lines.append(f"| {r.algo} | {'global' if e.view == 'global' else 'pers.'} | {pf_cell(r, 'pf_best', rounds)} | "
                     f"{ff_cell(r, r.ff_best, seeds, rounds)} | {db} | {wb} | {pf_cell(r, 'pf_last', rounds)} | "
                     f"{ff_cell(r, r.ff_last, seeds, rounds)} | {dl} | {wl} |")
    lines += beats_table(sc, rows)
    lines += ["", "## Hyper-parameters, mapped", "",
              "fedforge's paper defaults, passed to PFLlib by its flags (PFLlib's own defaults switch several methods "
              "off or differ; the values used are those of the papers / the authors' run scripts).", ""]
    lines += mapping_table([r.algo for r in rows])
    notes = [(r.algo, MAPPING[r.algo].note) for r in rows if MAPPING[r.algo].note]
    if notes:
        lines += ["", "Where the two codes do not compute the same thing (deliberate departures of fedforge, documented "
                      "in its modules and step-equivalence tests), or how a setting was matched:", ""]
        lines += [f"- **{a}**: {n}" for a, n in notes]
    lines += ["", "## Time per run", "",
              "Minutes of wall time per run, one torch thread, on a 2-core machine shared with other jobs (PFLlib's "
              "time includes its per-round evaluation of the training loss over all training data and its extra "
              "(R+1)-th round; fedforge's is the run's clock at its last record). Not speed measurements.", "",
              "| method | PFLlib | fedforge (per seed) |", "|---|---|---|"]
    for r in rows:
        ff = ", ".join(f"{m:.1f}" for m in r.ff_minutes) or "-"
        lines.append(f"| {r.algo} | {_f(r.pf_minutes, '.1f')} | {ff} |")
    lines += ["", f"![accuracy per round, both codes]({sc.plot.name})"]
    return "\n".join(lines) + "\n"


def plot_curves(sc: Scenario, rows: list[Row], path: Path) -> bool:
    shown = [r for r in rows if r.pf_curve or r.ff_curves]
    if not shown:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    n = len(shown)
    cols = min(4, n)
    rws = math.ceil(n / cols)
    fig, axes = plt.subplots(rws, cols, figsize=(max(3.6 * cols, 7.5), 2.8 * rws + 0.4), squeeze=False)
    for ax, r in zip(axes.flat, shown):
        e = MAPPING[r.algo]
        if r.pf_curve:
            xs = sorted(r.pf_curve)
            ax.plot(xs, [r.pf_curve[x] for x in xs], color="tab:orange",
                    label="PFLlib" + ("" if r.pf_state == "complete" else f" ({r.pf_state})"))
            if r.pf_ft is not None:
                ax.plot([xs[-1]], [r.pf_ft], "x", color="tab:orange", label="PFLlib fine-tuned")
        if r.ff_curves:
            xs = sorted(set.intersection(*(set(c) for c, _ in r.ff_curves)))
            ys = np.array([[c[x] for x in xs] for c, _ in r.ff_curves])
            m = ys.mean(0)
            ax.plot(xs, m, color="tab:blue", label=f"fedforge (n={len(ys)})")
            if len(ys) > 1:
                s = ys.std(0, ddof=1)
                ax.fill_between(xs, m - s, m + s, color="tab:blue", alpha=0.2, lw=0)
            fts = [ft for _, ft in r.ff_curves if ft is not None]
            if fts:
                ax.plot([xs[-1]], [statistics.fmean(fts)], "+", color="tab:blue", ms=9, label="fedforge fine-tuned")
        ax.set_title(f"{r.algo} ({'global' if e.view == 'global' else 'personalized'})", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("aggregations", fontsize=8)
        ax.set_ylabel("test accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(sc.title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write_report(sc: Scenario, out: Path, rounds: int, seeds: list[int], command: str, table: Path | None = None) -> Path:
    from fedforge.results.report import write_markdown

    table = Path(table or sc.table)
    sc = dataclasses.replace(sc, table=table)
    rows = collect(sc, out, rounds, seeds, sc.algorithms)
    example = f"python main.py {shlex.join(pfllib_command(sc, MAPPING[sc.algorithms[0]], rounds)[1:])}"
    md = build_markdown(sc, rows, rounds, seeds, command, example)
    write_markdown(table, md)
    plot_curves(sc, rows, sc.plot)
    print(f"table: {table}", file=sys.stderr)
    return table


# ------------------------------------------------------------------------------------------ main
def _list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--scenario", required=True, choices=("mnist", "cifar100"))
    p.add_argument("--only", choices=("pfllib", "fedforge"), help="run one side only (the table shows both)")
    p.add_argument("--algorithms", help="comma-separated subset of the scenario's algorithms (default: all)")
    p.add_argument("--seeds", help="fedforge's seeds, comma-separated (default: mnist 0; cifar100 0,1,2)")
    p.add_argument("--rounds", type=int, help="rounds (default: mnist 20, cifar100 50); a quick check uses 2")
    p.add_argument("--out-dir", default=str(REPO / "bench-runs" / "reference"), help="scratch folder (default: %(default)s)")
    p.add_argument("--table", help="Markdown file to write (default: the scenario's docs/benchmarks page)")
    p.add_argument("--device", default="cpu", help="cpu or cuda, for both codes (default: cpu)")
    p.add_argument("--data", help="a folder in PFLlib's layout to use instead of the scenario's split (quick checks; "
                                  "needs --table and its own --out-dir)")
    p.add_argument("--export-only", action="store_true", help="only make the split (cifar100's export)")
    p.add_argument("--no-run", action="store_true", help="only rebuild the table and the plot")
    a = p.parse_args(argv)
    out = Path(a.out_dir).resolve()
    sc = scenarios(out)[a.scenario]
    algos = _list(a.algorithms) or sc.algorithms
    unknown = [x for x in algos if x not in sc.algorithms]
    if unknown:
        p.error(f"--algorithms: {', '.join(unknown)} not in scenario {sc.name} ({', '.join(sc.algorithms)})")
    seeds = [int(s) for s in _list(a.seeds)] if a.seeds else sc.seeds
    rounds = a.rounds if a.rounds is not None else sc.rounds
    quick = rounds != sc.rounds or a.data is not None
    if quick and not a.table:
        p.error("--rounds other than the scenario's, or --data, needs --table (and its own --out-dir) so that the "
                "committed page is not overwritten")
    if quick:  # a quick configuration: its table lists what it runs
        sc = dataclasses.replace(sc, algorithms=algos)
    if a.data is not None:
        sc = dataclasses.replace(sc, data_dir=Path(a.data).resolve(), export=None, title=f"Matched runs (quick check): "
                                 f"PFLlib and fedforge on {a.data}", description=f"the split in `{a.data}`")
    command = shlex.join(["python", "benchmarks/reference_runs.py", *argv])
    table = Path(a.table) if a.table else sc.table
    report = lambda: write_report(sc, out, rounds, seeds, command, table)  # noqa: E731
    if a.no_run:
        made = sc.data_dir or out / sc.name / "export"
        if (Path(made) / "config.json").is_file():
            sc = dataclasses.replace(sc, num_clients=split_clients(made))
        write_report(sc, out, rounds, seeds, command, table)
        return 0
    from fedforge.core.faults import RunInterrupted

    data_dir = export_split(sc, out)
    if a.export_only:
        return 0
    sc = dataclasses.replace(sc, num_clients=split_clients(data_dir))
    report = lambda: write_report(sc, out, rounds, seeds, command, table)  # noqa: E731
    try:
        if a.only in (None, "pfllib"):
            for x in algos:
                run_pfllib(sc, MAPPING[x], out, data_dir, rounds, a.device)
                report()
        if a.only in (None, "fedforge"):
            run_fedforge(sc, algos, seeds, out, data_dir, rounds, a.device, report)
    except (KeyboardInterrupt, RunInterrupted) as e:
        print(f"reference_runs: interrupted ({e or type(e).__name__}); run the same command again to resume "
              f"(finished runs are kept, fedforge's resume from their checkpoints, PFLlib's start again).",
              file=sys.stderr)
        report()
        return 130
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
