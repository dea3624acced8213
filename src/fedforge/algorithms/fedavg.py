"""FedAvg — McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017.

Each round the sampled clients start from the global model w, run E epochs of mini-batch SGD on their data,
and upload w_k; the server sets w ← Σ_k (n_k / n) · w_k over the round's clients (n_k: training samples).

Unlike PFLlib, BatchNorm running statistics are averaged with the weights (they are part of the model).
"""
from __future__ import annotations

from ..core.algorithm import Algorithm, register_algorithm


@register_algorithm("fedavg", summary="FedAvg (McMahan et al., AISTATS 2017): sample-weighted model averaging")
class FedAvg(Algorithm):
    paper = "McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data, AISTATS 2017"
    vectorizable = True  # plain cross-entropy SGD from the global model: the vectorized executor can batch clients
