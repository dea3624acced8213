"""``pfllib:DIR`` — a dataset partitioned by PFLlib, used with its own client split as-is.

PFLlib writes ``config.json``, ``train/<i>.npz`` and ``test/<i>.npz``; each npz holds one pickled dict
``{'x': float32 NCHW normalised to [-1, 1], 'y': int64}``. Unpickling can run code, so these files are read
with a restricted unpickler that admits only numpy arrays (and the dict holding them).
"""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from .sources import SOURCES, Dataset, validate_arrays

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _takes_allow_pickle(fn) -> bool:
    import inspect

    try:
        return "allow_pickle" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def load_pickled_arrays(path: Path) -> dict[str, np.ndarray]:
    """Read a PFLlib client file: an npz whose ``data`` entry is a pickled dict of numpy arrays."""
    try:
        with zipfile.ZipFile(path) as zf:
            member = "data.npy" if "data.npy" in zf.namelist() else None
            if member is None:
                raise DataError(f"{path}: no 'data' entry; PFLlib client files hold a pickled dict under 'data'.")
            raw = zf.read(member)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{path} is corrupt or truncated ({type(e).__name__}); regenerate it with PFLlib.") from None
    f = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f, allow_pickle=True) if _takes_allow_pickle(read_header) else read_header(f)
    except ValueError as e:
        raise DataError(f"{path}: not an npy entry ({e}).") from None
    if dtype != np.dtype(object) or shape != ():
        raise DataError(f"{path}: expected one pickled dict, found an array of dtype {dtype} and shape {shape}.")
    try:
        obj = _ArraysOnly(f).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: holds a pickled object other than numpy arrays ({e}); refusing to unpickle it.") from None
    except Exception as e:
        raise DataError(f"{path} cannot be unpickled ({type(e).__name__}); regenerate it with PFLlib.") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict) or not {"x", "y"} <= set(obj) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise DataError(f"{path}: expected a dict of numpy arrays with keys 'x' and 'y'.")
    return obj


def _to_uint8_nhwc(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim != 4:
        raise DataError(f"{path}: 'x' must be NCHW images, got shape {x.shape}.")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.001 or hi > 1.001:
        raise DataError(f"{path}: pixel values span [{lo:.3f}, {hi:.3f}]; PFLlib images are normalised to [-1, 1].")
    u = np.rint((x.astype(np.float64) * 0.5 + 0.5) * 255.0)
    return np.clip(u, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1).copy()


@SOURCES.register("pfllib")
def _pfllib(arg: str | None, root: Path, download: bool = False) -> Dataset:
    """A PFLlib-partitioned directory (config.json, train/<i>.npz, test/<i>.npz), with its client split."""
    if not arg:
        raise DataError("pfllib: needs a directory, as in --dataset pfllib:/path/to/MNIST.")
    base = Path(arg).expanduser()
    cfg_path = base / "config.json"
    if not cfg_path.is_file():
        raise DataError(f"{base} is not a PFLlib dataset directory (no config.json).")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{cfg_path} is not valid JSON ({e}).") from None
    n_clients = cfg.get("num_clients")
    if not isinstance(n_clients, int) or n_clients < 1:
        raise DataError(f"{cfg_path}: 'num_clients' must be a positive integer.")
    xs, ys, split = [], [], []
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for part in ("train", "test"):
        for i in range(n_clients):
            p = base / part / f"{i}.npz"
            if not p.is_file():
                raise DataError(f"{p} is missing; config.json says there are {n_clients} clients.")
            d = load_pickled_arrays(p)
            x = _to_uint8_nhwc(d["x"], p)
            y = np.asarray(d["y"]).astype(np.int64)
            parts.append((x, y))
    for i, (x, y) in enumerate(parts):
        xs.append(x)
        ys.append(y)
    sizes = [len(y) for _, y in parts]
    starts = np.cumsum([0] + sizes)
    for i in range(n_clients):
        tr = np.arange(starts[i], starts[i + 1])
        te = np.arange(starts[n_clients + i], starts[n_clients + i + 1])
        split.append((tr, te))
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    k = int(cfg.get("num_classes") or (int(y.max()) + 1))
    validate_arrays(x, y, str(base), k)
    # Cross-check the per-client label counts against config.json.
    declared = cfg.get("Size of samples for labels in clients")
    if declared is not None:
        for i, (tr, te) in enumerate(split):
            got = dict(zip(*np.unique(y[np.concatenate([tr, te])], return_counts=True)))
            want = {int(c): int(n) for c, n in declared[i]}
            if {int(c): int(n) for c, n in got.items()} != want:
                raise DataError(f"{base}: client {i}'s samples do not match the label counts in config.json.")
    name = f"pfllib:{base.name}"
    return Dataset(name, x, y, k, (0.5,) * x.shape[3], (0.5,) * x.shape[3], client_split=split,
                   meta={"pfllib_config": {k_: v for k_, v in cfg.items() if k_ != "Size of samples for labels in clients"}})
