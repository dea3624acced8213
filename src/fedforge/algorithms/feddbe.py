"""FedDBE — Zhang et al., "Eliminating Domain Bias for Federated Learning in Representation Space", NeurIPS 2023
(FedAvg equipped with the Domain Bias Eliminator, DBE).

DBE adds two things to FedAvg on a model φ (features) + h (head):

* Personalized Representation Bias Memory (PRBM): a learnable vector z̄ᵖ_i per client, added to the features before
  the head, ŷ = h(φ(x) + z̄ᵖ_i). It is trained with the model but kept by the client: it is never uploaded.
* Mean Regularisation (MR): the client's running mean of its features, updated per batch with ``momentum`` μ,
      z̄_i ← (1 − μ)·sg(z̄_i) + μ·mean_batch φ(x)                 (sg: stop-gradient; z̄_i starts at 0 each round)
  is pulled towards the global mean z̄ᵍ:
      L = CE(h(φ(x) + z̄ᵖ_i), y) + κ · mean_d ½(z̄_i − z̄ᵍ)²

z̄ᵍ comes from a warm-up: clients train once without DBE (plain cross-entropy) and report their running mean; the
server takes the sample-weighted average and keeps sending it, unchanged, from then on. Model weights are averaged
as in FedAvg (sample-weighted, whole model). A client is judged personally with h(φ(x) + z̄ᵖ_i) on the received
model, and globally with the received model alone.

The warm-up is the first round of the run (the first round that has no z̄ᵍ yet): its clients train without DBE
and upload their running mean with their model, and the server averages both. The authors' code runs the warm-up
in the server's constructor on every client, discards the models it trained, and starts round 1 from the initial
model; here the warm-up round's training counts as an ordinary FedAvg round, and with partial participation z̄ᵍ
averages the means of that round's clients. Defaults κ = 50 and μ = 1 are the values of the authors' run script
(PFLlib's command-line defaults, κ = 0 and μ = 0.1, switch MR off).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, weighted_average
from ..core.params import HyperParams, hp
from ..core.training import EvalCounts
from ..models import FedModel
from ._pfl4_common import require_split

BIAS = "dbe/bias"  # PRBM, client state only
MEAN = "dbe/mean"  # a client's running mean, uploaded in the warm-up round only
GLOBAL_MEAN = "dbe/global_mean"  # z̄ᵍ, server state and broadcast


@dataclass(frozen=True)
class FedDBEParams(HyperParams):
    kappa: float = hp(50.0, "weight of the mean regulariser pulling the running feature mean to the global mean", ge=0)
    momentum: float = hp(1.0, "momentum of the client's running feature mean (1: the current batch's mean)", gt=0, le=1)


def running_mean(previous: torch.Tensor, features: torch.Tensor, momentum: float) -> torch.Tensor:
    """(1 − μ)·sg(previous) + μ·mean of the batch's features (differentiable in ``features``)."""
    return (1.0 - momentum) * previous.detach() + momentum * features.mean(0)


def mean_regulariser(running: torch.Tensor, global_mean: torch.Tensor, kappa: float) -> torch.Tensor:
    """κ · mean_d ½(z̄_i − z̄ᵍ)²."""
    return kappa * (0.5 * (running - global_mean.detach()) ** 2).mean()


@register_algorithm("feddbe", summary="FedDBE (Zhang et al., NeurIPS 2023): FedAvg with a personal feature bias and mean regularisation")
class FedDBE(Algorithm):
    paper = "Zhang et al., Eliminating Domain Bias for Federated Learning in Representation Space, NeurIPS 2023"
    Params = FedDBEParams
    personalized = True
    has_global = True

    def __init__(self, hp: FedDBEParams, ctx):
        super().__init__(hp, ctx)
        self.dim = require_split(ctx, self.name).feature_dim

    # ----------------------------------------------------------------------------------- server side
    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        msg = model_entries(server)
        if GLOBAL_MEAN in server:
            msg[GLOBAL_MEAN] = server[GLOBAL_MEAN]
        return msg

    def eval_message(self, server: State, cid: int) -> Message:
        return model_entries(server)

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        if not updates:
            return server
        weights = [u.weight for u in updates]
        new = {**server, **weighted_average([model_entries(u.upload) for u in updates], weights)}
        if GLOBAL_MEAN not in server:
            means = [(u.upload[MEAN], w) for u, w in zip(updates, weights) if MEAN in u.upload]
            if means:
                new[GLOBAL_MEAN] = weighted_average([{"m": m} for m, _ in means], [w for _, w in means])["m"]
        return new

    # ----------------------------------------------------------------------------------- client side
    def init_client(self, rt) -> State:
        return {BIAS: torch.zeros(self.dim, device=rt.device)}

    def local_update(self, rt, msg: Message, state: State) -> Update:
        h = self.hp
        rt.load(model_entries(msg))
        target = msg[GLOBAL_MEAN].to(rt.device) if GLOBAL_MEAN in msg else None
        bias = state[BIAS].detach().to(rt.device).clone().requires_grad_(True)
        run = {"mean": torch.zeros(self.dim, device=rt.device)}

        def loss_fn(model: FedModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            rep = model.features(x)
            mean = running_mean(run["mean"], rep, h.momentum)
            run["mean"] = mean.detach()
            if target is None:  # warm-up: no DBE
                return F.cross_entropy(model.head(rep), y)
            loss = F.cross_entropy(model.head(rep + bias), y)
            return loss + mean_regulariser(mean, target, h.kappa)

        params = list(rt.model.parameters()) + ([bias] if target is not None else [])
        stats = rt.train(loss_fn=loss_fn, params=params)
        upload = rt.model_state()
        if target is None:
            upload[MEAN] = run["mean"].clone()
        return Update(upload, {BIAS: bias.detach()}, rt.num_train, stats.as_dict())

    def evaluate(self, rt, msg: Message, state: State) -> dict[str, EvalCounts]:
        rt.load(model_entries(msg))
        m = rt.model
        bias = state[BIAS].to(rt.device)
        return {"global": rt.evaluate(),
                "personalized": rt.evaluate(lambda x: m.head(m.features(x) + bias))}
