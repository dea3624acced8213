"""FedCAC — Wu, Liu, Niu, Zhu & Tang, "Bold but Cautious: Unlocking the Potential of Personalized Federated
Learning through Cautiously Aggressive Collaboration", ICCV 2023.

After local training each client marks its *critical* parameters: in every parameter tensor, the share τ with the
largest sensitivity |Δw ⊙ w| (Δw: the change over the local update). Critical parameters collaborate only with
clients whose critical positions overlap enough; the others are averaged over everyone:

    m_k = [ |Δw_k ⊙ w_k| ≥ its ⌊τ·size⌋-th largest value ]            (per tensor; the client's critical mask)
    o_ij = 1 − ‖m_i − m_j‖₁ / (2 ‖m_i‖₁)                              (overlap of the round's clients i ≠ j)
    θ_t = ō + (t / β) · (o_max − ō)                                   (collaboration threshold, rising with round t)
    w̃_i = mean{ w_j : j = i or o_ij ≥ θ_t }                           (customized global model of client i)
    w^{t+1} = Σ_k (n_k / n) · w_k                                      (global model, FedAvg)
    client i's model:  w_i ← m_i ⊙ w̃_i + (1 − m_i) ⊙ w^{t+1}

A client is judged with that model (personalized) and the global model. τ = 0 marks nothing critical and gives
FedAvg exactly. Defaults: τ = 0.5 and β = 100, the authors' CIFAR-10 configuration (Fling's
``cifar10_fedcac_resnet_config.py``; CIFAR-100 uses τ = 0.4, β = 170). PFLlib's ``-bt 0`` default fails its own
``beta >= 1`` assertion in the first round.

The server keeps each client's latest customized model (``cust/<cid>/...``), so its state grows with the number of
clients that have trained; a client's state is its critical mask. Clients that did not take part combine their
last customized model with the new global model, as in PFLlib.

Deliberate differences from PFLlib (``servercac.py``): PFLlib skips the customization after the first round, so
the critical parameters of round-1 clients are then taken from their *initial* weights; here every round,
including the first, customizes with θ_t = ō + (t/β)(o_max − ō) (as the authors' Fling code does). Buffers (e.g.
BatchNorm statistics) come from the global model. A round with one client customizes nothing (PFLlib: NaN threshold).
With PFLlib's server customizing after its first round too, two rounds equal PFLlib's (``tests/reference/test_pfllib_step.py``,
``test_step_equivalence[fedcac]``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, under, weighted_average, with_prefix
from ..core.params import HyperParams, hp

CUST = "cust"
MASK = "mask"


@dataclass(frozen=True)
class FedCACParams(HyperParams):
    tau: float = hp(0.5, "share τ of each parameter tensor marked critical by |Δw·w| (0: nothing critical, i.e. FedAvg)", ge=0, le=1)
    beta: int = hp(100, "rounds β over which the collaboration threshold rises from the mean to the highest overlap", ge=1)


@torch.no_grad()
def critical_mask(before: torch.Tensor, after: torch.Tensor, tau: float) -> torch.Tensor:
    """Boolean mask of the critical entries of one parameter tensor: |(after − before) · after| at least its
    ⌊τ·size⌋-th largest value (the smallest non-zero value instead when that threshold is 0)."""
    c = ((after - before) * after).abs()
    metric = c.flatten()
    k = int(tau * metric.numel())
    if k == 0:
        return torch.zeros_like(c, dtype=torch.bool)
    thresh = torch.topk(metric, k).values[-1]
    if thresh <= 1e-10:
        nonzero = metric[metric > 1e-20]
        if nonzero.numel():
            thresh = nonzero.min()
    return c >= thresh


def overlap_matrix(masks: list[torch.Tensor]) -> torch.Tensor:
    """o_ij = 1 − ‖m_i − m_j‖₁ / (2‖m_i‖₁) for flattened masks (float64, zero where ‖m_i‖₁ = 0; diagonal unused)."""
    m = torch.stack(masks)
    gram = torch.zeros(len(masks), len(masks), dtype=torch.float64, device=m.device)
    for s in range(0, m.shape[1], 1 << 20):  # exact integer counts, without a float64 copy of every mask at once
        part = m[:, s:s + (1 << 20)].double()
        gram += part @ part.T
    size = gram.diagonal().unsqueeze(1)
    dist = size + size.T - 2.0 * gram  # ‖m_i − m_j‖₁ of binary masks
    return torch.where(size > 0, 1.0 - dist / (2.0 * size.clamp(min=1.0)), torch.zeros_like(dist))


def collaboration(overlap: torch.Tensor, rnd: int, beta: int) -> list[list[int]]:
    """For each client i of the round, the clients whose models form its customized model (i first)."""
    n = overlap.shape[0]
    if n < 2:
        return [[i] for i in range(n)]
    off = ~torch.eye(n, dtype=torch.bool, device=overlap.device)
    vals = overlap[off]
    avg, top = vals.mean(), vals.max()
    threshold = avg + (rnd / beta) * (top - avg)
    return [[i] + [j for j in range(n) if j != i and bool(overlap[i, j] >= threshold)] for i in range(n)]


@register_algorithm("fedcac", summary="FedCAC (Wu et al., ICCV 2023): critical parameters averaged only with clients of overlapping critical sets")
class FedCAC(Algorithm):
    paper = ("Wu, Liu, Niu, Zhu & Tang, Bold but Cautious: Unlocking the Potential of Personalized Federated Learning "
             "through Cautiously Aggressive Collaboration, ICCV 2023")
    Params = FedCACParams
    personalized = True
    has_global = True

    def __init__(self, hp: FedCACParams, ctx):
        super().__init__(hp, ctx)
        self.param_names = [n for n, _ in ctx.build_model().named_parameters()]

    # ----------------------------------------------------------------------------------- server side
    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return {**model_entries(server), **with_prefix(under(server, f"{CUST}/{cid}"), CUST)}

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        if not updates:
            return server
        models = [model_entries(u.upload) for u in updates]
        glob = weighted_average(models, [u.weight for u in updates])
        out = {**{k: v for k, v in server.items() if k.startswith(CUST + "/")}, **glob}
        masks = [torch.cat([u.upload[f"{MASK}/{n}"].flatten() for n in self.param_names]) for u in updates]
        if not any(bool(m.any()) for m in masks):
            return out  # nothing critical anywhere: no customized models are needed
        groups = collaboration(overlap_matrix(masks), rnd, self.hp.beta)
        for u, group in zip(updates, groups):
            cust = {k: v for k, v in weighted_average([models[j] for j in group], [1.0] * len(group)).items()
                    if v.is_floating_point()}
            out.update(with_prefix(cust, f"{CUST}/{u.cid}"))
        return out

    # ----------------------------------------------------------------------------------- client side
    def start_model(self, msg: Message, state: State) -> Message:
        """w_i = m_i ⊙ w̃_i + (1 − m_i) ⊙ w_global (the global model until the client has a mask and a customized model)."""
        glob = model_entries(msg)
        cust, mask = under(msg, CUST), under(state, MASK)
        if not cust or not mask:
            return glob
        return {**glob, **{n: torch.where(mask[n], cust[n], glob[n]) for n in mask}}

    def local_update(self, rt, msg: Message, state: State) -> Update:
        start = self.start_model(msg, state)
        rt.load(start)
        stats = rt.train()
        trained = rt.model_state()
        masks = {n: critical_mask(start[n], trained[n], self.hp.tau) for n in self.param_names}
        share = sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))
        return Update({**trained, **with_prefix(masks, MASK)}, with_prefix(masks, MASK), rt.num_train,
                      {**stats.as_dict(), "critical_share": share})

    def personal_params(self, msg: Message, state: State) -> Message:
        return self.start_model(msg, state)
