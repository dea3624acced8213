"""FedGH — Yi et al., "FedGH: Heterogeneous Federated Learning with Generalized Global Header", ACM MM 2023.

Clients with different feature extractors f_k share one classification header H trained on the server from
their class prototypes:

    client k   loads H as its head, trains (f_k, H_k) with CE on D_k, then uploads
               R_k^c = mean_{(x, y=c) ∈ D_k} f_k(x)                     (trained model, eval mode)
    server     H ← H − η_s ∇ CE(H(R_k^c), c)  over all uploaded (R_k^c, c) pairs, for ``server_epochs`` epochs
    client k   is judged with (f_k, H); ``head_acc`` also reports (f_k, H_k), its own locally trained header

Uploads are prototypes only (``proto/<c>``); downloads are H (``head.*``, (d+1)·C floats for a linear head).
Every architecture must therefore have the same head. H starts from the initial head of the first architecture
(HtFLlib starts from client 0's head).

Defaults: the server trains with SGD at η_s = 0.01 for one epoch over the prototypes in mini-batches of the
clients' batch size, as HtFLlib's benchmark script runs FedGH (one version of ``total.sh`` passes ``-se 1``; its
argparse default is 100 epochs). The authors' code (LipingYi/FedGH) also makes one pass per round, one prototype per
step. One round's client and server steps equal HtFLlib's (``tests/reference/test_htfllib_equivalence.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.context import derive_seed
from ..core.messages import Message, State, model_entries
from ..core.params import HyperParams, hp
from ..core.training import train_loop
from .mechanics import (
    is_head,
    message_to_prototypes,
    prototype_update,
    require_common_feature_dim,
    require_same_head,
    select,
    with_own_head,
)

if TYPE_CHECKING:
    from ..core.runtime import ClientRuntime


@dataclass(frozen=True)
class FedGHParams(HyperParams):
    server_lr: float = hp(0.01, "server SGD learning rate η_s for the global header", gt=0)
    server_epochs: int = hp(1, "server epochs over the uploaded prototypes per round", ge=0)


@register_algorithm("fedgh", summary="FedGH (Yi et al., ACM MM 2023): a global header trained on the server from client prototypes")
class FedGH(Algorithm):
    paper = "Yi et al., FedGH: Heterogeneous Federated Learning with Generalized Global Header, ACM MM 2023"
    Params = FedGHParams
    personalized = True
    has_global = False
    heterogeneous = True

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        require_common_feature_dim(ctx, self.name)
        require_same_head(ctx, self.name)

    # ----------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        return {k: v.detach().clone() for k, v in self.ctx.build_model(self.ctx.archs[0]).head.state_dict().items()}

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return {f"head.{k}": v for k, v in server.items()}

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        pairs = [(v, c) for u in updates for c, v in message_to_prototypes(u.upload, -1).items()]
        if not pairs or self.hp.server_epochs == 0:
            return server
        protos = torch.stack([v.float() for v, _ in pairs])
        dev = protos.device  # the server's device: the header trains there
        labels = torch.tensor([c for _, c in pairs], dtype=torch.long, device=dev)
        head = self.ctx.build_model(self.ctx.archs[0]).head.to(dev)
        head.load_state_dict(server)
        gen = torch.Generator(device=dev).manual_seed(derive_seed(self.ctx.seed, rnd, "fedgh"))
        bs = self.ctx.batch_size
        for _ in range(self.hp.server_epochs):
            order = torch.randperm(len(labels), generator=gen, device=dev)
            train_loop(head, [(protos[order[i:i + bs]], labels[order[i:i + bs]]) for i in range(0, len(labels), bs)],
                       self.hp.server_lr)
        return {k: v.detach().clone() for k, v in head.state_dict().items()}

    # ----------------------------------------------------------------------------------------- client
    def init_client(self, rt: ClientRuntime) -> State:
        return rt.initial_params()

    def local_update(self, rt: ClientRuntime, msg: Message, state: State) -> Update:
        rt.load(model_entries(state))
        rt.load(model_entries(msg))  # the global header replaces the local one
        return prototype_update(rt, rt.train())

    def personal_params(self, msg: Message, state: State) -> Message:
        """The client's feature extractor with the global header."""
        return {**select(model_entries(state), lambda k: not is_head(k)), **model_entries(msg)}

    def evaluate(self, rt: ClientRuntime, msg: Message, state: State):
        """Judged with the global header (the paper); ``head``: with the header the client last trained locally
        (before the server's replaced it), which separates the extractor's quality from the global header's."""
        return with_own_head(super().evaluate(rt, msg, state), rt, state)
