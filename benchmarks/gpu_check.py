"""GPU readiness check (issue 19): every registered algorithm on the GPU, then the speed table against PFLlib.

One command, sized for under 8 minutes on one H100/H200 (``--budget``, default 470 s; what would not fit is skipped,
and the output says so). On the GPU machine nothing is installed and ``../shared`` is not there, so copy the data
(and PFLlib's code) into a git-ignored folder of the work tree first, and carry it along::

    mkdir -p .gpu-data && cp -r ../shared/data/pfllib-mnist .gpu-data/
    cp -r ../shared/reference-code/pfllib .gpu-data/pfllib          # optional: PFLlib beside fedforge
    PYTHONPATH=src python3 benchmarks/gpu_check.py --data .gpu-data --pfllib .gpu-data/pfllib --out gpu_check.json

Here, on the CPU (no GPU targets can be met; the JSON says "not met" or "not measured", never "met" by default)::

    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick --data ../shared/data \\
        --pfllib ../shared/reference-code/pfllib --out /tmp/gpu_check.json

What it does, in order:

1. **Every algorithm** (``fedforge.algorithms.ALGORITHMS.names()``) runs ``--rounds`` (2) rounds on ``digits``
   (4 clients, batch 32, lr 0.05) on ``--device``; heterogeneous ones (``Algorithm.heterogeneous``) also on the
   model group ``--group`` (``htfe-img-2``: cnn and ht_resnet18). Each gets pass, fail (with the exception's text;
   one failure never stops the script) or "skipped (needs X)" when an optional dependency is missing.
2. **The speed table** (seconds per round = wall time of a round with its evaluation, steady state: the median of
   rounds 2..N; fedforge from its records' clock, PFLlib from its own "time cost" lines, median of its loop
   iterations 1..N):

   * ``mnist``: PFLlib's MNIST split (``pfllib:<data>/pfllib-mnist``), 20 clients, FedAvg, the 4-layer CNN, batch 10,
     evaluation every round: fedforge's sequential executor (target ≥ 2.5× PFLlib) and vectorized executor (target
     ≤ 2.3 s/round and ≥ 10× PFLlib);
   * ``synth500``: 500 CIFAR-100-shaped clients made here (random uint8 32×32×3 images, 100 classes, 120 samples per
     client, ``iid``, 75 % train; an ``npz:`` file in a temporary folder), the CNN, every client every round,
     vectorized executor with ``--workers 100``: target ≤ 1.5 s/round within 4.6 GB of GPU memory
     (``torch.cuda.max_memory_allocated``);
   * ``ditto``, ``fedala``: vectorized vs their own sequential GPU path on the MNIST split (target ≥ 5×);
   * ``bf16``: bf16 vs fp32 at batch 64 (sequential executor, 20 clients of the synthetic set; target: bf16's round
     ≤ 0.7× fp32's).

   With ``--pfllib DIR`` (a PFLlib work tree, the folder holding ``system/main.py``), PFLlib's ``main.py`` runs as a
   subprocess on the same data and device: the MNIST split as it is, the synthetic set written in PFLlib's layout
   by ``fedforge.data.export`` (dataset name ``Cifar100synth``, so PFLlib's CNN takes 32×32×3 inputs). Where
   ``h5py``, ``calmsize`` or ``cvxpy`` are missing, stand-in modules on the subprocess's ``PYTHONPATH`` replace them
   (``benchmarks/_pfllib.py``); none of them is on the timed path (h5py: the results file written after the last
   round; calmsize: the memory report after it; cvxpy: FedPAC). scikit-learn is on it (ROC-AUC in every
   evaluation) and is required.
3. **JSON** (``--out``): the machine (GPU, torch, CUDA), per-algorithm results, the speed table, the targets met or
   not ("met", "not met", "not measured"), what was skipped and why; and the table as Markdown for
   docs/performance.md, also printed.

``--quick`` shrinks everything (1 round per algorithm on a subset, 2 % of the MNIST split, 50 synthetic clients,
2 timed rounds) so that a CPU run takes a few minutes. On a CPU PFLlib runs with one torch thread
(``OMP_NUM_THREADS=1`` unless set), as fedforge's client tasks do. Only torch, numpy, scipy, scikit-learn, matplotlib, pyyaml,
tqdm and safetensors are needed (what the GPU machine has); torchvision only for the ``ht_*`` models of the group.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _pfllib  # noqa: E402  (benchmarks/_pfllib.py: PFLlib's main.py as a subprocess)

SCHEMA = "fedforge-gpu-check-1"
ROWS = ("mnist", "synth500", "ditto", "fedala", "bf16")
MET, NOT_MET, NOT_MEASURED = "met", "not met", "not measured"


@dataclass
class Settings:
    """Sizes of one check (the defaults: the full GPU check; :data:`QUICK`: a CPU run of a few minutes)."""

    rounds: int = 2  # rounds per algorithm check
    clients: int = 4  # clients per algorithm check
    group: str = "htfe-img-2"  # model group of the heterogeneous checks
    algorithms: list[str] | None = None  # None: every registered algorithm
    speed_rounds: int = 4  # timed rounds (the steady state is the median of rounds 2..N)
    mnist_fraction: float = 1.0  # share of each MNIST client's samples
    synth_clients: int = 500
    synth_per_client: int = 120
    synth_workers: int = 100  # --workers of the vectorized executor on the synthetic set
    bf16_clients: int = 20
    run_cap_s: float = 90.0  # a fedforge run is stopped after this many seconds (it keeps the rounds it finished)
    pfllib_cap_s: float = 150.0  # likewise a PFLlib run
    check_share: float = 0.4  # share of the budget the algorithm checks may use


QUICK = Settings(rounds=1, group="cnn,ht_resnet4", algorithms=["fedavg", "ditto", "fedala", "fedproto"],
                 speed_rounds=2, mnist_fraction=0.02, synth_clients=50, bf16_clients=10, run_cap_s=60.0,
                 pfllib_cap_s=120.0)

TARGETS = {  # row key -> (what, test on the row)
    "mnist-vectorized-time": "MNIST split, vectorized: ≤ 2.3 s/round",
    "mnist-vectorized-pfllib": "MNIST split, vectorized: ≥ 10× PFLlib",
    "mnist-sequential-pfllib": "MNIST split, sequential: ≥ 2.5× PFLlib",
    "synth500-time": "500 CIFAR-100-shaped clients, vectorized: ≤ 1.5 s/round",
    "synth500-memory": "500 CIFAR-100-shaped clients: ≤ 4.6 GB GPU memory",
    "ditto-vectorized": "Ditto: vectorized ≥ 5× its sequential path",
    "fedala-vectorized": "FedALA: vectorized ≥ 5× its sequential path",
    "bf16": "bf16 round ≤ 0.7× fp32 round at batch 64",
}


# --------------------------------------------------------------------------------------------- budget
class Budget:
    """The time left of ``--budget`` seconds; steps that would not fit are skipped and say so."""

    def __init__(self, seconds: float):
        self.total = float(seconds)
        self.t0 = time.perf_counter()
        self.skipped: list[str] = []

    def used(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total - self.used()

    def fits(self, what: str, needs: float) -> bool:
        if needs <= self.left():
            return True
        msg = f"{what}: skipped (needs about {needs:.0f} s, {max(0.0, self.left()):.0f} s of the {self.total:.0f} s budget left)"
        self.skipped.append(msg)
        say(msg)
        return False


def say(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- machine
def machine_info(device: str) -> dict:
    import numpy as np
    import torch

    info: dict[str, Any] = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
                            "numpy": np.__version__, "cuda": torch.version.cuda, "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        p = torch.cuda.get_device_properties(idx)
        info |= {"gpu": p.name, "gpu_memory_bytes": int(p.total_memory), "gpu_count": torch.cuda.device_count(),
                 "cudnn": torch.backends.cudnn.version(), "capability": f"{p.major}.{p.minor}"}
    else:
        info["gpu"] = None
    return info


# --------------------------------------------------------------------------------------------- algorithms
def missing_dependency(exc: BaseException) -> str | None:
    """The optional package an error says is missing (``ModuleNotFoundError``, or fedforge's install hint), else None."""
    import re

    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return exc.name.split(".")[0]
    m = re.search(r"pip install ['\"]?([A-Za-z0-9_.\-\[\]]+)", str(exc))
    if m and "install" in str(exc) and any(w in str(exc) for w in ("not installed", "needs", "need ")):
        return m.group(1).strip("'\"")
    return None


def error_text(exc: BaseException, lines: int = 6) -> str:
    """The exception and the last lines of its traceback."""
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(tb).rstrip().splitlines()[-lines:]
    return f"{type(exc).__name__}: {exc}" + ("\n" + "\n".join(tail) if len(tail) > 1 else "")


def check_algorithm(name: str, device: str, model: str = "cnn", rounds: int = 2, clients: int = 4) -> dict:
    """Run one algorithm for ``rounds`` rounds on digits; never raises (the result says pass, fail or skipped)."""
    import fedforge

    t0 = time.perf_counter()
    row: dict[str, Any] = {"algorithm": name, "model": model, "rounds": rounds, "device": device}
    try:
        res = fedforge.run(algorithm=name, dataset="digits", model=model, clients=clients, rounds=rounds, lr=0.05,
                           batch_size=32, partition="dirichlet", alpha=0.5, device=device, run_dir=False,
                           progress=False, seed=0)
        last = res.records[-1]
        accs = [last.get("global_acc"), last.get("personalized_acc")]
        bad = [a for a in accs if a is not None and not math.isfinite(a)]
        if all(a is None for a in accs) or bad:
            raise RuntimeError(f"no finite accuracy in the last record: {accs}")
        row |= {"status": "pass", "global_acc": last.get("global_acc"), "personalized_acc": last.get("personalized_acc")}
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001  (one failure never stops the check)
        dep = missing_dependency(e)
        if dep is not None:
            row |= {"status": "skipped", "reason": f"skipped (needs {dep})", "error": f"{type(e).__name__}: {e}"}
        else:
            row |= {"status": "fail", "error": error_text(e)}
    finally:
        _free_gpu()
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def check_algorithms(names: list[str], device: str, s: Settings, budget: Budget) -> list[dict]:
    from fedforge.algorithms import ALGORITHMS

    allowed = budget.total * s.check_share
    out: list[dict] = []
    jobs: list[tuple[str, str]] = []
    for n in names:
        jobs.append((n, "cnn"))
        cls = ALGORITHMS.get(n) if n in ALGORITHMS else None
        if cls is not None and getattr(cls, "heterogeneous", False):
            jobs.append((n, s.group))
    for i, (n, model) in enumerate(jobs):
        if budget.used() > allowed:
            rest = len(jobs) - i
            msg = f"algorithm checks: {rest} left unchecked (the checks' share of the budget, {allowed:.0f} s, is spent)"
            budget.skipped.append(msg)
            say(msg)
            out += [{"algorithm": m, "model": mm, "status": "skipped", "reason": "skipped (time budget)"}
                    for m, mm in jobs[i:]]
            break
        row = check_algorithm(n, device, model, s.rounds, s.clients)
        say(f"{n} on {model}: {row.get('reason') or row['status']} ({row['seconds']:.1f} s)"
            + (f": {row['error'].splitlines()[0]}" if row["status"] == "fail" else ""))
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------- data
def mnist_split(data: Path, fraction: float, tmp: Path) -> tuple[Path, str]:
    """(a folder in PFLlib's layout, its PFLlib dataset name): the MNIST split as it is, or a copy keeping the first
    ``fraction`` of each client's train and test samples (written with ``fedforge.data.export``)."""
    src = Path(data) / "pfllib-mnist"
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} holds no PFLlib split (config.json); copy pfllib-mnist into --data "
                                f"(mkdir -p .gpu-data && cp -r ../shared/data/pfllib-mnist .gpu-data/)")
    if fraction >= 1:
        return src, "MNIST"
    import numpy as np

    from fedforge.data import Partition, load_dataset
    from fedforge.data.export import export_pfllib
    from fedforge.data.partition import labels_fingerprint

    out = tmp / f"MNIST-{fraction:g}"
    if (out / "config.json").is_file():
        return out, out.name
    ds = load_dataset(f"pfllib:{src}", None)
    keep = lambda idx, least: np.asarray(idx[: max(least, int(round(len(idx) * fraction)))], np.int64)  # noqa: E731
    train = [keep(a, 20) for a, _ in ds.client_split]
    test = [keep(b, 5) for _, b in ds.client_split]
    part = Partition(train, test, "natural", {"fraction": fraction}, 0, labels_fingerprint(ds.y))
    export_pfllib(ds, part, out, batch_size=10)
    return out, out.name


def synthetic_cifar(tmp: Path, clients: int, per_client: int, seed: int = 0) -> Path:
    """``clients × per_client`` random uint8 images of CIFAR-100's shape (32×32×3), labels 0..99 evenly, as an
    ``npz:`` dataset file."""
    import numpy as np

    path = tmp / f"synth-cifar100-{clients}x{per_client}.npz"
    if path.is_file():
        return path
    n = clients * per_client
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = rng.permutation(np.arange(n) % 100).astype(np.int64)
    np.savez(path, x=x, y=y)
    return path


# --------------------------------------------------------------------------------------------- timed runs
def _free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def steady(times: list[float]) -> float | None:
    """Median of rounds 2..N (all rounds when there is only one)."""
    if not times:
        return None
    return statistics.median(times[1:] if len(times) > 1 else times)


class _Notes(logging.Handler):
    """Keeps fedforge's warnings and notices of a run (e.g. the vectorized executor's fallbacks)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def time_fedforge(device: str, cap_s: float, **options: Any) -> dict:
    """One fedforge run, timed per round from its records (round r: the clock at record r minus at record r-1,
    i.e. the round's training and its evaluation). Stopped after ``cap_s`` seconds, keeping finished rounds."""
    import torch

    from fedforge.config import build_config
    from fedforge.core.faults import RunInterrupted
    from fedforge.core.simulation import Simulation

    cfg = build_config(overrides={"seed": 0, "model": "cnn", "batch_size": 10, "lr": 0.005, "local_epochs": 1,
                                  "join_ratio": 1.0, "eval_every": 1, "device": device, **options})
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    stamps: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    notes = _Notes()
    log = logging.getLogger("fedforge")
    log.addHandler(notes)
    sim = None
    due = threading.Event()

    def time_up() -> None:  # the run stops after the client in progress (Simulation.request_stop)
        due.set()
        if sim is not None:
            sim.request_stop()

    timer = threading.Timer(cap_s, time_up)
    timer.daemon = True
    timer.start()
    stopped = False
    try:
        sim = Simulation(cfg, run_dir=False, progress=False,
                         on_record=lambda r: stamps.append((int(r["round"]), float(r["seconds"]))))
        if due.is_set():
            sim.request_stop()
        sim.run()
    except RunInterrupted:
        stopped = True
    finally:
        timer.cancel()
        log.removeHandler(notes)
    rounds = [b - a for (ra, a), (rb, b) in zip(stamps, stamps[1:]) if rb == ra + 1]
    out: dict[str, Any] = {"round_seconds": rounds, "steady_s": steady(rounds),
                           "wall_s": round(time.perf_counter() - t0, 2), "stopped_early": stopped,
                           "config": {k: v for k, v in options.items() if k != "data_root"}}
    if stopped:
        out["note"] = (f"stopped at its time cap ({cap_s:.0f} s) after {len(rounds)} timed round(s)"
                       + ("; the one round timed includes the warm-up" if len(rounds) == 1 else ""))
    if cuda:
        out["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated(torch.device(device)))
    if notes.lines:
        out["notes"] = list(dict.fromkeys(notes.lines))[:5]
    sim = None
    _free_gpu()
    return out


def time_pfllib(pfllib: Path, work: Path, data_dir: Path, pf_name: str, args: list[str], device: str,
                cap_s: float) -> dict:
    """PFLlib's main.py on the same data; seconds per loop iteration from its "time cost" lines."""
    system = _pfllib.setup_worktree(work, data_dir, pf_name, reference=pfllib, standins=tuple(_pfllib.STANDINS))
    log = work / f"{pf_name}-{args[args.index('-algo') + 1] if '-algo' in args else 'run'}.log"
    cmd = ["-data", pf_name, "-m", "CNN", "-dev", "cuda" if device.startswith("cuda") else "cpu",
           "-did", str((device.split(":") + ["0"])[1]) if device.startswith("cuda") else "0",
           "-t", "1", "-go", "gpucheck", *args]
    # on a CPU, one torch thread as fedforge's client tasks use (and OpenMP does not spin on a busy machine)
    extra = {} if device.startswith("cuda") or "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": "1"}
    rc, seconds, timed_out = _pfllib.run_main(system, cmd, log, _pfllib.pfllib_env(work, extra), timeout=cap_s)
    text = log.read_text(errors="replace")
    iters = _pfllib.parse_round_seconds(text)
    expected = int(args[args.index("-gr") + 1]) + 1 if "-gr" in args else None  # PFLlib trains rounds 0..gr
    out: dict[str, Any] = {"round_seconds": iters, "steady_s": steady(iters), "returncode": rc,
                           "wall_s": round(seconds, 2),
                           "stopped_early": timed_out and (expected is None or len(iters) < expected),
                           "standins": _pfllib.written_standins(work),
                           "command": "python main.py " + " ".join(cmd)}
    if rc != 0 and not timed_out:
        out["error"] = "\n".join(text.rstrip().splitlines()[-8:])
    elif timed_out:
        out["note"] = f"stopped at its time cap ({cap_s:.0f} s) after {len(iters)} loop iteration(s)"
    if "cuda is not avaiable" in text:
        out["note"] = "PFLlib found no CUDA device and ran on the CPU"
    return out


# --------------------------------------------------------------------------------------------- speed table
@dataclass
class Row:
    key: str
    workload: str
    fedforge: str = "-"
    pfllib: str = "-"
    ratio: str = "-"
    targets: list[dict] = field(default_factory=list)
    measurements: dict = field(default_factory=dict)
    status: str = "ok"
    note: str = ""


def target(key: str, value: float | None, ok: Callable[[float], bool], device: str, shown: str) -> dict:
    met = NOT_MEASURED if value is None else (MET if ok(value) else NOT_MET)
    t = {"key": key, "target": TARGETS[key], "value": value, "shown": shown, "met": met, "device": device}
    if met != NOT_MEASURED and not device.startswith("cuda"):
        t["note"] = f"measured on {device}; the target is for one H100/H200"
    return t


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}×"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def speed_table(device: str, s: Settings, budget: Budget, data: Path | None, pfllib: Path | None, tmp: Path,
                rows: tuple[str, ...] = ROWS) -> list[Row]:
    out: list[Row] = []
    R = s.speed_rounds
    synth_pfllib: tuple | None = None
    pf_work = tmp / "pfllib"
    mnist: tuple[Path, str] | None = None
    need_mnist = any(r in rows for r in ("mnist", "ditto", "fedala"))
    if need_mnist:
        if data is None:
            budget.skipped.append("mnist, ditto, fedala: skipped (no --data folder holding pfllib-mnist)")
        else:
            try:
                mnist = mnist_split(Path(data), s.mnist_fraction, tmp)
            except (FileNotFoundError, OSError) as e:
                budget.skipped.append(f"mnist, ditto, fedala: skipped ({e})")
                say(budget.skipped[-1])
    pf_ok = pfllib is not None
    pf_skip = None if pf_ok else "no --pfllib work tree given"

    def ff(what: str, **options: Any) -> dict | None:
        if not budget.fits(what, min(s.run_cap_s, 15.0)):
            return None
        say(f"{what}: running")
        try:
            r = time_fedforge(device, min(s.run_cap_s, max(5.0, budget.left() - 5)), **options)
        except Exception as e:  # noqa: BLE001  (a failed row is reported, the table goes on)
            say(f"{what}: failed: {type(e).__name__}: {e}")
            return {"error": error_text(e)}
        say(f"{what}: {_s(r['steady_s'])}/round over rounds {r['round_seconds']}")
        return r

    def pf(what: str, data_dir: Path, name: str, args: list[str]) -> dict | None:
        nonlocal pf_skip
        if pf_skip is not None:
            return None
        if not budget.fits(what, min(s.pfllib_cap_s, 30.0)):
            return None
        say(f"{what}: running PFLlib's main.py")
        try:
            r = time_pfllib(Path(pfllib), pf_work, data_dir, name, args, device,
                            min(s.pfllib_cap_s, max(10.0, budget.left() - 5)))
        except (_pfllib.PfllibUnavailable, FileNotFoundError) as e:
            pf_skip = str(e)
            budget.skipped.append(f"PFLlib: skipped ({e})")
            say(budget.skipped[-1])
            return None
        say(f"{what}: {_s(r['steady_s'])}/round over iterations {r['round_seconds']}"
            + (f" (exit code {r['returncode']})" if r["returncode"] else ""))
        return r

    common_mnist = lambda: {"dataset": f"pfllib:{mnist[0]}"}  # noqa: E731

    # MNIST split: sequential and vectorized fedforge, PFLlib
    if "mnist" in rows and mnist is not None:
        seq = ff("mnist sequential", rounds=R, executor="sequential", **common_mnist())
        vec = ff("mnist vectorized", rounds=R, executor="vectorized", **common_mnist())
        ref = pf("mnist PFLlib", mnist[0], mnist[1],
                 ["-algo", "FedAvg", "-ncl", "10", "-nc", "20", "-gr", str(R), "-jr", "1", "-lbs", "10", "-lr", "0.005",
                  "-ls", "1", "-eg", "1"])
        p = ref.get("steady_s") if ref else None
        for key, r in (("sequential", seq), ("vectorized", vec)):
            v = r.get("steady_s") if r else None
            row = Row(f"mnist-{key}", f"PFLlib MNIST split, 20 clients, FedAvg, eval every round, {key}"
                      + (f" ({s.mnist_fraction:g} of each client's samples)" if s.mnist_fraction < 1 else ""),
                      fedforge=_s(v) + "/round" if v is not None else "-", pfllib=_s(p) + "/round" if p is not None else "-",
                      ratio=_x(_ratio(p, v)), measurements={"fedforge": r, "pfllib": ref})
            if key == "vectorized":
                row.targets.append(target("mnist-vectorized-time", v, lambda x: x <= 2.3, device, _s(v)))
                row.targets.append(target("mnist-vectorized-pfllib", _ratio(p, v), lambda x: x >= 10, device,
                                          _x(_ratio(p, v))))
            else:
                row.targets.append(target("mnist-sequential-pfllib", _ratio(p, v), lambda x: x >= 2.5, device,
                                          _x(_ratio(p, v))))
            fallback = [n for n in (r or {}).get("notes", []) if "one at a time" in n]
            if fallback:
                row.note = "the vectorized executor said: " + fallback[0]
            row.status = "ok" if v is not None else "skipped"
            out.append(row)

    # 500 CIFAR-100-shaped clients, vectorized (and PFLlib on the same clients)
    if "synth500" in rows:
        n, k = s.synth_clients, s.synth_per_client
        row = Row("synth500", f"{n} CIFAR-100-shaped clients ({k} samples, 75 % train), CNN, join ratio 1, eval "
                  f"every round, vectorized --workers {s.synth_workers}")
        if budget.fits("synth500", 20.0):
            path = synthetic_cifar(tmp, n, k)
            ds_opts = dict(dataset=f"npz:{path}", partition="iid", clients=n, train_ratio=0.75, min_samples=1)
            vec = ff(f"synth{n} vectorized", rounds=R, executor="vectorized", workers=s.synth_workers, **ds_opts)
            v = vec.get("steady_s") if vec else None
            mem = vec.get("gpu_peak_bytes") if vec else None
            row.fedforge = (_s(v) + "/round" if v is not None else "-") + (f", {mem / 1e9:.2f} GB GPU" if mem else "")
            row.measurements = {"fedforge": vec, "pfllib": None}
            row.status = "ok" if v is not None else "skipped"
            synth_pfllib = (row, path, n, k, v)  # PFLlib's side runs last: its export and run cost the most
        else:
            v = mem = None
            row.status = "skipped"
        row.targets.append(target("synth500-time", v, lambda x: x <= 1.5, device, _s(v)))
        row.targets.append(target("synth500-memory", None if mem is None else mem / 1e9, lambda x: x <= 4.6, device,
                                  "-" if mem is None else f"{mem / 1e9:.2f} GB"))
        out.append(row)

    # Ditto and FedALA: vectorized vs their own sequential path
    for algo, label in (("ditto", "Ditto"), ("fedala", "FedALA")):
        if algo not in rows or mnist is None:
            continue
        seq = ff(f"{algo} sequential", algorithm=algo, rounds=R, executor="sequential", **common_mnist())
        vec = ff(f"{algo} vectorized", algorithm=algo, rounds=R, executor="vectorized", **common_mnist())
        a, b = (seq or {}).get("steady_s"), (vec or {}).get("steady_s")
        r = _ratio(a, b)
        row = Row(f"{algo}-vectorized", f"{label} on the MNIST split, vectorized vs its own sequential path",
                  fedforge=f"{_s(b)} (sequential {_s(a)})", ratio=_x(r) + (" vs sequential" if r else ""),
                  measurements={"sequential": seq, "vectorized": vec}, status="ok" if r is not None else "skipped")
        notes = (vec or {}).get("notes") or []
        fallback = [n for n in notes if "one at a time" in n]
        if fallback:
            row.note = "the vectorized executor said: " + fallback[0]
        row.targets.append(target(f"{algo}-vectorized", r, lambda x: x >= 5, device, _x(r)))
        out.append(row)

    # bf16 vs fp32 at batch 64
    if "bf16" in rows and not budget.fits("bf16", 15.0):
        out.append(Row("bf16", f"bf16 vs fp32, batch 64, {s.bf16_clients} CIFAR-100-shaped clients, sequential",
                       status="skipped", targets=[target("bf16", None, lambda x: x <= 0.7, device, "-")]))
    elif "bf16" in rows:
        n = s.bf16_clients
        path = synthetic_cifar(tmp, s.synth_clients, s.synth_per_client)
        opts = dict(dataset=f"npz:{path}", partition="iid", clients=n, batch_size=64, executor="sequential",
                    rounds=R, min_samples=1)
        fp32 = ff("bf16 row: fp32", precision="fp32", **opts)
        bf16 = ff("bf16 row: bf16", precision="bf16", **opts)
        a, b = (bf16 or {}).get("steady_s"), (fp32 or {}).get("steady_s")
        r = _ratio(a, b)
        row = Row("bf16", f"bf16 vs fp32, batch 64, {n} CIFAR-100-shaped clients, sequential",
                  fedforge=f"bf16 {_s(a)}, fp32 {_s(b)}", ratio="-" if r is None else f"{r:.2f} (bf16 / fp32)",
                  measurements={"fp32": fp32, "bf16": bf16}, status="ok" if r is not None else "skipped")
        row.targets.append(target("bf16", r, lambda x: x <= 0.7, device, "-" if r is None else f"{r:.2f}"))
        out.append(row)

    # PFLlib on the synthetic clients, beside the synth500 row's fedforge run
    if synth_pfllib is not None and pf_skip is None:
        row, path, n, k, v = synth_pfllib
        ref = None
        if budget.fits(f"synth{n} PFLlib export and run", 20.0 + n * k / 2000):
            try:
                exp = export_synthetic(path, n, tmp)
                ref = pf(f"synth{n} PFLlib", exp, "Cifar100synth",
                         ["-algo", "FedAvg", "-ncl", "100", "-nc", str(n), "-gr", str(R), "-jr", "1", "-lbs", "10",
                          "-lr", "0.005", "-ls", "1", "-eg", "1"])
            except Exception as e:  # noqa: BLE001
                budget.skipped.append(f"synth{n} PFLlib: skipped (export failed: {type(e).__name__}: {e})")
        p = ref.get("steady_s") if ref else None
        row.pfllib = _s(p) + "/round" if p is not None else "-"
        row.ratio = _x(_ratio(p, v))
        row.measurements["pfllib"] = ref
    for row in out:  # what failed or stopped a measurement early goes into the table
        ms = {k: m for k, m in row.measurements.items() if isinstance(m, dict)}
        extra = [f"{k}: {m['note']}" for k, m in ms.items() if m.get("note")]
        failed = [f"{k} failed: {m['error'].splitlines()[0]}" for k, m in ms.items() if m.get("error")]
        if any(m.get("error") for k, m in ms.items() if k != "pfllib"):
            row.status = "failed"  # fedforge's side failed (PFLlib's failure is noted only)
        row.note = "; ".join([row.note] * bool(row.note) + failed + extra)
    return out


def export_synthetic(npz: Path, clients: int, tmp: Path) -> Path:
    """The synthetic set, partitioned as fedforge partitions it (iid, seed 0, 75 % train), in PFLlib's layout."""
    from fedforge.data import load_dataset, make_partition
    from fedforge.data.export import export_pfllib

    out = tmp / "pfllib-data" / "Cifar100synth"
    if (out / "config.json").is_file():
        return out
    ds = load_dataset(f"npz:{npz}", None)
    part = make_partition(ds.y, ds.num_classes, "iid", clients, 0, train_ratio=0.75, min_samples=1)
    export_pfllib(ds, part, out, batch_size=10)
    return out


def markdown(rows: list[Row], machine: dict) -> str:
    gpu = machine.get("gpu")
    where = f"{gpu}, torch {machine['torch']}, CUDA {machine.get('cuda')}" if gpu else \
        f"the CPU ({machine['cpu_count']} cores; no GPU: the targets are for one H100/H200), torch {machine['torch']}"
    lines = [f"Measured on {where} ({time.strftime('%Y-%m-%d')}, `benchmarks/gpu_check.py`); seconds per round with "
             "evaluation, steady state (median of rounds 2..N).", "",
             f"| workload | fedforge | PFLlib (same {'GPU' if gpu else 'CPU'}) | ratio | targets |", "|---|---|---|---|---|"]
    for r in rows:
        tg = "; ".join(f"{t['target'].split(': ', 1)[-1]}: **{t['met']}**" for t in r.targets) or "-"
        wl = r.workload + (f" ({r.note})" if r.note else "") + (" — skipped" if r.status == "skipped" else "")
        lines.append(f"| {wl} | {r.fedforge} | {r.pfllib} | {r.ratio} | {tg} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def run_check(device: str, s: Settings, budget: Budget, data: Path | None, pfllib: Path | None,
              rows: tuple[str, ...] = ROWS, tmp: Path | None = None) -> dict:
    """Everything the command does, as a JSON-ready dict."""
    from fedforge.algorithms import ALGORITHMS

    machine = machine_info(device)
    names = s.algorithms if s.algorithms is not None else list(ALGORITHMS.names())
    say(f"{len(names)} algorithm(s) on {device}, then the speed table ({', '.join(rows) or 'no rows'}); "
        f"budget {budget.total:.0f} s")
    algos = check_algorithms(names, device, s, budget)
    own_tmp = None
    if tmp is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="fedforge-gpu-check-")
        tmp = Path(own_tmp.name)
    try:
        table = speed_table(device, s, budget, data, pfllib, Path(tmp), rows)
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
    targets = [t for r in table for t in r.targets]
    counts = {k: sum(1 for a in algos if a["status"] == k) for k in ("pass", "fail", "skipped")}
    return {
        "schema": SCHEMA, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device, "machine": machine,
        "settings": asdict(s), "budget_s": budget.total, "seconds": round(budget.used(), 1),
        "algorithms": algos, "algorithm_counts": counts,
        "speed": [asdict(r) for r in table], "targets": targets,
        "all_targets_met": bool(targets) and all(t["met"] == MET for t in targets) and device.startswith("cuda"),
        "skipped": list(budget.skipped), "markdown": markdown(table, machine),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    ap.add_argument("--data", type=Path, default=None,
                    help="folder holding pfllib-mnist (default: $FEDFORGE_DATA, else ../shared/data, else .gpu-data)")
    ap.add_argument("--pfllib", type=Path, default=None, help="PFLlib work tree (holding system/main.py) to run beside fedforge")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON file to write (default: %(default)s)")
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for everything (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="shrink everything (a CPU run of a few minutes)")
    ap.add_argument("--algorithms", help="comma-separated algorithms to check (default: all; --quick: a subset)")
    ap.add_argument("--rounds", type=int, help="rounds per algorithm check (default 2; --quick 1)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"speed-table rows, comma-separated, or none (default: {','.join(ROWS)})")
    ap.add_argument("--speed-rounds", type=int, help="timed rounds per run (default 4; --quick 2)")
    ap.add_argument("--synth-clients", type=int, help="clients of the synthetic CIFAR-100-shaped set (default 500; --quick 50)")
    a = ap.parse_args(argv)
    s = replace(QUICK) if a.quick else Settings()
    if a.algorithms:
        s.algorithms = [x.strip() for x in a.algorithms.split(",") if x.strip()]
    if a.rounds:
        s.rounds = a.rounds
    if a.speed_rounds:
        s.speed_rounds = a.speed_rounds
    if a.synth_clients:
        s.synth_clients = a.synth_clients
        s.synth_workers = min(s.synth_workers, a.synth_clients)
        s.bf16_clients = min(s.bf16_clients, a.synth_clients)
    rows = tuple(r.strip() for r in a.rows.split(",") if r.strip() and r.strip() != "none")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {', '.join(unknown)} (choose from {', '.join(ROWS)})")
    data = a.data
    if data is None:
        for cand in (os.environ.get("FEDFORGE_DATA"), ROOT.parent / "shared" / "data", ROOT / ".gpu-data"):
            if cand and (Path(cand) / "pfllib-mnist").is_dir():
                data = Path(cand)
                break
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: --device cuda, but torch finds no CUDA device here; use --device cpu.", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run_check(a.device, s, Budget(a.budget), data, a.pfllib, rows)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(a.out)
    c = result["algorithm_counts"]
    print(f"\nalgorithms on {a.device}: {c['pass']} pass, {c['fail']} fail, {c['skipped']} skipped")
    for row in result["algorithms"]:
        if row["status"] != "pass":
            print(f"  {row['algorithm']} ({row['model']}): {row.get('reason') or row['status']}"
                  + (f" — {row['error'].splitlines()[0]}" if row.get("error") else ""))
    print("\n" + result["markdown"])
    for t in result["targets"]:
        print(f"target: {t['target']}: {t['met']} ({t['shown']})")
    for msg in result["skipped"]:
        print(f"skipped: {msg}")
    print(f"\n{result['seconds']:.0f} s; JSON: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
