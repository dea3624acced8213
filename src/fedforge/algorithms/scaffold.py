"""SCAFFOLD — Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML 2020.

The server holds the model x and a control variate c; client i holds its own control variate c_i (0 at first).
In a round each sampled client starts from y = x and takes K local SGD steps with the corrected gradient

    y ← y − η_l · (g_i(y) − c_i + c),

then updates its control variate with the paper's option II, c_i⁺ = c_i − c + (x − y) / (K · η_l), and uploads
Δy = y − x and Δc_i = c_i⁺ − c_i. The server, over the round's clients S (N clients in all), sets

    x ← x + η_g · (1/|S|) Σ_{i∈S} Δy_i,      c ← c + (1/N) Σ_{i∈S} Δc_i.

η_g is the server learning rate (1 in the paper's experiments). The averages are uniform, as in the paper.
Control variates cover the trainable parameters; buffers (e.g. BatchNorm statistics) are averaged like weights.
Each client downloads x and c and uploads y and Δc_i: twice FedAvg's traffic, which the byte counters show.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import model_entries, under, weighted_average, with_prefix
from ..core.objective import MAIN, Objective, Phase, plain_loss
from ..core.params import HyperParams, hp

CONTROL = "control"


@dataclass(frozen=True)
class ScaffoldParams(HyperParams):
    server_lr: float = hp(1.0, "server learning rate eta_g applied to the mean model change", gt=0)


@register_algorithm("scaffold", summary="SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct client drift")
class Scaffold(Algorithm):
    paper = "Karimireddy et al., SCAFFOLD: Stochastic Controlled Averaging for Federated Learning, ICML 2020"
    Params = ScaffoldParams

    def init_server(self):
        model = self.ctx.build_model()
        server = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for n, p in model.named_parameters():
            if p.requires_grad:
                server[f"{CONTROL}/{n}"] = torch.zeros_like(p.detach())
        return server

    def broadcast(self, server, cid, rnd):
        return dict(server)  # x and c

    def eval_message(self, server, cid):
        return model_entries(server)

    vectorizable = True  # the correction is a gradient function of per-client tensors: the vectorized executor batches

    def vector_objective(self, rt, msg, state) -> Objective:
        x = model_entries(msg)
        c = under(msg, CONTROL)
        names = [n for n, p in rt.model.named_parameters() if p.requires_grad]
        c_i = under(state, CONTROL) or {n: torch.zeros_like(c[n]) for n in names}

        def finish(rt, w, stats) -> Update:
            y = w[MAIN]
            k = max(1, stats[0].steps)
            lr = float(rt.lr)
            new_c_i, delta_c = {}, {}
            for n in names:
                new = c_i[n] - c[n] + (x[n] - y[n]) / (k * lr)
                delta_c[n] = new - c_i[n]
                new_c_i[n] = new
            return Update({**y, **with_prefix(delta_c, CONTROL)}, with_prefix(new_c_i, CONTROL), rt.num_train,
                          stats[0].as_dict())

        return Objective(start={MAIN: x}, extras={f"correction/{n}": c[n] - c_i[n] for n in names},
                         phases=(Phase(loss=plain_loss(self.loss), grad=self.correct),), finish=finish)

    @staticmethod
    def correct(params, grads, ex):
        """Each step's gradient corrected by c − c_i."""
        return {n: g + ex[f"correction/{n}"] for n, g in grads.items()}

    def aggregate(self, server, updates, rnd):
        if not updates:
            return server
        ones = [1.0] * len(updates)
        x = model_entries(server)
        mean_y = weighted_average([model_entries(u.upload) for u in updates], ones)
        out = dict(server)
        eta = self.hp.server_lr
        for k, v in mean_y.items():
            if v.is_floating_point():
                out[k] = x[k] + eta * (v - x[k])
            else:
                out[k] = v
        n = self.ctx.num_clients
        deltas = [under(u.upload, CONTROL) for u in updates]
        for k in deltas[0]:
            out[f"{CONTROL}/{k}"] = server[f"{CONTROL}/{k}"] + torch.stack([d[k] for d in deltas]).sum(0) / n
        return out
