"""FedEM — Marfoq, Neglia, Bellet, Kameni & Vidal, "Federated Multi-Task Learning under a Mixture of Distributions",
NeurIPS 2021.

Each client's data is modelled as a mixture of M shared components: client k's model is p_k(y | x) =
Σ_m π_km · p_m(y | x; θ_m), with M component models θ_m shared by all clients and mixture weights π_k kept by the
client. Each round client k receives every θ_m and runs one EM step on its training data (x_j, y_j):

    E-step   q_jm ∝ π_km · exp(−ℓ(θ_m; x_j, y_j))                    (per sample, normalised over m)
    π_k      ← mean_j q_j                                             (kept in the client's state)
    M-step   θ_m ← local SGD on (1/B) Σ_{j ∈ batch} q_jm · ℓ(θ_m; x_j, y_j)   (all components, the same batches)

and the server averages each component over the round's clients, weighted by n_k (as FedAvg). A client is judged
with its mixture Σ_m π_km softmax(h_m(x)) (``personalized``); there is no single global model. With M = 1, q ≡ 1 and
FedEM is FedAvg (tested). Component 0 starts from the run's usual initial model, the others from other seeds.

Defaults: M = 3, as the paper's experiments and FL-bench. Losses of the E-step are computed in eval mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.context import derive_seed
from ..core.messages import Message, State, under, with_prefix
from ..core.params import HyperParams, hp
from .mechanics import indexed_batches


@dataclass(frozen=True)
class FedEMParams(HyperParams):
    components: int = hp(3, "M: number of shared component models (1: FedAvg)", ge=1)


@register_algorithm("fedem", summary="FedEM (Marfoq et al., NeurIPS 2021): shared mixture components, per-client mixture weights learned by EM")
class FedEM(Algorithm):
    paper = "Marfoq, Neglia, Bellet, Kameni & Vidal, Federated Multi-Task Learning under a Mixture of Distributions, NeurIPS 2021"
    Params = FedEMParams
    personalized = True
    has_global = False

    # ----------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        state: State = {}
        for m in range(self.hp.components):
            model = self.ctx.build_model() if m == 0 else self.ctx.build_model(seed=derive_seed(self.ctx.seed, "fedem", m))
            state |= with_prefix({k: v.detach().clone() for k, v in model.state_dict().items()}, f"comp/{m}")
        return state

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return dict(server)

    # ----------------------------------------------------------------------------------------- client
    def init_client(self, rt) -> State:
        M = self.hp.components
        return {"fedem/pi": torch.full((M,), 1.0 / M, device=rt.device)}

    def components(self, rt, msg: Message) -> nn.ModuleList:
        """The M component models, loaded with the received weights (the worker's model instances)."""
        models = [rt.model] + [rt.aux_model(f"fedem/{m}") for m in range(1, self.hp.components)]
        for m, model in enumerate(models):
            rt.load(under(msg, f"comp/{m}"), model)
        return nn.ModuleList(models)

    @torch.no_grad()
    def responsibilities(self, rt, comps: nn.ModuleList, pi: torch.Tensor) -> torch.Tensor:
        """E-step: q (n, M) ∝ π_m · exp(−ℓ_m) for each training sample, in the client's training order."""
        comps.eval()
        losses = []
        for x, y in rt.fed.test_batches(rt.cid, rt.ctx.eval_batch_size, part="train"):
            losses.append(torch.stack([F.cross_entropy(c(x).float(), y, reduction="none") for c in comps], 1))
        L = torch.cat(losses)
        return torch.softmax(torch.log(pi.to(L.device)) - L, dim=1)

    def local_update(self, rt, msg: Message, state: State) -> Update:
        comps = self.components(rt, msg)
        q = self.responsibilities(rt, comps, state["fedem/pi"])
        pi = q.mean(0)

        def loss_fn(models, xp, y):
            x, pos = xp
            ce = torch.stack([F.cross_entropy(c(x), y, reduction="none") for c in models], 1)  # (B, M)
            return (ce * q[pos]).mean(0).sum()

        stats = rt.train(loss_fn=loss_fn, model=comps, batches=indexed_batches(rt))
        upload: Message = {}
        for m, c in enumerate(comps):
            upload |= with_prefix(rt.model_state(c), f"comp/{m}")
        metrics = {**stats.as_dict(), "mixture_entropy": float(-(pi * pi.clamp_min(1e-12).log()).sum())}
        return Update(upload, {"fedem/pi": pi.detach().cpu()}, rt.num_train, metrics)

    def evaluate(self, rt, msg: Message, state: State):
        comps = self.components(rt, msg)
        comps.eval()
        log_pi = torch.log(state["fedem/pi"].to(rt.device).clamp_min(1e-30))

        def predict(x):
            logp = torch.stack([torch.log_softmax(c(x).float(), 1) for c in comps], 2)  # (B, C, M)
            return torch.logsumexp(logp + log_pi, dim=2)

        return {"personalized": rt.evaluate(predict)}
