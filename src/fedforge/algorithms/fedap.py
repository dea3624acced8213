"""FedAP — Lu, Wang, Chen, Qin, Xu, Dimitriadis & Qin, "Personalized Federated Learning with Adaptive Batchnorm for
Healthcare", IEEE Transactions on Big Data, 2022.

Normalisation layers stay on their clients throughout (as FedBN). After a warm-up that trains one model for everyone,
each client i measures the statistics its data induces inside that model — per channel, the mean μ_i^l and variance
σ_i^{2,l} of the input of every BatchNorm layer l (of every convolution's output when the model has no BatchNorm,
of every linear layer's when it has no convolution either) —
and the server turns their distances into personalised aggregation weights:

    d_ij = Σ_l ( ‖μ_i^l − μ_j^l‖² + ‖σ_i^l − σ_j^l‖² )^{1/2}                  (Wasserstein distance of Gaussians)
    w_ij = (1 − m) · (1/d_ij) / Σ_{k≠i} (1/d_ik)   (j ≠ i),      w_ii = m      (m: ``model_momentum``)
    client i starts each round from Σ_j w_ij θ_j (the non-normalisation weights; θ_j: client j's latest model)

then trains locally. A client is judged with its own θ_i and normalisation layers (``personalized``).

Protocol. The paper's FedAP pre-trains by passing one model through the clients in turn; the federated variant
f-FedAP, which FL-bench also provides, pre-trains with FedAvg, and that is what fits a round of parallel clients: here
the first ``warm_up`` share of the rounds is FedBN. A client computes its statistics (eval mode, on its training data)
on the warm-up model the first time it takes part afterwards, and sends them once; until then it trains its own model
only, and others give it no weight. ``last_layer_only`` uses only the last statistic point (d-FedAP). With
``warm_up = 1`` FedAP is FedBN (FedAvg for a model without normalisation layers; tested).

Defaults are FL-bench's (m = 0.5, warm-up half the rounds).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, under, weighted_average, with_prefix
from ..core.params import HyperParams, hp
from ._partial import norm_entries
from .mechanics import mix_params, warmup_length


@dataclass(frozen=True)
class FedAPParams(HyperParams):
    warm_up: float = hp(0.5, "share of the rounds that pre-train one model (FedBN) before personalised aggregation (1: FedBN)", ge=0, le=1)
    model_momentum: float = hp(0.5, "m: the weight of a client's own model in its aggregation (1: no aggregation)", ge=0, le=1)
    last_layer_only: bool = hp(False, "use only the last statistic point's statistics (d-FedAP)")


def statistic_points(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """(module, use its input) for every BatchNorm layer of the body; without any, (module, use its output) for every
    convolution, and without those for every linear layer."""
    body = list(model.features.modules())
    bns = [m for m in body if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        return [(m, True) for m in bns]
    convs = [m for m in body if isinstance(m, nn.Conv2d)]
    return [(m, False) for m in (convs or [m for m in body if isinstance(m, nn.Linear)])]


def point_size(m: nn.Module) -> int:
    """Channels of a statistic point."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.num_features
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


@torch.no_grad()
def channel_statistics(rt, model: nn.Module, last_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance (concatenated over the statistic points) of the client's training data."""
    points = statistic_points(model)
    if last_only:
        points = points[-1:]
    sums: list = [None] * len(points)
    sqs: list = [None] * len(points)
    counts = [0] * len(points)

    def hook(i: int, use_input: bool):
        def fn(mod, inp, out):
            t = (inp[0] if use_input else out).double()
            t = t.transpose(0, 1).reshape(t.shape[1], -1)  # channels × (samples · positions)
            sums[i] = t.sum(1) if sums[i] is None else sums[i] + t.sum(1)
            sqs[i] = (t * t).sum(1) if sqs[i] is None else sqs[i] + (t * t).sum(1)
            counts[i] += t.shape[1]
        return fn

    handles = [m.register_forward_hook(hook(i, use_in)) for i, (m, use_in) in enumerate(points)]
    was = model.training
    model.eval()
    try:
        for x, _ in rt.fed.test_batches(rt.cid, rt.ctx.eval_batch_size, part="train"):
            model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    if not points or counts[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=rt.device), torch.zeros(0, dtype=torch.float64, device=rt.device)
    means = [s / n for s, n in zip(sums, counts)]
    vars_ = [(q / n - m * m).clamp_min(0) for q, n, m in zip(sqs, counts, means)]
    return torch.cat(means), torch.cat(vars_)


def aggregation_weights(means: dict[int, torch.Tensor], vars_: dict[int, torch.Tensor], sizes: list[int],
                        num_clients: int, momentum: float) -> torch.Tensor:
    """FedAP's weight matrix over the clients that have sent statistics (the others keep only their own model)."""
    W = torch.eye(num_clients, dtype=torch.float64, device=next(iter(means.values())).device if means else None)
    have = sorted(means)
    if len(have) < 2:
        return W
    for i in have:
        inv = {}
        for j in have:
            if j == i:
                continue
            d, start = 0.0, 0
            for size in sizes:
                dm = means[i][start:start + size] - means[j][start:start + size]
                ds = vars_[i][start:start + size].sqrt() - vars_[j][start:start + size].sqrt()
                d += float((dm.pow(2).sum() + ds.pow(2).sum()).sqrt())
                start += size
            inv[j] = 1e14 if d == 0 else 1.0 / d
        total = sum(inv.values())
        W[i] = 0.0
        for j, v in inv.items():
            W[i, j] = (1.0 - momentum) * v / total
        W[i, i] = momentum
    return W


@register_algorithm("fedap", summary="FedAP (Lu et al., IEEE TBD 2022): local BatchNorm; models aggregated by the similarity of clients' feature statistics")
class FedAP(Algorithm):
    paper = "Lu, Wang, Chen, Qin, Xu, Dimitriadis & Qin, Personalized Federated Learning with Adaptive Batchnorm for Healthcare, IEEE Transactions on Big Data 2022"
    Params = FedAPParams
    personalized = True
    has_global = False

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        model = ctx.build_model()
        self.local = norm_entries(model)
        self.shared = [k for k in model.state_dict() if k not in self.local]
        points = statistic_points(model)
        if hp.last_layer_only:
            points = points[-1:]
        self.sizes = [point_size(m) for m, _ in points]
        self.warm = warmup_length(hp.warm_up, ctx.rounds)

    # ----------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        init = super().init_server()
        state = {k: init[k] for k in self.shared}
        state["fedap/personal"] = torch.tensor(False, device=self.ctx.device)
        return state | (self.start_personal(state) if self.warm == 0 else {})

    def start_personal(self, state: State) -> State:
        glob = {k: state[k] for k in self.shared}
        out: State = {"fedap/personal": torch.tensor(True, device=self.ctx.device)}
        for j in range(self.ctx.num_clients):
            out |= with_prefix(glob, f"client/{j}")
        return out

    def statistics(self, server: State) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        n = self.ctx.num_clients
        means = {j: server[f"fedap/mean/{j}"] for j in range(n) if f"fedap/mean/{j}" in server}
        return means, {j: server[f"fedap/var/{j}"] for j in means}

    def weights(self, server: State) -> torch.Tensor:
        means, vars_ = self.statistics(server)
        return aggregation_weights(means, vars_, self.sizes, self.ctx.num_clients, self.hp.model_momentum)

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        if not bool(server["fedap/personal"]):
            return {k: server[k] for k in self.shared}
        own = under(server, f"client/{cid}")
        if f"fedap/mean/{cid}" not in server:  # statistics first: of the warm-up model, which its own still is
            return {**own, "fedap/collect": torch.tensor(True, device=self.ctx.device)}
        row = self.weights(server)[cid].tolist()  # host weights: one read, not one per client
        models = [under(server, f"client/{j}") for j in range(self.ctx.num_clients)]
        keys = [k for k in self.shared if own[k].is_floating_point()]
        return {**own, **mix_params(models, row, keys=keys)}

    def eval_message(self, server: State, cid: int) -> Message:
        if not bool(server["fedap/personal"]):
            return {k: server[k] for k in self.shared}
        return under(server, f"client/{cid}")

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        if not updates:
            return server
        out = dict(server)
        if not bool(server["fedap/personal"]):  # warm-up: FedBN
            out |= weighted_average([model_entries(u.upload) for u in updates], [u.weight for u in updates])
            return out | (self.start_personal(out) if rnd >= self.warm else {})
        for u in updates:
            out |= with_prefix(model_entries(u.upload), f"client/{u.cid}")
            if "fedap/mean" in u.upload:
                out[f"fedap/mean/{u.cid}"] = u.upload["fedap/mean"]
                out[f"fedap/var/{u.cid}"] = u.upload["fedap/var"]
        return out

    # ----------------------------------------------------------------------------------------- client
    def init_client(self, rt) -> State:
        init = rt.initial_params()
        return {k: v for k, v in init.items() if k in self.local}

    def local_update(self, rt, msg: Message, state: State) -> Update:
        rt.load({**model_entries(msg), **model_entries(state)})
        stats: Message = {}
        if "fedap/collect" in msg:
            mean, var = channel_statistics(rt, rt.model, self.hp.last_layer_only)
            stats = {"fedap/mean": mean, "fedap/var": var}
        result = rt.train()
        trained = rt.model_state()
        upload = {k: trained[k] for k in self.shared}
        return Update({**upload, **stats}, {k: trained[k] for k in self.local}, rt.num_train, result.as_dict())
