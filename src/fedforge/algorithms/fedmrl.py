"""FedMRL — Yi et al., "Federated Model Heterogeneous Matryoshka Representation Learning", NeurIPS 2024.

Each client has its own heterogeneous model (extractor F_k, head h_k, features of dimension d) and a copy of a
small homogeneous global model (extractor G with features of dimension d₁ < d, head g). A local projector P_k
fuses the two representations, and the fused vector feeds both heads in a nested (Matryoshka) way:

    fusion        R = P_k([G(x) ; F_k(x)])                       P_k: Linear(d₁ + d → d), kept locally
    loss          CE(h_k(R), y) + CE(g(R[:d₁]), y)               (coarse d₁-dim prefix → global head)
    server        (G, g) ← Σ_k (n_k / n) · (G, g)_k
    inference     ŷ = h_k(P_k([G(x) ; F_k(x)]))

Uploads and downloads are the small model's weights (``small/*``); F_k, h_k and P_k never leave the client.
The small model is ``small_model`` built with feature dimension ``small_dim`` (default: the group's first
architecture with 128-d features, as HtFLlib's ``-sfd 128`` on ``models[0]``).

Departure from prior code: HtFLlib's client never saves the projector after training, so it stays at its
initial random weights; here P_k is trained and kept, as the paper describes. The global model is averaged
with sample weights (the paper's FedAvg step) rather than HtFLlib's unweighted mean, and whole: HtFLlib averages only
its parameters, so the server's BatchNorm statistics stay the initial ones, and every client downloads those.
With the 4-layer CNN first in a group (``htfe-img-2``, ``-4``, ``-8``), HtFLlib's small model is FedAvgCNN whose
512-wide fc output is average-pooled to 128, here the CNN with a 128-wide fc layer (ht_* models are pooled as in
HtFLlib). One round equals HtFLlib's otherwise (``tests/reference/test_htfllib_equivalence.py``, ResNet-4 first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.context import derive_seed
from ..core.messages import Message, State, model_entries, under, with_prefix
from ..core.params import HyperParams, hp
from ..errors import ConfigError
from ..models import MODELS, FedModel, create_model
from .mechanics import require_common_feature_dim

if TYPE_CHECKING:
    from ..core.runtime import ClientRuntime


@dataclass(frozen=True)
class FedMRLParams(HyperParams):
    small_dim: int = hp(128, "d₁: feature dimension of the small global model (the coarse Matryoshka prefix)", ge=1)
    small_model: str = hp("", "registry name of the small global model (empty: the group's first architecture)")


_SMALL: dict[tuple, FedModel] = {}  # one small-model instance per worker process (loaded in place per client)


@register_algorithm("fedmrl", summary="FedMRL (Yi et al., NeurIPS 2024): small shared model fused by a local projector, nested heads")
class FedMRL(Algorithm):
    paper = "Yi et al., Federated Model Heterogeneous Matryoshka Representation Learning, NeurIPS 2024"
    Params = FedMRLParams
    personalized = True
    has_global = False
    heterogeneous = True

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self.small_arch = hp.small_model or ctx.archs[0]
        if self.small_arch not in MODELS:
            raise ConfigError(f"fedmrl: small_model '{hp.small_model}' is not a registered model; see `fedforge list models`.")
        self.feature_dim = require_common_feature_dim(ctx, self.name)
        if hp.small_dim >= self.feature_dim:
            raise ConfigError(f"fedmrl: small_dim must be below the clients' feature dimension {self.feature_dim} "
                              f"(the coarse prefix of the fused representation), got {hp.small_dim}; the paper's default is 128.")
        try:
            self._build_small()
        except TypeError:
            raise ConfigError(f"fedmrl: the {self.small_arch} model has no adjustable feature dimension; choose a "
                              f"small_model such as cnn or an ht_* architecture.") from None

    def _build_small(self) -> FedModel:
        return create_model(self.small_arch, self.ctx.input_shape, self.ctx.num_classes,
                            seed=derive_seed(self.ctx.seed, "init", self.small_arch, "fedmrl"),
                            feature_dim=self.hp.small_dim, vocab_size=self.ctx.vocab_size)

    def _small(self, rt: ClientRuntime) -> FedModel:
        key = (self.small_arch, tuple(self.ctx.input_shape), self.ctx.vocab_size, self.ctx.num_classes, self.hp.small_dim,
               str(rt.device))
        if key not in _SMALL:
            _SMALL[key] = self._build_small().to(rt.device)
        return _SMALL[key]

    # ----------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        return with_prefix(self._build_small().state_dict(), "small")

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return dict(server)

    # ----------------------------------------------------------------------------------------- client
    def init_client(self, rt: ClientRuntime) -> State:
        d, d1 = self.feature_dim, self.hp.small_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.ctx.seed, "fedmrl-proj", rt.cid))
            proj = nn.Linear(d1 + d, d).to(rt.device)  # drawn on the CPU (the same on every device), then moved
        return rt.initial_params() | {"proj/weight": proj.weight.detach().clone(), "proj/bias": proj.bias.detach().clone()}

    def _fused(self, model: FedModel, small: FedModel, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.cat([small.features(x), model.features(x)], 1), w, b)

    def local_update(self, rt: ClientRuntime, msg: Message, state: State) -> Update:
        rt.load(model_entries(state))
        small = self._small(rt)
        rt.load(under(msg, "small"), model=small)
        small.train()
        w = state["proj/weight"].clone().to(rt.device).requires_grad_(True)
        b = state["proj/bias"].clone().to(rt.device).requires_grad_(True)
        d1 = self.hp.small_dim

        def loss_fn(model, x, y):
            r = self._fused(model, small, x, w, b)
            return F.cross_entropy(model.head(r), y) + F.cross_entropy(small.head(r[:, :d1]), y)

        params = list(rt.model.parameters()) + list(small.parameters()) + [w, b]
        stats = rt.train(loss_fn=loss_fn, params=params)
        new_state = rt.model_state() | {"proj/weight": w.detach(), "proj/bias": b.detach()}
        return Update(with_prefix(rt.model_state(small), "small"), new_state, rt.num_train, stats.as_dict())

    def personal_params(self, msg: Message, state: State) -> Message:
        return model_entries(state)

    def evaluate(self, rt: ClientRuntime, msg: Message, state: State):
        rt.load(model_entries(state))
        small = self._small(rt)
        rt.load(under(msg, "small"), model=small)
        small.eval()
        model = rt.model
        w, b = state["proj/weight"].to(rt.device), state["proj/bias"].to(rt.device)
        return {"personalized": rt.evaluate(lambda x: model.head(self._fused(model, small, x, w, b)))}
