"""FedL2G — Zhang, Liu, Hua, Cao & Yang, "FedL2G: Learning to Guide Local Training in Heterogeneous Federated Learning",
arXiv:2410.06490, 2024 (code in HtFLlib as FedL2G-feat / FedL2G-logit).

Clients own different architectures and share only **guiding vectors** G ∈ R^{C×d}, one per class, kept and learned
by the server (d: the common feature dimension for the feature variant, C for the logit variant). With
u_k(x) = f_k(x) (features) or g_k(x) = h_k(f_k(x)) (logits), client k trains on

    L_k(θ; G) = CE(g_k(x), y) + MSE(u_k(x), G_y)                                  (local epochs, grad norm ≤ 100)

and then *learns how the guide should change*: a virtual SGD step on S study batches, then the plain CE on Q
held-out quiz batches, differentiated with respect to G through the virtual step (only the mixed derivative
∂²L/∂θ∂G enters, no Hessian in θ, as the paper states):

    θ'_k = θ_k − η ∇_θ (1/S) Σ_study L_k(θ_k; G)
    ∇_G^k = ∇_G (1/Q) Σ_quiz CE(g_k(x; θ'_k), y)                                 (uploaded per class: grad/<c>)

The server averages each class's gradient over the clients that sent one (zero for classes nobody sent), clips
the (C × d) gradient to a norm of 100 and takes an SGD step G ← G − η_s ∇_G. For the first ``warm_up_rounds``
rounds clients only run the meta step (no local training), as HtFLlib does. G starts from N(0, 1) (nn.Embedding's
initialisation). The quiz set is a fixed random ``quiz_batches × batch_size`` samples of the client's training data
(HtFLlib takes the first samples); local training uses the rest. A client is judged with its own model.

Defaults are HtFLlib's (S = Q = 1, 50 warm-up rounds) and the FedL2G repository's ``run_me.sh`` server learning
rate (100 for features, 0.1 for logits). Deliberate differences from HtFLlib: the local training batches are
shuffled (HtFLlib's loader is not); ``warm_up_rounds`` count towards ``rounds`` (HtFLlib runs them before its
global rounds). The per-step arithmetic is tested against HtFLlib's own client and server code.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.context import derive_seed
from ..core.messages import Message, State, model_entries
from ..core.params import HyperParams, hp
from .mechanics import features_and_logits, holdout_positions, message_to_prototypes, require_common_feature_dim

log = logging.getLogger("fedforge")

PAPER_SERVER_LR = {"feat": 100.0, "logit": 0.1}


@dataclass(frozen=True)
class FedL2GParams(HyperParams):
    target: str = hp("feat", "what the guiding vectors guide: the features (FedL2G-feat) or the logits (FedL2G-logit)",
                     choices=("feat", "logit"))
    server_lr: float = hp(0.0, "server SGD rate of the guiding vectors (0: the paper's, 100 for feat and 0.1 for logit)", ge=0)
    study_batches: int = hp(1, "batches of the virtual (study) step of the meta update", ge=1)
    quiz_batches: int = hp(1, "held-out quiz batches the meta loss is measured on", ge=1)
    warm_up_rounds: int = hp(50, "first rounds in which clients only run the meta step (no local training)", ge=0)
    max_grad_norm: float = hp(100.0, "clip norm of the client's gradients and of the server's guide gradient", gt=0)


def guided_loss(output: torch.Tensor, guided: torch.Tensor, y: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """CE(output, y) + MSE(guided, G_y): the client objective (``guided`` is the features or the logits)."""
    return F.cross_entropy(output, y) + F.mse_loss(guided, guide[y])


def client_loss(target: str, guide: torch.Tensor):
    """The local training loss_fn for ``rt.train`` with the guide fixed."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = model.features(x)
        out = model.head(z)
        return guided_loss(out, z if target == "feat" else out, y, guide)

    return loss_fn


def meta_gradient(model: nn.Module, guide: torch.Tensor, study: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  quiz: Sequence[tuple[torch.Tensor, torch.Tensor]], lr: float, target: str) -> torch.Tensor:
    """∇_G of the quiz cross-entropy after one virtual SGD step (rate ``lr``) on the study batches' guided loss.

    The model's own parameters are not changed (the step is taken on copies, through ``functional_call``)."""
    g = guide.detach().clone().requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    theta = [params[n] for n in names]
    pseudo = 0.0
    for x, y in study:
        z, out = features_and_logits(model, params, x)
        pseudo = pseudo + guided_loss(out, z if target == "feat" else out, y, g)
    grads = torch.autograd.grad(pseudo / len(study), theta, create_graph=True, allow_unused=True)
    virtual = {n: p if gr is None else p - lr * gr for n, p, gr in zip(names, theta, grads)}
    meta = 0.0
    for x, y in quiz:
        meta = meta + F.cross_entropy(features_and_logits(model, virtual, x)[1], y)
    (gg,) = torch.autograd.grad(meta / len(quiz), [g])
    return gg


def guide_step(guide: torch.Tensor, grads: dict[int, torch.Tensor], lr: float, max_norm: float) -> torch.Tensor:
    """The server's update: per-class mean gradients (zero rows for classes nobody sent), clipped to ``max_norm``
    as one tensor, then G − lr·∇."""
    total = torch.zeros_like(guide)
    for c, gs in grads.items():
        total[c] = torch.stack(gs).mean(0)
    norm = torch.linalg.vector_norm(total)
    total = total * torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return guide - lr * total


@register_algorithm("fedl2g", summary="FedL2G (Zhang et al., 2024): server-learned guiding vectors per class, trained by clients' meta gradients")
class FedL2G(Algorithm):
    paper = "Zhang, Liu, Hua, Cao & Yang, FedL2G: Learning to Guide Local Training in Heterogeneous Federated Learning, arXiv:2410.06490, 2024"
    Params = FedL2GParams
    personalized = True
    has_global = False
    heterogeneous = True

    GUIDE = "guide/vectors"

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self.dim = require_common_feature_dim(ctx, self.name) if hp.target == "feat" else ctx.num_classes
        if hp.warm_up_rounds >= ctx.rounds:
            log.warning("fedl2g: warm_up_rounds=%d >= rounds=%d, so clients never train locally (only meta steps); "
                        "lower warm_up_rounds (the paper's default is 50).", hp.warm_up_rounds, ctx.rounds)

    @property
    def server_lr(self) -> float:
        return self.hp.server_lr or PAPER_SERVER_LR[self.hp.target]

    # ----------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        gen = torch.Generator().manual_seed(derive_seed(self.ctx.seed, "l2g-guide"))  # the same G on every device
        return {self.GUIDE: torch.randn(self.ctx.num_classes, self.dim, generator=gen).to(self.ctx.device)}

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return {self.GUIDE: server[self.GUIDE]}

    def eval_message(self, server: State, cid: int) -> Message:
        return {}  # a client is judged with the model it keeps

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        grads: dict[int, list[torch.Tensor]] = {}
        for u in updates:
            for c, g in message_to_prototypes(u.upload, -1, "grad").items():
                grads.setdefault(c, []).append(g.float())
        if not updates:
            return server
        return {**server, self.GUIDE: guide_step(server[self.GUIDE], grads, self.server_lr, self.hp.max_grad_norm)}

    # ----------------------------------------------------------------------------------------- client
    def init_client(self, rt) -> State:
        return rt.initial_params()

    def split(self, rt) -> tuple[torch.Tensor, torch.Tensor]:
        """(quiz, study) positions within the client's training data (fixed for the run)."""
        return holdout_positions(rt.num_train, self.hp.quiz_batches * rt.batch_size,
                                 derive_seed(self.ctx.seed, rt.cid, "l2g-quiz"))

    def local_update(self, rt, msg: Message, state: State) -> Update:
        rt.load(model_entries(state))
        guide = msg[self.GUIDE].to(rt.device)
        quiz_pos, study_pos = self.split(rt)
        metrics: dict[str, float] = {}
        if rt.round > self.hp.warm_up_rounds:
            batches = rt.fed.train_batches(rt.cid, rt.batch_size, rt.gen, epochs=rt.local_epochs, subset=study_pos)
            stats = rt.train(loss_fn=client_loss(self.hp.target, guide), batches=batches,
                             max_grad_norm=self.hp.max_grad_norm)
            metrics = stats.as_dict()
        study = list(rt.fed.train_batches(rt.cid, rt.batch_size, rt.gen, subset=study_pos))[: self.hp.study_batches]
        quiz = list(rt.fed.train_batches(rt.cid, rt.batch_size, rt.gen, subset=quiz_pos))[: self.hp.quiz_batches]
        rt.model.train()
        grad = meta_gradient(rt.model, guide, study, quiz, rt.lr, self.hp.target) if study and quiz else torch.zeros_like(guide)
        upload = {f"grad/{c}": grad[c].detach().cpu().clone() for c in range(grad.shape[0]) if bool(grad[c].abs().sum() > 0)}
        return Update(upload, rt.model_state(), rt.num_train, metrics)

    def personal_params(self, msg: Message, state: State) -> Message:
        return model_entries(state)
