"""FedProx-FT — FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020), then on-device
fine-tuning (Wang et al., "Federated Evaluation of On-device Personalization", arXiv:1910.10252, 2019), as FL-IoT
names and runs it.

The rounds are FedProx's; after the last round every client fine-tunes the final global model w for τ epochs with
the same proximal pull toward it (FL-IoT fine-tunes with its FedProx client, whose anchor is the last model it
received):

    rounds:     w_k ← w_k − η (∇F_k(w_k; ξ) + μ (w_k − w)),   w ← Σ_k (n_k / n) · w_k
    after them: v_k ← w,  v_k ← v_k − η (∇F_k(v_k; ξ) + μ (v_k − w))  for τ epochs  (``finetune_epochs``)

μ = 0 is FedAvg-FT, step for step. μ keeps FedProx's default (0.01, one of the paper's values; FL-IoT's scripts
pass ``-mu 1e-5``), τ FedAvg-FT's (20, see :mod:`fedforge.algorithms.fedavg_ft` for FL-IoT's early-stopped
fine-tuning, which fedforge does not copy). The proximal term is FedProx's (``mechanics.proximal_grad_hook``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.algorithm import register_algorithm
from ..core.params import hp
from .fedavg_ft import fine_tune
from .fedprox import FedProx, FedProxParams


@dataclass(frozen=True)
class FedProxFTParams(FedProxParams):
    finetune_epochs: int = hp(20, "epochs each client fine-tunes the final global model (with the proximal term) on "
                                  "its own data (FL-IoT's pass of -ls 20 epochs; 0 gives FedProx)", ge=0)


@register_algorithm("fedprox_ft", summary="FedProx-FT (FL-IoT): FedProx, then each client fine-tunes the global model "
                                          "with the proximal term")
class FedProxFT(FedProx):
    paper = ("Li et al., Federated Optimization in Heterogeneous Networks, MLSys 2020; fine-tuning: Wang et al., "
             "Federated Evaluation of On-device Personalization, arXiv:1910.10252, 2019")
    Params = FedProxFTParams
    family = "IoT"
    personalized = True  # judged with the fine-tuned model (the global one until fine-tuning)
    has_global = True
    has_finetune = True

    def finetune(self, rt, msg, state):
        return fine_tune(rt, msg, self.hp.finetune_epochs, mu=self.hp.mu, loss=self.loss)
