"""Downstream evaluation of a synthetic dataset: train a classifier, judge it on real held-out images.

Training sets: ``syn`` (synthetic only), ``mix`` (synthetic + the client's private images; every step takes one
synthetic batch and one private batch, as EvolveGen's ``train_few`` does) and ``real`` (the private images alone,
the reference that ``mix`` must beat).

Classifiers: ``linear`` (the paper's protocol: a bias-free linear head on the frozen client encoder; features are
centred and scaled by one factor from the training set) or any zoo model name (trained from scratch on the images).
Both go through the project's one SGD loop (:func:`fedforge.core.training.train_loop`) with a cosine learning
rate; the paper's code uses AdamW (lr 1e-3, cosine, 100 epochs, batch 16) on the head instead, since this
project has one plain-SGD loop. Metrics: accuracy and macro-F1 (scikit-learn) on the test images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from ..core.training import train_loop
from ..errors import ConfigError
from .encoder import Encoder

MODES = ("syn", "mix", "real")


@dataclass
class EvalSettings:
    classifier: str = "linear"
    epochs: int | None = None  # default: 100 for the linear head (the paper's), 20 for a full model
    batch_size: int = 16  # the paper's
    lr: float | None = None  # default: 0.05 (linear head on centred, scaled features), 0.02 (full model)
    seed: int = 0

    def resolved(self) -> EvalSettings:
        lin = self.classifier == "linear"
        return EvalSettings(self.classifier, self.epochs or (100 if lin else 20), self.batch_size,
                            self.lr or (0.05 if lin else 0.02), self.seed)


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, gen: torch.Generator,
             extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled epoch over (x, y); with ``extra`` each batch is joined by a batch of it (cycled, reshuffled)."""
    n = len(y)
    perm = torch.randperm(n, generator=gen)
    ex_perm, ex_pos = None, 0
    for s in range(0, n, batch_size):
        sel = perm[s : s + batch_size]
        xb, yb = x[sel], y[sel]
        if extra is not None:
            m = len(extra[1])
            take, have = [], 0
            while have < len(sel):
                if ex_perm is None or ex_pos >= m:
                    ex_perm, ex_pos = torch.randperm(m, generator=gen), 0
                k = min(len(sel) - have, m - ex_pos)
                take.append(ex_perm[ex_pos : ex_pos + k])
                ex_pos += k
                have += k
            t = torch.cat(take)
            xb, yb = torch.cat([xb, extra[0][t]]), torch.cat([yb, extra[1][t]])
        yield xb, yb


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=list(range(num_classes)), average="macro", zero_division=0))


def _fit(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], extra, s: EvalSettings) -> None:
    gen = torch.Generator().manual_seed(s.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        for e in range(s.epochs):
            lr = 0.5 * s.lr * (1 + math.cos(math.pi * e / s.epochs))
            train_loop(model, _batches(train[0], train[1], s.batch_size, gen, extra), lr)
    model.eval()


class DownstreamEvaluator:
    """Trains and judges classifiers for one client: its encoder, its private images and the real test images.

    Test (and private) features are computed once and reused across evaluations.
    """

    def __init__(self, encoder: Encoder, private: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                 num_classes: int, settings: EvalSettings | None = None):
        if len(test[1]) == 0:
            raise ConfigError("there are no held-out real images to evaluate on; lower --shots so that each class "
                              "keeps images beyond the private ones, or drop --eval-every.")
        self.encoder = encoder
        self.num_classes = num_classes
        self.s = (settings or EvalSettings()).resolved()
        self.private = private
        self.test = test
        self._feat_cache: dict[str, torch.Tensor] = {}
        if self.s.classifier != "linear":
            from ..models import MODELS

            MODELS.get(self.s.classifier)  # unknown names fail here with the registry's suggestion

    # -------------------------------------------------------------------------------------- inputs
    def _features(self, key: str, images: np.ndarray) -> torch.Tensor:
        if key not in self._feat_cache:
            self._feat_cache[key] = self.encoder.embed(images)
        return self._feat_cache[key]

    def _images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC → float NCHW normalised with the private images' channel statistics (full-model training)."""
        if "stats" not in self._feat_cache:
            from ..data.sources import channel_stats

            mean, std = channel_stats(self.private[0])
            c = len(mean)
            self._feat_cache["stats"] = torch.tensor([mean, std], dtype=torch.float32).view(2, 1, c, 1, 1)
        mean, std = self._feat_cache["stats"]
        x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
        return ((x - mean) / std).contiguous()

    # -------------------------------------------------------------------------------------- public
    def evaluate(self, mode: str, synthetic: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
        """Accuracy and macro-F1 on the test images of a classifier trained as ``mode`` says."""
        if mode not in MODES:
            raise ConfigError(f"unknown evaluation mode '{mode}'; choose from {', '.join(MODES)}.")
        if mode != "real" and synthetic is None:
            raise ConfigError(f"evaluation mode '{mode}' needs a synthetic dataset.")
        py = torch.as_tensor(self.private[1], dtype=torch.long)
        ty = np.asarray(self.test[1])
        if self.s.classifier == "linear":
            pf = self._features("private", self.private[0])
            tf = self._features("test", self.test[0])
            if mode == "real":
                train, extra = (pf, py), None
            else:
                sf = self.encoder.embed(synthetic[0])
                sy = torch.as_tensor(synthetic[1], dtype=torch.long)
                train, extra = (sf, sy), ((pf, py) if mode == "mix" else None)
            both = train[0] if extra is None else torch.cat([train[0], extra[0]])
            # centre, then one scale for all dimensions (per-dimension scaling blows up dead ReLU units when the
            # training set is a few shots)
            mu = both.mean(0, keepdim=True)
            sd = (both - mu).pow(2).mean().sqrt() + 1e-6
            norm = lambda f: (f - mu) / sd  # noqa: E731
            train = (norm(train[0]), train[1])
            extra = (norm(extra[0]), extra[1]) if extra is not None else None
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.s.seed)
                model = nn.Linear(pf.shape[1], self.num_classes, bias=False)
            _fit(model, train, extra, self.s)
            with torch.no_grad():
                pred = model(norm(tf)).argmax(1).numpy()
        else:
            from ..models import create_model

            shape = (self.test[0].shape[3], self.test[0].shape[1], self.test[0].shape[2])
            model = create_model(self.s.classifier, shape, self.num_classes, seed=self.s.seed)
            px = self._images(self.private[0])
            if mode == "real":
                train, extra = (px, py), None
            else:
                train = (self._images(synthetic[0]), torch.as_tensor(synthetic[1], dtype=torch.long))
                extra = (px, py) if mode == "mix" else None
            _fit(model, train, extra, self.s)
            with torch.no_grad():
                pred = torch.cat([model(self._images(self.test[0][i : i + 500])).argmax(1)
                                  for i in range(0, len(ty), 500)]).numpy()
        return {"acc": float((pred == ty).mean()), "macro_f1": macro_f1(ty, pred, self.num_classes)}
