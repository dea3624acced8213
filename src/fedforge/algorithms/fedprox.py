"""FedProx — Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.

Client k (approximately) minimises its loss plus a proximal term to the round's global model w^t:

    h_k(w; w^t) = F_k(w) + (mu / 2) · ||w − w^t||²,   i.e. each SGD step uses  ∇F_k(w) + mu · (w − w^t);

the server averages as FedAvg: w^{t+1} = Σ_k (n_k / n) · w_k. With mu = 0 FedProx is FedAvg, step for step.
The paper tunes mu in {0.001, 0.01, 0.1, 1}; the default 0.01 is one of its values (PFLlib ships mu = 0, which
silently turns FedProx into FedAvg). The paper's tolerance of partial local work from stragglers (γ-inexact
solutions) is not modelled: every client runs the configured local epochs.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import model_entries, with_prefix
from ..core.objective import MAIN, Objective, Phase, plain_loss
from ..core.params import HyperParams, hp
from .mechanics import proximal_grads


@dataclass(frozen=True)
class FedProxParams(HyperParams):
    mu: float = hp(0.01, "weight of the proximal term mu/2·||w − w_global||² (0 gives FedAvg)", ge=0)


@register_algorithm("fedprox", summary="FedProx (Li et al., MLSys 2020): FedAvg with a proximal term mu/2·||w − w_global||²")
class FedProx(Algorithm):
    paper = "Li et al., Federated Optimization in Heterogeneous Networks, MLSys 2020"
    Params = FedProxParams

    vectorizable = True  # FedAvg's update with the proximal gradient: the vectorized executor can batch clients

    def vector_objective(self, rt, msg, state) -> Objective:
        glob = model_entries(msg)
        return Objective(start={MAIN: glob}, extras=with_prefix(glob, "anchor"),
                         phases=(Phase(loss=plain_loss(self.loss), grad=self.proximal if self.hp.mu else None),),
                         finish=lambda rt, w, stats: Update(w[MAIN], state, rt.num_train, stats[0].as_dict()))

    def proximal(self, params, grads, ex):
        """Each step's gradient plus mu·(w − w_global) (the received model is the anchor)."""
        return proximal_grads(params, grads, ex.under("anchor"), self.hp.mu)
