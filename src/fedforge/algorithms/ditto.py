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

import torch

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries
from ..core.params import HyperParams, hp
from .mechanics import proximal_grad_hook


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

    def local_update(self, rt, msg: Message, state: State) -> Update:
        glob = model_entries(msg)
        # global model: FedAvg's local update, on the task's batch stream
        rt.load(glob)
        stats = rt.train()
        upload = rt.model_state()
        # personal model: the same batches, proximal pull towards the received global model
        rt.load(model_entries(state))
        anchors = [glob[n] for n, p in rt.model.named_parameters() if p.requires_grad]
        replay = torch.Generator(device=rt.gen.device).manual_seed(rt.seed)  # rt.gen's stream, where it draws
        pstats = rt.train(grad_hook=proximal_grad_hook(anchors, self.hp.lamda), batches=rt.batches(generator=replay))
        metrics = {**stats.as_dict(), "personal_loss": pstats.loss}
        return Update(upload, rt.model_state(), rt.num_train, metrics)
