"""LG-FedAvg — Liang et al., "Think Locally, Act Globally: Federated Learning with Local and Global
Representations", NeurIPS 2019 Workshop on Federated Learning (arXiv:2001.01523).

Each client k keeps its own local representation (the body θ_k^l) and shares the global layers (the head θ^g).
Per round: client k trains (θ_k^l, θ^g) on its data, uploads θ_k^g only; the server sets θ^g ← Σ_k (n_k / n) θ_k^g.
A client is judged with (θ_k^l, θ^g); ``head_acc`` also reports (θ_k^l, θ_k^g), the head it trained itself in its
last round (kept in its state for that view only, never sent). Because only the head crosses the network, clients may own different
architectures as long as they share the feature dimension (``heterogeneous = True``; HtFLlib's LG-FedAvg setting).

Departures from the paper, both as in PFLlib/HtFLlib: the local representation is learned by the supervised
cross-entropy only (the paper also allows auxiliary unsupervised or fair-representation losses), and the
global head starts from random initialisation rather than from a FedAvg-pretrained model.
"""
from __future__ import annotations

from ..core.algorithm import register_algorithm
from ..core.messages import Message, State
from ..core.objective import MAIN
from ._partial import PartialSharing
from .mechanics import is_head, keep_own_head, with_own_head


@register_algorithm("lgfedavg", summary="LG-FedAvg (Liang et al., 2020): local body, shared head; works across architectures")
class LGFedAvg(PartialSharing):
    paper = ("Liang et al., Think Locally, Act Globally: Federated Learning with Local and Global Representations, "
             "arXiv:2001.01523, 2020")
    heterogeneous = True

    vectorizable = True  # one SGD pass on the whole model: the vectorized executor can batch clients

    def shares(self, name: str) -> bool:
        return is_head(name)

    def extra_state(self, rt, weights):
        return keep_own_head(weights[MAIN])

    def evaluate(self, rt, msg: Message, state: State):
        return with_own_head(super().evaluate(rt, msg, state), rt, state)
