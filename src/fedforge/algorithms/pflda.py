"""PFL-DA — Shi & Al Kontar, "Personalized Federated Learning via Domain Adaptation with an Application to
Distributed 3D Printing", Technometrics 2023.

Domain adaptation applied to personalization: a global model learned from every client's data is the source, and
each client adapts a personal model to its own domain while staying close to the global one. For a network split
into a feature extractor φ and a head h (the form PFLlib implements), client k keeps its own extractor φ_k and
personal head h_k; only the global head h_g is shared. In round t client k

    1. trains its personal head for E epochs, φ_k frozen:   h_k ← SGD on CE(h_k(φ_k(x)), y) + λ · ‖h_k − h_g^t‖₂,
    2. trains its extractor through the received global head, both updated, for E epochs:
                                                            (φ_k, h_g) ← SGD on CE(h_g(φ_k(x)), y),
    3. uploads h_g; the server averages the heads: h_g^{t+1} = Σ_k (n_k / n) · h_{g,k}.

A client is judged with its personal model (φ_k, h_k). E is the run's local epochs. λ = 1 is PFLlib's default
(``-lam 1.0``); the paper chooses its penalty weight by validation and gives no value for neural networks. With
λ = 0 the personal head is trained on its cross-entropy alone, which is what PFLlib computes for every λ (below).

Deliberate differences from PFLlib (``clientda.py``): PFLlib computes the penalty ‖h_g − h_k‖₂ from ``.data``
tensors, so it carries no gradient and never acts; here it is differentiated (‖·‖₂, not squared, as PFLlib writes
it; its subgradient at h_k = h_g is 0). With λ = 0 two rounds equal PFLlib's for any ``-lam``
(``tests/reference/test_pfllib_step.py``, ``test_step_equivalence[pflda]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries
from ..core.params import HyperParams, hp
from .mechanics import frozen_feature_batches, is_body, is_head, named_params, select


@dataclass(frozen=True)
class PFLDAParams(HyperParams):
    lam: float = hp(1.0, "weight λ of the penalty λ·‖h_personal − h_global‖₂ on the personal head (0: plain cross-entropy)", ge=0)


def head_distance(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖θ − θ_anchor‖₂ over the concatenation of the tensors (differentiable in ``params``)."""
    return torch.linalg.vector_norm(torch.cat([(p - a.detach()).flatten() for p, a in zip(params, anchors)]))


@register_algorithm("pflda", summary="PFL-DA (Shi & Al Kontar, Technometrics 2023): personal head held near a shared global head; personal extractor trained through the global head")
class PFLDA(Algorithm):
    paper = ("Shi & Al Kontar, Personalized Federated Learning via Domain Adaptation with an Application to "
             "Distributed 3D Printing, Technometrics 2023")
    Params = PFLDAParams
    personalized = True
    has_global = False

    # ----------------------------------------------------------------------------------- server side
    def init_server(self) -> State:
        return select(super().init_server(), is_head)

    def eval_message(self, server: State, cid: int) -> Message:
        return {}  # a client is judged with its own state alone

    # ----------------------------------------------------------------------------------- client side
    def init_client(self, rt) -> State:
        return rt.initial_params()

    def train_personal_head(self, rt, global_head: Message):
        """Step 1: the personal head on CE + λ‖h − h_g‖₂ with the extractor frozen (on features computed once where
        that is exact)."""
        names = [n for n, _ in rt.model.named_parameters() if is_head(n)]
        params = named_params(rt.model, is_head)
        anchors = [global_head[n] for n in names]
        lam = self.hp.lam
        cached = frozen_feature_batches(rt)

        def loss_fn(model, x, y):
            if cached is None:
                with torch.no_grad():
                    x = model.features(x)
            loss = F.cross_entropy(model.head(x), y)
            return loss + lam * head_distance(params, anchors) if lam else loss

        return rt.train(loss_fn=loss_fn, params=params, batches=cached)

    def local_update(self, rt, msg: Message, state: State) -> Update:
        ghead = {k: v for k, v in model_entries(msg).items() if is_head(k)}
        rt.load(model_entries(state))
        head_stats = self.train_personal_head(rt, ghead)
        g = rt.aux_model("pflda/global-head")
        rt.load(ghead, g)

        def loss_fn(model, x, y):
            return F.cross_entropy(g.head(model.features(x)), y)

        g.train()
        body_stats = rt.train(loss_fn=loss_fn, params=named_params(rt.model, is_body) + named_params(g, is_head))
        upload = rt.model_state(g, prefixes=["head."])
        metrics = {**body_stats.as_dict(), "head_loss": head_stats.loss}
        return Update(upload, rt.model_state(), rt.num_train, metrics)

    def personal_params(self, msg: Message, state: State) -> Message:
        return model_entries(state)
