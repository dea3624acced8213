"""APFL — Deng, Kamani & Mahdavi, "Adaptive Personalized Federated Learning", arXiv:2003.13461, 2020.

Each client keeps a local model v_i and a mixing weight α_i ∈ [0, 1]; its personalized model is the mixture
v̄_i = α_i v_i + (1 − α_i) w_i of its local model and its copy w_i of the global model. On every local batch ξ, from
the same point:

    w_i ← w_i − η ∇f_i(w_i; ξ)                                 (the global model trains exactly as in FedAvg)
    v_i ← v_i − η ∇_v f_i(v̄_i; ξ)  = v_i − η α_i ∇f_i(v̄_i; ξ)
    α_i ← Π_[0,1]( α_i − η ⟨v_i − w_i, ∇f_i(v̄_i; ξ)⟩ )          (adaptive α, projected onto [0, 1])
    server: w ← Σ_k (n_k / n) w_k

The client is judged (``personalized``) with v̄_i = α_i v_i + (1 − α_i) w_i, where w_i is the client's copy of the
global model after its last local training (``mix_with=local``, the default): the paper's v̄_i is made of the local
iterate w_i^(t), and both the authors' code (FedTorch: ``inference_personal`` on the client's model before
aggregation) and PFLlib (``model_per`` mixed with the trained ``model``) judge that mixture. A client that has not
trained yet mixes with the received global model. ``mix_with=global`` mixes v_i with the freshly aggregated global
model instead (what fedforge did before; it needs no copy of w_i in the client's state). ``global`` is w itself.
α_i, v_i (and w_i) stay on the client (``v/...``, ``w/...`` and ``apfl/alpha`` in its state). α's initial value must
lie in [0, 1]: α = 0 is FedAvg's model, α = 1 a purely local model; 0.5 is one of the paper's settings.

α = 0 is absorbing: v's gradient is α·∇f, so v stops training and α's gradient ⟨v − w, ∇f(v̄)⟩ keeps pushing it
down once the locally trained w fits the client's data better than v. α takes its step on every local batch (the
paper's rule) with the run's learning rate η.

Departures from PFLlib (reference notes): PFLlib adds 0.02·α to α's gradient and overwrites v with the mixture
after training; here α follows its plain gradient and v stays the local model, as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, under, with_prefix
from ..core.params import HyperParams, hp
from .mechanics import forward_with, mix_params

ALPHA = "apfl/alpha"


@dataclass(frozen=True)
class APFLParams(HyperParams):
    alpha: float = hp(0.5, "initial mixing weight α of the local model in α·v + (1 − α)·w", ge=0.0, le=1.0)
    adaptive: bool = hp(True, "learn α per client by its gradient (the paper's adaptive APFL); false keeps α fixed")
    mix_with: str = hp("local", "w of the judged mixture α·v + (1 − α)·w: local (the client's w after its last local "
                                "training: the paper's v̄, FedTorch, PFLlib) or global (the received global model)",
                       choices=("local", "global"))


@register_algorithm("apfl", summary="APFL (Deng et al., 2020): personalized mixture α·v + (1−α)·w with α learned per client")
class APFL(Algorithm):
    paper = "Deng, Kamani & Mahdavi, Adaptive Personalized Federated Learning, arXiv:2003.13461, 2020"
    Params = APFLParams
    personalized = True
    has_global = True

    def init_client(self, rt) -> State:
        return {**with_prefix(rt.initial_params(), "v"),
                ALPHA: torch.tensor(float(self.hp.alpha), device=rt.device)}

    def local_update(self, rt, msg: Message, state: State) -> Update:
        w_model = rt.model
        v_model = rt.aux_model("apfl_v")
        rt.load(model_entries(msg))
        rt.load(under(state, "v"), model=v_model)
        v_model.train()
        alpha = state[ALPHA].detach().clone().float().requires_grad_(self.hp.adaptive)
        w_named = [(n, p) for n, p in w_model.named_parameters() if p.requires_grad]
        v_named = [(n, p) for n, p in v_model.named_parameters() if p.requires_grad]

        seen = {"loss_w": 0.0, "n": 0}

        def loss(model, x, y):
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)  # projection of the previous α step onto [0, 1]
            loss_w = F.cross_entropy(model(x), y)
            seen["loss_w"] += float(loss_w.detach()) * int(y.shape[0])
            seen["n"] += int(y.shape[0])
            mixed = {n: alpha * pv + (1.0 - alpha) * pw.detach() for (n, pv), (_, pw) in zip(v_named, w_named)}
            loss_mix = F.cross_entropy(forward_with(v_model, mixed, x), y)
            return loss_w + loss_mix

        adapt = self.hp.adaptive
        params = [p for _, p in w_named] + [p for _, p in v_named] + ([alpha] if adapt else [])
        stats = rt.train(loss_fn=loss, params=params)
        with torch.no_grad():
            alpha.clamp_(0.0, 1.0)
        new_state = {**with_prefix(rt.model_state(v_model), "v"), ALPHA: alpha.detach().clone()}
        if self.hp.mix_with == "local":
            new_state |= with_prefix(rt.model_state(), "w")
        # "loss" is the global model's training loss (as FedAvg's); the personalized model's is reported apart
        loss_w = seen["loss_w"] / max(seen["n"], 1)
        metrics = {**stats.as_dict(), "loss": loss_w, "mixture_loss": stats.loss - loss_w, "alpha": float(alpha.detach())}
        return Update(rt.model_state(), new_state, rt.num_train, metrics)

    def personal_params(self, msg: Message, state: State) -> Message:
        v = under(state, "v")
        a = float(state[ALPHA])
        w = under(state, "w") if self.hp.mix_with == "local" else {}
        w = w or model_entries(msg)  # a client that has not trained yet: its w is the received global model
        return mix_params([v, w], [a, 1.0 - a], keys=list(w))
