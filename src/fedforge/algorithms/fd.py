"""FD (FedDistill) — Jeong et al., "Communication-Efficient On-Device Machine Learning: Federated Distillation and
Augmentation under Non-IID Private Data", NeurIPS 2018 Workshop on Machine Learning on the Phone and other Consumer
Devices (arXiv:1811.11479).

Clients exchange per-class mean logits, never weights (so architectures may differ freely; not even the feature
dimension has to match). With g_k client k's network:

    local logits     F_k^(c) = mean_{(x, y=c) ∈ D_k} g_k(x)                     (after local training, eval mode)
    global logits    F̄^(c)   = mean_{k holding c} F_k^(c)
    local objective  L_k = CE(g_k(x), y) + λ · KL( softmax(F̄^(y)) ‖ softmax(g_k(x)) )    (batch mean)

Uploads are ``logit/<c>`` (C floats) for each class the client holds; downloads are the global logits of every
class seen so far (C·C floats). Each client keeps its whole model and is judged with it.

Departures from prior code: HtFLlib's FD collects the logits during training (mixing all the epoch's models);
here they come from the trained model, as for prototypes. HtFLlib commit ca3e29a dropped the softmax on the
teacher, so its soft target is the raw averaged logit vector, which is not a distribution; the paper distils
towards the softmax of the global logits, which is what this does (temperature 1). A sample whose class has no
global logit yet adds no distillation term here; HtFLlib distils it towards its own detached logits, which still
pulls. With the softmaxed target and the trained model's logits substituted, one round equals HtFLlib's
(``tests/reference/test_htfllib_equivalence.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries
from ..core.params import HyperParams, hp
from .mechanics import aggregate_prototypes, kl_distill, message_to_prototypes, prototype_matrix, prototype_update

if TYPE_CHECKING:
    from ..core.runtime import ClientRuntime


@dataclass(frozen=True)
class FDParams(HyperParams):
    lam: float = hp(1.0, "weight λ of the distillation term towards the global per-class logits (0: local only)", ge=0)


@register_algorithm("fd", summary="FedDistill (Jeong et al., 2018): exchange per-class mean logits; distil towards them")
class FD(Algorithm):
    paper = ("Jeong et al., Communication-Efficient On-Device Machine Learning: Federated Distillation and "
             "Augmentation under Non-IID Private Data, arXiv:1811.11479, 2018")
    Params = FDParams
    personalized = True
    has_global = False
    heterogeneous = True

    PREFIX = "logit"

    # ----------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        return {}

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return dict(server)

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        return aggregate_prototypes(server, updates, self.PREFIX)

    # ----------------------------------------------------------------------------------------- client
    def init_client(self, rt: "ClientRuntime") -> State:
        return rt.initial_params()

    def local_update(self, rt: "ClientRuntime", msg: Message, state: State) -> Update:
        rt.load(model_entries(state))
        C = self.ctx.num_classes
        T, mask = prototype_matrix(message_to_prototypes(msg, C, self.PREFIX), C, C, device=rt.device)
        lam = float(self.hp.lam)
        loss_fn = None
        if lam > 0 and bool(mask.any()):
            T, mask = T.to(rt.device), mask.to(rt.device)

            def loss_fn(model, x, y):
                out = model(x)
                loss = F.cross_entropy(out, y)
                has = mask[y]
                if not bool(has.any()):
                    return loss
                share = has.sum().to(out.dtype) / x.shape[0]  # samples without a global logit add nothing
                return loss + lam * share * kl_distill(out[has], T[y[has]])

        return prototype_update(rt, rt.train(loss_fn=loss_fn), self.PREFIX, features=rt.model)

    def personal_params(self, msg: Message, state: State) -> Message:
        return model_entries(state)
