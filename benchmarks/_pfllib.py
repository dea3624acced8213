"""Running PFLlib's own ``main.py`` as a subprocess, shared by the benchmarks that compare with it
(``benchmarks/reference_runs.py``: accuracies; ``benchmarks/gpu_check.py``: seconds per round).

PFLlib runs unmodified from a scratch work tree: ``WORK/system`` is a copy of ``<reference>/pfllib/system`` (so that
no ``__pycache__`` lands in the reference tree), ``WORK/dataset/<NAME>`` a symbolic link to a split in PFLlib's
layout (PFLlib reads ``../dataset/<NAME>/{train,test}/<i>.npz`` from its working directory ``system/``; ``NAME``
decides the CNN's first linear layer: ``MNIST`` in it → 1024, ``Cifar10`` in it (so also ``Cifar100``) → 1600,
otherwise 10816), and ``WORK/standins`` holds stand-in modules for imports that are missing here and that the
compared path never uses; it goes first on the subprocess's ``PYTHONPATH`` only.

Stand-ins (:data:`STANDINS`): ``cvxpy`` (imported by FedPAC's server, which ``main.py`` imports at start; used by
FedPAC alone), ``calmsize`` (formats byte counts in ``main.py``'s memory report, printed after the last round) and
``h5py`` (``save_results`` writes the accuracy curve to ``../results/*.h5`` after the last round and
``average_data`` reads it back; the stand-in writes the same arrays to that file with ``numpy.savez``).
``scikit-learn`` is on the timed path (every evaluation computes ROC-AUC with it) and has no stand-in.

What PFLlib prints and this module reads back: per round ``-----Round number: i-----`` then, for each evaluation,
``Averaged Test Accuracy: ...`` and friends (:func:`parse_pfllib_stdout`), and at the end of each loop iteration
``----- time cost ----- <seconds>`` (``Server.train`` in ``flcore/servers/serveravg.py`` and most other servers: the
wall time of iteration i, evaluation, local training and aggregation included; :func:`parse_round_seconds`).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("FEDFORGE_REFERENCE_CODE", REPO.parent / "shared" / "reference-code"))

CVXPY_STANDIN = '''"""Stand-in for cvxpy, written by fedforge's benchmarks/_pfllib.py: PFLlib's main.py imports FedPAC's
server, which imports cvxpy; FedPAC is not run by fedforge's benchmarks, so nothing here is ever used."""


def __getattr__(name):
    raise RuntimeError("cvxpy is a stand-in here (FedPAC is not run by fedforge's benchmarks); pip install cvxpy")
'''

CALMSIZE_STANDIN = '''"""Stand-in for calmsize, written by fedforge's benchmarks/_pfllib.py: PFLlib's memory reporter (printed after
the last round) formats byte counts with it; here they print as plain numbers of bytes."""


def size(num_bytes):
    return float(num_bytes)
'''

H5PY_STANDIN = '''"""Stand-in for h5py, written by fedforge's benchmarks/_pfllib.py: PFLlib writes its accuracy curve to
../results/*.h5 after the last round (Server.save_results) and reads it back (utils/result_utils.average_data).
This writes the same named arrays to that file with numpy.savez and reads them back; nothing else of h5py."""
import numpy as np


class File:
    def __init__(self, path, mode="r"):
        self.path, self.mode, self.data = str(path), mode, {}
        if "r" in mode:
            with open(self.path, "rb") as f:
                with np.load(f, allow_pickle=False) as z:
                    self.data = {k: z[k] for k in z.files}

    def create_dataset(self, name, data=None, **_):
        self.data[name] = np.asarray(data)

    def get(self, name, default=None):
        return self.data.get(name, default)

    def __getitem__(self, name):
        return self.data[name]

    def close(self):
        if "w" in self.mode or "a" in self.mode:
            with open(self.path, "wb") as f:
                np.savez(f, **self.data)
            self.mode = "r"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
'''

# module -> its stand-in (only for modules off the compared path; see the docstring)
STANDINS = {"cvxpy": CVXPY_STANDIN, "calmsize": CALMSIZE_STANDIN, "h5py": H5PY_STANDIN}
REQUIRED = ("sklearn", "numpy", "torch", "torchvision")  # on PFLlib's path: never stood in for


class PfllibUnavailable(SystemExit):
    """PFLlib cannot run here (its code or a module it needs is missing); the message names what and the fix."""


def pfllib_system(reference: str | os.PathLike | None = None) -> Path:
    """``<reference>/pfllib/system`` (default ``$FEDFORGE_REFERENCE_CODE``, else ``../shared/reference-code``), or
    the PFLlib work tree ``reference`` itself when it holds ``system/main.py``."""
    base = Path(reference) if reference is not None else REFERENCE
    for system in (base / "system", base / "pfllib" / "system"):
        if (system / "main.py").is_file():
            return system
    raise FileNotFoundError(f"PFLlib's code is not at {base} (no system/main.py; set FEDFORGE_REFERENCE_CODE or --pfllib)")


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def setup_worktree(work: Path, data_dir: Path, pf_name: str, *, reference: str | os.PathLike | None = None,
                   standins: Iterable[str] = ("cvxpy",)) -> Path:
    """``work/{system, dataset/<pf_name>, results, standins}`` for PFLlib; returns ``work/system`` (its cwd).

    Modules named in ``standins`` that are not importable get their stand-in (:data:`STANDINS`); any other missing
    module PFLlib imports (``h5py``, ``calmsize``, ``sklearn``, ...) raises :class:`PfllibUnavailable`.
    """
    allowed = set(standins)
    missing = [m for m in (*STANDINS, *REQUIRED) if m not in allowed and not _importable(m)]
    if missing:
        raise PfllibUnavailable(f"PFLlib's main.py needs {', '.join(missing)}; pip install "
                                + " ".join("scikit-learn" if m == "sklearn" else m for m in missing))
    src = pfllib_system(reference)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    system = work / "system"
    shutil.copytree(src, system, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    link = work / "dataset" / pf_name
    link.parent.mkdir(exist_ok=True)
    if link.is_symlink() and Path(os.readlink(link)) != Path(data_dir).resolve():
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(Path(data_dir).resolve(), target_is_directory=True)
    for m in sorted(allowed & set(STANDINS)):
        if not _importable(m):
            (work / "standins" / m).mkdir(parents=True, exist_ok=True)
            (work / "standins" / m / "__init__.py").write_text(STANDINS[m])
    return system


def written_standins(work: Path) -> list[str]:
    """The stand-in modules a work tree holds (what the subprocess imports instead of the real thing)."""
    d = Path(work) / "standins"
    return sorted(p.name for p in d.iterdir() if (p / "__init__.py").is_file()) if d.is_dir() else []


def pfllib_env(work: Path, extra: dict | None = None) -> dict[str, str]:
    """The subprocess's environment: unbuffered output, no bytecode files, the stand-ins first on PYTHONPATH."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}
    standins = Path(work) / "standins"
    if standins.is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(standins), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_main(system: Path, args: Sequence[str], log: Path, env: dict[str, str], *, timeout: float | None = None,
             on_start: Callable[[subprocess.Popen], None] | None = None) -> tuple[int, float, bool]:
    """Run ``python main.py ARGS`` in ``system`` with its output (stdout and stderr) in ``log``:
    (return code, seconds, timed out). Interrupted (Ctrl-C), the subprocess is stopped before the error goes on."""
    cmd = [sys.executable, "main.py", *args]
    t0 = time.time()
    timed_out = False
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=system, stdout=f, stderr=subprocess.STDOUT, env=env)
        if on_start is not None:
            on_start(proc)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
    return rc, time.time() - t0, timed_out


# ------------------------------------------------------------------------------------------ reading its output
_ROUND = re.compile(r"-+Round number: (\d+)-+")
_EVAL = re.compile(r"^\s*-*\s*(Evaluate.*?)\s*-*\s*$")
_VALUE = re.compile(r"^(Averaged Train Loss|Averaged Test Accuracy|Averaged Test AUC|Std Test Accuracy|Std Test AUC):"
                    r"\s*(\S+)")
_KEYS = {"Averaged Train Loss": "train_loss", "Averaged Test Accuracy": "acc", "Averaged Test AUC": "auc",
         "Std Test Accuracy": "acc_std", "Std Test AUC": "auc_std"}
_TIME = re.compile(r"-+\s*time cost\s*-+\s*([-+0-9.eE]+)\s*$")


def parse_pfllib_stdout(text: str) -> list[dict]:
    """Every evaluation PFLlib printed, in order: ``{"round", "label", "acc", ...}`` (``stage: "finetune"`` for the
    one after FedBABU's fine-tuning, which carries the last round's number)."""
    evals: list[dict] = []
    rnd, label, cur = None, "", None
    for line in text.splitlines():
        m = _ROUND.search(line)
        if m:
            rnd, label, cur = int(m.group(1)), "", None
            continue
        m = _EVAL.match(line)
        if m and rnd is not None:
            label, cur = m.group(1).strip(), None
            continue
        m = _VALUE.match(line.strip())
        if m and rnd is not None:
            key = _KEYS[m.group(1)]
            if cur is None or key in cur:  # a new evaluation block starts (its first value line)
                cur = {"round": rnd, "label": label}
                if "fine-tuned" in label:
                    cur["stage"] = "finetune"
                evals.append(cur)
            try:
                cur[key] = float(m.group(2))
            except ValueError:
                cur[key] = float("nan")
    return [e for e in evals if "acc" in e]


def parse_round_seconds(text: str) -> list[float]:
    """The wall time of each of PFLlib's loop iterations i = 0, 1, ... (its ``time cost`` lines), in order."""
    out = []
    for line in text.splitlines():
        m = _TIME.search(line)
        if m:
            try:
                out.append(float(m.group(1)))
            except ValueError:
                pass
    return out


def read_h5_acc(path: Path) -> list[float] | None:
    """PFLlib's accuracy curve at full precision from its ``results/*.h5`` (None when h5py or the file is missing)."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return [float(v) for v in f["rs_test_acc"][()]]
    except (OSError, KeyError, ImportError):
        return None
