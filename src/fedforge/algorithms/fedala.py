"""FedALA — Zhang et al., "FedALA: Adaptive Local Aggregation for Personalized Federated Learning", AAAI 2023.

Before local training, client i does not overwrite its model θ_i with the received global model Θ; it aggregates
the two adaptively (ALA), element by element:

    θ̂_i = θ_i + (Θ − θ_i) ⊙ W_i

The lower layers take Θ (W = 1 there); on the top ``layer_idx`` parameter tensors W_i ∈ [0, 1] is learned on a random
``rand_percent`` % subset D_i^s of the client's training data, with Θ and θ_i fixed:

    W_i ← clip_[0,1]( W_i − η · ∇_θ̂ L(θ̂_i; D_i^s) ⊙ (Θ − θ_i) )

W starts at 1 (so θ̂ = Θ), is trained until its loss converges the first time ALA runs on a client, for one pass in
later rounds, and is kept by the client between rounds. θ̂_i is then trained with SGD (cross-entropy, as FedAvg) and
uploaded; the server takes the sample-weighted average. A client that has never trained has no θ_i yet, so ALA is
skipped then (θ̂ = Θ), as in the authors' code.

Details that the paper leaves open, and what this module does:

* "Until convergence" is made bounded: the authors' code stops when the standard deviation of the last
  ``num_pre_loss`` (10) epoch losses falls below ``threshold`` (0.1); here the loss of an epoch is its mean
  per-sample loss (the authors' code records the last batch's loss), and at most ``max_init_epochs`` (50) epochs
  are spent, so the first ALA always ends.
* D_i^s is a uniformly random subset (the authors' code takes a random contiguous slice); it is cut into
  fixed mini-batches that every W-epoch of one ALA call reuses (as the authors' unshuffled loader does).
* Buffers (e.g. BatchNorm statistics) take the global values; ALA acts on parameter tensors only.
* The W update is plain projected SGD: it runs through the shared SGD loop
  (:func:`fedforge.core.training.train_loop`) with W as the parameters and a gradient hook that returns the
  projected-gradient step (W − clip(W − η·g)) / η. When every adapted tensor belongs to the head, the features of
  D_i^s are computed once per ALA call and only the head is re-run (the lower layers are fixed at Θ).

Evaluation: the personalized accuracy is measured on θ̂_i, the model that ALA initialises the client's *next* round
with (PFLlib evaluates after the next round's ALA, too). The random subset and batches of an ALA call are drawn from a
stream seeded by (seed, client, round it initialises), so the evaluated model is exactly the model the client starts
its next round from when it takes part in that round. The global accuracy is that of the averaged model Θ.
``layer_idx = 0`` (every tensor takes Θ) or ``eta = 0`` (W stays 1) reduce FedALA to FedAvg.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.context import derive_seed
from ..core.messages import Message, State, model_entries, under, with_prefix
from ..core.objective import MAIN, Objective, Phase
from ..core.params import HyperParams, hp
from ..core.training import train_loop
from ..errors import ConfigError

HEAD = "head."


@dataclass(frozen=True)
class FedALAParams(HyperParams):
    eta: float = hp(1.0, "learning rate of the ALA weights W (0: W stays 1, i.e. FedAvg)", ge=0)
    rand_percent: float = hp(80.0, "percentage of local training data the ALA weights are learned on", gt=0, le=100)
    layer_idx: int = hp(2, "number of top parameter tensors aggregated adaptively (lower ones take the global model)", ge=0)
    threshold: float = hp(0.1, "first ALA: stop when the std of the last num_pre_loss epoch losses is below this", gt=0)
    num_pre_loss: int = hp(10, "first ALA: how many recent epoch losses the convergence test looks at", ge=2)
    max_init_epochs: int = hp(50, "first ALA: most epochs spent training W to convergence", ge=1)


def ala_names(model: nn.Module, layer_idx: int) -> list[str]:
    """Names of the top ``layer_idx`` parameter tensors (in ``named_parameters`` order), those ALA adapts."""
    names = [n for n, _ in model.named_parameters()]
    return names[len(names) - layer_idx:] if layer_idx > 0 else []


def ala_combine(local: Mapping[str, torch.Tensor], glob: Mapping[str, torch.Tensor],
                weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ_local + (θ_global − θ_local) ⊙ W for each adapted tensor, computed as θ_global + (θ_local − θ_global) ⊙ (1 − W)
    so that W = 1 gives the global tensor exactly."""
    return {n: glob[n] + (local[n] - glob[n]) * (1.0 - w) for n, w in weights.items()}


def projected_step_hook(eta: float):
    """Gradient hook for SGD on W ∈ [0, 1]: returns (W − clip(W − η·g, 0, 1)) / η, so that the loop's step
    W ← W − η·(that) lands on the projected point (projected gradient descent)."""

    def hook(params: Sequence[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for w, g in zip(params, grads):
            target = (w.detach() - eta * g).clamp_(0.0, 1.0)
            out.append((w.detach() - target) / eta)
        return out

    return hook


def learn_ala_weights(module: nn.Module, local: Mapping[str, torch.Tensor], glob: Mapping[str, torch.Tensor],
                      weights: Mapping[str, torch.Tensor], batches: list[tuple[torch.Tensor, torch.Tensor]], eta: float,
                      *, until_converged: bool, threshold: float = 0.1, num_pre_loss: int = 10,
                      max_epochs: int = 50) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Learn the ALA weights W on ``batches`` with ``module``'s other tensors fixed.

    ``local``/``glob``/``weights`` map names of ``module``'s parameters to tensors. One pass over the batches, or,
    with ``until_converged``, passes until the std of the last ``num_pre_loss`` epoch losses is below ``threshold``
    (at most ``max_epochs``). Returns the new weights (in [0, 1]) and the epoch losses.
    """
    names = list(weights)
    w = {n: weights[n].detach().clone().requires_grad_(True) for n in names}
    if eta == 0 or not names or not batches:
        return {n: t.detach() for n, t in w.items()}, []
    local_d = {n: local[n].detach() for n in names}
    glob_d = {n: glob[n].detach() for n in names}

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        params = ala_combine(local_d, glob_d, w)
        return F.cross_entropy(functional_call(m, params, (x,)), y)

    hook = projected_step_hook(eta)
    losses: list[float] = []
    for _ in range(max_epochs if until_converged else 1):
        stats = train_loop(module, batches, eta, params=[w[n] for n in names], loss_fn=loss_fn, grad_hook=hook)
        losses.append(stats.loss)
        if until_converged and len(losses) > num_pre_loss and float(np.std(losses[-num_pre_loss:])) < threshold:
            break
    with torch.no_grad():
        for t in w.values():
            t.clamp_(0.0, 1.0)
    return {n: t.detach() for n, t in w.items()}, losses


@register_algorithm("fedala", summary="FedALA (Zhang et al., AAAI 2023): adaptive local aggregation of the global model before local training")
class FedALA(Algorithm):
    paper = "Zhang et al., FedALA: Adaptive Local Aggregation for Personalized Federated Learning, AAAI 2023"
    Params = FedALAParams
    personalized = True
    has_global = True

    def __init__(self, hp: FedALAParams, ctx):
        super().__init__(hp, ctx)
        model = ctx.build_model()
        n = sum(1 for _ in model.parameters())
        if hp.layer_idx > n:
            raise ConfigError(f"fedala: layer_idx is {hp.layer_idx}, but model '{ctx.archs[0]}' has only {n} parameter "
                              f"tensors; use a layer_idx between 0 and {n} (the paper uses 2).")
        self.names = ala_names(model, hp.layer_idx)
        self.head_only = bool(self.names) and all(n.startswith(HEAD) for n in self.names)

    # ------------------------------------------------------------------------------------------ ALA
    def initialise(self, rt, msg: Message, state: State, init_round: int) -> tuple[Message, dict[str, torch.Tensor], int]:
        """ALA: the model client ``rt.cid`` starts round ``init_round`` from, its new W and the W-epochs spent."""
        glob = {k: v.to(rt.device) for k, v in model_entries(msg).items()}
        local = model_entries(state)
        if not local or not self.names:
            return glob, {}, 0
        old_w = under(state, "ala")
        first = not old_w
        weights = {n: old_w[n] if n in old_w else torch.ones_like(glob[n]) for n in self.names}
        h = self.hp
        # the batch order is drawn where the task's own batch orders are (rt.gen's device)
        gen = torch.Generator(device=rt.gen.device).manual_seed(derive_seed(self.ctx.seed, "ala", rt.cid, init_round))
        batches = list(rt.fed.train_batches(rt.cid, rt.batch_size, gen, epochs=1, fraction=h.rand_percent / 100.0))
        model = rt.aux_model("fedala/ala")
        rt.load(glob, model)
        model.train()
        if self.head_only:
            with torch.no_grad():
                batches = [(model.features(x), y) for x, y in batches]
            module: nn.Module = model.head
            key = lambda n: n[len(HEAD):]  # noqa: E731
        else:
            module = model
            key = lambda n: n  # noqa: E731
        new_w, losses = learn_ala_weights(
            module, {key(n): local[n] for n in self.names}, {key(n): glob[n] for n in self.names},
            {key(n): weights[n] for n in self.names}, batches, h.eta, until_converged=first,
            threshold=h.threshold, num_pre_loss=h.num_pre_loss, max_epochs=h.max_init_epochs)
        new_w = {n: new_w[key(n)] for n in self.names}
        return {**glob, **ala_combine(local, glob, new_w)}, new_w, len(losses)

    # ----------------------------------------------------------------------------------- client side
    vectorizable = True  # ALA per client, then FedAvg's SGD from θ̂: the vectorized executor batches the SGD

    def vector_objective(self, rt, msg: Message, state: State) -> Objective:
        params, weights, epochs = self.initialise(rt, msg, state, rt.round)  # ALA: per client, while building
        ala = with_prefix(weights or under(state, "ala"), "ala")

        def finish(rt, w, stats) -> Update:
            model = w[MAIN]
            return Update(model, {**model, **ala}, rt.num_train, {**stats[0].as_dict(), "ala_epochs": epochs})

        return Objective(start={MAIN: params}, phases=(Phase(),), finish=finish)

    def evaluate(self, rt, msg: Message, state: State):
        rt.load(model_entries(msg))
        out = {"global": rt.evaluate()}
        params, _, _ = self.initialise(rt, msg, state, rt.round + 1)
        rt.load(params)
        out["personalized"] = rt.evaluate()
        return out
