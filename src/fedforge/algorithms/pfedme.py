"""pFedMe — T. Dinh, Tran & Nguyen, "Personalized Federated Learning with Moreau Envelopes", NeurIPS 2020.

Each client's personal model θ_i is the proximal point of its loss around the local copy w of the global model:
θ_i(w) = argmin_θ f_i(θ) + λ/2 ‖θ − w‖² (the Moreau envelope). Per local batch D:

    θ ← θ − η_p (∇f(θ; D) + λ(θ − w))    repeated K times      (approximate proximal point θ̃, warm-started)
    w ← w − η λ (w − θ̃)                                         (gradient step on the envelope; η = run's lr)
    server: w_global ← (1 − β) · w_global + β · Σ_k (n_k / n) w_k

θ starts each round from the received global model and continues across the batches of the round, as in the
authors' code; the client keeps its last θ̃ as its personal model and is judged with it (``personalized``); the
global model is recorded as ``global``. A round runs ``local_epochs`` passes of batches (the paper counts R local
iterations instead).

Defaults are the authors' CNN setting (their CIFAR-10 command): λ = 15, K = 5, η_p = 0.01, β = 1 (the paper uses
β = 1 and β = 2). Their MNIST MLR/MLP setting η_p = 0.1 makes the 4-layer CNN diverge (NaN loss on ``digits`` in
round 2), so it is not the default. PFLlib ships β = 0, which never moves the global model; β must be > 0 here.
The authors' code (and PFLlib, which copies its optimizer) also adds μ·θ with μ = 0.001 to the inner steps'
gradient, an optimizer default that the paper does not have; ``weight_decay = 0.001`` reproduces it (0 by default).

Reduction (tested): with K = 1, η_p = η and λ = 1/η, the single inner step gives θ̃ = w − η∇f(w; D) and the
envelope step sets w = θ̃, so with β = 1 the global model follows FedAvg exactly (up to rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, weighted_average
from ..core.params import HyperParams, hp
from ..core.training import TrainStats
from .mechanics import proximal_grad_hook


@dataclass(frozen=True)
class PFedMeParams(HyperParams):
    lamda: float = hp(15.0, "λ: strength of the Moreau-envelope term λ/2‖θ − w‖² binding the personal model to w", ge=0)
    K: int = hp(5, "inner steps per batch that approximate the personal model θ", ge=1)
    personal_lr: float = hp(0.01, "step size η_p of the K inner steps on θ", gt=0)
    beta: float = hp(1.0, "server step: global ← (1 − β)·global + β·average (1: plain average; 2: the paper's acceleration)", gt=0)
    weight_decay: float = hp(0.0, "μ of an L2 term μ·θ in the inner steps' gradient (not in the paper; the authors' code "
                                  "and PFLlib use 0.001)", ge=0)


@register_algorithm("pfedme", summary="pFedMe (T. Dinh et al., NeurIPS 2020): Moreau-envelope personal models, K inner steps")
class PFedMe(Algorithm):
    paper = "T. Dinh, Tran & Nguyen, Personalized Federated Learning with Moreau Envelopes, NeurIPS 2020"
    Params = PFedMeParams
    personalized = True
    has_global = True

    def local_update(self, rt, msg: Message, state: State) -> Update:
        hp_ = self.hp
        model = rt.model
        rt.load(model_entries(msg))  # θ starts at the received global model
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        theta = [p for n, p in model.named_parameters() if p.requires_grad]
        w = [p.detach().clone() for p in theta]  # the local copy of the global model
        prox = proximal_grad_hook(w, hp_.lamda)  # reads w, which is updated in place below
        wd = hp_.weight_decay
        hook = prox if wd == 0 else (lambda ps, gs: [g.add(p.detach(), alpha=wd) for p, g in zip(ps, prox(ps, gs))])
        step = rt.lr * hp_.lamda
        total = TrainStats()
        samples = 0
        for x, y in rt.batches():
            st = rt.train(params=theta, batches=[(x, y)] * hp_.K, lr=hp_.personal_lr, grad_hook=hook)
            total = total.merge(st)
            samples += int(y.shape[0])
            with torch.no_grad():
                for wi, ti in zip(w, theta):
                    wi.sub_(wi - ti, alpha=step)  # w ← w − η λ (w − θ̃)
        personal = rt.model_state()
        upload = {**personal, **dict(zip(names, (t.clone() for t in w)))}
        metrics = {"loss": total.loss, "samples": samples, "steps": total.steps}
        return Update(upload, personal, rt.num_train, metrics)

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        if not updates:
            return server
        avg = weighted_average([u.upload for u in updates], [u.weight for u in updates])
        b = self.hp.beta
        out = dict(server)
        for k, v in avg.items():
            prev = server.get(k)
            if prev is not None and v.is_floating_point():
                out[k] = (1.0 - b) * prev + b * v if b != 1.0 else v
            else:
                out[k] = v
        return out
