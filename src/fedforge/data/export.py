"""Write a fedforge partition in PFLlib's dataset layout, so that PFLlib's own ``main.py`` runs on the same split.

Layout (what PFLlib's ``dataset/utils/dataset_utils.py`` writes and ``system/utils/data_utils.py`` reads)::

    DIR/config.json       num_clients, num_classes, non_iid, balance, partition,
                          "Size of samples for labels in clients" ([[label, count], ...] per client, train + test),
                          alpha, batch_size
    DIR/train/<i>.npz     np.savez_compressed(f, data={'x': x, 'y': y})   (a pickled dict under 'data')
    DIR/test/<i>.npz

``x`` is float32 NCHW normalised as PFLlib's ``generate_*.py`` scripts do (``ToTensor()`` then
``Normalize(0.5, 0.5)`` per channel: ``(u / 255 − 0.5) / 0.5`` computed in float32, so values lie in [−1, 1]);
``y`` is int64. Client ``i``'s samples keep the order of the partition's index arrays, so reading the directory
back (``pfllib:DIR``) gives every client the same samples in the same order, and the uint8 pixels exactly
(the float32 values are 2u/255 − 1, which rounds back to u). ``DIR/fedforge-export.json`` marks the directory
as an export (which dataset, scheme and seed); only a directory so marked, or an empty one, is written into.

PFLlib reads ``../dataset/<name>/{train,test}/<i>.npz`` relative to its working directory and picks the
4-layer CNN's first fully connected size from ``<name>`` (``"MNIST" in name`` → 1024, ``"Cifar10" in name`` →
1600, otherwise 10816 for 64×64 inputs); see ``docs/faithfulness.md`` for how to run it on an export.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_open, atomic_write_text
from ..errors import DataError
from .partition import Partition
from .sources import Dataset

MARKER = "fedforge-export.json"
CONFIG = "config.json"
# fedforge partitioner → PFLlib's name for it (its generate_*.py scripts take "pat", "dir", "exdir" or "-" → None)
PFLLIB_SCHEME = {"pathological": "pat", "dirichlet": "dir", "exdir": "exdir", "iid": None}
_CLIENT_FILE = re.compile(r"^\d+\.npz$")


def pfllib_pixels(x: np.ndarray) -> np.ndarray:
    """uint8 NHWC → float32 NCHW in [−1, 1], bit for bit what ``ToTensor()`` + ``Normalize(0.5, 0.5)`` give."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return t.to(torch.float32).div(255).sub(0.5).div(0.5).numpy()


def check_export_dir(out: str | os.PathLike) -> Path:
    """``out`` if it may receive an export (absent, empty, or an earlier export); DataError otherwise."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"--export-pfllib {out} is a file; give a directory (new, empty, or an earlier export).")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise DataError(f"--export-pfllib {out} is not empty and holds no earlier export ({MARKER}); "
                        f"give a new or empty directory so that no other files are overwritten.")
    return out


def pfllib_config(ds: Dataset, part: Partition, batch_size: int) -> dict:
    """``config.json`` with PFLlib's keys (in PFLlib's order) for ``part`` over ``ds``."""
    stats = []
    for tr, te in zip(part.train, part.test):
        labels, counts = np.unique(ds.y[np.concatenate([tr, te]).astype(np.int64)], return_counts=True)
        stats.append([[int(c), int(n)] for c, n in zip(labels, counts)])
    scheme = part.scheme
    balance = part.params.get("balance", scheme == "iid")
    return {
        "num_clients": part.num_clients,
        "num_classes": int(ds.num_classes),
        "non_iid": scheme != "iid",
        "balance": bool(balance),
        "partition": PFLLIB_SCHEME.get(scheme, scheme),
        "Size of samples for labels in clients": stats,
        "alpha": part.params.get("alpha"),
        "batch_size": int(batch_size),
    }


def _clear_earlier_export(out: Path) -> None:
    for sub in ("train", "test"):
        d = out / sub
        if d.is_dir():
            for p in d.iterdir():
                if _CLIENT_FILE.match(p.name):
                    p.unlink()
    if (out / CONFIG).is_file():
        (out / CONFIG).unlink()


def export_pfllib(ds: Dataset, part: Partition, out: str | os.PathLike, batch_size: int = 10) -> Path:
    """Write ``part`` over ``ds`` into ``out`` in PFLlib's layout; returns the directory.

    ``config.json`` is written last, so an interrupted export is never read as a whole one (``pfllib:DIR`` needs it).
    """
    if ds.x.ndim != 4 or ds.x.dtype != np.uint8:
        raise DataError(f"{ds.name}: only image datasets (uint8 NHWC) can be exported in PFLlib's layout.")
    part.check(ds.y)
    out = check_export_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    _clear_earlier_export(out)
    marker = {"written_by": "fedforge", "dataset": ds.name, "scheme": part.scheme, "params": part.params,
              "seed": part.seed, "fingerprint": part.fingerprint, "num_clients": part.num_clients,
              "pixels": "float32 NCHW, (u/255 - 0.5)/0.5 per channel (ToTensor + Normalize(0.5, 0.5))"}
    atomic_write_text(out / MARKER, json.dumps(marker, indent=2, default=str) + "\n")
    for sub, lists in (("train", part.train), ("test", part.test)):
        (out / sub).mkdir(exist_ok=True)
        for i, idx in enumerate(lists):
            idx = np.asarray(idx, dtype=np.int64)
            data = {"x": pfllib_pixels(ds.x[idx]), "y": ds.y[idx].astype(np.int64)}
            with atomic_open(out / sub / f"{i}.npz", hidden=True, durable=False) as f:
                np.savez_compressed(f, data=data)
    atomic_write_text(out / CONFIG, json.dumps(pfllib_config(ds, part, batch_size)) + "\n")
    return out
