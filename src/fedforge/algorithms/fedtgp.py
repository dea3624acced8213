"""FedTGP — Zhang et al., "FedTGP: Trainable Global Prototypes with Adaptive-Margin-Enhanced Contrastive Learning
for Data and Model Heterogeneity in Federated Learning", AAAI 2024.

Clients upload class prototypes as in FedProto; the server replaces their average by **trainable global
prototypes** (TGP) P̂_c = W₂·ReLU(W₁·e_c + b₁) + b₂ (e_c: a learned class embedding) trained on the uploaded
prototypes with adaptive-margin-enhanced contrastive learning (ACL):

    cluster centres      P̄_c   = mean_k P_k^c                                     (this round's uploads)
    adaptive margin      δ(t)  = min( max_c min_{c'≠c} ‖P̄_c − P̄_{c'}‖₂ , τ )
    server loss          L_ACL = mean_{(P_k^c, c)} −log softmax_j( −(‖P_k^c − P̂_j‖₂ + δ(t)·[j = c]) )_c
    client objective     L_k   = CE(h_k(f_k(x)), y) + λ · ‖f_k(x) − P̂_y‖₂          (batch mean)
    inference            ŷ     = argmin_j ‖f_k(x) − P̂_j‖₂

The server runs ``server_epochs`` epochs of plain SGD over the (prototype, class) pairs each round (mini-batches of
the clients' batch size, the clients' learning rate, as the paper). Its mean ACL loss over the last epoch and δ(t)
are recorded with every evaluation as ``server_loss`` and ``margin``. Downloads are P̂_c for every class.
The head's accuracy is reported as ``head_acc`` beside the nearest-prototype ``personalized_acc``.

Departures from prior code: HtFLlib's FedTGP client (and the standalone repo) computes the uploaded prototypes
before saving the trained model, so they come from the start-of-round model; here they come from the trained
model, as the paper describes. The client regulariser is the paper's Euclidean distance with λ = 0.1; HtFLlib
uses the mean squared error with λ = 10 (its benchmark script). With one class uploaded, the margin is 0 here and τ
in HtFLlib (its sentinel distance survives). The server step equals HtFLlib's
(``tests/reference/test_htfllib_equivalence.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.algorithm import Update, register_algorithm
from ..core.context import derive_seed
from ..core.messages import State, under
from ..core.params import hp
from ..core.training import train_loop
from .fedproto import FedProto, FedProtoParams
from .mechanics import message_to_prototypes


@dataclass(frozen=True)
class FedTGPParams(FedProtoParams):
    lam: float = hp(0.1, "weight λ of the client regulariser λ·‖f(x) − P̂_y‖₂ (0: local training only)", ge=0)
    margin_threshold: float = hp(100.0, "τ, the upper bound of the adaptive margin δ(t)", ge=0)
    server_epochs: int = hp(100, "server epochs of ACL training of the global prototypes per round", ge=0)
    server_lr: float = hp(0.0, "server SGD learning rate (0: the clients' learning rate, as in the paper)", ge=0)
    server_batch: int = hp(0, "server mini-batch of prototypes (0: the clients' batch size, as in the paper)", ge=0)
    hidden_dim: int = hp(0, "hidden width of the prototype generator (0: the feature dimension, as in the paper)", ge=0)


class TrainablePrototypes(nn.Module):
    """P̂_c = fc(ReLU(mid(embedding(c)))): a class embedding followed by a two-layer perceptron."""

    def __init__(self, num_classes: int, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, feature_dim)
        self.mid = nn.Linear(feature_dim, hidden_dim)
        self.fc = nn.Linear(hidden_dim, feature_dim)
        self.num_classes = num_classes

    def forward(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        if classes is None:
            classes = torch.arange(self.num_classes, device=self.embedding.weight.device)
        return self.fc(F.relu(self.mid(self.embedding(classes))))


def adaptive_margin(protos: torch.Tensor, labels: torch.Tensor, threshold: float) -> float:
    """δ = min(max_c min_{c'≠c} ‖P̄_c − P̄_{c'}‖₂, τ), with P̄_c the mean of the uploaded prototypes of class c."""
    classes = torch.unique(labels)
    if len(classes) < 2:
        return 0.0
    centres = torch.stack([protos[labels == c].mean(0) for c in classes])
    d = torch.cdist(centres.double(), centres.double())
    d.fill_diagonal_(float("inf"))
    return float(min(d.min(1).values.max().item(), threshold))


def acl_loss(tgp: nn.Module, protos: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Adaptive-margin-enhanced contrastive loss of client prototypes against all trainable global prototypes."""
    gen = tgp()
    dist = torch.cdist(protos, gen)
    dist = dist + margin * F.one_hot(labels, gen.shape[0]).to(dist.dtype)
    return F.cross_entropy(-dist, labels)


@register_algorithm("fedtgp", summary="FedTGP (Zhang et al., AAAI 2024): server-trained global prototypes with adaptive-margin contrastive learning")
class FedTGP(FedProto):
    paper = ("Zhang et al., FedTGP: Trainable Global Prototypes with Adaptive-Margin-Enhanced Contrastive Learning "
             "for Data and Model Heterogeneity in Federated Learning, AAAI 2024")
    Params = FedTGPParams

    def _tgp(self) -> TrainablePrototypes:
        hidden = self.hp.hidden_dim or self.feature_dim
        return TrainablePrototypes(self.ctx.num_classes, self.feature_dim, hidden)

    def init_server(self) -> State:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.ctx.seed, "tgp-init"))
            tgp = self._tgp()
        state = {f"tgp/{k}": v.detach().clone() for k, v in tgp.state_dict().items()}
        state["stat/server_loss"] = torch.tensor(float("nan"), dtype=torch.float64, device=self.ctx.device)
        state["stat/margin"] = torch.tensor(float("nan"), dtype=torch.float64, device=self.ctx.device)
        return state

    def distance_term(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(((z - target) ** 2).sum(1) + 1e-12)

    def regulariser(self, z: torch.Tensor, target: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        return (self.distance_term(z, target) * has).sum() / z.shape[0]

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        pairs = [(v, c) for u in updates for c, v in message_to_prototypes(u.upload, -1, self.PREFIX).items()]
        if not pairs:
            return server
        protos = torch.stack([v.float() for v, _ in pairs])
        dev = protos.device  # the server's device: the prototype generator trains there
        labels = torch.tensor([c for _, c in pairs], dtype=torch.long, device=dev)
        margin = adaptive_margin(protos, labels, self.hp.margin_threshold)
        tgp = self._tgp().to(dev)
        tgp.load_state_dict(under(server, "tgp"))
        lr = self.hp.server_lr or self.ctx.lr
        bs = self.hp.server_batch or self.ctx.batch_size
        gen = torch.Generator(device=dev).manual_seed(derive_seed(self.ctx.seed, rnd, "tgp"))
        last = float("nan")
        for _ in range(self.hp.server_epochs):
            order = torch.randperm(len(labels), generator=gen, device=dev)
            batches = [(protos[order[i:i + bs]], labels[order[i:i + bs]]) for i in range(0, len(labels), bs)]
            stats = train_loop(tgp, batches, lr, loss_fn=lambda m, x, y: acl_loss(m, x, y, margin))
            last = stats.loss
        tgp.eval()
        with torch.no_grad():
            gen_protos = tgp()
        out: State = {f"tgp/{k}": v.detach().clone() for k, v in tgp.state_dict().items()}
        out |= {f"{self.PREFIX}/{c}": gen_protos[c].clone() for c in range(self.ctx.num_classes)}
        out["stat/server_loss"] = torch.tensor(last, dtype=torch.float64, device=dev)
        out["stat/margin"] = torch.tensor(margin, dtype=torch.float64, device=dev)
        return out

    def server_metrics(self, server: State) -> dict[str, float]:
        loss, margin = float(server["stat/server_loss"]), float(server["stat/margin"])
        return {"server_loss": None if loss != loss else loss, "margin": None if margin != margin else margin}
