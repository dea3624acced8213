"""FedNTD — Lee, Jeong, Shin & Yun, "Preservation of the Global Knowledge by Not-True Distillation in Federated
Learning", NeurIPS 2022.

Client k trains the received global model w^t on its cross-entropy plus a distillation term that keeps the
predictions of the *not-true* classes close to those of the frozen global model (the true class is left free to
fit the local data):

    p̃_τ(x)_c = softmax_{c ≠ y}(z_c / τ),   z = f_w(x) (local logits),   z^g = f_{w^t}(x) (global logits, frozen)
    L_k(w) = CE(z, y) + β · τ² · KL( p̃_τ^g(x) ‖ p̃_τ(x) )                  (batch mean)

and the server averages as FedAvg: w^{t+1} = Σ_k (n_k / n) · w_k. With β = 0 FedNTD is FedAvg, step for step.

Defaults are the paper's and the authors' configuration (``config/fedntd.json``): τ = 1, β = 1. PFLlib ships
``-bt 0`` (β = 0), which silently turns FedNTD into FedAvg.

Deliberate differences from PFLlib's ``clientntd.py``/``serverntd.py``:

* aggregation is the sample-weighted mean (FedAvg, as in the authors' ``BaseServer._aggregation``); PFLlib's FedNTD
  server overrides ``add_parameters`` with an unweighted mean over the round's clients.

With PFLlib's server given the weighted mean, two rounds equal PFLlib's (``tests/reference/test_pfllib_step.py``, ``test_step_equivalence[fedntd]``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import model_entries
from ..core.params import HyperParams, hp
from .mechanics import kl_distill


@dataclass(frozen=True)
class FedNTDParams(HyperParams):
    beta: float = hp(1.0, "weight β of the not-true distillation term (0 gives FedAvg)", ge=0)
    tau: float = hp(1.0, "temperature τ of the not-true distillation", gt=0)


def not_true_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The (B, C−1) logits of every class but the true one, in class order."""
    b, c = logits.shape
    keep = torch.ones(b, c, dtype=torch.bool, device=logits.device)
    keep[torch.arange(b, device=logits.device), y] = False
    return logits[keep].view(b, c - 1)


def ntd_loss(logits: torch.Tensor, global_logits: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """τ² · KL(softmax(z^g_{¬y}/τ) ‖ softmax(z_{¬y}/τ)), batch mean (the global logits are not differentiated)."""
    return kl_distill(not_true_logits(logits, y), not_true_logits(global_logits, y), tau)


@register_algorithm("fedntd", summary="FedNTD (Lee et al., NeurIPS 2022): FedAvg + distillation of the global model's not-true-class predictions")
class FedNTD(Algorithm):
    paper = "Lee, Jeong, Shin & Yun, Preservation of the Global Knowledge by Not-True Distillation in Federated Learning, NeurIPS 2022"
    Params = FedNTDParams

    def local_update(self, rt, msg, state) -> Update:
        glob = model_entries(msg)
        beta, tau = self.hp.beta, self.hp.tau
        teacher = rt.aux_model("fedntd/global")
        rt.load(glob, teacher)
        teacher.eval()
        teacher.requires_grad_(False)

        def loss_fn(model, x, y):
            logits = model(x)
            with torch.no_grad():
                g = teacher(x)
            return F.cross_entropy(logits, y) + beta * ntd_loss(logits, g, y, tau)

        rt.load(glob)
        stats = rt.train(loss_fn=loss_fn)
        return Update(rt.model_state(), state, rt.num_train, stats.as_dict())
