"""CFL — Sattler, Müller & Samek, "Clustered Federated Learning: Model-Agnostic Distributed Multitask Optimization
Under Privacy Constraints", IEEE Transactions on Neural Networks and Learning Systems, 2021.

Clients are organised in clusters, each with its own model θ_c; a client trains from its cluster's model (FedAvg's
local update) and every cluster is averaged as in FedAvg, θ_c ← Σ_{i ∈ c} (n_i / n_c) θ_i = θ_c + Σ (n_i / n_c) Δθ_i.
When a cluster's federated optimum is reached for the cluster as a whole but not for its members — its mean update
is small while some member's update is still large,

    ‖Σ_{i ∈ c} (n_i / n_c) Δθ_i‖ < ε₁   and   max_{i ∈ c} ‖Δθ_i‖ > ε₂,

the cluster is split in two by the cosine similarities α_ij = ⟨Δθ_i, Δθ_j⟩ / (‖Δθ_i‖‖Δθ_j‖) of its members' updates
(complete-linkage agglomerative clustering of −α, scikit-learn, as the authors' code), and each part takes the
average of its own members' models. A client is judged with its cluster's model; there is no global model. Without a
split CFL is FedAvg, step for step (tested).

Defaults are the authors' demo and FL-bench's: ε₁ = 0.4, ε₂ = 1.6, splits from round 20 on, only clusters of more
than 2 clients split. A cluster splits only in a round in which all its members reported (the paper assumes full
participation; with partial participation a split waits for such a round). ``clusters`` is recorded with each
evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, under, weighted_average, with_prefix
from ..core.params import HyperParams, hp


@dataclass(frozen=True)
class CFLParams(HyperParams):
    eps_1: float = hp(0.4, "ε₁: a cluster may split when the norm of its mean update is below this", ge=0)
    eps_2: float = hp(1.6, "ε₂: ... and some member's update norm is above this", ge=0)
    min_cluster_size: int = hp(2, "only clusters with more clients than this split", ge=1)
    start_round: int = hp(20, "first round in which clusters may split", ge=0)


def bipartition(updates: torch.Tensor) -> tuple[list[int], list[int]]:
    """Two groups of rows of ``updates`` (m, P) by complete-linkage clustering of their negative cosine similarities."""
    from sklearn.cluster import AgglomerativeClustering

    u = updates.double()
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = (u @ u.T).cpu().numpy()
    labels = AgglomerativeClustering(n_clusters=2, metric="precomputed", linkage="complete").fit(-sim).labels_
    return [int(i) for i in np.flatnonzero(labels == 0)], [int(i) for i in np.flatnonzero(labels == 1)]


@register_algorithm("cfl", summary="CFL (Sattler et al., IEEE TNNLS 2021): FedAvg per cluster; clusters split by the cosine similarity of updates")
class CFL(Algorithm):
    paper = ("Sattler, Müller & Samek, Clustered Federated Learning: Model-Agnostic Distributed Multitask Optimization "
             "Under Privacy Constraints, IEEE TNNLS 2021")
    Params = CFLParams
    personalized = True
    has_global = False
    vectorizable = True  # local training is FedAvg's

    # ----------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        state = with_prefix(super().init_server(), "cluster/0")
        state["cfl/cluster"] = torch.zeros(self.ctx.num_clients, dtype=torch.long, device=self.ctx.device)
        return state

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return under(server, f"cluster/{int(server['cfl/cluster'][cid])}")

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        out = dict(server)
        assign = server["cfl/cluster"].clone()
        for c in sorted({int(assign[u.cid]) for u in updates}):
            members = [u for u in sorted(updates, key=lambda u: u.cid) if int(assign[u.cid]) == c]
            model = under(server, f"cluster/{c}")
            keys = [k for k, v in model.items() if v.is_floating_point()]
            deltas = torch.stack([torch.cat([(model_entries(u.upload)[k].double() - model[k].double()).reshape(-1)
                                             for k in keys]) for u in members])
            w = torch.tensor([u.weight for u in members], dtype=torch.float64, device=deltas.device)
            mean_norm = float(((w / w.sum()) @ deltas).norm())
            max_norm = float(deltas.norm(dim=1).max())
            everyone = len(members) == int((assign == c).sum())
            if (rnd >= self.hp.start_round and everyone and len(members) > self.hp.min_cluster_size
                    and mean_norm < self.hp.eps_1 and max_norm > self.hp.eps_2):
                first, second = bipartition(deltas)
                new = int(assign.max()) + 1
                for i in second:
                    assign[members[i].cid] = new
                groups = {c: [members[i] for i in first], new: [members[i] for i in second]}
            else:
                groups = {c: members}
            for cl, us in groups.items():
                avg = weighted_average([model_entries(u.upload) for u in us], [u.weight for u in us])
                out |= with_prefix(avg, f"cluster/{cl}")
        out["cfl/cluster"] = assign
        return out

    def server_metrics(self, server: State) -> dict[str, float]:
        return {"clusters": int(server["cfl/cluster"].max()) + 1}
