"""``pfllib:DIR`` — a dataset partitioned by PFLlib (or FL-IoT / HtFL-OnDevice), used with its own client split as-is.

PFLlib writes ``config.json``, ``train/<i>.npz`` and ``test/<i>.npz``; each npz holds one pickled dict
``{'x': ..., 'y': int64}``. Unpickling can run code, so these files are read with a restricted unpickler that
admits only numpy arrays (and the dict holding them, and plain lists and numbers inside object arrays).

What ``x`` holds decides the modality (``"modality"`` in ``config.json`` overrides it):

* images: float32 NCHW normalised to [-1, 1] with 1 or 3 channels (or uint8 NCHW) → uint8 NHWC, as always;
* sensor series: float (N, C, 1, L) (HAR: (N, 9, 1, 128)) → series (N, C, L); (N, C, H, L) with several rows
  (PAMAP2: 9 signals × 3 IMUs × 256) → series (N, C·H, L), channel ``c·H + h``; float (N, C, L) → series;
  PFLlib feeds these values unchanged, so they are kept as stored (mean 0, std 1);
* texts: an object array of (token ids, length) pairs (PFLlib's AG News / SogouNews) → tokens (N, L) with
  lengths; an integer (N, L) array (Shakespeare) → tokens. The vocabulary size is ``config.json``'s
  ``vocab_size`` when it has one, else the largest id + 1;
* float (N, D) → vectors (kept as stored).
"""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from .sources import MODALITIES, SOURCES, Dataset, check_lengths, token_ids, validate_arrays

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
        raise DataError(f"{path}: pixel values span [{lo:.3f}, {hi:.3f}]; PFLlib images are normalised to [-1, 1] "
                        f"(if these are not images, add \"modality\": \"series\" to config.json).")
    u = np.rint((x.astype(np.float64) * 0.5 + 0.5) * 255.0)
    return np.clip(u, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def _looks_like_images(x: np.ndarray) -> bool:
    return x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[2] > 1


def _client_modality(x: np.ndarray) -> str | None:
    """The modality one client file's ``x`` holds in PFLlib's layouts (None: not one of them)."""
    if x.dtype == object:
        return "tokens"
    if np.issubdtype(x.dtype, np.integer) and x.ndim == 2:
        return "tokens"
    if x.dtype == np.uint8 and x.ndim == 4:
        return "image"
    if np.issubdtype(x.dtype, np.floating):
        if x.ndim == 4:
            return "image" if _looks_like_images(x) else "series"
        if x.ndim == 3:
            return "series"
        if x.ndim == 2:
            return "vector"
    return None


def _token_pairs(x: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """PFLlib's texts: an object array of (ids, length) pairs → (ids (n, L), lengths (n,))."""
    if x.dtype != object:
        return np.asarray(x), None
    rows = x if x.ndim == 2 and x.shape[1:] == (2,) else None
    if rows is None:
        raise DataError(f"{path}: 'x' is an object array of shape {x.shape}; PFLlib's texts are (token ids, length) pairs.")
    try:
        ids = [np.asarray(r[0]) for r in rows]
        lengths = np.array([int(r[1]) for r in rows], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: the (token ids, length) pairs cannot be read ({e}).") from None
    widths = {a.shape for a in ids}
    if len(widths) > 1 or any(a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) for a in ids[:1]):
        raise DataError(f"{path}: texts of different lengths ({sorted(w[0] if w else 0 for w in widths)[:3]}...) or non-integer "
                        f"ids; PFLlib pads every text to max_len.")
    out = np.stack(ids) if ids else np.zeros((0, 0), np.int64)
    return out, lengths


def _convert(x: np.ndarray, modality: str, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """One client file's ``x`` in the cache format of ``modality`` (and token lengths)."""
    if modality == "image":
        return _to_uint8_nhwc(x, path), None
    if modality == "tokens":
        return _token_pairs(x, path)
    if not np.issubdtype(x.dtype, np.floating) or x.ndim not in ((3, 4) if modality == "series" else (2,)):
        raise DataError(f"{path}: 'x' is {x.dtype} with shape {x.shape}, which is not {modality} data "
                        f"({'float (N, C, L) or (N, C, H, L)' if modality == 'series' else 'float (N, D)'}).")
    if x.ndim == 4:  # (N, C, H, L): rows of each channel become channels
        x = x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])
    return np.ascontiguousarray(x, dtype=np.float32), None


@SOURCES.register("pfllib")
def _pfllib(arg: str | None, root: Path, download: bool = False) -> Dataset:
    """A PFLlib-partitioned directory (config.json, train/<i>.npz, test/<i>.npz) of images, sensor series or texts,
    with its client split."""
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
    declared_modality = cfg.get("modality")
    if declared_modality is not None and declared_modality not in MODALITIES:
        raise DataError(f"{cfg_path}: unknown modality '{declared_modality}'; use one of {', '.join(MODALITIES)}.")
    split = []
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    modality, first = declared_modality, None
    for part in ("train", "test"):
        for i in range(n_clients):
            p = base / part / f"{i}.npz"
            if not p.is_file():
                raise DataError(f"{p} is missing; config.json says there are {n_clients} clients.")
            d = load_pickled_arrays(p)
            found = _client_modality(d["x"])
            if found is None:
                raise DataError(f"{p}: 'x' is {d['x'].dtype} with shape {d['x'].shape}, which is none of PFLlib's layouts; "
                                f"add \"modality\" ({', '.join(MODALITIES)}) to config.json if it is one.")
            if modality is None:
                modality = found
            elif declared_modality is None and found != modality:
                raise DataError(f"{p} holds {found} data but {first} holds {modality} data; a dataset holds one modality "
                                f"(mixed client files).")
            x, lengths = _convert(d["x"], modality, p)
            if first is not None and x.shape[1:] != parts[0][0].shape[1:]:
                what = {"series": "series of shape (C, L) =", "tokens": "texts of length", "image": "images of shape",
                        "vector": "vectors of length"}[modality]
                shape = lambda a: a.shape[1:] if len(a.shape) > 2 else a.shape[1]  # noqa: E731
                raise DataError(f"{p} holds {what} {shape(x)}, but {first} holds {shape(parts[0][0])}; every client's "
                                f"samples must have the same shape (regenerate the split with one window/text length).")
            first = first or p
            y = np.asarray(d["y"]).astype(np.int64)
            if len(y) != len(x):
                raise DataError(f"{p}: 'x' holds {len(x)} samples but 'y' holds {len(y)} labels; they must match.")
            parts.append((x, y, lengths))
    sizes = [len(y) for _, y, _ in parts]
    starts = np.cumsum([0] + sizes)
    for i in range(n_clients):
        tr = np.arange(starts[i], starts[i + 1])
        te = np.arange(starts[n_clients + i], starts[n_clients + i + 1])
        split.append((tr, te))
    x = np.concatenate([a for a, _, _ in parts])
    y = np.concatenate([b for _, b, _ in parts])
    k = int(cfg.get("num_classes") or (int(y.max()) + 1))
    vocab = None
    lengths = None
    if modality == "tokens":
        vocab = cfg.get("vocab_size")
        if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool)):
            raise DataError(f"{cfg_path}: 'vocab_size' must be an integer.")
        vocab = vocab if vocab is not None else (int(x.max()) + 1 if x.size else 2)
        if all(l is not None for _, _, l in parts):
            lengths = check_lengths(np.concatenate([l for _, _, l in parts]), x.shape, str(base))
    validate_arrays(x, y, str(base), k, modality=modality, vocab_size=vocab)
    # Cross-check the per-client label counts against config.json.
    declared = cfg.get("Size of samples for labels in clients")
    if declared is not None:
        for i, (tr, te) in enumerate(split):
            got = dict(zip(*np.unique(y[np.concatenate([tr, te])], return_counts=True)))
            want = {int(c): int(n) for c, n in declared[i]}
            if {int(c): int(n) for c, n in got.items()} != want:
                raise DataError(f"{base}: client {i}'s samples do not match the label counts in config.json.")
    name = f"pfllib:{base.name}"
    meta = {"pfllib_config": {k_: v for k_, v in cfg.items() if k_ != "Size of samples for labels in clients"}}
    if modality == "image":
        return Dataset(name, x, y, k, (0.5,) * x.shape[3], (0.5,) * x.shape[3], client_split=split, meta=meta)
    meta["normalisation"] = "as stored (PFLlib feeds these values unchanged)"
    if modality == "tokens":
        x = token_ids(x, lengths, int(vocab))
        return Dataset(name, x, y, k, (), (), client_split=split, meta=meta, modality="tokens", vocab_size=int(vocab))
    width = x.shape[1]
    return Dataset(name, x, y, k, (0.0,) * width, (1.0,) * width, client_split=split, meta=meta, modality=modality)
