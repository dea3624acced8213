"""kNN-Per — Marfoq, Neglia, Vidal & Kameni, "Personalized Federated Learning through Local Memorization", ICML 2022.

The global model (features φ, head h) is trained exactly as FedAvg. Each client personalises it at inference time
only: it stores the features of its training samples in a datastore S_k = {(φ(x_j), y_j)} (at most ``capacity`` of
them) and interpolates the model's prediction with a k-nearest-neighbour one over that store:

    p_kNN(y | x) ∝ Σ_{j ∈ N_k(x)} 1[y_j = y] · exp(−‖φ(x) − φ(x_j)‖² / (d · s))          (N_k: the k nearest in S_k)
    p_k(y | x)   = λ · p_kNN(y | x) + (1 − λ) · softmax(h(φ(x)))_y

A client is judged twice: ``global`` with the FedAvg model, ``personalized`` with p_k. The neighbour search is
exact (``torch.cdist`` and ``topk`` on the run's device; FL-bench uses a flat faiss index, the same search). With
λ = 0 the personalized prediction is the global model's (tested).

Defaults are FL-bench's (k = 5, λ = 0.5, s = 1, capacity 500; the paper tunes λ per client on validation data).
Unlike FL-bench, which mixes the kNN probabilities with the model's raw logits, the mixture here is of two
probability distributions, as in the paper.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.algorithm import register_algorithm
from ..core.messages import Message, State, model_entries
from ..core.params import HyperParams, hp
from .fedavg import FedAvg
from .mechanics import train_features


@dataclass(frozen=True)
class KNNPerParams(HyperParams):
    weight: float = hp(0.5, "λ: weight of the kNN prediction in the interpolation (0: the global model alone)", ge=0, le=1)
    k: int = hp(5, "neighbours the kNN prediction looks at", ge=1)
    scale: float = hp(1.0, "s: the kernel exp(−‖a − b‖² / (d·s)) of a neighbour at squared distance ‖a − b‖²", gt=0)
    capacity: int = hp(500, "most training samples a client's datastore holds (a random subset beyond that)", ge=1)


def knn_probabilities(z: torch.Tensor, store: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int,
                      scale: float) -> torch.Tensor:
    """p_kNN (B, C) of query features ``z`` over a datastore of features ``store`` with ``labels``."""
    d2 = torch.cdist(z.float(), store.float()).pow(2)
    dist, idx = d2.topk(min(k, store.shape[0]), dim=1, largest=False)
    w = torch.exp(-dist / (z.shape[1] * scale))
    p = torch.zeros(z.shape[0], num_classes, device=z.device, dtype=w.dtype).scatter_add_(1, labels[idx], w)
    return p / (w.sum(1, keepdim=True) + 1e-9)


def interpolate(p_knn: torch.Tensor, logits: torch.Tensor, weight: float) -> torch.Tensor:
    """log(λ·p_kNN + (1 − λ)·softmax(logits)), computed in log space (λ = 0 gives log_softmax(logits) exactly)."""
    log_model = torch.log_softmax(logits.float(), dim=1)
    if weight == 0:
        return log_model
    log_knn = torch.log(p_knn.clamp_min(1e-30)) + math.log(weight)
    if weight == 1:
        return log_knn
    return torch.logaddexp(log_knn, log_model + math.log(1.0 - weight))


@register_algorithm("knnper", summary="kNN-Per (Marfoq et al., ICML 2022): FedAvg model interpolated with a kNN over the client's own features")
class KNNPer(FedAvg):
    paper = "Marfoq, Neglia, Vidal & Kameni, Personalized Federated Learning through Local Memorization, ICML 2022"
    Params = KNNPerParams
    personalized = True
    has_global = True
    vectorizable = True  # training is FedAvg's

    def datastore(self, rt) -> tuple[torch.Tensor, torch.Tensor]:
        """The client's datastore: features of (at most ``capacity``) training samples under the loaded model."""
        z, y = train_features(rt)
        if z.shape[0] > self.hp.capacity:
            keep = torch.randperm(z.shape[0], generator=rt.gen, device=rt.gen.device)[: self.hp.capacity].to(z.device)
            z, y = z[keep], y[keep]
        return z, y

    def personalized_predictor(self, rt) -> Callable[[torch.Tensor], torch.Tensor]:
        """Scores log p_k(· | x) of the loaded model and the client's datastore."""
        model = rt.model
        store, labels = self.datastore(rt)
        C, h = self.ctx.num_classes, self.hp

        def predict(x: torch.Tensor) -> torch.Tensor:
            z = model.features(x)
            logits = model.head(z)
            if h.weight == 0 or store.shape[0] == 0:
                return interpolate(logits, logits, 0.0)
            return interpolate(knn_probabilities(z.flatten(1), store, labels, C, h.k, h.scale), logits, h.weight)

        return predict

    def evaluate(self, rt, msg: Message, state: State):
        rt.load(model_entries(msg))
        out = {"global": rt.evaluate()}
        out["personalized"] = rt.evaluate(self.personalized_predictor(rt))
        return out
