"""FedMTL — Smith, Chiang, Sanjabi & Talwalkar, "Federated Multi-Task Learning", NeurIPS 2017 (the multi-task
objective with a fixed task-relationship matrix, not the MOCHA dual solver; PFLlib's "FedMTL (not MOCHA)").

Every client k learns its own model w_k (a column of W = [w_1 … w_N]) under a regulariser that couples the tasks:

    min_W  Σ_k F_k(w_k) + λ1 · tr(W Ω Wᵀ) + λ2 · ‖W‖²_F,      Ω = (I − 11ᵀ/N)² = I − 11ᵀ/N,

the mean-regularised choice of Ω the paper gives as an example, for which tr(W Ω Wᵀ) = Σ_j ‖w_j − w̄‖². Client k
takes SGD steps on its own column with the other columns fixed at their latest values:

    w_k ← w_k − η · ( ∇F_k(w_k) + 2λ1 · (w_k − w̄) + 2λ2 · w_k ),   w̄ = (w_k + Σ_{j≠k} w_j) / N.

The server needs only S = Σ_j w_j: it broadcasts S, and each client sends back the change of its model, S ← S +
Σ_k Δw_k; a client evaluates with its own w_k. With λ1 = λ2 = 0 FedMTL is ``local`` training exactly.

Defaults: the paper tunes the regularisation per data set and gives no values for neural networks; λ1 = 0.5 makes the
pull 2λ1 · (w_k − w̄) as strong as Ditto's default λ = 1 proximal pull, and λ2 = 0 (no weight decay, like every
method here).

Deliberate differences from PFLlib (``clientmtl.py``/``servermtl.py``): PFLlib builds W from ``state_dict()``
tensors, which carry no gradient, so its regulariser never changes the model and its FedMTL trains exactly like
``local`` (it also builds Ω from ``torch.ones`` instead of the identity, i.e. Ω ∝ 11ᵀ, and scales the regulariser by
10^−(digits of the model size + 1)); here the regulariser is the paper's and is differentiated. W holds every client's
latest model (PFLlib: the models of the round's clients only). With λ1 = λ2 = 0 two rounds equal PFLlib's FedMTL step
for step (``tests/reference/test_pfllib_step.py``, ``test_step_equivalence[fedmtl]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, under, with_prefix
from ..core.params import HyperParams, hp

SUM = "sum"
DELTA = "delta"


@dataclass(frozen=True)
class FedMTLParams(HyperParams):
    lam1: float = hp(0.5, "weight λ1 of tr(WΩWᵀ) = Σ_j ‖w_j − w̄‖², pulling each client towards the mean model (0 with λ2 = 0: local)", ge=0)
    lam2: float = hp(0.0, "weight λ2 of ‖W‖²_F (weight decay on every client's model)", ge=0)


def mtl_grad_hook(others: Sequence[torch.Tensor], num_tasks: int, lam1: float, lam2: float):
    """Gradient hook adding ∇_{w_k}[λ1·tr(WΩWᵀ) + λ2·‖W‖²] = 2λ1·((1 − 1/N)·w_k − Σ_{j≠k} w_j / N) + 2λ2·w_k,
    ``others`` being Σ_{j≠k} w_j per parameter tensor."""
    a = 2.0 * lam1 * (1.0 - 1.0 / num_tasks) + 2.0 * lam2
    b = 2.0 * lam1 / num_tasks

    def hook(params: Sequence[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return [g.add(p.detach(), alpha=a).sub_(o, alpha=b) for p, g, o in zip(params, grads, others)]

    return hook


@register_algorithm("fedmtl", summary="FedMTL (Smith et al., NeurIPS 2017): per-client models coupled by λ1·tr(WΩWᵀ) with Ω = I − 11ᵀ/N")
class FedMTL(Algorithm):
    paper = "Smith, Chiang, Sanjabi & Talwalkar, Federated Multi-Task Learning, NeurIPS 2017"
    Params = FedMTLParams
    personalized = True
    has_global = False

    def __init__(self, hp: FedMTLParams, ctx):
        super().__init__(hp, ctx)
        self.param_names = [n for n, p in ctx.build_model().named_parameters() if p.requires_grad]

    # ----------------------------------------------------------------------------------- server side
    def init_server(self) -> State:
        w0 = super().init_server()  # every client starts from these weights
        return with_prefix({n: w0[n] * float(self.ctx.num_clients) for n in self.param_names}, SUM)

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return dict(server)

    def eval_message(self, server: State, cid: int) -> Message:
        return {}  # a client is judged with its own state alone

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        out = dict(server)
        for u in updates:
            for n, d in under(u.upload, DELTA).items():
                out[f"{SUM}/{n}"] = out[f"{SUM}/{n}"] + d.to(out[f"{SUM}/{n}"].device)
        return out

    # ----------------------------------------------------------------------------------- client side
    def init_client(self, rt) -> State:
        return rt.initial_params()

    def local_update(self, rt, msg: Message, state: State) -> Update:
        start = model_entries(state)
        rt.load(start)
        total = under(msg, SUM)
        named = dict(rt.model.named_parameters())
        params = [named[n] for n in self.param_names]
        others = [total[n].to(rt.device) - start[n] for n in self.param_names]
        hook = mtl_grad_hook(others, self.ctx.num_clients, self.hp.lam1, self.hp.lam2)
        stats = rt.train(params=params, grad_hook=hook)
        new = rt.model_state()
        delta = {n: new[n] - start[n] for n in self.param_names}
        return Update(with_prefix(delta, DELTA), new, rt.num_train, stats.as_dict())

    def personal_params(self, msg: Message, state: State) -> Message:
        return model_entries(state)
