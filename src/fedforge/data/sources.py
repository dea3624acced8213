"""Dataset sources: each returns pooled arrays in the project's cache format.

Cache format (``<root>/<name>.npz``; no pickles)::

    x         the samples, in one of four modalities:
              image   uint8   (N, H, W, C)   raw pixels, channels last, C in {1, 3}
              series  float   (N, C, L)      C channels (sensors) of L time steps
              tokens  integer (N, L)         token ids 0..vocab_size-1, id 0 is padding (at the end)
              vector  float   (N, D)         D features
    y         int64 (N,)       class index 0..K-1
    modality  str (optional)   image | series | tokens | vector; without it the modality is read off x where that
                               is unambiguous (uint8 4-D: image, float 3-D: series, float 2-D: vector, integer
                               2-D with a vocab_size: tokens)
    vocab_size int (tokens)    the number of token ids
    lengths   int (N,) (tokens, optional)  each text's length; ids at or past it are padding
    mean, std float (C,) or (D,) (series and vectors, optional)  how to standardise each channel/feature;
                               without them the pooled data's own statistics are used (mean 0, std 1: as stored)

An image file holds only ``x`` and ``y``, exactly as before modalities existed.
Sources are registered by name; a spec is ``name`` or ``kind:argument`` (``npz:PATH``,
``folder:PATH``, ``pfllib:DIR``).
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .._io import atomic_open
from ..errors import DataError
from ..registry import Registry

SOURCES: Registry[Callable[..., Dataset]] = Registry("dataset", "see `fedforge list datasets`",
                                                     populate="fedforge.data.pfllib")

DEFAULT_ROOT = Path.home() / ".cache" / "fedforge" / "data"


MODALITIES = ("image", "series", "tokens", "vector")
# what x looks like in each modality (for messages)
LAYOUTS = {"image": "uint8 (N, H, W, C)", "series": "float (N, C, L)", "tokens": "integer (N, L) token ids",
           "vector": "float (N, D)"}


@dataclass
class Dataset:
    """Pooled arrays of one dataset plus what the rest of the library needs to know about it."""

    name: str
    x: np.ndarray  # image: uint8 NHWC; series: float32 (N, C, L); tokens: int (N, L); vector: float32 (N, D)
    y: np.ndarray  # int64
    num_classes: int
    mean: tuple[float, ...]  # per channel (image, series) or feature (vector); () for tokens
    std: tuple[float, ...]
    # A natural client split shipped with the data (e.g. PFLlib's): per client (train, test) index arrays.
    client_split: list[tuple[np.ndarray, np.ndarray]] | None = None
    class_names: list[str] | None = None
    meta: dict = field(default_factory=dict)
    # A dataset made of domains (``folder:`` laid out as ROOT/<domain>/<class>/<image>): each sample's domain index
    # into ``domain_names`` (see :mod:`fedforge.data.domains`).
    domain: np.ndarray | None = None
    domain_names: list[str] | None = None
    modality: str = "image"
    vocab_size: int | None = None  # tokens only: ids are 0..vocab_size-1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One model input: (C, H, W) for images, (C, L) for series, (L,) for tokens, (D,) for vectors."""
        if self.modality == "image":
            _, h, w, c = self.x.shape
            return (c, h, w)
        return tuple(int(v) for v in self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The dataset cache: ``root`` if given, else ``$FEDFORGE_DATA``, else ``~/.cache/fedforge/data``."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("FEDFORGE_DATA")
    return Path(env).expanduser() if env else DEFAULT_ROOT


# --------------------------------------------------------------------------------------------- cache IO
MAX_CLASSES = 100_000  # a sanity bound: a stray huge label must not silently build a gigantic classifier head


def _check_image(x: np.ndarray, where: str, hint: str = "") -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        got = f"{getattr(x, 'dtype', type(x).__name__)} with shape {getattr(x, 'shape', '?')}"
        raise DataError(f"{where}: 'x' must be uint8 with shape (N, H, W, C), got {got}; rewrite it in the cache format{hint}.")
    if x.shape[3] not in (1, 3):
        raise DataError(f"{where}: 'x' must be channels-last with 1 or 3 channels, got shape {x.shape}; rewrite it as (N, H, W, C).")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise DataError(f"{where}: 'x' holds empty images (shape {x.shape}); rewrite it as (N, H, W, C) with H, W >= 1.")


def _check_floats(x: np.ndarray, where: str, modality: str) -> None:
    ndim = 3 if modality == "series" else 2
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating) or x.ndim != ndim:
        got = f"{getattr(x, 'dtype', type(x).__name__)} with shape {getattr(x, 'shape', '?')}"
        raise DataError(f"{where}: {modality} data must be {LAYOUTS[modality]}, got {got}.")
    if min(x.shape[1:]) < 1:
        raise DataError(f"{where}: 'x' holds empty {modality} samples (shape {x.shape}).")
    if not np.isfinite(x).all():
        raise DataError(f"{where}: 'x' holds NaN or infinite values; replace them (e.g. numpy.nan_to_num) before use.")


def _check_tokens(x: np.ndarray, where: str, vocab_size: int | None) -> None:
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.integer) or x.ndim != 2:
        got = f"{getattr(x, 'dtype', type(x).__name__)} with shape {getattr(x, 'shape', '?')}"
        raise DataError(f"{where}: token data must be {LAYOUTS['tokens']}, got {got}.")
    if x.shape[1] < 1:
        raise DataError(f"{where}: 'x' holds empty texts (shape {x.shape}).")
    if vocab_size is None or isinstance(vocab_size, bool) or int(vocab_size) < 2:
        raise DataError(f"{where}: token data needs a 'vocab_size' of at least 2 (ids 0..vocab_size-1, id 0 is padding), "
                        f"got {vocab_size}.")
    if x.size:
        lo, hi = int(x.min()), int(x.max())
        if lo < 0:
            raise DataError(f"{where}: token id {lo} is negative; ids run from 0 (padding) to vocab_size-1.")
        if hi >= int(vocab_size):
            raise DataError(f"{where}: token id {hi} is beyond the vocabulary of {int(vocab_size)} ids (0..{int(vocab_size) - 1}); "
                            f"raise 'vocab_size' to at least {hi + 1} or re-tokenise.")


def validate_arrays(x: np.ndarray, y: np.ndarray, where: str, num_classes: int | None = None,
                    modality: str = "image", vocab_size: int | None = None) -> int:
    """Check pooled arrays against the cache format of their modality; return the number of classes."""
    if modality == "image":
        _check_image(x, where)
    elif modality in ("series", "vector"):
        _check_floats(x, where, modality)
    elif modality == "tokens":
        _check_tokens(x, where, vocab_size)
    else:
        raise DataError(f"{where}: unknown modality '{modality}'; use one of {', '.join(MODALITIES)}.")
    if not isinstance(y, np.ndarray) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: 'y' must be a 1-D integer array, got {getattr(y, 'dtype', type(y).__name__)} with shape {getattr(y, 'shape', '?')}.")
    if len(y) != len(x):
        raise DataError(f"{where}: 'x' holds {len(x)} samples but 'y' holds {len(y)} labels; they must match.")
    if len(y) == 0:
        raise DataError(f"{where}: the dataset is empty.")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise DataError(f"{where}: labels must be class indices 0..K-1, found {lo}.")
    k = num_classes if num_classes is not None else hi + 1
    if hi >= k:
        raise DataError(f"{where}: label {hi} is out of range for {k} classes.")
    if k > MAX_CLASSES:
        raise DataError(f"{where}: label {hi} would make {k:,} classes (more than {MAX_CLASSES:,}); labels must be class "
                        f"indices 0..K-1, so renumber them.")
    return k


def infer_modality(x: np.ndarray, vocab_size: int | None = None) -> str | None:
    """The modality an untagged ``x`` unambiguously has in the cache format, or None."""
    if not isinstance(x, np.ndarray):
        return None
    if x.dtype == np.uint8 and x.ndim == 4:
        return "image"
    if np.issubdtype(x.dtype, np.floating) and x.ndim in (2, 3):
        return "series" if x.ndim == 3 else "vector"
    if np.issubdtype(x.dtype, np.integer) and x.ndim == 2 and vocab_size is not None:
        return "tokens"
    return None


def _untagged_error(x: np.ndarray, where: str) -> DataError:
    """What to add to a file whose ``x`` has no modality that can be read off it."""
    if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.integer) and x.ndim == 2:
        return DataError(f"{where}: 'x' holds integers of shape {x.shape}: if they are token ids, add modality='tokens' and "
                         f"vocab_size=<number of ids> to the file; if they are features, store them as float32 (a vector).")
    try:
        _check_image(x, where, hint=" (other data: float (N, C, L) series, float (N, D) vectors, or integer (N, L) tokens "
                                    "with a 'modality' and 'vocab_size' entry)")
    except DataError as e:
        return e
    return DataError(f"{where}: cannot tell the modality of 'x'; add a 'modality' entry ({', '.join(MODALITIES)}).")


@dataclass
class CacheArrays:
    """What one cache file holds (see the module docstring)."""

    x: np.ndarray
    y: np.ndarray
    modality: str = "image"
    vocab_size: int | None = None
    lengths: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    inferred: bool = True  # the modality was read off x (no 'modality' entry)


def _scalar(f, key: str, path: Path, kind: str):
    a = f[key]
    if a.size != 1 or (kind == "str" and a.dtype.kind != "U") or (kind == "int" and not np.issubdtype(a.dtype, np.integer)):
        what = "one string (" + ", ".join(MODALITIES) + ")" if kind == "str" else "one integer"
        raise DataError(f"{path}: '{key}' must be {what}, got {a.dtype} with shape {a.shape}.")
    return str(a.reshape(())) if kind == "str" else int(a.reshape(()))


def read_arrays(path: str | os.PathLike) -> CacheArrays:
    """Read and validate one cache file of any modality (no pickles are ever loaded)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist.")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array, not an archive of 'x' and 'y'
            raise DataError(f"{path} holds a single array, not an npz archive of 'x' (uint8 NHWC) and 'y' (int64); "
                            f"rewrite it with numpy.savez(path, x=..., y=...).")
        with loaded as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)}; a cache file holds 'x' (uint8 NHWC) and 'y' (int64).")
            x, y = f["x"], f["y"]
            tag = _scalar(f, "modality", path, "str") if "modality" in f.files else None
            vocab = _scalar(f, "vocab_size", path, "int") if "vocab_size" in f.files else None
            extra = {k: f[k] for k in ("lengths", "mean", "std") if k in f.files}
    except DataError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise DataError(f"{path}: holds pickled objects, which the cache format does not allow; store plain arrays 'x' and 'y'.") from None
        raise DataError(f"{path} is not a readable npz file ({e}); delete it and rebuild the cache.") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{path} is corrupt or truncated ({type(e).__name__}); delete it and rebuild the cache.") from None
    modality = tag or infer_modality(x, vocab)
    if modality is None:
        raise _untagged_error(x, str(path))
    if modality not in MODALITIES:
        raise DataError(f"{path}: unknown modality '{modality}'; use one of {', '.join(MODALITIES)}.")
    extras_for = {"image": (), "series": ("mean", "std"), "vector": ("mean", "std"), "tokens": ("lengths",)}[modality]
    stray = sorted(set(extra) - set(extras_for)) + (["vocab_size"] if vocab is not None and modality != "tokens" else [])
    if stray:
        raise DataError(f"{path}: '{stray[0]}' does not apply to {modality} data; remove it or fix the 'modality' entry.")
    validate_arrays(x, y, str(path), modality=modality, vocab_size=vocab)
    out = CacheArrays(x, y.astype(np.int64, copy=False), modality, vocab, inferred=tag is None)
    if modality == "tokens" and "lengths" in extra:
        out.lengths = check_lengths(extra["lengths"], x.shape, str(path))
    if modality in ("series", "vector"):
        out.mean, out.std = _given_stats(extra.get("mean"), extra.get("std"), x.shape[1], str(path))
    return out


def check_lengths(lengths: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Token lengths: one integer per text, 0..L."""
    n, L = shape
    if not isinstance(lengths, np.ndarray) or lengths.shape != (n,) or not np.issubdtype(lengths.dtype, np.integer):
        raise DataError(f"{where}: 'lengths' must be {n} integers (one per text), got "
                        f"{getattr(lengths, 'dtype', type(lengths).__name__)} with shape {getattr(lengths, 'shape', '?')}.")
    if n and (int(lengths.min()) < 0 or int(lengths.max()) > L):
        raise DataError(f"{where}: text lengths must lie in 0..{L} (the padded length), found "
                        f"{int(lengths.min())}..{int(lengths.max())}.")
    return lengths.astype(np.int64, copy=False)


def _given_stats(mean, std, width: int, where: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    if (mean is None) != (std is None):
        raise DataError(f"{where}: give both 'mean' and 'std' (one value per channel/feature) or neither.")
    if mean is None:
        return None, None
    for key, a in (("mean", mean), ("std", std)):
        if a.shape != (width,) or not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
            raise DataError(f"{where}: '{key}' must hold {width} finite floats (one per channel/feature), got {a.dtype} {a.shape}.")
    if (std <= 0).any():
        raise DataError(f"{where}: 'std' must be positive for every channel/feature.")
    return mean.astype(np.float64), std.astype(np.float64)


def read_cache(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one image cache file (uint8 NHWC ``x``, int64 ``y``); other modalities: :func:`read_arrays`."""
    arrays = read_arrays(path)
    if arrays.modality != "image":
        raise DataError(f"{path} holds {arrays.modality} data, not images; load it with npz:{path} (read_arrays).")
    return arrays.x, arrays.y


def write_cache(path: str | os.PathLike, x: np.ndarray, y: np.ndarray, *, modality: str | None = None,
                vocab_size: int | None = None, lengths: np.ndarray | None = None, mean=None, std=None) -> Path:
    """Write a cache file atomically (temporary file in the same folder, then rename).

    Images (the default) are written as ``x`` and ``y`` alone, as always; other modalities add a ``modality`` entry
    and their own (``vocab_size``, ``lengths`` for tokens; ``mean``/``std`` for series and vectors).
    """
    path = Path(path)
    y = np.asarray(y, dtype=np.int64)
    modality = modality or infer_modality(x, vocab_size)
    if modality is None:
        raise _untagged_error(x, str(path))
    validate_arrays(x, y, str(path), modality=modality, vocab_size=vocab_size)
    arrays: dict[str, np.ndarray] = {"x": x, "y": y}
    if modality != "image":
        arrays["modality"] = np.array(modality)
    if modality == "tokens":
        arrays["vocab_size"] = np.array(int(vocab_size), dtype=np.int64)
        if lengths is not None:
            arrays["lengths"] = check_lengths(np.asarray(lengths), x.shape, str(path))
    elif lengths is not None:
        raise DataError(f"{path}: 'lengths' applies to token data only.")
    if mean is not None or std is not None:
        if modality not in ("series", "vector"):
            raise DataError(f"{path}: 'mean' and 'std' apply to series and vectors only.")
        m, s_ = _given_stats(np.asarray(mean, dtype=np.float64) if mean is not None else None,
                             np.asarray(std, dtype=np.float64) if std is not None else None, x.shape[1], str(path))
        arrays["mean"], arrays["std"] = m, s_
    with atomic_open(path, hidden=False) as f:
        np.savez(f, **arrays)
    return path


# ------------------------------------------------------------------------------------- statistics
def channel_stats(x: np.ndarray, max_samples: int = 10000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units (on at most ``max_samples`` samples)."""
    sub = x[: max_samples].astype(np.float32) / 255.0
    mean = sub.mean(axis=(0, 1, 2))
    std = sub.std(axis=(0, 1, 2)) + 1e-8
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def feature_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (series (N, C, L)) or per-feature (vectors (N, D)) mean and std of the pooled data.

    Accumulated in float64 over every sample; a constant channel gets std 1 (it is only centred).
    """
    axes = (0, 2) if x.ndim == 3 else (0,)
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    std = np.where(std > 1e-12, std, 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def token_ids(x: np.ndarray, lengths: np.ndarray | None, vocab_size: int) -> np.ndarray:
    """Token ids as stored in memory: padding (0) at and past each text's length, int32 when the vocabulary fits."""
    if lengths is not None:
        beyond = np.arange(x.shape[1])[None, :] >= lengths[:, None]
        if (x[beyond] != 0).any():
            x = np.where(beyond, 0, x)
    return x.astype(np.int32 if vocab_size <= np.iinfo(np.int32).max else np.int64, copy=False)


def dataset_from_arrays(name: str, a: CacheArrays, num_classes: int | None = None, **kwargs) -> Dataset:
    """A :class:`Dataset` from validated arrays: float32 series/vectors, padding past each text's length, statistics."""
    k = num_classes if num_classes is not None else int(a.y.max()) + 1
    if a.modality == "image":
        mean, std = channel_stats(a.x)
        return Dataset(name, a.x, a.y, k, mean, std, **kwargs)
    meta = dict(kwargs.pop("meta", {}) or {})
    meta["modality_from"] = "read off x" if a.inferred else "the file's 'modality' entry"
    if a.modality == "tokens":
        x = token_ids(a.x, a.lengths, int(a.vocab_size))
        return Dataset(name, x, a.y, k, (), (), modality="tokens", vocab_size=int(a.vocab_size), meta=meta, **kwargs)
    x = a.x.astype(np.float32, copy=False)
    if a.mean is not None:
        mean, std = tuple(float(v) for v in a.mean), tuple(float(v) for v in a.std)
        meta["normalisation"] = "the file's mean and std"
    else:
        mean, std = feature_stats(x)
        meta["normalisation"] = "standardised with the pooled data's statistics"
    return Dataset(name, x, a.y, k, mean, std, modality=a.modality, meta=meta, **kwargs)


# Standard normalisation constants (PFLlib and most pFL code use 0.5/0.5; these are the datasets' own).
KNOWN_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

TORCHVISION_NAMES = {"mnist": "MNIST", "fmnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}

# The official class names, in label order (CIFAR's meta files; torchvision's ``classes``).
CLASS_NAMES = {
    "cifar10": "airplane automobile bird cat deer dog frog horse ship truck".split(),
    "cifar100": ("apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain "
                 "mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split(),
}


def _download_torchvision(name: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Download the official train and test sets through torchvision and pool them."""
    import torchvision

    cls = getattr(torchvision.datasets, TORCHVISION_NAMES[name])
    raw = root / "raw"
    xs, ys = [], []
    try:
        for train in (True, False):
            ds = cls(root=str(raw), train=train, download=True)
            data = np.asarray(ds.data)
            if data.ndim == 3:
                data = data[..., None]
            xs.append(data.astype(np.uint8))
            ys.append(np.asarray(ds.targets, dtype=np.int64))
    except Exception as e:  # network errors come in many types
        raise DataError(f"could not download {name} through torchvision ({type(e).__name__}: {e}); "
                        f"copy {name}.npz into {root} instead.") from None
    return np.concatenate(xs), np.concatenate(ys)


def _cached_source(name: str, num_classes: int) -> Callable[..., Dataset]:
    def load(arg: str | None, root: Path, download: bool = False) -> Dataset:
        path = root / f"{name}.npz"
        if not path.is_file():
            if not download:
                raise DataError(
                    f"dataset file {path} is missing; copy {name}.npz there, point --data-root/FEDFORGE_DATA at a "
                    f"folder that has it, or pass --download to fetch it through torchvision.")
            x, y = _download_torchvision(name, root)
            write_cache(path, x, y)
        x, y = read_cache(path)
        k = validate_arrays(x, y, str(path), num_classes)
        mean, std = KNOWN_STATS[name]
        if x.shape[3] != len(mean):
            raise DataError(f"{path} holds {x.shape[3]}-channel images, but {name} has {len(mean)} channel(s); "
                            f"it is not {name}: replace it with the real {name}.npz.")
        names = CLASS_NAMES.get(name)
        return Dataset(name, x, y, k, mean, std, class_names=list(names) if names and len(names) == k else None)

    load.__doc__ = f"{TORCHVISION_NAMES[name]} from the cache (<root>/{name}.npz); downloadable through torchvision."
    return load


for _name, _k in (("mnist", 10), ("fmnist", 10), ("cifar10", 10), ("cifar100", 100)):
    SOURCES.add(_name, _cached_source(_name, _k), needs_file=f"{_name}.npz")


@SOURCES.register("digits")
def _digits(arg: str | None, root: Path, download: bool = False) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 samples, 10 classes; offline)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    mean, std = channel_stats(x)
    return Dataset("digits", x, y, 10, mean, std)


@SOURCES.register("npz")
def _npz(arg: str | None, root: Path, download: bool = False) -> Dataset:
    """Any file in the cache format (images, series, tokens or vectors): npz:PATH."""
    if not arg:
        raise DataError("npz: needs a path, as in --dataset npz:/path/to/file.npz.")
    return dataset_from_arrays(f"npz:{arg}", read_arrays(Path(arg).expanduser()))


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@SOURCES.register("folder")
def _folder(arg: str | None, root: Path, download: bool = False) -> Dataset:
    """One sub-folder of images per class: folder:PATH (or ROOT/<domain>/<class>/<image> for domains; images
    resized to the most common size)."""
    if not arg:
        raise DataError("folder: needs a path, as in --dataset folder:/path/to/images.")
    base = Path(arg).expanduser()
    if not base.is_dir():
        raise DataError(f"folder {base} does not exist; give a folder with one sub-folder of images per class.")
    subdirs = sorted(p for p in base.iterdir() if p.is_dir())
    if not subdirs:
        raise DataError(f"folder {base} has no sub-folders; put the images of each class in a sub-folder named after it.")
    if _domain_layout(subdirs):
        return _domain_folder(arg, base, subdirs)
    classes = [p.name for p in subdirs]
    files: list[tuple[Path, int]] = []
    for k, c in enumerate(classes):
        files += [(p, k) for p in _images_in(base / c)]
    if not files:
        raise DataError(f"folder {base} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    x = _read_images([p for p, _ in files])
    y = np.array([k for _, k in files], dtype=np.int64)
    mean, std = channel_stats(x)
    return Dataset(f"folder:{arg}", x, y, len(classes), mean, std, class_names=classes)


def _images_in(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _domain_layout(subdirs: list[Path]) -> bool:
    """ROOT/<domain>/<class>/<image>: no top-level sub-folder holds images itself, and one holds sub-folders."""
    if any(_images_in(d) for d in subdirs):
        return False
    return any(c.is_dir() for d in subdirs for c in d.iterdir())


def _domain_folder(arg: str, base: Path, domains: list[Path]) -> Dataset:
    """A folder of domains (DomainNet, Office-Caltech10, Digit-5, PACS): classes are the union of the class
    sub-folders of all domains, each sample keeps its domain."""
    import re

    per_domain: list[list[tuple[Path, str]]] = []
    for d in domains:
        files = [(p, c.name) for c in sorted(q for q in d.iterdir() if q.is_dir()) for p in _images_in(c)]
        if not files:
            raise DataError(f"domain folder {d} holds no images; put them in {d}/<class>/<image>, or remove the folder.")
        per_domain.append(files)
    classes = sorted({c for files in per_domain for _, c in files})
    index = {c: k for k, c in enumerate(classes)}
    names = [re.sub(r"[^A-Za-z0-9_.-]+", "_", d.name).strip("._") or f"domain{i}" for i, d in enumerate(domains)]
    if len(set(names)) < len(names):
        raise DataError(f"the domain folders of {base} have names that differ only in punctuation ({', '.join(names)}); "
                        f"rename them so that each has its own letters and digits.")
    x = _read_images([p for files in per_domain for p, _ in files])
    y = np.array([index[c] for files in per_domain for _, c in files], dtype=np.int64)
    domain = np.concatenate([np.full(len(files), i, dtype=np.int64) for i, files in enumerate(per_domain)])
    mean, std = channel_stats(x)
    return Dataset(f"folder:{arg}", x, y, len(classes), mean, std, class_names=classes, domain=domain,
                   domain_names=names)


def _read_images(paths: list[Path]) -> np.ndarray:
    """Images as one uint8 NHWC array: grayscale if all are, else RGB; resized to the most common size."""
    from collections import Counter

    from PIL import Image

    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(im.copy())
        except Exception as e:
            raise DataError(f"image {p} cannot be read ({type(e).__name__}); remove or replace it.") from None
    gray = all(im.mode in ("L", "1", "I;16", "I") for im in images)
    size = Counter(im.size for im in images).most_common(1)[0][0]
    arrs = []
    for im in images:
        im = im.convert("L" if gray else "RGB")
        if im.size != size:
            im = im.resize(size, Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
        arrs.append(a[..., None] if gray else a)
    return np.stack(arrs)


def parse_class_subset(spec: str) -> tuple[int, int]:
    """'A-B' (inclusive) → (A, B)."""
    try:
        a, b = (int(v) for v in str(spec).split("-", 1)) if "-" in str(spec) else (int(spec), int(spec))
    except ValueError:
        raise DataError(f"class subset '{spec}' is not of the form A-B (for example 50-99).") from None
    if a < 0 or b < a:
        raise DataError(f"class subset '{spec}' must satisfy 0 <= A <= B.")
    return a, b


def select_classes(ds: Dataset, spec: str) -> Dataset:
    """Keep classes A..B of a pooled dataset, relabelled 0..B-A."""
    a, b = parse_class_subset(spec)
    if b >= ds.num_classes:
        raise DataError(f"class subset {spec} needs classes up to {b}, but {ds.name} has {ds.num_classes} (0-{ds.num_classes - 1}).")
    if ds.client_split is not None:
        raise DataError(f"--class-subset cannot be combined with {ds.name}, which ships its own client split.")
    keep = np.flatnonzero((ds.y >= a) & (ds.y <= b))
    names = ds.class_names[a : b + 1] if ds.class_names else None
    return replace(ds, x=ds.x[keep], y=ds.y[keep] - a, num_classes=b - a + 1, class_names=names,
                   name=f"{ds.name}[{a}-{b}]", meta={**ds.meta, "class_subset": [a, b]},
                   domain=ds.domain[keep] if ds.domain is not None else None)


def load_dataset(spec: str, root: str | os.PathLike | None = None, download: bool = False,
                 class_subset: str | None = None) -> Dataset:
    """Load a dataset by spec (``mnist``, ``digits``, ``npz:PATH``, ``folder:PATH``, ``pfllib:DIR``)."""
    name, _, arg = spec.partition(":")
    fn = SOURCES.get(name)
    ds = fn(arg or None, data_root(root), download=download)
    if class_subset:
        ds = select_classes(ds, class_subset)
    return ds
