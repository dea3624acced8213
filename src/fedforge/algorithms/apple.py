"""APPLE — Luo & Wu, "Adapt to Adaptation: Learning Personalization for Cross-Silo Federated Learning", IJCAI 2022.

Every client i owns a core model θ_i (shared) and a directed relationship vector p_i ∈ R^N (kept local). Its
personalized model is the p_i-weighted combination of all core models,

    w_i = Σ_j p_ij θ_j        (θ_j for j ≠ i: the downloaded cores, frozen during the round)

trained on the local loss plus a prior that keeps p_i near p_0 (data-size shares n_j / n) early in training:

    L_i = f_i(Σ_j p_ij θ_j) + μ·λ(r)·‖p_i − p_0‖²,   λ(r) = (1 + cos(π r / (L·R))) / 2 for r < L·R, else 0
    θ_i ← θ_i − η ∇_{θ_i} L_i  (= η p_ii ∇f_i),   p_i ← p_i − η_p ∇_{p_i} L_i   (∂L/∂p_ij = ⟨θ_j, ∇f_i(w_i)⟩)

Each round a client downloads the N − 1 other core models (``bytes_down`` counts them all) and uploads its own core;
p_i and the personalized model w_i stay on the client, which is judged with w_i (``personalized``). p_i starts at
p_0, as in the authors' code. For convolutions and linear layers a weighted sum of weights equals the authors'
weighted sum of layer outputs, so mixing weights is the same model.

Defaults follow the authors' code: μ = 0.1, L = 0.1 (the prior fades out over the first 10 % of the rounds, with
the cosine schedule), η_p = 0.001; θ uses the run's learning rate with plain SGD (the authors use momentum 0.9).
PFLlib's default ``dr_learning_rate`` = 0 never updates p; here η_p > 0 by default. Not implemented: the paper's
limited-bandwidth mode that downloads only some cores per round.

Departures from PFLlib (``clientapple.py``): PFLlib steps the core with its learning rate × N (it multiplies
``-lr`` by the number of clients; fedforge's lr = N × PFLlib's gives the same step), and shares each client's last
mixture w_i (the personalized model of its last batch) instead of its core θ_i as the next round's core. Its clients
also train one after the other on shared core objects, so a later client mixes cores already updated this round
(here every client mixes the cores of the round's start, as in the paper), and it starts p at 1/N (here p_0). The
first client's core update is the same computation (``tests/reference/test_pfllib_step.py``,
``test_step_equivalence[apple]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, under, with_prefix
from ..core.params import HyperParams, hp
from .mechanics import forward_with, mix_params


@dataclass(frozen=True)
class APPLEParams(HyperParams):
    mu: float = hp(0.1, "μ: weight of the prior ‖p_i − p_0‖² on the directed relationship vector", ge=0.0)
    L: float = hp(0.1, "share of the rounds over which the prior's weight λ(r) is cosine-annealed from 1 to 0", ge=0.0, le=1.0)
    dr_lr: float = hp(0.001, "learning rate η_p of the directed relationship vector p_i (0: p stays at p_0)", ge=0.0)


@register_algorithm("apple", summary="APPLE (Luo & Wu, IJCAI 2022): personalized mixtures of all clients' core models, learned per client")
class APPLE(Algorithm):
    paper = "Luo & Wu, Adapt to Adaptation: Learning Personalization for Cross-Silo Federated Learning, IJCAI 2022"
    Params = APPLEParams
    personalized = True
    has_global = False

    @property
    def prior(self) -> torch.Tensor:
        """p_0: each client's share of the federation's training samples (on the run's device)."""
        return self.prior_on(self.ctx.device)

    def prior_on(self, device: torch.device | str) -> torch.Tensor:
        """p_0 on ``device``."""
        n = torch.tensor(self.ctx.train_sizes, dtype=torch.float32, device=device)
        return n / n.sum()

    def prior_weight(self, rnd: int) -> float:
        """μ·λ(r) for 1-based round ``rnd`` (r = rnd − 1), cosine-annealed to 0 over L·R rounds."""
        span = int(self.hp.L * self.ctx.rounds)
        r = rnd - 1
        if self.hp.mu == 0 or span <= 0 or r >= span:
            return 0.0
        return self.hp.mu * (math.cos(math.pi * r / span) + 1.0) / 2.0

    # ------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        init = super().init_server()
        return {f"core/{j}/{k}": v for j in range(self.ctx.num_clients) for k, v in init.items()}

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return {k: v for k, v in server.items() if k.startswith("core/") and not k.startswith(f"core/{cid}/")}

    def eval_message(self, server: State, cid: int) -> Message:
        return {}  # a client is judged with the personalized model it keeps

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        out = dict(server)
        for u in updates:
            out.update({f"core/{u.cid}/{k}": v for k, v in model_entries(u.upload).items()})
        return out

    # ------------------------------------------------------------------------------------- client
    def init_client(self, rt) -> State:
        init = rt.initial_params()
        return {**with_prefix(init, "own"), "apple/p": self.prior_on(rt.device), **init}

    def local_update(self, rt, msg: Message, state: State) -> Update:
        n, cid = self.ctx.num_clients, rt.cid
        own = under(state, "own")
        rt.load(own)
        model = rt.model
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        others = [j for j in range(n) if j != cid]
        cores = {j: under(msg, f"core/{j}") for j in others}
        # the frozen cores, stacked per parameter: (N − 1, *shape)
        stacks = {k: torch.stack([cores[j][k] for j in others]) for k, _ in named}
        p = state["apple/p"].detach().clone().float()
        learn_p = self.hp.dr_lr > 0
        if learn_p:
            p.requires_grad_(True)
        p0 = self.prior_on(p.device)
        coef = self.prior_weight(rt.round)
        other_idx = torch.tensor(others, dtype=torch.long, device=p.device)

        def loss(m, x, y):
            po = p[other_idx]
            mixed = {k: p[cid] * w + torch.tensordot(po, stacks[k], dims=1) for k, w in named}
            out = F.cross_entropy(forward_with(m, mixed, x), y)
            if coef > 0 and learn_p:
                out = out + coef * (p - p0).pow(2).sum()
            return out

        params = [w for _, w in named] + ([p] if learn_p else [])
        lrs = [rt.lr] * len(named) + ([self.hp.dr_lr] if learn_p else [])
        stats = rt.train(loss_fn=loss, params=params, lr=lrs)
        core = rt.model_state()
        p_final = p.detach().clone()
        sets = [core if j == cid else {**core, **cores[j]} for j in range(n)]
        personal = mix_params(sets, [float(c) for c in p_final], keys=list(core))
        new_state = {**with_prefix(core, "own"), "apple/p": p_final, **personal}
        metrics = {**stats.as_dict(), "p_self": float(p_final[cid])}
        return Update(core, new_state, rt.num_train, metrics)
