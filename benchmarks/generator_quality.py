"""Sample quality of fedforge's image generators: FID, precision and recall in the built-in encoder's feature space,
and how recognisable their samples are to a classifier trained on real images.

For each generator spec (``--generators builtin,builtin:DIR2``, loaded with ``fedforge.generative.load_generator``):

1. **FID, precision, recall** (Heusel et al. 2017; Kynkäänniemi et al. 2019, k-NN radius ``k`` = 3) between ``n``
   generated images (for a conditional generator: the class-balanced conditioned draws of 2.) and the real
   reference, both embedded by the shipped encoder (``fedforge.synth.encoder``,
   ``builtin``: the zoo's ``cnn`` trained on CIFAR-100 classes 0-49; its 512-d ``features(x)``, the layer before
   the head). This is *not* the Inception feature space of published FIDs: compare rows of this table only.
   Precision: the share of generated images inside the real images' k-NN manifold (fidelity); recall: the share of
   real images inside the generated images' manifold (diversity).
2. **Recognisability**: a classifier (``cnn_bn`` of the model zoo, trained here on real images of the same classes and
   cached under ``--out``) judges the samples. For a class-conditional generator (``gen.conditional`` true, with
   ``gen.classes``, the dataset class ids it was trained on) the samples are drawn class-balanced with
   ``gen.synthesize(gen.sample_prior(m, rng), condition=class_id)`` and the figure is the classifier's accuracy on
   them against the requested class; for an unconditional generator it is not applicable (None). For every
   generator: the classifier's mean max-softmax confidence on the samples and the entropy (nats) of the histogram of
   its predicted classes (mode coverage; ln K for a uniform spread over K classes).
3. **A sample grid** per generator (10 classes × 8 for conditional generators, 8 × 8 otherwise).

Real data. ``cifar100.npz`` holds the official train and test sets pooled and shuffled; the official split is not
recoverable from it. The held-out images are those of the split behind the built-in generators v2 (issue 23,
``fedforge.generative.split``): of each class, ``--held-out-per-class`` = 200 images drawn by
``numpy.random.default_rng([2026, class_id]).permutation`` of the class's images in cache order (so a class's split
does not depend on ``--classes``); no v2 generator trains on them. The rest is the train split. The reference set is
the held-out images of the generator's classes (``--classes`` for an unconditional generator, ``gen.classes`` for a
conditional one); the classifier learns from the train split and is scored on the held-out images. The "real" row of the
table is the train split judged the same way as a generator (its FID/precision/recall are the floor a perfect
generator of that many images would reach).

Outputs: ``OUT/<name>.json`` and ``OUT/<name>.png`` per generator; both are copied into the folder beside the table
(``docs/benchmarks/generator-quality/``), and the table (``--table``) is rebuilt from every JSON in that folder, so a
later run with only a new spec adds its row and keeps the others.

    scripts/cpu-slot .venv/bin/python benchmarks/generator_quality.py --data-root /work/shared/data --generators builtin

From Python, in the repository root (re-uses the cached classifier; see ``prepare``, ``evaluate_generator``,
``record``)::

    ctx = prepare(data_root="/work/shared/data")          # same defaults as the command line
    record(evaluate_generator(ctx, "builtin:DIR2"), ctx)  # OUT/<name>.json + grid, copied beside the table, table rebuilt
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from fedforge.errors import ConfigError, FedforgeError  # noqa: E402

SCHEMA = "fedforge-generator-quality/1"
DEFAULT_OUT = "bench-runs/generator-quality"
DEFAULT_TABLE = "docs/benchmarks/generator-quality.md"
SCRIPT = "benchmarks/generator_quality.py"


def log(msg: str) -> None:
    print(f"[generator-quality] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- metrics
def fid(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples):
    ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½), in float64, the matrix square root by ``scipy.linalg.sqrtm``.

    Covariances of ReLU features are often singular (a unit that never fires; fewer samples than dimensions), which
    makes scipy warn; the root is still accurate then (on the shipped generator it agrees with an eigenvalue-based
    root to 1e-7), so the warning is silenced, and only a root that is not finite is retried with ``eps`` added to
    both diagonals.
    """
    import warnings

    from scipy import linalg

    xa = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    xb = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    if xa.ndim != 2 or xb.ndim != 2 or xa.shape[1] != xb.shape[1] or len(xa) < 2 or len(xb) < 2:
        raise ConfigError(f"FID needs two sets of at least 2 feature vectors of one size, got {xa.shape} and {xb.shape}.")
    mu_a, mu_b = xa.mean(0), xb.mean(0)
    sa, sb = np.cov(xa, rowvar=False), np.cov(xb, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(sa @ sb)
        if not np.isfinite(root).all():
            off = eps * np.eye(sa.shape[0])
            root = linalg.sqrtm((sa + off) @ (sb + off))
    root = np.real(root)  # the imaginary part of a product of two PSD matrices' root is rounding noise
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sa) + np.trace(sb) - 2.0 * np.trace(root))


def _distance_chunks(query: torch.Tensor, ref: torch.Tensor, chunk: int):
    """Yields (start, distances of query[start:start+chunk] to every row of ref)."""
    for s in range(0, query.shape[0], chunk):
        yield s, torch.cdist(query[s : s + chunk], ref)


def knn_radii(feats: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row (the row itself, at distance 0, is not counted)."""
    x = feats.double()
    if x.shape[0] <= k:
        raise ConfigError(f"a k-NN radius with k = {k} needs more than {k} samples, got {x.shape[0]}.")
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for s, d in _distance_chunks(x, x, chunk):
        out[s : s + d.shape[0]] = d.kthvalue(k + 1, dim=1).values
    return out


def coverage_of(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Share of ``query`` rows inside the union of balls around ``ref`` rows with the given radii."""
    q, r = query.double(), ref.double()
    inside = 0
    for _, d in _distance_chunks(q, r, chunk):
        inside += int((d <= radii.unsqueeze(0)).any(1).sum())
    return inside / q.shape[0]


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision = share of ``fake`` inside the real k-NN
    manifold, recall = share of ``real`` inside the fake k-NN manifold."""
    precision = coverage_of(fake, real, knn_radii(real, k, chunk), chunk)
    recall = coverage_of(real, fake, knn_radii(fake, k, chunk), chunk)
    return precision, recall


def prediction_stats(probs: torch.Tensor, num_classes: int) -> dict[str, float | int]:
    """Mean max-softmax confidence, entropy (nats) of the predicted-class histogram, and classes predicted at least once."""
    pred = probs.argmax(1)
    hist = torch.bincount(pred, minlength=num_classes).double()
    p = hist / hist.sum()
    nz = p[p > 0]
    return {"mean_confidence": float(probs.max(1).values.mean()), "pred_entropy": float(-(nz * nz.log()).sum()),
            "pred_entropy_max": math.log(num_classes), "classes_predicted": int((hist > 0).sum())}


# ---------------------------------------------------------------------------------------------- real data
def parse_classes(spec: str) -> tuple[int, int]:
    from fedforge.data.sources import parse_class_subset

    return parse_class_subset(spec)


# the generator split of issue 23 (fedforge.generative.split: HELD_OUT_PER_CLASS, SEED); the test checks that
# heldout_split with these values reproduces its saved held-out positions
HELD_OUT_PER_CLASS, SPLIT_SEED = 200, 2026


def heldout_split(y: np.ndarray, class_ids: Sequence[int], held_out_per_class: int = HELD_OUT_PER_CLASS,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) positions into ``y`` (dataset class ids, in cache order): of each class, the first
    ``held_out_per_class`` of ``default_rng([seed, class_id]).permutation`` of its positions are held out, so one
    class's split is the same whichever other classes are evaluated."""
    from fedforge.generative.split import draw_held_out

    pos = np.flatnonzero(np.isin(y, list(class_ids)))
    counts = np.bincount(y[pos]) if pos.size else np.zeros(0, int)
    for c in class_ids:
        if int(counts[c] if c < len(counts) else 0) <= held_out_per_class:
            raise ConfigError(f"class {c} has {int(counts[c] if c < len(counts) else 0)} images; --held-out-per-class "
                              f"{held_out_per_class} leaves none to train on; hold out fewer.")
    test = pos[draw_held_out(y[pos], held_out_per_class, seed)]  # draw_held_out gives positions into y[pos]
    return np.setdiff1d(pos, test), np.sort(test)


def balanced_take(y: np.ndarray, positions: np.ndarray, class_ids: Sequence[int], n: int, seed: int) -> np.ndarray:
    """``n`` positions (of ``positions``) spread evenly over ``class_ids`` (the first n mod K classes get one more)."""
    k = len(class_ids)
    rng = np.random.default_rng(seed)
    out = []
    for i, c in enumerate(class_ids):
        m = n // k + (1 if i < n % k else 0)
        pool = positions[y[positions] == c]
        if m > len(pool):
            raise ConfigError(f"class {c} has {len(pool)} train-split images, fewer than the {m} asked; lower --n.")
        out.append(rng.choice(pool, size=m, replace=False))
    return np.sort(np.concatenate(out))


# -------------------------------------------------------------------------------------------- classifier
CLASSIFIER_DEFAULTS = dict(arch="cnn_bn", epochs=5, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=128,
                           augment=True, train_limit=None)


def _classifier_settings(lo: int, hi: int, held_out_per_class: int, split_seed: int, seed: int, **overrides: Any) -> dict:
    s = {**CLASSIFIER_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(s) - set(CLASSIFIER_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown classifier setting {sorted(unknown)[0]!r}; known: {', '.join(CLASSIFIER_DEFAULTS)}.")
    return {**s, "classes": [lo, hi], "held_out_per_class": held_out_per_class, "split_seed": split_seed, "seed": seed,
            "dataset": "cifar100"}


def _classifier_name(s: dict) -> str:
    lim = f"-n{s['train_limit']}" if s["train_limit"] else ""
    return (f"{s['arch']}-c{s['classes'][0]}-{s['classes'][1]}-h{s['held_out_per_class']}s{s['split_seed']}"
            f"-e{s['epochs']}-lr{s['lr']:g}-b{s['batch_size']}{'-aug' if s['augment'] else ''}{lim}-s{s['seed']}")


def train_classifier(fed, settings: dict, device: str = "cpu"):
    """Train ``settings['arch']`` on client 0's train view of ``fed`` (momentum SGD through the one training loop,
    cosine learning rate per epoch); returns (model, per-epoch log)."""
    from fedforge.core.training import Optimizer, eval_loop, train_loop
    from fedforge.models import create_model

    s = settings
    model = create_model(s["arch"], fed.input_shape, fed.num_classes, seed=s["seed"]).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = Optimizer("momentum", s["momentum"], s["weight_decay"])
    opt_state: dict = {}
    gen = torch.Generator().manual_seed(s["seed"])  # batch order and augmentation draws (on the CPU, as the engine's)
    hist = []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s["seed"])
        for epoch in range(s["epochs"]):
            lr = 0.5 * s["lr"] * (1 + math.cos(math.pi * epoch / s["epochs"]))
            st = train_loop(model, fed.train_batches(0, s["batch_size"], gen), lr, optimizer=opt, opt_state=opt_state)
            model.eval()
            acc = eval_loop(model, fed.test_batches(0, 1000)).acc
            hist.append({"epoch": epoch + 1, "lr": lr, "loss": st.loss, "heldout_acc": acc,
                         "seconds": round(time.perf_counter() - t0, 1)})
            log(f"classifier epoch {epoch + 1}/{s['epochs']}: loss {st.loss:.4f}, held-out acc {acc:.4f} "
                f"({time.perf_counter() - t0:.0f}s)")
    return model.eval(), hist


def load_or_train_classifier(fed, settings: dict, cache_dir: Path, device: str = "cpu"):
    """The classifier for ``settings``, from ``cache_dir/<name>.safetensors`` when it was trained with exactly these
    settings, else trained now and cached there. Returns (model, info dict)."""
    from safetensors.torch import load_file

    from fedforge.models import create_model
    from fedforge.synth.encoder import save_checkpoint

    name = _classifier_name(settings)
    weights, meta_path = cache_dir / f"{name}.safetensors", cache_dir / f"{name}.json"
    if weights.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == settings:
            model = create_model(settings["arch"], fed.input_shape, fed.num_classes, seed=0)
            model.load_state_dict(load_file(str(weights)))
            log(f"classifier: cached {weights}")
            info = {k: meta[k] for k in ("name", "settings", "epochs_log", "train_seconds")}
            return model.to(device).eval(), {**info, "cached": True, "path": str(weights)}
        log(f"classifier: {weights} was trained with other settings; training again")
    log(f"classifier: training {settings['arch']} for {settings['epochs']} epoch(s) on {fed.num_train(0)} images")
    t0 = time.perf_counter()
    model, hist = train_classifier(fed, settings, device)
    seconds = round(time.perf_counter() - t0, 1)
    ds = fed.dataset
    save_checkpoint(weights, model, settings["arch"], fed.input_shape, fed.num_classes, ds.mean, ds.std,
                    name=name, settings=settings, epochs_log=hist, train_seconds=seconds,
                    torch_threads=torch.get_num_threads())
    return model.eval(), {"name": name, "settings": settings, "epochs_log": hist, "train_seconds": seconds,
                          "cached": False, "path": str(weights)}


# --------------------------------------------------------------------------------------------- context
@dataclass
class QualityContext:
    """Everything a generator is judged against: data, split, encoder, reference features, classifier."""

    dataset: Any  # the --classes subset (labels 0..K-1; dataset class id = label + lo)
    fed: Any  # one "client": train split / held-out split, for the classifier
    lo: int
    hi: int
    train_pos: np.ndarray
    test_pos: np.ndarray
    encoder: Any
    classifier: torch.nn.Module
    classifier_info: dict
    settings: dict
    out: Path
    table: Path
    device: str = "cpu"
    test_feats: torch.Tensor | None = None
    real_eval: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)

    @property
    def class_ids(self) -> list[int]:
        return list(range(self.lo, self.hi + 1))

    @property
    def num_classes(self) -> int:
        return self.hi - self.lo + 1

    def class_id(self, pos: np.ndarray) -> np.ndarray:
        return self.dataset.y[pos] + self.lo


def prepare(data_root: str | None = None, classes: str = "0-49", out: str | Path = DEFAULT_OUT,
            table: str | Path = DEFAULT_TABLE, n: int = 5000, seed: int = 0, k: int = 3,
            held_out_per_class: int = HELD_OUT_PER_CLASS, split_seed: int = SPLIT_SEED, device: str = "cpu", encoder: str = "builtin", **classifier: Any) -> QualityContext:
    """Load the data, split it, embed the held-out reference, and load (or train once and cache) the classifier.

    ``classifier`` overrides :data:`CLASSIFIER_DEFAULTS` (``epochs``, ``train_limit``, ...); a classifier trained
    with other settings is cached under another name, so the default one is never overwritten by a smaller one.
    """
    from fedforge.data import Federation, Partition, load_dataset
    from fedforge.synth.encoder import load_encoder

    lo, hi = parse_classes(classes)
    t0 = time.perf_counter()
    ds = load_dataset("cifar100", data_root, class_subset=f"{lo}-{hi}")
    train_pos, test_pos = heldout_split(ds.y + lo, range(lo, hi + 1), held_out_per_class, split_seed)
    settings = {"n": int(n), "seed": int(seed), "k": int(k), "classes": [lo, hi], "held_out_per_class": held_out_per_class,
                "split_seed": split_seed, "encoder": encoder, "dataset": "cifar100"}
    cls_settings = _classifier_settings(lo, hi, held_out_per_class, split_seed, seed, **classifier)
    fed_train = train_pos
    if cls_settings["train_limit"]:
        fed_train = np.sort(np.random.default_rng(seed).choice(train_pos, size=min(int(cls_settings["train_limit"]), len(train_pos)), replace=False))
    fed = Federation(ds, Partition([fed_train], [test_pos], "generator-quality", seed=split_seed), device=device,
                     augment=bool(cls_settings["augment"]))
    log(f"data: cifar100 classes {lo}-{hi}: {len(train_pos)} train-split, {len(test_pos)} held-out images "
        f"({time.perf_counter() - t0:.0f}s)")
    out = Path(out)
    model, info = load_or_train_classifier(fed, cls_settings, out / "classifier", device)
    enc = load_encoder(encoder, device)
    ctx = QualityContext(ds, fed, lo, hi, train_pos, test_pos, enc, model, info, settings, out, Path(table), device)
    ctx.test_feats = enc.embed(ds.x[test_pos])
    probs = classify(ctx, ds.x[test_pos])
    ctx.real_eval = {"acc": float((probs.argmax(1).numpy() == ds.y[test_pos]).mean()),
                     **prediction_stats(probs, ctx.num_classes)}
    log(f"classifier on the {len(test_pos)} held-out real images: acc {ctx.real_eval['acc']:.4f}, "
        f"mean confidence {ctx.real_eval['mean_confidence']:.3f} ({time.perf_counter() - t0:.0f}s)")
    return ctx


@torch.no_grad()
def classify(ctx: QualityContext, images: np.ndarray, batch_size: int = 1000) -> torch.Tensor:
    """Softmax probabilities (CPU) of the classifier on uint8 NHWC images (resized to its input if needed)."""
    from fedforge.generative.images import fit_to_input

    images = fit_to_input(images, ctx.fed.input_shape) if images.shape[1:] != ctx.dataset.x.shape[1:] else images
    out = []
    for s in range(0, len(images), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size])).to(ctx.fed.device)
        out.append(ctx.classifier(ctx.fed.to_input(xb).contiguous(memory_format=torch.channels_last)).float().softmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, ctx.num_classes)


def embed(ctx: QualityContext, images: np.ndarray) -> torch.Tensor:
    from fedforge.generative.images import fit_to_input

    if ctx.encoder.input_shape is not None and tuple(images.shape[1:]) != tuple(ctx.encoder.input_shape[i] for i in (1, 2, 0)):
        images = fit_to_input(images, ctx.encoder.input_shape)
    return ctx.encoder.embed(images)


def reference_feats(ctx: QualityContext, class_ids: Sequence[int]) -> torch.Tensor:
    assert ctx.test_feats is not None
    keep = np.isin(ctx.class_id(ctx.test_pos), np.asarray(class_ids))
    return ctx.test_feats[torch.from_numpy(keep)]


def real_baseline(ctx: QualityContext, class_ids: Sequence[int]) -> dict:
    """FID / precision / recall of ``n`` train-split real images (class-balanced) against the held-out reference."""
    key = tuple(int(c) for c in class_ids)
    if key not in ctx.baselines:
        t0 = time.perf_counter()
        n = ctx.settings["n"]
        pos = balanced_take(ctx.dataset.y + ctx.lo, ctx.train_pos, key, n, ctx.settings["seed"])
        feats = embed(ctx, ctx.dataset.x[pos])
        ref = reference_feats(ctx, key)
        p, r = precision_recall(ref, feats, ctx.settings["k"])
        ctx.baselines[key] = {"n": int(len(pos)), "fid": fid(ref, feats), "precision": p, "recall": r}
        log(f"real baseline ({len(pos)} train-split images vs {ref.shape[0]} held-out): FID "
            f"{ctx.baselines[key]['fid']:.3f}, precision {p:.4f}, recall {r:.4f} ({time.perf_counter() - t0:.0f}s)")
    return ctx.baselines[key]


# ---------------------------------------------------------------------------------------------- generators
def slug(spec: str) -> str:
    """A file name for a generator spec (``builtin`` → builtin, ``builtin:runs/cgan`` → builtin-runs-cgan)."""
    s = re.sub(r"[^A-Za-z0-9._]+", "-", spec).strip("-.") or "generator"
    if len(s) > 80:
        import hashlib

        s = s[-60:].lstrip("-.") + "-" + hashlib.sha1(spec.encode()).hexdigest()[:8]
    return s


def generator_classes(gen: Any) -> list[int] | None:
    """The dataset class ids of a conditional generator (``gen.classes``), or None for an unconditional one."""
    if not getattr(gen, "conditional", False):
        return None
    classes = getattr(gen, "classes", None)
    if not classes:
        raise ConfigError(f"{gen!r} says it is conditional but has no `classes` (the dataset class ids it was trained on).")
    return [int(c) for c in classes]


def draw_samples(gen: Any, n: int, seed: int, class_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``n`` images from the generator's prior (uint8 NHWC) and, for a conditional generator, the dataset class id
    each was conditioned on: class-balanced (the first n mod K classes get one more), each class from its own seed."""
    from fedforge.core.context import derive_seed

    if class_ids is None:
        return gen.synthesize(gen.sample_prior(n, torch.Generator().manual_seed(derive_seed(seed, "prior")))), None
    k = len(class_ids)
    images, labels = [], []
    for i, c in enumerate(class_ids):
        m = n // k + (1 if i < n % k else 0)
        if m == 0:
            continue
        z = gen.sample_prior(m, torch.Generator().manual_seed(derive_seed(seed, "class", int(c))))
        images.append(np.asarray(gen.synthesize(z, condition=int(c))))
        labels.append(np.full(m, int(c), dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def sample_grid(images: np.ndarray, labels: np.ndarray | None, class_ids: Sequence[int] | None,
                rows: int = 10, per_row: int = 8) -> tuple[np.ndarray, list[int] | None]:
    """A grid of the evaluated samples: ``rows`` classes (evenly spaced over the generator's) × ``per_row`` samples
    for a conditional generator, the first 8 × 8 samples otherwise. Returns (grid, class id of each row)."""
    from fedforge.generative.images import image_grid

    if labels is None or class_ids is None:
        return image_grid(images[: per_row * per_row], ncol=per_row), None
    picks = [class_ids[int(i)] for i in np.unique(np.linspace(0, len(class_ids) - 1, min(rows, len(class_ids))).round())]
    tiles, shown = [], []
    for c in picks:
        mine = images[labels == c][:per_row]
        if len(mine):
            tiles.append(np.concatenate([mine, np.full((per_row - len(mine), *mine.shape[1:]), 255, np.uint8)]))
            shown.append(int(c))
    return image_grid(np.concatenate(tiles), ncol=per_row), shown


def evaluate_generator(ctx: QualityContext, spec: str, n: int | None = None, seed: int | None = None,
                       generator: Any = None, name: str | None = None) -> dict:
    """Judge one generator (``spec``, or an already built ``generator`` object) against ``ctx``; returns the result
    record (also holding the sample grid as ``_grid``, an HWC uint8 array, for :func:`record`)."""
    from fedforge.generative import load_generator

    n = int(n if n is not None else ctx.settings["n"])
    seed = int(seed if seed is not None else ctx.settings["seed"])
    k = ctx.settings["k"]
    t0 = time.perf_counter()
    gen = generator if generator is not None else load_generator(spec, device=ctx.device)
    classes = generator_classes(gen)
    if classes is not None:  # a conditional generator is judged on the classes of --classes, which it must know
        unknown = sorted(set(ctx.class_ids) - set(classes))
        if unknown:
            raise ConfigError(f"{spec} cannot make classes {unknown[:5]}{'...' if len(unknown) > 5 else ''} of --classes "
                              f"{ctx.lo}-{ctx.hi} (it knows {min(classes)}-{max(classes)}); pass --classes within them.")
        classes = [c for c in classes if c in set(ctx.class_ids)]
    ref_classes = classes if classes is not None else ctx.class_ids
    cfg = getattr(gen, "config", None)
    trained_on = cfg.get("class_subset") if isinstance(cfg, dict) else None
    if classes is None and trained_on and str(trained_on) != f"{ctx.lo}-{ctx.hi}":
        log(f"warning: {spec} was trained on classes {trained_on}, the reference is classes {ctx.lo}-{ctx.hi}")
    log(f"{spec}: {gen!r}, {'conditional on ' + str(len(classes)) + ' classes' if classes else 'unconditional'}; "
        f"drawing {n} samples")
    images, labels = draw_samples(gen, n, seed, classes)
    t_gen = time.perf_counter() - t0
    feats = embed(ctx, images)
    ref = reference_feats(ctx, ref_classes)
    f = fid(ref, feats)
    p, r = precision_recall(ref, feats, k)
    log(f"{spec}: FID {f:.3f}, precision {p:.4f}, recall {r:.4f} ({time.perf_counter() - t0:.0f}s)")
    probs = classify(ctx, images)
    stats = prediction_stats(probs, ctx.num_classes)
    cond_acc, per_class = None, None
    if labels is not None:
        hit = probs.argmax(1).numpy() == (labels - ctx.lo)
        cond_acc = float(hit.mean())
        per_class = {str(c): float(hit[labels == c].mean()) for c in classes if (labels == c).any()}
    log(f"{spec}: class-conditional acc {cond_acc if cond_acc is None else round(cond_acc, 4)}, mean confidence "
        f"{stats['mean_confidence']:.3f}, predicted-class entropy {stats['pred_entropy']:.3f} / "
        f"{stats['pred_entropy_max']:.3f} nats, {stats['classes_predicted']} classes predicted")
    grid, grid_rows = sample_grid(images, labels, classes)
    base = real_baseline(ctx, ref_classes)
    res = {
        "schema": SCHEMA, "name": name or slug(spec), "spec": spec, "generator": repr(gen),
        "kind": getattr(gen, "kind", type(gen).__name__), "conditional": classes is not None,
        "generator_classes": classes, "generator_trained_on": trained_on,
        "resolution": int(images.shape[1]), "n": int(len(images)), "seed": seed, "k": k,
        "reference": {"dataset": "cifar100", "classes": _ranges(ref_classes), "n": int(ref.shape[0]),
                      "split": f"{ctx.settings['held_out_per_class']} held-out images per class, seed {ctx.settings['split_seed']}",
                      "real_baseline": base},
        "feature_space": {"encoder": ctx.settings["encoder"], "name": ctx.encoder.name, "dim": int(feats.shape[1]),
                          "trained_on": ctx.encoder.meta.get("trained_on")},
        "fid": f, "precision": p, "recall": r,
        "class_conditional_acc": cond_acc, "per_class_acc": per_class, **stats,
        "classifier": {"name": ctx.classifier_info["name"], "arch": ctx.classifier_info["settings"]["arch"],
                       "epochs": ctx.classifier_info["settings"]["epochs"],
                       "train_images": int(ctx.fed.num_train(0)), "train_seconds": ctx.classifier_info["train_seconds"],
                       "cache": ctx.classifier_info["path"],
                       "real_heldout": ctx.real_eval},
        "grid_rows": grid_rows,
        "seconds": {"sampling": round(t_gen, 1), "total": round(time.perf_counter() - t0, 1)},
        "torch_threads": torch.get_num_threads(), "device": ctx.device,
        "_grid": grid,
    }
    return res


def _ranges(ids: Sequence[int]) -> str:
    """[0, 1, 2, 5] → '0-2,5'."""
    ids = sorted(int(i) for i in ids)
    parts, start = [], None
    for i, c in enumerate(ids):
        if start is None:
            start = c
        if i + 1 == len(ids) or ids[i + 1] != c + 1:
            parts.append(f"{start}" if start == c else f"{start}-{c}")
            start = None
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------- outputs
def record(res: dict, ctx: QualityContext, command: str | None = None) -> Path:
    """Write ``OUT/<name>.json`` and ``OUT/<name>.png``, copy both beside the table, and rebuild the table."""
    from fedforge._io import atomic_write_text
    from fedforge.generative.images import save_png

    res = dict(res)
    grid = res.pop("_grid")
    res["command"] = command or res.get("command") or f"python {SCRIPT} (from Python: evaluate_generator(ctx, {res['spec']!r}))"
    res["grid"] = f"{res['name']}.png"
    ctx.out.mkdir(parents=True, exist_ok=True)
    save_png(grid, ctx.out / res["grid"], upscale=2)
    js = ctx.out / f"{res['name']}.json"
    atomic_write_text(js, json.dumps(res, indent=2) + "\n")
    folder = assets_dir(ctx.table)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(js, folder / js.name)
    shutil.copyfile(ctx.out / res["grid"], folder / res["grid"])
    write_table(ctx.table)
    log(f"wrote {js}, {ctx.out / res['grid']}; table {ctx.table}")
    return js


def assets_dir(table: str | Path) -> Path:
    """The folder beside the table that holds the results and grids it shows (``generator-quality.md`` →
    ``generator-quality/``)."""
    table = Path(table)
    return table.with_name(table.stem)


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


NOTES = "<!-- notes: text below this line is kept when the table is rebuilt -->"


def write_table(table: str | Path) -> Path:
    """Rebuild the markdown table from every result JSON in the folder beside it (text below :data:`NOTES` is kept)."""
    from fedforge._io import atomic_write_text

    table = Path(table)
    folder = assets_dir(table)
    results = []
    for p in sorted(folder.glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except ValueError:
            continue
        if isinstance(r, dict) and r.get("schema") == SCHEMA:
            results.append(r)
    results.sort(key=lambda r: (r["reference"]["classes"], r["spec"]))
    rel = folder.name
    lines = [
        "# Generator sample quality",
        "",
        f"Written by `{SCRIPT}` (see its docstring for the method). Lower FID is better; precision (fidelity) and recall",
        "(diversity) are the improved k-NN metrics of Kynkäänniemi et al. (2019) with k = 3. All three are computed in",
        "the feature space of the shipped encoder (`fedforge.synth.encoder`, `builtin`: the zoo's `cnn` trained on",
        "CIFAR-100 classes 0-49, its 512-d penultimate features), **not** Inception-v3's, so they compare rows of this",
        "table only, not published FIDs.",
        "",
        "The reference set is the held-out part of the generator split of issue 23 (`fedforge.generative.split`: 200",
        "CIFAR-100 images per class, seed 2026, which no v2 built-in generator trains on; the dataset file pools the",
        "official train and test sets, so the official test set cannot be picked out). The **real** row judges n images",
        "of the remaining train split the same way: the floor a perfect generator reaches at that sample size. The",
        "shipped (v1) built-in generator was trained on *all* images of its classes, held-out ones included, and the",
        "encoder on all but 2,000 of them, so neither is independent of the reference. The classifier (columns \"cond. acc\",",
        "\"confidence\", \"entropy\") never saw the held-out images; \"cond. acc\" is its accuracy on class-conditional",
        "samples against the requested class (n/a for unconditional generators), \"confidence\" its mean max-softmax",
        "probability, \"entropy\" the entropy (nats) of its predicted-class histogram (ln K when the predictions spread",
        "evenly over the K classes), \"hit\" the classes it predicted at least once.",
        "",
        "| generator | kind | classes | n | FID ↓ | precision ↑ | recall ↑ | cond. acc ↑ | confidence | entropy (max) | hit | grid |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    seen_real: set[tuple] = set()
    for r in results:
        ref, clf = r["reference"], r["classifier"]
        key = (ref["classes"], clf["name"], ref["real_baseline"]["n"])
        if key not in seen_real:
            seen_real.add(key)
            b, h = ref["real_baseline"], clf["real_heldout"]
            lines.append(f"| **real** (train split vs held-out; classifier on held-out) | real | {ref['classes']} | {b['n']} | "
                         f"{_f(b['fid'])} | {_f(b['precision'])} | {_f(b['recall'])} | {_f(h['acc'])} | "
                         f"{_f(h['mean_confidence'])} | {_f(h['pred_entropy'])} ({_f(h['pred_entropy_max'])}) | "
                         f"{h['classes_predicted']} | |")
        label = f"`{r['spec']}`" + (f" ({r['name']})" if r["name"] != r["spec"] else "")
        lines.append(f"| {label} | {r['kind']}{' (conditional)' if r['conditional'] else ''} | {ref['classes']} | "
                     f"{r['n']} | {_f(r['fid'])} | {_f(r['precision'])} | {_f(r['recall'])} | "
                     f"{_f(r['class_conditional_acc'])} | {_f(r['mean_confidence'])} | "
                     f"{_f(r['pred_entropy'])} ({_f(r['pred_entropy_max'])}) | {r['classes_predicted']} | "
                     f"[{r['grid']}]({rel}/{r['grid']}) |")
    lines += ["", "## Classifier", ""]
    for name in sorted({r["classifier"]["name"] for r in results}):
        c = next(r["classifier"] for r in results if r["classifier"]["name"] == name)
        lines.append(f"* `{name}`: the zoo's `{c['arch']}`, {c['epochs']} epochs on {c['train_images']:,} train-split "
                     f"images ({c['train_seconds']:.0f} s to train); accuracy on the held-out real images "
                     f"{100 * c['real_heldout']['acc']:.2f} %. Cached as `{c.get('cache', '?')}` and re-used.")
    lines += ["", "## Runs", ""]
    for r in results:
        rows = f"; grid rows: classes {', '.join(map(str, r['grid_rows']))}" if r.get("grid_rows") else ""
        lines.append(f"* `{r['spec']}` ({r['generator']}): `{r['command']}`; {r['seconds']['total']:.0f} s to judge this "
                     f"generator ({r['torch_threads']} thread(s), {r['device']}; the classifier's training not included); result "
                     f"[{r['name']}.json]({rel}/{r['name']}.json){rows}.")
    old = table.read_text() if table.is_file() else ""
    notes = old.split(NOTES, 1)[1] if NOTES in old else "\n"
    lines += ["", NOTES]
    atomic_write_text(table, "\n".join(lines) + notes)
    return table


# ----------------------------------------------------------------------------------------------- command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generators", default="builtin", help="comma-separated generator specs (default: builtin)")
    p.add_argument("--data-root", default=None, help="dataset cache holding cifar100.npz (default: $FEDFORGE_DATA)")
    p.add_argument("--classes", default="0-49", help="CIFAR-100 classes A-B of the reference and classifier (0-49)")
    p.add_argument("--n", type=int, default=5000, help="generated images per generator (5000)")
    p.add_argument("--k", type=int, default=3, help="k of the k-NN radius for precision/recall (3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and the classifier (0)")
    p.add_argument("--held-out-per-class", type=int, default=HELD_OUT_PER_CLASS,
                   help=f"held-out real images per class ({HELD_OUT_PER_CLASS}: the generator split of issue 23)")
    p.add_argument("--split-seed", type=int, default=SPLIT_SEED, help=f"seed of the held-out draw ({SPLIT_SEED})")
    p.add_argument("--classifier-epochs", type=int, default=CLASSIFIER_DEFAULTS["epochs"])
    p.add_argument("--classifier-train-limit", type=int, default=None, help="train the classifier on this many images only")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results and the cached classifier ({DEFAULT_OUT})")
    p.add_argument("--table", default=DEFAULT_TABLE, help=f"markdown table to (re)write ({DEFAULT_TABLE})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    specs = [s.strip() for s in args.generators.split(",") if s.strip()]
    if not specs:
        print("error: --generators names no generator; give e.g. --generators builtin", file=sys.stderr)
        return 2
    if args.n < args.k + 2:
        print(f"error: --n {args.n} is too small for k = {args.k}; give at least {args.k + 2}.", file=sys.stderr)
        return 2
    command = f"python {SCRIPT} " + shlex.join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    try:
        ctx = prepare(args.data_root, args.classes, args.out, args.table, args.n, args.seed, args.k,
                      args.held_out_per_class, args.split_seed, args.device, epochs=args.classifier_epochs,
                      train_limit=args.classifier_train_limit)
        for spec in specs:
            record(evaluate_generator(ctx, spec), ctx, command)
    except FedforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
