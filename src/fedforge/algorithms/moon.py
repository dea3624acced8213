"""MOON — Li, He & Song, "Model-Contrastive Federated Learning", CVPR 2021.

Client k adds to its cross-entropy a model-contrastive term on the representation z = f(x) of its current model,
with the representation z_glob of the round's global model as the positive and z_prev of its own previous local
model as the negative:

    ℓ_con = −log [ exp(sim(z, z_glob)/τ) / ( exp(sim(z, z_glob)/τ) + exp(sim(z, z_prev)/τ) ) ],
    ℓ = CE(h(z), y) + μ · ℓ_con,     sim = cosine similarity,

then uploads its model; the server averages as FedAvg. With μ = 0 MOON is FedAvg exactly. Paper values:
τ = 0.5 and μ = 1 (the value for CIFAR-100 and Tiny-ImageNet and the default of the authors' code; the paper
uses μ = 5 for CIFAR-10). PFLlib ships μ = 0 and τ = 1, i.e. FedAvg.

Differences from the paper: the representation is the model's feature vector (for ``cnn`` the 512-d output of
its fc layer, as in PFLlib) instead of the output of an added two-layer projection head; a client that has not
trained before uses the initial model as its previous model (as the authors' code does in round 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import model_entries, under, with_prefix
from ..core.objective import MAIN, Objective, Phase
from ..core.params import HyperParams, hp

PREV = "prev"


@dataclass(frozen=True)
class MoonParams(HyperParams):
    mu: float = hp(1.0, "weight of the model-contrastive loss (0 gives FedAvg; the paper uses 5 on CIFAR-10)", ge=0)
    tau: float = hp(0.5, "temperature of the model-contrastive loss", gt=0)


def model_contrastive_loss(z: torch.Tensor, z_pos: torch.Tensor, z_neg: torch.Tensor, tau: float) -> torch.Tensor:
    """−log softmax over (cos(z, z_pos), cos(z, z_neg)) / τ of the positive pair, batch mean."""
    logits = torch.stack([F.cosine_similarity(z, z_pos, dim=1), F.cosine_similarity(z, z_neg, dim=1)], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(z.shape[0], dtype=torch.long, device=z.device))


@register_algorithm("moon", summary="MOON (Li et al., CVPR 2021): model-contrastive loss to the global and previous local model")
class Moon(Algorithm):
    paper = "Li, He & Song, Model-Contrastive Federated Learning, CVPR 2021"
    Params = MoonParams

    vectorizable = True  # the contrastive loss is a pure function of the models: the vectorized executor can batch

    def vector_objective(self, rt, msg, state) -> Objective:
        glob = model_entries(msg)
        prev = under(state, PREV) or rt.initial_params()
        on = self.hp.mu > 0
        return Objective(start={MAIN: glob}, phases=(Phase(loss=self.contrastive_loss if on else None),),
                         frozen={"global": glob, "previous": prev} if on else {},  # run in eval mode, never trained
                         finish=lambda rt, w, stats: Update(w[MAIN], with_prefix(w[MAIN], PREV), rt.num_train,
                                                            stats[0].as_dict()))

    def contrastive_loss(self, m, x, y, ex):
        """CE(h(z), y) + μ·ℓ_con(z, z_glob, z_prev) with z_glob, z_prev from the frozen global and previous models."""
        z = m.features(x)
        with torch.no_grad():
            z_pos, z_neg = ex.model("global").features(x), ex.model("previous").features(x)
        return F.cross_entropy(m.head(z), y) + self.hp.mu * model_contrastive_loss(z, z_pos, z_neg, self.hp.tau)
