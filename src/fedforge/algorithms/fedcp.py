"""FedCP — Zhang et al., "FedCP: Separating Feature Information for Personalized Federated Learning via Conditional
Policy", KDD 2023.

Each client's model is the feature extractor φ, a personalized head h_p (kept by the client) and the frozen global
head h_g; a Conditional Policy Network (CPN, shared) splits every feature vector r = φ(x) per sample and per feature:

    v_i = normalise(Σ_rows W_{h_p})                              (client-specific vector from the personal head)
    [a_p, a_g] = GumbelSoftmax_τ( ReLU(LN(A·(r ⊙ v_i) + b)) )    (two policies per feature, a_p + a_g = 1)
    ŷ = h_p(r ⊙ a_p) + h_g(r ⊙ a_g)                              (h_g frozen: it receives no gradient)
    L = CE(ŷ, y) + λ · MMD²(φ(x), φ_g(x))                         (φ_g: frozen copy of the received global φ)

φ, h_p and the CPN are trained with SGD; the client uploads φ, ½(h_p + h_g) as its head, and the CPN; the server
averages each sample-weighted, and sends back φ (which replaces the client's), the averaged head (its new h_g) and the
CPN. The personal head h_p never leaves the client.

Choices, where the paper leaves details to the code:

* The CPN is Linear(d, 2d) → LayerNorm(2d) → ReLU, the MMD uses RBF kernels exp(−‖a−b‖²/(2a)) for
  a ∈ {10, 15, 20, 50} (σ = √a), and τ = 1, soft (not hard) samples, as in the authors' code.
* The Gumbel noise is drawn from the task's random stream during training; evaluation uses the noise-free policy
  softmax(logits/τ) (the authors' code also samples Gumbel noise at test time, so its accuracy is random).
* v_i is computed from the personal head at the start of every task (PFLlib computes it after aggregation from the
  trained personal head, and uses a uniformly random vector before the client's first aggregation; here a client's
  first v_i comes from its initial head).
* The CPN starts from weights drawn from the run's seed, the same for every client.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, with_prefix
from ..core.params import HyperParams, hp
from ..core.training import EvalCounts
from ..models import FedModel
from . import mechanics
from ._pfl4_common import gumbel_softmax, head_weight, module_seed, params_for, require_split, seeded

MMD_BANDWIDTHS = tuple(math.sqrt(a) for a in (10.0, 15.0, 20.0, 50.0))


@dataclass(frozen=True)
class FedCPParams(HyperParams):
    lam: float = hp(5.0, "weight of the MMD term keeping features close to the frozen global feature extractor's", ge=0)
    tau: float = hp(1.0, "temperature of the Gumbel-softmax policy", gt=0)


def init_cpn(dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Initial CPN weights (Linear(d, 2d) + LayerNorm(2d)), drawn from ``seed``."""
    with seeded(seed):
        fc, ln = nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim)
    return {"fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach(),
            "ln.weight": ln.weight.detach(), "ln.bias": ln.bias.detach()}


def client_context(head: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """v_i: the L2-normalised sum over classes of the personal head's weight matrix, shape (1, d)."""
    return F.normalize(head_weight(head).sum(0, keepdim=True), p=2, dim=1)


def policies(cpn: Mapping[str, torch.Tensor], rep: torch.Tensor, context: torch.Tensor, tau: float = 1.0,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-feature policies (a_p, a_g) for features ``rep`` (B, d); a_p + a_g = 1 element-wise.

    With a ``generator`` the policies are Gumbel-softmax samples; without, the noise-free softmax.
    """
    b, d = rep.shape
    h = F.linear(rep * context, cpn["fc.weight"], cpn["fc.bias"])
    h = F.relu(F.layer_norm(h, (2 * d,), cpn["ln.weight"], cpn["ln.bias"]))
    a = gumbel_softmax(h.view(b, 2, d), tau, generator, dim=1)
    return a[:, 0, :], a[:, 1, :]


def forward(model: FedModel, global_model: FedModel, cpn: Mapping[str, torch.Tensor], context: torch.Tensor,
            x: torch.Tensor, tau: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits h_p(r ⊙ a_p) + h_g(r ⊙ a_g) and the features r = φ(x)."""
    rep = model.features(x)
    pm, gm = policies(cpn, rep, context, tau, generator)
    return model.head(rep * pm) + global_model.head(rep * gm), rep


@register_algorithm("fedcp", summary="FedCP (Zhang et al., KDD 2023): a conditional policy splits features between a personal and the global head")
class FedCP(Algorithm):
    paper = "Zhang et al., FedCP: Separating Feature Information for Personalized Federated Learning via Conditional Policy, KDD 2023"
    Params = FedCPParams
    personalized = True
    has_global = False

    def __init__(self, hp: FedCPParams, ctx):
        super().__init__(hp, ctx)
        self.dim = require_split(ctx, self.name).feature_dim

    # ----------------------------------------------------------------------------------- server side
    def init_server(self) -> State:
        state = super().init_server()  # φ and the initial head (the first h_g)
        return {**state, **with_prefix(init_cpn(self.dim, module_seed(self.ctx, self.name, "cpn")), "cpn")}

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return dict(server)

    # ----------------------------------------------------------------------------------- client side
    def init_client(self, rt) -> State:
        return {k: v for k, v in rt.initial_params().items() if k.startswith(mechanics.HEAD)}

    def _global_model(self, rt, msg: Message) -> FedModel:
        g = rt.aux_model("fedcp/global")
        g.requires_grad_(False)
        rt.load(model_entries(msg), g)
        return g

    def local_update(self, rt, msg: Message, state: State) -> Update:
        h = self.hp
        glob = model_entries(msg)
        rt.load({k: v for k, v in glob.items() if mechanics.is_body(k)})
        rt.load(model_entries(state))
        g = self._global_model(rt, msg)
        g.train()
        context = client_context(model_entries(state))
        cpn = params_for(msg, "cpn", rt.device)

        def loss_fn(model: FedModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out, rep = forward(model, g, cpn, context, x, h.tau, rt.gen)
            loss = F.cross_entropy(out, y)
            if h.lam:
                with torch.no_grad():
                    rep_g = g.features(x)
                loss = loss + h.lam * mechanics.mmd_rbf(rep, rep_g, MMD_BANDWIDTHS)
            return loss

        stats = rt.train(loss_fn=loss_fn, params=list(rt.model.parameters()) + list(cpn.values()))
        personal = rt.model_state(prefixes=[mechanics.HEAD])
        upload = {**rt.model_state(prefixes=[mechanics.BODY]),
                  **{k: 0.5 * (v + glob[k]) for k, v in personal.items()},
                  **with_prefix({k: v.detach() for k, v in cpn.items()}, "cpn")}
        return Update(upload, personal, rt.num_train, stats.as_dict())

    def evaluate(self, rt, msg: Message, state: State) -> dict[str, EvalCounts]:
        rt.load({k: v for k, v in model_entries(msg).items() if mechanics.is_body(k)})
        rt.load(model_entries(state))
        g = self._global_model(rt, msg)
        g.eval()
        context = client_context(model_entries(state))
        cpn = params_for(msg, "cpn", rt.device, trainable=False)
        return {"personalized": rt.evaluate(lambda x: forward(rt.model, g, cpn, context, x, self.hp.tau, None)[0])}
