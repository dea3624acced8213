"""pFedSim — Tan, Zhou, Liu, Wang & Yu, "pFedSim: Similarity-Aware Model Aggregation Towards Personalized Federated
Learning", arXiv:2305.15706, 2023.

Two phases. **Warm-up** (the first ``warm_up`` share of the rounds): FedAvg. **Personalization**: every client keeps
its own model θ_i = (φ_i, h_i) (the server stores the latest one each client uploaded, all starting from the warm-up
model), and the server gives client i a feature extractor aggregated with weights from the similarity of the
clients' classifiers, while its classifier h_i stays its own:

    s_ij = max(0, mean_c cos(h_i[c], h_j[c]))                 (rows of the last classifier layer; among the clients
                                                               of one round, kept in an N × N matrix, s_ii = 1)
    w_ij = −log(1 − s̃_ij) / Σ_l −log(1 − s̃_il),  s̃ = s with s̃_ii = 0.9999
    client i starts from (Σ_j w_ij φ_j, h_i)   (its own model θ_i while no other client is similar yet)

then trains locally and uploads its whole model. A client is judged with its own θ_i (``personalized``); during
warm-up that is the global model. ``warm_up = 1`` gives FedAvg (tested).

Defaults are FL-bench's (warm-up of half the rounds).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, under, weighted_average, with_prefix
from ..core.params import HyperParams, hp
from .mechanics import is_head, mix_params, warmup_length


@dataclass(frozen=True)
class PFedSimParams(HyperParams):
    warm_up: float = hp(0.5, "share of the rounds trained as FedAvg before the personalization phase (1: FedAvg)", ge=0, le=1)


def classifier_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """max(0, mean over classes of the cosine similarity of two classifiers' weight rows)."""
    return max(0.0, float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean()))


def similarity_weights(row: torch.Tensor, cid: int) -> torch.Tensor | None:
    """Aggregation weights of client ``cid`` from its similarity row (None: no other client is similar)."""
    if float(row.sum()) <= 1.0:
        return None
    w = row.clone().double()
    w[cid] = 0.9999
    w = -torch.log1p(-w)
    return w / w.sum()


@register_algorithm("pfedsim", summary="pFedSim (Tan et al., 2023): FedAvg warm-up, then feature extractors aggregated by classifier similarity")
class PFedSim(Algorithm):
    paper = "Tan, Zhou, Liu, Wang & Yu, pFedSim: Similarity-Aware Model Aggregation Towards Personalized Federated Learning, arXiv:2305.15706, 2023"
    Params = PFedSimParams
    personalized = True
    has_global = False

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self.warm = warmup_length(hp.warm_up, ctx.rounds)
        model = ctx.build_model()
        heads = [n for n, p in model.named_parameters() if is_head(n) and p.dim() == 2]
        self.classifier = heads[-1]  # the last classifier layer's weight, whose rows are compared

    # ----------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        state = super().init_server()
        state["pfedsim/similarity"] = torch.eye(self.ctx.num_clients, dtype=torch.float64, device=self.ctx.device)
        state["pfedsim/personal"] = torch.tensor(self.warm == 0, device=self.ctx.device)
        if self.warm == 0:  # no warm-up: every client's model starts from the initial one
            glob = model_entries(state)
            for j in range(self.ctx.num_clients):
                state |= with_prefix(glob, f"client/{j}")
        return state

    def personal(self, server: State, cid: int) -> Message:
        return under(server, f"client/{cid}") if bool(server["pfedsim/personal"]) else model_entries(server)

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        own = self.personal(server, cid)
        if not bool(server["pfedsim/personal"]):
            return own
        w = similarity_weights(server["pfedsim/similarity"][cid], cid)
        if w is None:
            return own
        body = [k for k in own if not is_head(k) and own[k].is_floating_point()]
        models = [under(server, f"client/{j}") for j in range(self.ctx.num_clients)]
        return {**own, **mix_params(models, [float(x) for x in w], keys=body)}

    def eval_message(self, server: State, cid: int) -> Message:
        return self.personal(server, cid)

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        if not updates:
            return server
        out = dict(server)
        if not bool(server["pfedsim/personal"]):  # warm-up: FedAvg
            out |= weighted_average([u.upload for u in updates], [u.weight for u in updates])
            if rnd >= self.warm:  # the warm-up ends: every client's model starts from the global one
                glob = model_entries(out)
                for j in range(self.ctx.num_clients):
                    out |= with_prefix(glob, f"client/{j}")
                out["pfedsim/personal"] = torch.tensor(True, device=server["pfedsim/personal"].device)
            return out
        sim = server["pfedsim/similarity"].clone()
        for u in updates:
            out |= with_prefix(model_entries(u.upload), f"client/{u.cid}")
        ids = sorted(u.cid for u in updates)
        for a, i in enumerate(ids):
            for j in ids[a + 1:]:
                s = classifier_similarity(out[f"client/{i}/{self.classifier}"], out[f"client/{j}/{self.classifier}"])
                sim[i, j] = sim[j, i] = s
        out["pfedsim/similarity"] = sim
        return out
