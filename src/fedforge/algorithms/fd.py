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

import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries
from ..core.objective import MAIN, Objective, Phase
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
    def init_client(self, rt: ClientRuntime) -> State:
        return rt.initial_params()

    vectorizable = True  # the distillation target comes from the message: the vectorized executor can batch clients

    def vector_objective(self, rt: ClientRuntime, msg: Message, state: State) -> Objective:
        C = self.ctx.num_classes
        logits = message_to_prototypes(msg, C, self.PREFIX)
        on = float(self.hp.lam) > 0 and bool(logits)
        extras = {}
        if on:
            T, mask = prototype_matrix(logits, C, C, device=rt.device)
            extras = {"logits": T, "has_logit": mask}
        return Objective(start={MAIN: model_entries(state)}, phases=(Phase(loss=self.distill_loss if on else None),),
                         extras=extras, finish=self.finish)

    def distill_loss(self, m, x, y, ex):
        """CE + λ·share·KL(softmax(F̄_y) ‖ softmax(g(x))) over the samples whose class has a global logit (share: their
        fraction of the batch); per-sample weights instead of selected rows, so that it is vmappable."""
        out = m(x)
        loss = F.cross_entropy(out, y)
        has = ex["has_logit"][y].to(out.dtype)
        share = has.sum() / x.shape[0]  # samples without a global logit add nothing
        return loss + float(self.hp.lam) * share * kl_distill(out, ex["logits"][y], weight=has)

    def finish(self, rt: ClientRuntime, weights, stats) -> Update:
        rt.load(weights[MAIN])  # (already loaded when run one client at a time)
        return prototype_update(rt, stats[0], self.PREFIX, features=rt.model)

    def personal_params(self, msg: Message, state: State) -> Message:
        return model_entries(state)
