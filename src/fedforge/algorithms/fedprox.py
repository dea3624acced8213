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
from ..core.messages import model_entries
from ..core.params import HyperParams, hp
from .mechanics import proximal_grad_hook


@dataclass(frozen=True)
class FedProxParams(HyperParams):
    mu: float = hp(0.01, "weight of the proximal term mu/2·||w − w_global||² (0 gives FedAvg)", ge=0)


@register_algorithm("fedprox", summary="FedProx (Li et al., MLSys 2020): FedAvg with a proximal term mu/2·||w − w_global||²")
class FedProx(Algorithm):
    paper = "Li et al., Federated Optimization in Heterogeneous Networks, MLSys 2020"
    Params = FedProxParams

    def local_update(self, rt, msg, state) -> Update:
        rt.load(model_entries(msg))
        params = [p for p in rt.model.parameters() if p.requires_grad]
        anchors = [p.detach().clone() for p in params]
        stats = rt.train(loss_fn=self.loss, params=params, grad_hook=proximal_grad_hook(anchors, self.hp.mu))
        return Update(rt.model_state(), state, rt.num_train, stats.as_dict())
