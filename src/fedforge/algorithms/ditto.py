"""Ditto — Li, Hu, Beirami & Smith, "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021.

Two models per client: the global model w, trained and averaged exactly as in FedAvg, and a personal model v_k
that never leaves the client, trained on the local objective plus a proximal pull towards the received global w^t:

    w_k ← local SGD on f_k from w^t;  server: w^{t+1} = Σ_k (n_k / n) w_k                          (FedAvg)
    v_k ← v_k − η (∇f_k(v_k) + λ (v_k − w^t))   over the same local batches                    (personal)

The client is judged twice and the two are recorded **separately**: ``global`` with w and ``personalized`` with
v_k (PFLlib appends both to one list). λ = 1 is the value of the authors' Fashion-MNIST runs. The personal pass
replays the task's batch order (the authors' code uses the same batch for both updates), which also makes the
global model identical to FedAvg's and, at λ = 0, the personal models identical to ``local``'s (both tested).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, with_prefix
from ..core.objective import Objective, Phase
from ..core.params import HyperParams, hp
from .mechanics import proximal_grads


@dataclass(frozen=True)
class DittoParams(HyperParams):
    lamda: float = hp(1.0, "λ: weight of the proximal term λ/2‖v − w_global‖² on the personal model (0: purely local)", ge=0)


@register_algorithm("ditto", summary="Ditto (Li et al., ICML 2021): FedAvg global model + personal model with a prox pull to it")
class Ditto(Algorithm):
    paper = "Li, Hu, Beirami & Smith, Ditto: Fair and Robust Federated Learning Through Personalization, ICML 2021"
    Params = DittoParams
    personalized = True
    has_global = True

    def init_client(self, rt) -> State:
        return rt.initial_params()  # v_k⁰ = w⁰

    vectorizable = True  # both models' updates are objectives: the vectorized executor can batch clients

    def vector_objective(self, rt, msg: Message, state: State) -> Objective:
        glob = model_entries(msg)
        # global model: FedAvg's local update, on the task's batch stream; personal model: the same batches
        # (replayed from the task's seed), proximal pull towards the received global model
        return Objective(start={"global": glob, "personal": model_entries(state)}, extras=with_prefix(glob, "anchor"),
                         phases=(Phase(model="global"),
                                 Phase(model="personal", grad=self.proximal if self.hp.lamda else None, replay=True)),
                         finish=self.finish)

    def proximal(self, params, grads, ex):
        """The personal model's gradient plus λ·(v − w_global)."""
        return proximal_grads(params, grads, ex.under("anchor"), self.hp.lamda)

    def finish(self, rt, weights, stats) -> Update:
        metrics = {**stats[0].as_dict(), "personal_loss": stats[1].loss}
        return Update(weights["global"], weights["personal"], rt.num_train, metrics)
