"""GPFL — Zhang et al., "GPFL: Simultaneously Learning Global and Personalized Feature Information for Personalized
Federated Learning", ICCV 2023.

A shared feature extractor φ, a Global Category Embedding layer (GCE: one embedding g_c per class) and a Conditional
Valve (CoV: FiLM layers conditioned on a vector) turn one feature vector f = φ(x) into a generic and a personalized one:

    CoV(f, c) = ReLU( f ⊙ (1 + γ(c)) + β(c) ),   γ(c) = LN(ReLU(A_γ c + b_γ)),  β(c) = LN(ReLU(A_β c + b_β))
    generic conditional input       ḡ   = (1/C) Σ_c g_c
    personalized conditional input  p_i = Σ_c (n_{i,c} / n_i) g_c          (client i's label distribution)
    f_G = CoV(f, ḡ),   f_P = CoV(f, p_i)

    L = CE(h_i(f_P), y)                                  personalized head h_i (kept by the client)
      + CE(cos(f_G, g_·), y)                            angle-level guidance: softmax over cosines to every g_c
      + λ · ‖f_G − g⁰_y‖₂                               magnitude-level guidance, g⁰: the received GCE, frozen
      + (μ/2)(‖GCE‖² + ‖CoV‖²)                          weight decay μ on GCE and CoV only

φ, h_i, GCE and CoV are trained with SGD; φ, GCE and CoV are uploaded and averaged (sample-weighted); h_i stays on the
client. A client is evaluated with h_i(CoV(φ(x), p_i)) on the received φ, GCE and CoV.

Differences from the authors' code (which PFLlib copies):

* ḡ and p_i are computed from the GCE the client receives this round; the authors' code computes them from the
  client's own GCE as it was after its last local training, and before a client's first aggregation they are zero
  vectors (no conditioning at all in the first round).
* The magnitude term is the mean over the batch of each sample's L2 distance; the authors' code takes one L2 norm
  over the whole (batch × d) difference, which is larger by about √batch_size.
* GCE and CoV start from weights drawn from the run's seed (GCE: N(0, 1) embeddings; CoV: PyTorch's Linear
  initialisation, LayerNorm at identity), the same for every client.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, with_prefix
from ..core.params import HyperParams, hp
from ..core.training import EvalCounts
from ..models import FedModel
from . import mechanics
from ._pfl4_common import module_seed, params_for, require_split, seeded


@dataclass(frozen=True)
class GPFLParams(HyperParams):
    lam: float = hp(0.01, "weight of the magnitude-level guidance ‖f_G − g_y‖₂ towards the class embedding", ge=0)
    mu: float = hp(0.1, "weight decay of the GCE and CoV parameters", ge=0)


def init_gce(num_classes: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    with seeded(seed):
        emb = nn.Embedding(num_classes, dim)
    return {"embedding": emb.weight.detach()}


def init_cov(dim: int, seed: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    with seeded(seed):
        for branch in ("gamma", "beta"):
            fc, ln = nn.Linear(dim, dim), nn.LayerNorm(dim)
            out |= {f"{branch}.fc.weight": fc.weight.detach(), f"{branch}.fc.bias": fc.bias.detach(),
                    f"{branch}.ln.weight": ln.weight.detach(), f"{branch}.ln.bias": ln.bias.detach()}
    return out


def cov(p: Mapping[str, torch.Tensor], f: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Conditional Valve: ReLU(f ⊙ (1 + γ(context)) + β(context)) with γ, β = LN(ReLU(Linear(context)))."""
    d = f.shape[-1]

    def branch(name: str) -> torch.Tensor:
        h = F.relu(F.linear(context, p[f"{name}.fc.weight"], p[f"{name}.fc.bias"]))
        return F.layer_norm(h, (d,), p[f"{name}.ln.weight"], p[f"{name}.ln.bias"])

    return F.relu(f * (branch("gamma") + 1.0) + branch("beta"))


def conditional_inputs(embedding: torch.Tensor, class_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ḡ, p_i): the mean of the class embeddings and their mix by the client's label distribution."""
    e = embedding.detach()
    share = class_counts.to(e.dtype).to(e.device)
    share = share / share.sum().clamp(min=1)
    return e.mean(0), share @ e


def gce_loss(embedding: torch.Tensor, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Angle-level guidance: cross-entropy of the cosine similarities between f and every class embedding."""
    return F.cross_entropy(F.normalize(f, dim=1) @ F.normalize(embedding, dim=1).t(), y)


def weight_decay_hook(first: int, mu: float):
    """Gradient hook adding μ·w to the gradients of the parameters from index ``first`` on."""

    def hook(params: Sequence[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if mu == 0:
            return grads
        return grads[:first] + [g.add(p.detach(), alpha=mu) for p, g in zip(params[first:], grads[first:])]

    return hook


@register_algorithm("gpfl", summary="GPFL (Zhang et al., ICCV 2023): global category embeddings and a conditional valve split generic and personalized features")
class GPFL(Algorithm):
    paper = ("Zhang et al., GPFL: Simultaneously Learning Global and Personalized Feature Information for Personalized "
             "Federated Learning, ICCV 2023")
    Params = GPFLParams
    personalized = True
    has_global = False

    def __init__(self, hp: GPFLParams, ctx):
        super().__init__(hp, ctx)
        self.dim = require_split(ctx, self.name).feature_dim

    # ----------------------------------------------------------------------------------- server side
    def init_server(self) -> State:
        body = {k: v for k, v in super().init_server().items() if mechanics.is_body(k)}
        gce = init_gce(self.ctx.num_classes, self.dim, module_seed(self.ctx, self.name, "gce"))
        cv = init_cov(self.dim, module_seed(self.ctx, self.name, "cov"))
        return {**body, **with_prefix(gce, "gce"), **with_prefix(cv, "cov")}

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return dict(server)

    # ----------------------------------------------------------------------------------- client side
    def init_client(self, rt) -> State:
        return {k: v for k, v in rt.initial_params().items() if k.startswith(mechanics.HEAD)}

    def local_update(self, rt, msg: Message, state: State) -> Update:
        h = self.hp
        rt.load(model_entries(msg))
        rt.load(model_entries(state))
        gce = params_for(msg, "gce", rt.device)
        cv = params_for(msg, "cov", rt.device)
        frozen = msg["gce/embedding"].detach().to(rt.device)
        generic, personal = conditional_inputs(frozen, rt.class_counts())

        def loss_fn(model: FedModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            f = model.features(x)
            loss = F.cross_entropy(model.head(cov(cv, f, personal)), y)
            f_g = cov(cv, f, generic)
            loss = loss + gce_loss(gce["embedding"], f_g, y)
            if h.lam:
                loss = loss + h.lam * (f_g - frozen[y]).norm(dim=1).mean()
            return loss

        own = list(rt.model.parameters())
        stats = rt.train(loss_fn=loss_fn, params=own + list(gce.values()) + list(cv.values()),
                         grad_hook=weight_decay_hook(len(own), h.mu))
        upload = {**rt.model_state(prefixes=[mechanics.BODY]),
                  **with_prefix({k: v.detach() for k, v in gce.items()}, "gce"),
                  **with_prefix({k: v.detach() for k, v in cv.items()}, "cov")}
        return Update(upload, rt.model_state(prefixes=[mechanics.HEAD]), rt.num_train, stats.as_dict())

    def evaluate(self, rt, msg: Message, state: State) -> dict[str, EvalCounts]:
        rt.load(model_entries(msg))
        rt.load(model_entries(state))
        cv = params_for(msg, "cov", rt.device, trainable=False)
        _, personal = conditional_inputs(msg["gce/embedding"].to(rt.device), rt.class_counts())
        m = rt.model
        return {"personalized": rt.evaluate(lambda x: m.head(cov(cv, m.features(x), personal)))}
