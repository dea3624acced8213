"""FedRoD — Chen & Chao, "On Bridging Generic and Personalized Federated Learning for Image Classification", ICLR 2022.

Every client holds the generic model (body f, generic head g), which is shared and averaged as in FedAvg, and a
personal head p_k that never leaves it. On a batch (x, y) with z = f(x), client k minimises

    L_BSM(g(z), y) + CE(g(z).detach() + p_k(z.detach()), y),

where the balanced softmax L_BSM(s, y) = CE(s + log π_k, y) adds the log of the client's class frequencies
π_k (Ren et al., 2020), so that g learns a class-balanced (generic) classifier despite the local label skew.
The personal loss does not reach f or g. Prediction: generic view g(f(x)); personalized view g(f(x)) + p_k(f(x)).
The server sets (f, g) ← Σ_k (n_k / n) · (f_k, g_k); uploads are the generic model only.

p_k starts as a copy of the initial generic head (as in PFLlib). The paper's hypernetwork variant is not implemented.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.algorithm import register_algorithm
from ..core.messages import model_entries, under, with_prefix
from ..core.objective import Phase
from ._partial import PartialSharing
from .mechanics import is_head, select

PHEAD = "phead"  # state prefix of the personal head
_TAG = "fedrod-personal-head"


def balanced_softmax_loss(logits: torch.Tensor, y: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits + log_prior`` (classes absent from the client have log prior −inf)."""
    return F.cross_entropy(logits + log_prior.to(logits.dtype), y)


@register_algorithm("fedrod", summary="FedRoD (Chen & Chao, ICLR 2022): balanced-softmax generic model + personal head")
class FedRoD(PartialSharing):
    paper = "Chen & Chao, On Bridging Generic and Personalized Federated Learning for Image Classification, ICLR 2022"
    has_global = True

    def shares(self, name: str) -> bool:
        return True

    def init_extra(self, rt):
        return with_prefix(select(rt.initial_params(), is_head), PHEAD)

    def _personal_head(self, rt, state):
        m = rt.aux_model(_TAG)
        rt.load(under(state, PHEAD), m)
        return m

    vectorizable = True  # one SGD pass on the model and the personal head: the vectorized executor can batch clients

    def vector_objective(self, rt, msg, state):
        obj = super().vector_objective(rt, msg, state)
        obj.start[PHEAD] = under(state, PHEAD)  # the personal head, trained jointly (phases: also)
        counts = rt.class_counts().float()
        obj.extras = {"log_prior": torch.where(counts > 0, counts.log(), torch.full_like(counts, float("-inf")))}
        return obj

    def phases(self, rt):
        return (Phase(loss=self.rod_loss, also=((PHEAD, is_head),)),)

    @staticmethod
    def rod_loss(m, x, y, ex):
        """Balanced softmax on the generic head + cross-entropy of the (detached) generic and personal logits."""
        z = m.features(x)
        g = m.head(z)
        p = ex.model(PHEAD).head(z.detach())
        return balanced_softmax_loss(g, y, ex["log_prior"]) + F.cross_entropy(g.detach() + p, y)

    def extra_state(self, rt, weights):
        return with_prefix(select(weights[PHEAD], is_head), PHEAD)

    def evaluate(self, rt, msg, state):
        rt.load(model_entries(msg))
        model = rt.model
        out = {"global": rt.evaluate()}
        phead_model = self._personal_head(rt, state)
        phead_model.eval()

        def predict(x):
            z = model.features(x)
            return model.head(z) + phead_model.head(z)

        out["personalized"] = rt.evaluate(predict)
        return out
