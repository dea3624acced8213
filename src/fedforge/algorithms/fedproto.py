"""FedProto — Tan et al., "FedProto: Federated Prototype Learning across Heterogeneous Clients", AAAI 2022.

Clients exchange class prototypes (mean feature vectors), never weights, so every client may own a different
architecture as long as the feature dimension is shared. With f_k client k's feature extractor:

    local prototype     C_k^(j) = mean_{(x, y=j) ∈ D_k} f_k(x)                 (after local training, eval mode)
    global prototype    C̄^(j)   = mean_{k ∈ N_j} C_k^(j)                       (N_j: clients that hold class j)
    local objective     L_k = CE(h_k(f_k(x)), y) + λ · ‖f_k(x) − C̄^(y)‖² / d   (mean over the batch)
    inference           ŷ = argmin_j ‖f_k(x) − C̄^(j)‖₂                          (nearest global prototype)

Uploads are the client's prototypes of the classes it holds (``proto/<c>``, d floats each); downloads are the global
prototypes. Clients keep their whole model as state and are judged by nearest-prototype inference (the paper's
protocol); the accuracy of the local head is also reported as ``head_acc``. Before any global prototype exists
(round 0), the local head is used.

Departures from prior code: HtFLlib/PFLlib upload prototypes gathered during training (HtFLlib's FedTGP client from
the start-of-round model); here they come from the locally trained model in eval mode, as the paper describes.
The global prototype is the unweighted mean over the clients holding the class, as in the official code.
λ = 1 with the squared distance averaged over feature dimensions (the official code's ``MSELoss``); HtFLlib's
benchmark script uses λ = 10.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries
from ..core.objective import MAIN, Objective, Phase
from ..core.params import HyperParams, hp
from .mechanics import (
    aggregate_prototypes,
    message_to_prototypes,
    nearest_prototype_scores,
    prototype_matrix,
    prototype_mse,
    prototype_update,
    require_common_feature_dim,
)

if TYPE_CHECKING:
    from ..core.runtime import ClientRuntime


@dataclass(frozen=True)
class FedProtoParams(HyperParams):
    lam: float = hp(1.0, "weight λ of the prototype regulariser λ·‖f(x) − C̄_y‖²/d (0: local training only)", ge=0)


@register_algorithm("fedproto", summary="FedProto (Tan et al., AAAI 2022): exchange class prototypes; nearest-prototype inference")
class FedProto(Algorithm):
    paper = "Tan et al., FedProto: Federated Prototype Learning across Heterogeneous Clients, AAAI 2022"
    Params = FedProtoParams
    personalized = True
    has_global = False
    heterogeneous = True

    PREFIX = "proto"

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self.feature_dim = require_common_feature_dim(ctx, self.name)

    # ----------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        return {}

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        p = self.PREFIX + "/"
        return {k: v for k, v in server.items() if k.startswith(p)}

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        return aggregate_prototypes(server, updates, self.PREFIX)

    # ----------------------------------------------------------------------------------------- client
    def init_client(self, rt: ClientRuntime) -> State:
        return rt.initial_params()

    def global_prototypes(self, msg: Message, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, d) global prototypes received and the mask of classes that have one (on ``device``, by default the
        message's)."""
        return prototype_matrix(message_to_prototypes(msg, self.ctx.num_classes, self.PREFIX), self.ctx.num_classes,
                                self.feature_dim, device=device)

    def regulariser(self, z: torch.Tensor, target: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        """λ-free distance term between features and their class's global prototype (batch mean)."""
        return prototype_mse(z, target, has)

    def weight(self) -> float:
        return float(self.hp.lam)

    vectorizable = True  # the regulariser reads the received prototypes: the vectorized executor can batch clients

    def vector_objective(self, rt: ClientRuntime, msg: Message, state: State) -> Objective:
        on = self.weight() > 0 and bool(message_to_prototypes(msg, self.ctx.num_classes, self.PREFIX))
        extras = {}
        if on:
            P, mask = self.global_prototypes(msg, rt.device)
            extras = {"protos": P, "has_proto": mask}
        return Objective(start={MAIN: model_entries(state)}, phases=(Phase(loss=self.proto_loss if on else None),),
                         extras=extras, finish=self.finish)

    def proto_loss(self, m, x, y, ex):
        """CE(h(z), y) + λ·(distance of z to its class's global prototype; 0 where the class has none)."""
        z = m.features(x)
        loss = F.cross_entropy(m.head(z), y)
        return loss + self.weight() * self.regulariser(z, ex["protos"][y], ex["has_proto"][y].to(z.dtype))

    def finish(self, rt: ClientRuntime, weights, stats) -> Update:
        rt.load(weights[MAIN])  # (already loaded when run one client at a time)
        return prototype_update(rt, stats[0], self.PREFIX)

    def personal_params(self, msg: Message, state: State) -> Message:
        return model_entries(state)

    def evaluate(self, rt: ClientRuntime, msg: Message, state: State):
        rt.load(model_entries(state))
        P, mask = self.global_prototypes(msg, rt.device)
        head = rt.evaluate()
        if bool(mask.any()):
            model = rt.model
            proto = rt.evaluate(lambda x: nearest_prototype_scores(model.features(x), P, mask))
        else:
            proto = head
        return {"personalized": proto, "head": head}
