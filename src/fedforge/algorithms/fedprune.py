"""FedPrune — "FedPrune: Personalized and Communication-Efficient Federated Learning on Non-IID Data", ICONIP 2021
(Neural Information Processing, CCIS vol. 1516, Springer, doi:10.1007/978-3-030-92307-5_50), as FL-IoT implements it
(``clientprune.py``/``serverprune.py``).

Each client first trains a model alone, from the common initial weights w⁰, to find its critical parameters; they
fix its personal sub-network (mask m_k), which then takes part in federated training:

    warm-up:  w_k ← w⁰, W passes of local SGD alone;  g_k = ∇F_k(w_k; ξ_last) (the last warm-up batch's gradient)
              m_k[i] = 1  iff  |g_k[i]| ≥ the k-th largest |g_k| of its tensor,  k = ⌊(1 − r) · size⌋  (r: ``prune_ratio``)
    rounds:   w_k ← m_k ⊙ w,  then SGD with masked gradients (pruned weights stay 0):  w_k ← w_k − η m_k ⊙ ∇F_k(w_k; ξ)
              server, per unit i:  w[i] ← Σ_k n_k m_k[i] w_k[i] / Σ_k n_k m_k[i]   (units no round client keeps: unchanged)
    client k is judged with m_k ⊙ w.

r = 0 keeps every weight and is FedAvg (no warm-up is run and no mask sent). The warm-up draws its batches from its
own stream, so the round's batches are FedAvg's. Buffers (BatchNorm statistics) are not pruned and are averaged as in
FedAvg. Uploads hold the masked weights and the mask (bool); bytes are counted dense (a sparse encoding would send
about (1 − r) of the weights).

FL-IoT differs in three places (``tests/reference/test_fliot_step.py`` shows each): its server divides by the
number of round clients keeping a unit plus 1e-5 and weights by n_k·J/N (J clients, N their samples), which is the
per-unit mean only when clients hold equally many samples (fedforge: the sample-weighted mean over the clients that
keep the unit; units nobody keeps become 0 there); its threshold ``sorted[-int(topk/100·size)]`` keeps a whole tensor
when that count is 0 (``-tk 0``, its default, keeps everything; a 6-entry bias at ``-tk 10``), where fedforge keeps at
least one entry.

Defaults: the paper's values are not given here; FL-IoT's scripts sweep the kept share ``-tk`` from 10 to 90 % and
run ``-gr 20``, i.e. 21 warm-up passes of its 20 local epochs. fedforge: r = 0.5 (the middle of that sweep) and
W = 21 passes of the run's local epochs (``warmup_rounds``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.context import derive_seed
from ..core.messages import Message, State, model_entries, weighted_average
from ..core.params import HyperParams, hp
from ..core.training import train_loop

MASK = "mask/"


@dataclass(frozen=True)
class FedPruneParams(HyperParams):
    prune_ratio: float = hp(0.5, "share of every weight tensor a client prunes, by its warm-up gradient's magnitude "
                                 "(the middle of FL-IoT's -tk sweep; 0 gives FedAvg)", ge=0.0, lt=1.0)
    warmup_rounds: int = hp(21, "passes of local training (each the run's local epochs) a client makes alone before "
                                "taking its mask (FL-IoT: -gr 20, plus one)", ge=1)


def keep_count(size: int, ratio: float) -> int:
    """Entries of a tensor of ``size`` that survive pruning ``ratio`` of it: ⌊(1 − ratio)·size⌋, at least 1."""
    return max(1, min(size, int(math.floor((1.0 - ratio) * size + 1e-9))))


def top_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """True where ``score`` is at least its k-th largest value (k = :func:`keep_count`); ties at the threshold are kept
    (the same on every device, unlike a top-k's choice among equal values)."""
    n = score.numel()
    k = keep_count(n, ratio)
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    threshold = score.flatten().kthvalue(n - k + 1).values
    return score >= threshold


def masks_of(state: State) -> dict[str, torch.Tensor]:
    return {k[len(MASK):]: v for k, v in state.items() if k.startswith(MASK)}


@register_algorithm("fedprune", summary="FedPrune (ICONIP 2021; FL-IoT): personal sub-networks from a local warm-up's "
                                        "gradients, trained masked and averaged unit by unit")
class FedPrune(Algorithm):
    paper = ("FedPrune: Personalized and Communication-Efficient Federated Learning on Non-IID Data, ICONIP 2021 "
             "(CCIS 1516)")
    Params = FedPruneParams
    family = "IoT"
    personalized = True  # each client is judged with its own sub-network m_k ⊙ w
    has_global = False  # the dense global model is no client's model

    # ------------------------------------------------------------------------------------------ client
    def find_mask(self, rt) -> dict[str, torch.Tensor]:
        """The warm-up: local training alone from the initial weights, on batches from its own random stream (so that
        the round's batches stay the task's); the mask from the last batch's gradient."""
        rt.load(rt.initial_params())
        named = [(n, p) for n, p in rt.model.named_parameters() if p.requires_grad]
        last: dict[str, list[torch.Tensor]] = {}

        def keep_last(params, grads):
            last["g"] = [g.detach() for g in grads]
            return grads

        gen = torch.Generator(device=rt.gen.device).manual_seed(derive_seed(rt.seed, "fedprune-warmup"))
        batches = rt.batches(epochs=self.hp.warmup_rounds * rt.local_epochs, generator=gen)
        # the one SGD loop, with an optimiser state of its own that is not kept: the round's rt.train stays call 0
        train_loop(rt.model, batches, rt.lr, params=[p for _, p in named], loss_fn=self.loss, grad_hook=keep_last,
                   autocast=rt.autocast, optimizer=rt.optimizer)
        if "g" not in last:  # a client without a training batch: nothing tells its weights apart
            return {n: torch.ones_like(p, dtype=torch.bool) for n, p in named}
        return {n: top_mask(g.abs(), self.hp.prune_ratio) for (n, _), g in zip(named, last["g"])}

    def local_update(self, rt, msg: Message, state: State) -> Update:
        mask = masks_of(state)
        if self.hp.prune_ratio > 0 and not mask:
            mask = self.find_mask(rt)
        glob = model_entries(msg)
        rt.load({**glob, **{n: glob[n] * m for n, m in mask.items()}})
        named = [(n, p) for n, p in rt.model.named_parameters() if p.requires_grad]
        hook = None
        if mask:
            ms = [mask[n] for n, _ in named]

            def hook(params, grads):
                return [g * m for g, m in zip(grads, ms)]

        stats = rt.train(loss_fn=self.loss, params=[p for _, p in named], grad_hook=hook)
        weights = rt.model_state()
        upload = {**weights, **{n: weights[n] * m for n, m in mask.items()}, **{MASK + n: m for n, m in mask.items()}}
        metrics = stats.as_dict()
        if mask:
            metrics["kept"] = sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
        return Update(upload, {MASK + n: m for n, m in mask.items()}, rt.num_train, metrics)

    def personal_params(self, msg: Message, state: State) -> Message:
        glob = model_entries(msg)
        return {**glob, **{n: glob[n] * m for n, m in masks_of(state).items()}}

    # ------------------------------------------------------------------------------------------ server
    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        """Per unit, the sample-weighted mean over the round's clients that keep it (FedAvg where all keep it)."""
        if not updates:
            return server
        ups = [u.upload for u in updates]
        weights = [u.weight for u in updates]
        masked = [k for k in model_entries(ups[0]) if MASK + k in ups[0]]
        plain = [k for k in model_entries(ups[0]) if k not in masked]
        out = {**server, **weighted_average(ups, weights, keys=plain)}
        for k in masked:
            num = weighted_average(ups, weights, keys=[k])[k]
            cover = weighted_average([{k: u[MASK + k].to(num.dtype)} for u in ups], weights)[k]
            count = sum(u[MASK + k].to(torch.int32) for u in ups)
            mean = torch.where(cover > 0, num / cover.clamp_min(torch.finfo(cover.dtype).tiny), server[k])
            out[k] = torch.where(count == len(ups), num, mean)  # every client keeps it: FedAvg's weights, as they are
        return out
