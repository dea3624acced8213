"""The fixed CIFAR-100 split behind the built-in generators v2 (issue 23).

Of each class's 600 images (the pooled train + test sets of the dataset cache, in cache order), a seeded draw of
``HELD_OUT_PER_CLASS`` = 200 is *held out*: no built-in generator v2 is trained on them, and the benchmarks draw
their private context and test images of CIFAR-100 from them only (``fedforge synth`` benchmarks with
``builtin-c100``, the generator quality benchmark's real reference and held-out classifier accuracy). The other 400
per class train the generators (classes 0-49 for ``builtin``, all 100 for ``builtin-c100``).

The draw: for class c, ``numpy.random.default_rng([SEED, c]).permutation`` of the class's positions; the first 200
are held out. The result is saved in ``fedforge/assets/cifar100-generator-split.json`` (the held-out positions,
sorted) and :func:`held_out_positions` checks that the draw reproduces the file.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import DataError

SEED = 2026
HELD_OUT_PER_CLASS = 200
ASSET = "cifar100-generator-split.json"


def draw_held_out(y: np.ndarray, per_class: int = HELD_OUT_PER_CLASS, seed: int = SEED) -> np.ndarray:
    """Sorted positions of the held-out images: ``per_class`` of each class, drawn as the module docstring says."""
    y = np.asarray(y)
    out = []
    for c in np.unique(y):
        pos = np.flatnonzero(y == c)
        if pos.size < per_class:
            raise DataError(f"class {int(c)} has {pos.size} images, fewer than the {per_class} to hold out.")
        out.append(pos[np.random.default_rng([seed, int(c)]).permutation(pos.size)[:per_class]])
    return np.sort(np.concatenate(out))


def asset_path() -> Path:
    return Path(str(resources.files("fedforge") / "assets" / ASSET))


def held_out_positions(y: np.ndarray) -> np.ndarray:
    """The held-out positions of the full CIFAR-100 cache (60,000 labels ``y`` in cache order), as saved."""
    y = np.asarray(y)
    saved = json.loads(asset_path().read_text())
    if len(y) != int(saved["images"]):
        raise DataError(f"the generator split is defined on the full CIFAR-100 cache ({saved['images']} images), "
                        f"got {len(y)} labels; load cifar100 without a class subset.")
    held = np.asarray(saved["held_out"], dtype=np.int64)
    if not np.array_equal(held, draw_held_out(y, int(saved["per_class"]), int(saved["seed"]))):
        raise DataError("this CIFAR-100 cache does not reproduce the saved generator split (another image order?); "
                        "rebuild the cache from the torchvision files.")
    return held


def generator_positions(y: np.ndarray, classes: list[int] | None = None) -> np.ndarray:
    """Positions a generator v2 trains on: not held out, and (if given) of ``classes`` only."""
    y = np.asarray(y)
    keep = np.ones(len(y), bool)
    keep[held_out_positions(y)] = False
    if classes is not None:
        keep &= np.isin(y, classes)
    return np.flatnonzero(keep)


def write_asset(y: np.ndarray, path: str | Path | None = None) -> Path:
    held = draw_held_out(y)
    path = Path(path) if path else asset_path()
    path.write_text(json.dumps({"dataset": "cifar100", "images": int(len(y)), "seed": SEED,
                                "per_class": HELD_OUT_PER_CLASS, "rule": "numpy.random.default_rng([seed, c]).permutation "
                                "of class c's positions in the pooled cache; the first per_class are held out",
                                "held_out": held.tolist()}) + "\n")
    return path
