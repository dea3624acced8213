"""FedHome — Wu, Chen, Zhou & Zhang, "FedHome: Cloud-Edge based Personalized Federated Learning for In-Home Health
Monitoring", IEEE Transactions on Mobile Computing, 2020 (vol. 21, no. 8, 2022).

The cloud learns one model with FedAvg; then every home personalises it on a class-balanced set generated from its
own data: the shared encoder φ maps the client's training samples to representations, SMOTE oversamples every
minority class up to the majority class's count in that space, and the classifier g (the fully connected layers on
top of φ) is refined on the balanced set, φ frozen:

    rounds:     w_k ← w − η Σ ∇F_k(w_k; ξ),   w ← Σ_k (n_k / n) · w_k          (FedAvg; w = (φ, g))
    after them: Z_k = {(φ(x), y)},  Z̃_k = Z_k ∪ SMOTE(Z_k):  z̃ = z_i + u · (z_j − z_i),  u ~ U[0, 1),
                z_j one of the K nearest same-class neighbours of z_i, until every class has max_c n_c samples
                g_k ← g − η Σ ∇ CE(g(z̃), y)  for τ epochs over Z̃_k  (``personal_epochs``);  client k is judged with (φ, g_k)

The paper's generative convolutional autoencoder also has a decoder trained to reconstruct the input; like FL-IoT
(``clienthome.py``), fedforge keeps its encoder–classifier path and the personalisation step and leaves the decoder
out. ``personal_epochs = 0`` is FedAvg. ``classifier`` chooses g: ``mlp`` (default) is every fully connected layer at
the end of the model (the trailing Linear/activation/Dropout/Flatten layers of ``features`` and the head: for
``harcnn`` the fc 1024 · fc 512 · head block, FL-IoT's ``predictor``, with φ the convolutions), ``head`` the last
layer alone on the 512-d features. The representations are computed once, in evaluation mode, from every training
sample (FL-IoT computes them from its drop_last training batches in training mode, which on HAR-CNN only drops the
last partial batch). A class with fewer than K + 1 samples uses all its other samples as neighbours, a class of one
sample is copied (imbalanced-learn's SMOTE, which FL-IoT calls, stops with an error there).

Defaults: K = 5 (imbalanced-learn's default, which FL-IoT uses). τ: FL-IoT trains g one epoch per evaluation until
50 evaluations on the test split bring no gain and reports the best; fedforge runs τ = 50 epochs (that patience) and
selects nothing on the test split. FL-IoT's batches over Z̃ are unshuffled; fedforge's are shuffled as every local
pass (``tests/reference/test_fliot_step.py`` feeds both the same batches).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.algorithm import register_algorithm
from ..core.messages import model_entries
from ..core.params import HyperParams, hp
from .fedavg import FedAvg

# layers a trailing classifier block may hold (shape-free on (N, D) inputs)
_FC_LAYERS = (nn.Linear, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Flatten,
              nn.Identity)


@dataclass(frozen=True)
class FedHomeParams(HyperParams):
    personal_epochs: int = hp(50, "epochs each client refines its classifier on the SMOTE-balanced representations "
                                  "after the last round (FL-IoT's patience, 50; 0 gives FedAvg)", ge=0)
    k_neighbors: int = hp(5, "SMOTE's K: same-class nearest neighbours a synthetic sample interpolates toward "
                             "(imbalanced-learn's default, used by FL-IoT)", ge=1)
    classifier: str = hp("mlp", "the personalised layers: mlp (the fully connected block at the end of the model, "
                                "FL-IoT's predictor) or head (the last layer alone)", choices=("mlp", "head"))


def classifier_start(model: nn.Module, classifier: str = "mlp") -> int:
    """Where the classifier g begins inside ``model.features``: the index of the first layer of its trailing fully
    connected block (``len(features)`` when g is the head alone, or when ``features`` is not an ``nn.Sequential`` or
    ends in no Linear layer)."""
    feats = model.features
    if classifier == "head" or not isinstance(feats, nn.Sequential):
        return len(feats) if isinstance(feats, nn.Sequential) else -1
    i = len(feats)
    while i > 0 and isinstance(feats[i - 1], _FC_LAYERS):
        i -= 1
    return i if any(isinstance(m, nn.Linear) for m in feats[i:]) else len(feats)


def split_model(model: nn.Module, classifier: str = "mlp"):
    """(encode, classify, classifier parameters): φ and g of ``model`` as functions, g's parameters to train."""
    i = classifier_start(model, classifier)
    if i < 0:  # a body that is not a Sequential: φ is the body, g the head
        return model.features, model.head, list(model.head.parameters())
    feats = model.features
    tail = list(feats[i:])

    def encode(x: torch.Tensor) -> torch.Tensor:
        for m in feats[:i]:
            x = m(x)
        return x

    def classify(z: torch.Tensor) -> torch.Tensor:
        for m in tail:
            z = m(z)
        return model.head(z)

    params = [p for m in tail for p in m.parameters()] + list(model.head.parameters())
    return encode, classify, params


def smote(z: torch.Tensor, y: torch.Tensor, k: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SMOTE (Chawla et al., 2002) on rows ``z`` (N, D) with labels ``y``: every class but the first largest one gets
    max_c n_c − n_c synthetic rows z_i + u·(z_j − z_i), z_j one of z_i's ``k`` nearest same-class rows (Euclidean),
    drawn as imbalanced-learn does: one integer in [0, n_c·k) per row (row i = draw // k, neighbour draw % k), then
    one u ~ U[0, 1) per row. Returns the rows in order followed by the synthetic rows, class by class."""
    classes, counts = torch.unique(y, return_counts=True)
    if classes.numel() < 2:
        return z, y
    top = int(counts.max())
    majority = int(classes[int(torch.argmax(counts))])
    out_z, out_y = [z], [y]
    for c, n_c in zip(classes.tolist(), counts.tolist()):
        need = top - n_c
        if c == majority or need == 0:
            continue
        zc = z[y == c]
        kk = min(k, n_c - 1)
        if kk == 0:  # one sample: nothing to interpolate toward
            new = zc.expand(need, -1).clone()
        else:
            d = torch.cdist(zc.double(), zc.double())
            d.fill_diagonal_(float("inf"))
            nn_idx = d.topk(kk, dim=1, largest=False).indices  # nearest first
            draw = torch.as_tensor(rng.integers(0, n_c * kk, size=need), device=z.device)
            u = torch.as_tensor(rng.random(need), dtype=torch.float64, device=z.device).unsqueeze(1)
            rows, cols = draw // kk, draw % kk
            base = zc[rows]
            new = (base.double() + u * (zc[nn_idx[rows, cols]] - base).double()).to(z.dtype)
        out_z.append(new)
        out_y.append(torch.full((need,), c, dtype=y.dtype, device=y.device))
    return torch.cat(out_z), torch.cat(out_y)


@register_algorithm("fedhome", summary="FedHome (Wu et al., IEEE TMC 2020): FedAvg, then each client refines its "
                                       "classifier on SMOTE-balanced representations")
class FedHome(FedAvg):
    paper = ("Wu, Chen, Zhou & Zhang, FedHome: Cloud-Edge based Personalized Federated Learning for In-Home Health "
             "Monitoring, IEEE TMC 2020")
    Params = FedHomeParams
    family = "IoT"
    personalized = True  # judged with (φ, g_k) after personalisation (the global model until then)
    has_global = True
    has_finetune = True

    def finetune(self, rt, msg, state):
        rt.load(model_entries(msg))
        if self.hp.personal_epochs == 0 or rt.num_train == 0:
            return rt.model_state()
        model = rt.model
        encode, classify, params = split_model(model, self.hp.classifier)
        z, y = self.representations(rt, encode)
        zb, yb = smote(z.flatten(1), y, self.hp.k_neighbors, rt.rng)
        zb = zb.view(-1, *z.shape[1:])
        batches = [(zb[pos], yb[pos]) for pos in rt.fed.train_positions(yb.numel(), rt.batch_size, rt.gen,
                                                                        self.hp.personal_epochs)]
        rt.train(loss_fn=lambda m, zz, yy: F.cross_entropy(classify(zz), yy), params=params, batches=batches)
        return rt.model_state()

    @staticmethod
    def representations(rt, encode) -> tuple[torch.Tensor, torch.Tensor]:
        """φ(x) of every training sample of the client, in stored order, in evaluation mode."""
        rt.model.eval()
        zs, ys = [], []
        with torch.no_grad(), rt.autocast():
            for x, y in rt.eval_batches(part="train"):
                zs.append(encode(x).float())
                ys.append(y)
        return torch.cat(zs), torch.cat(ys)
