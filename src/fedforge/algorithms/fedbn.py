"""FedBN — Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization", ICLR 2021.

FedAvg in which every normalisation layer stays on its client: the server averages all other weights,
w ← Σ_k (n_k / n) · w_k, while client k keeps its own BatchNorm (or GroupNorm/LayerNorm) scale and shift and
its running mean and variance across rounds. Each client is judged with the shared weights plus its own
normalisation layers (the paper's evaluation); there is no single global model, except when the model has
no normalisation layer at all: then FedBN is FedAvg and the (whole, shared) global model is judged too.

Difference from PFLlib: PFLlib's FedBN keeps local the *parameters* whose name contains "bn" (its clients never
receive buffers, so running statistics stay local as well), so normalisation layers named otherwise (torchvision
ResNets' ``downsample.1``, GroupNorm or LayerNorm layers) are averaged like any other layer; here the layers are
found by type and all of their entries (parameters and buffers) stay local. With BatchNorm layers named "bn" the
two compute the same (tests/reference/test_pfllib_step.py::test_step_equivalence[fedbn]). With a model that has no
normalisation layer (the plain ``cnn``) FedBN is FedAvg; use ``cnn_bn`` (the paper's CNN with BatchNorm) or a ResNet.
"""
from __future__ import annotations

from ..core.algorithm import register_algorithm
from ._partial import PartialSharing, norm_entries


@register_algorithm("fedbn", summary="FedBN (Li et al., ICLR 2021): FedAvg with local normalisation layers and statistics")
class FedBN(PartialSharing):
    paper = "Li et al., FedBN: Federated Learning on Non-IID Features via Local Batch Normalization, ICLR 2021"

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        if all(self.shared_keys(a) == frozenset(ctx.build_model(a).state_dict()) for a in ctx.arch_set):
            self.has_global = True  # nothing is kept local: the shared model is a global model

    def select_shared(self, model) -> set[str]:
        norms = norm_entries(model)
        return {k for k in model.state_dict() if k not in norms}
