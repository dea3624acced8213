"""FedKD — Wu et al., "Communication-efficient federated learning via knowledge distillation", Nature
Communications 13, 2032 (2022).

Each client keeps a large private **mentor** (its own architecture) and learns, with it, a small shared **mentee**
whose updates are the only thing exchanged, compressed by SVD. Per batch (t: mentor, s: mentee, H: features):

    task        L_t = CE(ŷ_t, y),   L_s = CE(ŷ_s, y)
    adaptive    L_d = [KL(ŷ_s ‖ ŷ_t) + KL(ŷ_t ‖ ŷ_s)] / (L_t + L_s)     (each KL w.r.t. the other's fixed output)
    hidden      L_h = MSE(H_t, W_h · H_s) / (L_t + L_s)                (W_h: a local linear map, trained too)
    loss        L_t + L_s + L_d + L_h                                    ((L_t + L_s) in the divisors is a constant)

Communication (the paper's dynamic gradient approximation): client k uploads its mentee update
Δ_k = θ_s,k − θ_s; every weight matrix (a convolution reshaped to out × in·k·k) is sent as its truncated SVD
U_r Σ_r V_rᵀ, keeping the fewest singular values whose energy Σ_{i≤r} σ_i² / Σ_i σ_i² reaches T(t), with

    T(t) = T_start + (T_end − T_start) · (t − 1) / (R − 1)              (0.95 → 0.98 over the R rounds)

(a matrix whose factors would not be smaller is sent as it is, as are vectors). The server reconstructs the
Δ_k, averages them with sample weights, compresses the average the same way and sends it back; server and
clients both apply the *compressed* global update, so their mentee copies stay identical. A client that missed
an update (partial participation) receives the whole mentee instead. Clients are judged with their mentor
(``personalized``); the mentee is also judged on every client as the ``global`` model.

Departures from prior code: HtFLlib compresses the mentee's weights rather than its updates and adds the hidden
loss twice (its ``L_h_g`` equals ``L_h``); here updates are compressed, as in the paper, and the shared hidden term
is counted once. The mentee is ``mentee_model`` (default: the group's first architecture, as HtFLlib's
``models[0]``). Non-floating buffers (BatchNorm step counters) stay local. HtFLlib also differs in: its KL terms
(``nn.KLDivLoss()``: the mean over batch × classes, 1/C of the KL, with gradients into the other model's output too)
and its divisor L_t + L_s (differentiated); W_h without bias (here a linear layer with bias); each model's gradient
clipped at norm 10; the mentees averaged unweighted; convolution kernels compressed as one SVD per k×k slice (here
the out × in·k·k matrix); T(t) = T_start + (T_end − T_start)·(t − 1)/R; and a rank search over ``range(len(σ))``
that never keeps every singular value, so a matrix that needs all of them arrives as zeros. Only the SVD codec of a
weight matrix is step-checked against it (``tests/reference/test_htfllib_equivalence.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.context import derive_seed
from ..core.messages import Message, State, model_entries, under, weighted_average, with_prefix
from ..core.params import HyperParams, hp
from ..errors import ConfigError
from ..models import MODELS
from .mechanics import kl_distill

if TYPE_CHECKING:
    from ..core.runtime import ClientRuntime


@dataclass(frozen=True)
class FedKDParams(HyperParams):
    t_start: float = hp(0.95, "SVD energy threshold T in the first round", gt=0, le=1)
    t_end: float = hp(0.98, "SVD energy threshold T in the last round (T rises linearly)", gt=0, le=1)
    mentee_model: str = hp("", "registry name of the shared mentee (empty: the first architecture of the group)")

    def validate(self, owner: str) -> None:
        if self.t_end < self.t_start:
            raise ConfigError(f"{owner}: t_end must be >= t_start (the energy threshold rises), got "
                              f"{self.t_start} → {self.t_end}; the paper's defaults are 0.95 → 0.98.")


# ------------------------------------------------------------------------------------ SVD codec
def energy_threshold(rnd: int, rounds: int, t_start: float, t_end: float) -> float:
    """T(t) rising linearly from ``t_start`` (round 1) to ``t_end`` (round ``rounds``)."""
    if rounds <= 1:
        return t_start
    frac = min(max((rnd - 1) / (rounds - 1), 0.0), 1.0)
    return t_start + (t_end - t_start) * frac


def svd_rank(s: torch.Tensor, threshold: float) -> int:
    """Fewest leading singular values whose squared sum reaches ``threshold`` of the total (0 for a zero matrix)."""
    e = (s.double() ** 2)
    total = float(e.sum())
    if total <= 0:
        return 0
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor([threshold], dtype=cum.dtype, device=cum.device) - 1e-12).item()) + 1


def compress(tensors: Mapping[str, torch.Tensor], threshold: float) -> Message:
    """Truncated-SVD encoding of every matrix that gets smaller (``svd/<k>/us``, ``svd/<k>/v``), the rest ``raw/<k>``."""
    out: Message = {}
    for k, t in tensors.items():
        if t.dim() >= 2:
            m = t.reshape(t.shape[0], -1).float()
            U, S, Vh = torch.linalg.svd(m, full_matrices=False)
            r = svd_rank(S, threshold)
            if r * (m.shape[0] + m.shape[1]) < m.numel():
                out[f"svd/{k}/us"] = (U[:, :r] * S[:r]).contiguous()
                out[f"svd/{k}/v"] = Vh[:r].contiguous()
                continue
        out[f"raw/{k}"] = t.detach().clone()
    return out


def decompress(msg: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`compress` (up to the truncation), given the original shapes."""
    out = {}
    for k, shape in shapes.items():
        if f"raw/{k}" in msg:
            out[k] = msg[f"raw/{k}"]
        elif f"svd/{k}/us" in msg:
            out[k] = (msg[f"svd/{k}/us"] @ msg[f"svd/{k}/v"]).reshape(shape)
    return out


@register_algorithm("fedkd", summary="FedKD (Wu et al., Nat. Commun. 2022): mentor/mentee distillation, SVD-compressed mentee updates")
class FedKD(Algorithm):
    paper = "Wu et al., Communication-efficient federated learning via knowledge distillation, Nature Communications 2022"
    Params = FedKDParams
    personalized = True
    has_global = True
    heterogeneous = True

    TAG = "fedkd-mentee"

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self.mentee_arch = hp.mentee_model or ctx.archs[0]
        if self.mentee_arch not in MODELS:
            raise ConfigError(f"fedkd: mentee_model '{hp.mentee_model}' is not a registered model; see `fedforge list models`.")
        init = ctx.build_model(self.mentee_arch).state_dict()
        self.shapes = {k: v.shape for k, v in init.items() if v.is_floating_point()}

    def threshold(self, rnd: int) -> float:
        return energy_threshold(rnd, self.ctx.rounds, self.hp.t_start, self.hp.t_end)

    def _floats(self, d: Mapping[str, torch.Tensor]) -> State:
        return {k: d[k] for k in self.shapes}

    # ----------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        state = with_prefix(self._floats(self.ctx.build_model(self.mentee_arch).state_dict()), "mentee")
        state["stat/version"] = torch.zeros((), dtype=torch.long, device=self.ctx.device)
        state["stat/sync"] = torch.zeros(self.ctx.num_clients, dtype=torch.long, device=self.ctx.device)  # version each client holds
        return state

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        v, s = int(server["stat/version"]), int(server["stat/sync"][cid])
        if s == v:
            return {}
        if s == v - 1:
            return with_prefix(under(server, "update"), "update")
        return with_prefix(under(server, "mentee"), "full")

    def eval_message(self, server: State, cid: int) -> Message:
        return with_prefix(under(server, "mentee"), "full")

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        if not updates:
            return server
        deltas = [decompress(under(u.upload, "delta"), self.shapes) for u in updates]
        avg = weighted_average(deltas, [u.weight for u in updates])
        packed = compress(avg, self.threshold(rnd))
        applied = decompress(packed, self.shapes)
        mentee = under(server, "mentee")
        out = {k: v for k, v in server.items() if not k.startswith("update/")}
        out |= {f"mentee/{k}": mentee[k] + applied[k] for k in self.shapes}
        out |= with_prefix(packed, "update")
        v = int(server["stat/version"])
        sync = server["stat/sync"].clone()
        for u in updates:
            sync[u.cid] = v
        out["stat/version"] = torch.tensor(v + 1, dtype=torch.long, device=sync.device)
        out["stat/sync"] = sync
        return out

    # ----------------------------------------------------------------------------------------- client
    def init_client(self, rt: ClientRuntime) -> State:
        state = rt.initial_params()
        state |= with_prefix(self._floats(rt.initial_params(self.mentee_arch)), "mentee")
        d_t = rt.model.feature_dim
        d_s = rt.aux_model(self.TAG, self.mentee_arch).feature_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.ctx.seed, "fedkd-wh", rt.cid))
            wh = nn.Linear(d_s, d_t).to(rt.device)  # drawn on the CPU (the same on every device), then moved
        return state | {"wh/weight": wh.weight.detach().clone(), "wh/bias": wh.bias.detach().clone()}

    def _synced_mentee(self, msg: Message, state: State) -> dict[str, torch.Tensor]:
        if any(k.startswith("full/") for k in msg):
            return under(msg, "full")
        mentee = under(state, "mentee")
        upd = under(msg, "update")
        if upd:
            applied = decompress(upd, self.shapes)
            mentee = {k: mentee[k] + applied[k] for k in self.shapes}
        return mentee

    def local_update(self, rt: ClientRuntime, msg: Message, state: State) -> Update:
        rt.load(model_entries(state))
        start = self._synced_mentee(msg, state)
        mentee = rt.aux_model(self.TAG, self.mentee_arch)
        rt.load(start, model=mentee)
        mentee.train()
        wh_w = state["wh/weight"].clone().to(rt.device).requires_grad_(True)
        wh_b = state["wh/bias"].clone().to(rt.device).requires_grad_(True)

        def loss_fn(model, x, y):
            h_t = model.features(x)
            h_s = mentee.features(x)
            o_t, o_s = model.head(h_t), mentee.head(h_s)
            ce_t, ce_s = F.cross_entropy(o_t, y), F.cross_entropy(o_s, y)
            scale = (ce_t + ce_s).detach()
            distil = kl_distill(o_t, o_s) + kl_distill(o_s, o_t)
            hidden = F.mse_loss(h_t, F.linear(h_s, wh_w, wh_b))
            return ce_t + ce_s + (distil + hidden) / scale

        params = list(rt.model.parameters()) + list(mentee.parameters()) + [wh_w, wh_b]
        stats = rt.train(loss_fn=loss_fn, params=params)
        trained = rt.model_state(mentee)
        delta = {k: trained[k] - start[k].to(trained[k].device) for k in self.shapes}  # compressed on the device
        upload = with_prefix(compress(delta, self.threshold(rt.round)), "delta")
        new_state = rt.model_state() | with_prefix({k: v.detach().clone() for k, v in start.items()}, "mentee")
        new_state |= {"wh/weight": wh_w.detach(), "wh/bias": wh_b.detach()}
        return Update(upload, new_state, rt.num_train, stats.as_dict())

    def personal_params(self, msg: Message, state: State) -> Message:
        return model_entries(state)

    def evaluate(self, rt: ClientRuntime, msg: Message, state: State):
        mentee = rt.aux_model(self.TAG, self.mentee_arch)
        rt.load(under(msg, "full"), model=mentee)
        out = {"global": rt.evaluate(model=mentee)}
        rt.load(model_entries(state))
        out["personalized"] = rt.evaluate()
        return out
