"""FedPer — Arivazhagan et al., "Federated Learning with Personalization Layers", arXiv:1912.00818, 2019.

The model is split into base layers (the body φ, shared) and personalization layers (the head h_k, local).
Each round client k trains (φ, h_k) jointly on its data by SGD on the cross-entropy, uploads φ_k only, and
keeps h_k; the server sets φ ← Σ_k (n_k / n) · φ_k. A client is judged with (φ, h_k): there is no global model.

Here the base is every ``features.*`` entry of the model and the personalization layer is the ``head.*``
classifier (the paper's best setting keeps the last layers local; PFLlib does the same).
"""
from __future__ import annotations

from ..core.algorithm import register_algorithm
from ._partial import PartialSharing
from .mechanics import is_body


@register_algorithm("fedper", summary="FedPer (Arivazhagan et al., 2019): shared body, local head")
class FedPer(PartialSharing):
    paper = "Arivazhagan et al., Federated Learning with Personalization Layers, arXiv:1912.00818, 2019"

    vectorizable = True  # one SGD pass on the whole model: the vectorized executor can batch clients

    def shares(self, name: str) -> bool:
        return is_body(name)
