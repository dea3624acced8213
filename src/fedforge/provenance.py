"""Where a result came from: versions, git commit, platform and the exact command line."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

# environment variables that can change results or say where the data came from
ENV_VARS = ("FEDFORGE_DATA", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "CUBLAS_WORKSPACE_CONFIG",
            "PYTHONHASHSEED")


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the fedforge checkout in use (``-dirty`` when tracked files differ); None for an installed copy."""
    here = Path(path) if path else Path(__file__).resolve().parent
    if not path and any(p in ("site-packages", "dist-packages") for p in here.parts):
        return None  # an installed copy: a git repository around the environment is not fedforge's source
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    import numpy
    import torch

    from ._version import __version__

    return {
        "fedforge": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "command": sys.argv,
        "command_line": shlex.join(getattr(sys, "orig_argv", sys.argv)),  # exactly as typed, interpreter included
        "executable": sys.executable,
        "cwd": os.getcwd(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "packages": {name: _version(name) for name in ("torchvision", "safetensors", "scikit-learn", "pyyaml")},
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
