"""FedDyn — Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021.

Client k keeps ∇_k, the gradient of its loss at its last local model (0 at first), and in round t minimises

    L_k(θ) − ⟨∇_k, θ⟩ + (α/2) · ||θ − θ^{t−1}||²      (SGD steps: g + α(θ − θ^{t−1}) − ∇_k),

then sets ∇_k ← ∇_k − α (θ_k^t − θ^{t−1}) and uploads θ_k^t. The server keeps h (0 at first) and, with P_t the
round's clients and m the number of clients,

    h ← h − α · (1/m) Σ_{k∈P_t} (θ_k^t − θ^{t−1}),      θ^t = (1/|P_t|) Σ_{k∈P_t} θ_k^t − h/α,

and sends θ^t (the "cloud" model) next round. As in the authors' code, the model that is evaluated is the plain
mean of the round's client models (the first term). α = 0.01 is the authors' value (their example script);
PFLlib uses α = 1 and a non-squared ||θ − θ^{t−1}||, which departs from the paper. The regulariser acts on the
trainable parameters; buffers (BatchNorm statistics) are averaged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import model_entries, under, weighted_average, with_prefix
from ..core.params import HyperParams, hp

GRAD = "grad"  # client state: ∇_k
H = "h"  # server state: h
AVG = "avg"  # server state: mean of the round's client models (evaluated)


@dataclass(frozen=True)
class FedDynParams(HyperParams):
    alpha: float = hp(0.01, "weight of the dynamic regulariser (alpha/2·||θ − θ_server||² and the linear term)", gt=0)


@register_algorithm("feddyn", summary="FedDyn (Acar et al., ICLR 2021): dynamic regulariser with server state h")
class FedDyn(Algorithm):
    paper = "Acar et al., Federated Learning Based on Dynamic Regularization, ICLR 2021"
    Params = FedDynParams

    def init_server(self):
        model = self.ctx.build_model()
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        h = {n: torch.zeros_like(p.detach()) for n, p in model.named_parameters() if p.requires_grad}
        return {**sd, **with_prefix(h, H), **with_prefix({k: v.clone() for k, v in sd.items()}, AVG)}

    def broadcast(self, server, cid, rnd):
        return model_entries(server)

    def eval_message(self, server, cid):
        return under(server, AVG)

    def local_update(self, rt, msg, state) -> Update:
        rt.load(model_entries(msg))
        named = [(n, p) for n, p in rt.model.named_parameters() if p.requires_grad]
        names, params = [n for n, _ in named], [p for _, p in named]
        anchors = [p.detach().clone() for p in params]
        prev_grad = under(state, GRAD)
        lin = [prev_grad[n] if n in prev_grad else torch.zeros_like(a) for n, a in zip(names, anchors)]
        alpha = self.hp.alpha

        def hook(ps, grads):
            return [g.add(p.detach() - a, alpha=alpha).sub_(l) for p, g, a, l in zip(ps, grads, anchors, lin)]

        stats = rt.train(loss_fn=self.loss, params=params, grad_hook=hook)
        new_grad = {n: l - alpha * (p.detach() - a) for n, p, a, l in zip(names, params, anchors, lin)}
        return Update(rt.model_state(), with_prefix(new_grad, GRAD), rt.num_train, stats.as_dict())

    def aggregate(self, server, updates, rnd):
        if not updates:
            return server
        theta = model_entries(server)
        mean = weighted_average([model_entries(u.upload) for u in updates], [1.0] * len(updates))
        h = under(server, H)
        alpha, share = self.hp.alpha, len(updates) / self.ctx.num_clients
        new_h = {n: h[n] - alpha * share * (mean[n] - theta[n]) for n in h}
        cloud = {k: (mean[k] - new_h[k] / alpha) if k in new_h else mean[k] for k in mean}
        return {**cloud, **with_prefix(new_h, H), **with_prefix(mean, AVG)}
