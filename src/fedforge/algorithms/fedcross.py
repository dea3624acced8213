"""FedCross — Hu, Zhou, Yue, Ling, Huang, Li, Liu, Lian & Chen, "FedCross: Towards Accurate Federated Learning via
Multi-Model Cross-Aggregation", ICDE 2024.

The server keeps several *middleware* models instead of one global model. Each round every participating client
trains one of them (a different one per client) and sends it back; then every trained middleware model is
cross-aggregated with one collaborator among the others:

    w_j ← SGD on client π(j)'s data, starting from w_j                        (one middleware model per client)
    w_j ← α · w_j + (1 − α) · w_{c(j)},   c(j) ≠ j chosen by ``select``:      (all at once, from the trained ones)
          lowest  — the model least similar to w_j,   highest — the most similar one,
          in_order — w_{(j + o) mod K} with the offset o = (t mod (K − 1)) + 1 of round t
    global model (for inference only): w^t = Σ_j (n_{π(j)} / n) · w_j of the round's trained models

Similarity is the sum over layers of the cosine similarity of the layers' parameters (weight and bias together).
During the first ``warmup_rounds`` rounds every middleware model is reset to the global model after aggregation,
which is FedAvg exactly; ``warmup_rounds`` ≥ the run's rounds gives FedAvg throughout. α = 0.99 and the
lowest-similarity choice are PFLlib's defaults (``-ca 0.99``, ``-cmss 1``); the paper studies α and the three
selection strategies (its acceleration variants — propeller models, a dynamic α — are not implemented).

Which middleware model a client receives: the algorithm contract does not tell ``broadcast`` which clients take part
in a round, so the pool holds one middleware model per client slot and round t dispatches slot π_t(i) to client i,
π_t a random permutation of the clients drawn from (seed, t). When every client takes part each round (PFLlib's
``-jr 1``) this is the paper's scheme with K = N models and random dispatch. With partial participation, the n
clients of a round train n distinct slots drawn at random and only those are cross-aggregated; the paper keeps
exactly n models and trains all of them every round. A slot that has never been trained is the current global
model.

Deliberate differences from PFLlib (``servercross.py``): the round variable there is shadowed by the client loop
index, so the warm-up bound and the in-order offset use K − 1 instead of the round (the in-order collaborator is
always j + 1); its similarity pairs consecutive state-dict entries and counts the last pair twice, and its
highest-similarity search can return the model itself; PFLlib's "global" evaluation scores each client's last
locally trained model, here the global model is evaluated. Rounds count from 1 here and from 0 in PFLlib, so the
in-order schedule starts at offset 2 (K > 2), where PFLlib's unshadowed code would start at 1. With PFLlib's
defaults (lowest similarity, no warm-up) one round's client and server steps equal PFLlib's, its double-counted head
changing no collaborator in the test's federation (``tests/reference/test_pfllib_step.py``,
``test_step_equivalence[fedcross]``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.context import derive_seed
from ..core.messages import Message, State, model_entries, under, weighted_average, with_prefix
from ..core.params import HyperParams, hp
from .mechanics import mix_params

MW = "mw"


@dataclass(frozen=True)
class FedCrossParams(HyperParams):
    alpha: float = hp(0.99, "weight α a middleware model keeps of itself when cross-aggregated with its collaborator", ge=0, le=1)
    select: str = hp("lowest", "how the collaborator is chosen: lowest or highest similarity, or in_order",
                     choices=("lowest", "highest", "in_order"))
    warmup_rounds: int = hp(0, "first rounds that aggregate like FedAvg (all middleware models reset to the global model)", ge=0)


def layer_groups(names: list[str]) -> list[list[str]]:
    """Parameter names grouped by the module that owns them (``head.weight`` and ``head.bias`` form one layer)."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.rsplit(".", 1)[0], []).append(n)
    return list(groups.values())


def model_similarity(a: Message, b: Message, groups: list[list[str]]) -> float:
    """Σ over layers of the cosine similarity between the two models' flattened layer parameters."""
    total = 0.0
    for g in groups:
        va = torch.cat([a[n].detach().flatten().double() for n in g])
        vb = torch.cat([b[n].detach().flatten().double() for n in g])
        total += float(F.cosine_similarity(va, vb, dim=0))
    return total


def collaborators(models: list[Message], groups: list[list[str]], select: str, rnd: int) -> list[int]:
    """For each of the K models, the index of the one it is cross-aggregated with (its own index when K = 1)."""
    k = len(models)
    if k < 2:
        return list(range(k))
    if select == "in_order":
        offset = rnd % (k - 1) + 1
        return [(j + offset) % k for j in range(k)]
    sim = [[0.0] * k for _ in range(k)]
    for i in range(k):
        for j in range(i):
            sim[i][j] = sim[j][i] = model_similarity(models[i], models[j], groups)
    out = []
    for j in range(k):
        others = [p for p in range(k) if p != j]
        pick = min if select == "lowest" else max
        out.append(pick(others, key=lambda p: (sim[j][p], p) if select == "lowest" else (sim[j][p], -p)))
    return out


@register_algorithm("fedcross", summary="FedCross (Hu et al., ICDE 2024): middleware models trained by different clients, cross-aggregated in pairs")
class FedCross(Algorithm):
    paper = ("Hu, Zhou, Yue, Ling, Huang, Li, Liu, Lian & Chen, FedCross: Towards Accurate Federated Learning via "
             "Multi-Model Cross-Aggregation, ICDE 2024")
    Params = FedCrossParams

    def __init__(self, hp: FedCrossParams, ctx):
        super().__init__(hp, ctx)
        self.groups = layer_groups([n for n, _ in ctx.build_model().named_parameters()])

    def slot(self, cid: int, rnd: int) -> int:
        """The middleware slot client ``cid`` trains in round ``rnd`` (a random permutation of the clients per round)."""
        perm = torch.randperm(self.ctx.num_clients, generator=torch.Generator().manual_seed(derive_seed(self.ctx.seed, rnd, "fedcross")))
        return int(perm[cid])

    def middleware(self, server: State, j: int) -> Message:
        """Middleware model ``j`` (the global model while that slot has never been trained)."""
        return under(server, f"{MW}/{j}") or model_entries(server)

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        if rnd < 1 or rnd <= self.hp.warmup_rounds:
            return model_entries(server)
        return dict(self.middleware(server, self.slot(cid, rnd)))

    def eval_message(self, server: State, cid: int) -> Message:
        return model_entries(server)

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        if not updates:
            return server
        glob = weighted_average([u.upload for u in updates], [u.weight for u in updates])
        if rnd <= self.hp.warmup_rounds:
            return glob  # every middleware model is the global model again
        slots = [self.slot(u.cid, rnd) for u in updates]
        trained = [model_entries(u.upload) for u in updates]
        pairs = collaborators(trained, self.groups, self.hp.select, rnd)
        a = self.hp.alpha
        out = {k: v for k, v in server.items() if k.startswith(MW + "/")}
        for j, c in enumerate(pairs):
            mixed = trained[j] if c == j else mix_params([trained[j], trained[c]], [a, 1.0 - a])
            out.update(with_prefix(mixed, f"{MW}/{slots[j]}"))
        return {**out, **glob}
