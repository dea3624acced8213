"""Dataset sources: each returns pooled arrays in the project's cache format.

Cache format (``<root>/<name>.npz``)::

    x  uint8  (N, H, W, C)   raw pixels, channels last
    y  int64  (N,)           class index 0..K-1

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

SOURCES: Registry[Callable[..., "Dataset"]] = Registry("dataset", "see `fedforge list datasets`",
                                                     populate="fedforge.data.pfllib")

DEFAULT_ROOT = Path.home() / ".cache" / "fedforge" / "data"


@dataclass
class Dataset:
    """Pooled arrays of one dataset plus what the rest of the library needs to know about it."""

    name: str
    x: np.ndarray  # uint8 NHWC
    y: np.ndarray  # int64
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # A natural client split shipped with the data (e.g. PFLlib's): per client (train, test) index arrays.
    client_split: list[tuple[np.ndarray, np.ndarray]] | None = None
    class_names: list[str] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one model input."""
        _, h, w, c = self.x.shape
        return (c, h, w)

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


def validate_arrays(x: np.ndarray, y: np.ndarray, where: str, num_classes: int | None = None) -> int:
    """Check pooled arrays against the cache format; return the number of classes."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        got = f"{getattr(x, 'dtype', type(x).__name__)} with shape {getattr(x, 'shape', '?')}"
        raise DataError(f"{where}: 'x' must be uint8 with shape (N, H, W, C), got {got}; rewrite it in the cache format.")
    if x.shape[3] not in (1, 3):
        raise DataError(f"{where}: 'x' must be channels-last with 1 or 3 channels, got shape {x.shape}; rewrite it as (N, H, W, C).")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise DataError(f"{where}: 'x' holds empty images (shape {x.shape}); rewrite it as (N, H, W, C) with H, W >= 1.")
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


def read_cache(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one cache file (no pickles are ever loaded)."""
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
    except DataError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise DataError(f"{path}: holds pickled objects, which the cache format does not allow; store plain arrays 'x' and 'y'.") from None
        raise DataError(f"{path} is not a readable npz file ({e}); delete it and rebuild the cache.") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{path} is corrupt or truncated ({type(e).__name__}); delete it and rebuild the cache.") from None
    validate_arrays(x, y, str(path))
    return x, y.astype(np.int64, copy=False)


def write_cache(path: str | os.PathLike, x: np.ndarray, y: np.ndarray) -> Path:
    """Write a cache file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    y = np.asarray(y, dtype=np.int64)
    validate_arrays(x, y, str(path))
    with atomic_open(path, hidden=False) as f:
        np.savez(f, x=x, y=y)
    return path


# ------------------------------------------------------------------------------------- statistics
def channel_stats(x: np.ndarray, max_samples: int = 10000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units (on at most ``max_samples`` samples)."""
    sub = x[: max_samples].astype(np.float32) / 255.0
    mean = sub.mean(axis=(0, 1, 2))
    std = sub.std(axis=(0, 1, 2)) + 1e-8
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# Standard normalisation constants (PFLlib and most pFL code use 0.5/0.5; these are the datasets' own).
KNOWN_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

TORCHVISION_NAMES = {"mnist": "MNIST", "fmnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


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
        return Dataset(name, x, y, k, mean, std)

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
    """Any file in the cache format: npz:PATH."""
    if not arg:
        raise DataError("npz: needs a path, as in --dataset npz:/path/to/file.npz.")
    x, y = read_cache(Path(arg).expanduser())
    mean, std = channel_stats(x)
    return Dataset(f"npz:{arg}", x, y, int(y.max()) + 1, mean, std)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@SOURCES.register("folder")
def _folder(arg: str | None, root: Path, download: bool = False) -> Dataset:
    """One sub-folder of images per class: folder:PATH (images resized to the most common size)."""
    from collections import Counter

    from PIL import Image

    if not arg:
        raise DataError("folder: needs a path, as in --dataset folder:/path/to/images.")
    base = Path(arg).expanduser()
    if not base.is_dir():
        raise DataError(f"folder {base} does not exist; give a folder with one sub-folder of images per class.")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"folder {base} has no sub-folders; put the images of each class in a sub-folder named after it.")
    files: list[tuple[Path, int]] = []
    for k, c in enumerate(classes):
        files += [(p, k) for p in sorted((base / c).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"folder {base} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    images = []
    for p, _ in files:
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
    x = np.stack(arrs)
    y = np.array([k for _, k in files], dtype=np.int64)
    mean, std = channel_stats(x)
    return Dataset(f"folder:{arg}", x, y, len(classes), mean, std, class_names=classes)


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
                   name=f"{ds.name}[{a}-{b}]", meta={**ds.meta, "class_subset": [a, b]})


def load_dataset(spec: str, root: str | os.PathLike | None = None, download: bool = False,
                 class_subset: str | None = None) -> Dataset:
    """Load a dataset by spec (``mnist``, ``digits``, ``npz:PATH``, ``folder:PATH``, ``pfllib:DIR``)."""
    name, _, arg = spec.partition(":")
    fn = SOURCES.get(name)
    ds = fn(arg or None, data_root(root), download=download)
    if class_subset:
        ds = select_classes(ds, class_subset)
    return ds
