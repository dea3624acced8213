"""FedPAC — Xu, Tong & Huang, "Personalized Federated Learning with Feature Alignment and Classifier Collaboration",
ICLR 2023.

Clients share the feature extractor φ (averaged as in FedAvg) and keep personal heads, which the server rebuilds each
round as the best convex combination of the round's heads. In round t, client i

    1. loads φ^t and its head h_i, and measures on its data (under φ^t) the label shares π_{i,c}, the class means
       μ_{i,c} of the features, and  v_i = (1/n_i) Σ_c [π_{i,c} · E‖φ(x)‖²_{y=c} − π²_{i,c} · ‖μ_{i,c}‖²]  and
       H_i = [π_{i,c} · μ_{i,c}]_c  (a C × d matrix);
    2. trains its head for ``head_epochs`` with φ frozen (cross-entropy);
    3. trains φ for the run's local epochs with the head frozen on  CE + λ · ‖φ(x) − c̄_y‖² / d  (feature alignment
       to the global prototype c̄_y of the sample's class, batch mean);
    4. uploads φ_i, h_i, (v_i, H_i) and its class prototypes (means of φ_i(x) per class, eval mode).

The server sets φ^{t+1} = Σ_i (n_i / n) φ_i, the global prototypes c̄_c to the mean over the round's clients that hold
class c, and for each client i of the round solves the quadratic program

    α_i = argmin_{α ≥ 0, Σα = 1}  αᵀ (diag(v) + D_i) α,    (D_i)_{jl} = Σ_c ⟨H_{i,c} − H_{j,c}, H_{i,c} − H_{l,c}⟩,

and gives client i the head Σ_j α_ij h_j (weights below 10⁻³ are dropped and the rest renormalised). A client is
judged with (φ^t, its head). Defaults λ = 1 and one head epoch are the paper's (and PFLlib's).

The quadratic program is solved with Clarabel (``pip install clarabel``): an interior-point solver under the
Apache-2.0 licence, a single ~1 MB wheel that needs only numpy and scipy, deterministic for given inputs, and
accurate to 1e-8 by default. cvxpy (PFLlib's choice) pulls in several solvers and a modelling layer whose default
solver has changed between versions; quadprog is GPL and needs a strictly positive definite matrix; qpsolvers is
an LGPL front end that still needs such a back-end. As in the authors' code, a matrix with negative eigenvalues is
rebuilt from its eigenpairs with eigenvalues ≥ 0.01, and a client whose program has no solution keeps its own head.

Deliberate differences from PFLlib (``clientpac.py``/``serverpac.py``): the weights below 10⁻³ are zeroed *and the
others renormalised* (PFLlib zeroes them only, so its weights may sum to slightly less than 1); a client whose
program fails keeps its own trained head (PFLlib indexes the uploaded heads by client id there); prototypes and
statistics use every training sample in eval mode (PFLlib: a shuffled pass dropping the last incomplete batch).
PFLlib defect (found by the step test): its uploaded heads are the clients' own head modules, and it writes each
client's combined head into that client's model before combining the next client's, so a later client mixes heads
already combined this round; here every combination mixes the heads as trained. With these aligned, one round's
client and server steps equal PFLlib's (``tests/reference/test_pfllib_step.py``, ``test_step_equivalence[fedpac]``;
PFLlib's QP through cvxpy, whose weights agree with Clarabel's to 1e-5).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, under, weighted_average, with_prefix
from ..core.params import HyperParams, hp
from ..errors import ConfigError
from .mechanics import (
    aggregate_prototypes,
    collect_prototypes,
    is_body,
    is_head,
    message_to_prototypes,
    mix_params,
    named_params,
    prototype_matrix,
    prototype_mse,
    prototypes_to_message,
    select,
    train_head,
)

INSTALL_HINT = ("FedPAC solves a small quadratic program with the Clarabel solver, which is not installed: "
                "pip install clarabel (or pip install 'fedforge[qp]').")
PROTO, PHEAD, STAT = "proto", "phead", "stat"
EPS = 1e-3  # head weights below this are dropped (as in the authors' code)


@dataclass(frozen=True)
class FedPACParams(HyperParams):
    lam: float = hp(1.0, "weight λ of the feature alignment ‖φ(x) − c̄_y‖²/d to the global prototypes", ge=0)
    head_epochs: int = hp(1, "epochs training the head with the extractor frozen, before the extractor's epochs", ge=1)


@torch.no_grad()
def feature_statistics(rt) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, H) of the client's data under ``rt.model``'s extractor (eval mode): v the scalar variance term, H the
    (C, d) matrix of label-share-weighted class means (see the module docstring)."""
    model = rt.model
    was = model.training
    model.eval()
    c = rt.ctx.num_classes
    sums = sq = None
    counts = torch.zeros(c, dtype=torch.float64, device=rt.device)
    try:
        for x, y in rt.eval_batches("train"):
            z = model.features(x).double()
            y = y.to(z.device)
            if sums is None:
                sums = torch.zeros(c, z.shape[1], dtype=torch.float64, device=z.device)
                sq = torch.zeros(c, dtype=torch.float64, device=z.device)
            sums.index_add_(0, y, z)
            sq.index_add_(0, y, (z * z).sum(1))
            counts += torch.bincount(y, minlength=c).to(counts)
    finally:
        model.train(was)
    n = counts.sum()
    if sums is None or n == 0:
        d = model.feature_dim
        return torch.zeros((), dtype=torch.float64, device=rt.device), torch.zeros(c, d, dtype=torch.float64, device=rt.device)
    mu = sums / counts.clamp(min=1).unsqueeze(1)
    py = counts / n
    v = (py * sq / counts.clamp(min=1)).sum() - (py * py * (mu * mu).sum(1)).sum()
    return v / n, py.unsqueeze(1) * mu


def combination_weights(v: np.ndarray, hs: np.ndarray, i: int) -> np.ndarray | None:
    """α_i ≥ 0, Σα_i = 1 minimising αᵀ(diag(v) + D_i)α for the round's statistics ``v`` (K,) and ``hs`` (K, C, d);
    weights below 10⁻³ dropped and the rest renormalised; None when the program cannot be solved."""
    try:
        import clarabel
        from scipy import sparse
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    k = len(v)
    diff = (hs[i][None] - hs).reshape(k, -1)  # rows: H_i − H_j
    p = np.diag(v) + diff @ diff.T
    p = 0.5 * (p + p.T)
    evals, evecs = np.linalg.eigh(p)
    if evals.min() < 0:  # numerical safety, as in the authors' code: keep the eigenpairs with eigenvalue ≥ 0.01
        keep = evals >= 0.01
        p = (evecs[:, keep] * evals[keep]) @ evecs[:, keep].T
        p = 0.5 * (p + p.T)
    p = p / max(float(np.abs(p).max()), 1e-300)  # same minimiser, a well-scaled program for the solver
    a = sparse.csc_matrix(np.vstack([np.ones((1, k)), -np.eye(k)]))
    b = np.concatenate([[1.0], np.zeros(k)])
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    solver = clarabel.DefaultSolver(sparse.triu(sparse.csc_matrix(2.0 * p), format="csc"), np.zeros(k), a, b,
                                    [clarabel.ZeroConeT(1), clarabel.NonnegativeConeT(k)], settings)
    sol = solver.solve()
    if sol.status not in (clarabel.SolverStatus.Solved, clarabel.SolverStatus.AlmostSolved):
        return None
    alpha = np.clip(np.asarray(sol.x, dtype=np.float64), 0.0, None)
    alpha[alpha <= EPS] = 0.0
    if alpha.sum() <= 0:
        return None
    return alpha / alpha.sum()


@register_algorithm("fedpac", summary="FedPAC (Xu et al., ICLR 2023): features aligned to global prototypes; each client's head a QP-weighted mix of the round's heads")
class FedPAC(Algorithm):
    paper = "Xu, Tong & Huang, Personalized Federated Learning with Feature Alignment and Classifier Collaboration, ICLR 2023"
    Params = FedPACParams
    personalized = True
    has_global = False

    def __init__(self, hp: FedPACParams, ctx):
        super().__init__(hp, ctx)
        if importlib.util.find_spec("clarabel") is None:
            raise ConfigError(INSTALL_HINT)
        self.feature_dim = ctx.build_model().feature_dim

    # ----------------------------------------------------------------------------------- server side
    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return {**select(model_entries(server), is_body), **{k: v for k, v in server.items() if k.startswith(PROTO + "/")},
                **with_prefix(under(server, f"{PHEAD}/{cid}"), PHEAD)}

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        if not updates:
            return server
        bodies = [select(model_entries(u.upload), is_body) for u in updates]
        out = {k: v for k, v in server.items() if not k.startswith(PROTO + "/")}
        out.update(weighted_average(bodies, [u.weight for u in updates]))
        out.update(aggregate_prototypes(server, updates, PROTO))
        heads = [select(model_entries(u.upload), is_head) for u in updates]
        v = np.array([float(u.upload[f"{STAT}/v"]) for u in updates])
        hs = np.stack([u.upload[f"{STAT}/h"].double().cpu().numpy() for u in updates])
        for i, u in enumerate(updates):
            alpha = combination_weights(v, hs, i)
            head = heads[i] if alpha is None else mix_params(heads, [float(a) for a in alpha])
            out.update(with_prefix(head, f"{PHEAD}/{u.cid}"))
        return out

    # ----------------------------------------------------------------------------------- client side
    def client_model(self, rt, msg: Message) -> Message:
        """φ^t with the client's head (the server's combination for it, or the initial head before it has one)."""
        head = under(msg, PHEAD) or select(rt.initial_params(), is_head)
        return {**select(model_entries(msg), is_body), **head}

    def local_update(self, rt, msg: Message, state: State) -> Update:
        rt.load(self.client_model(rt, msg))
        v, h = feature_statistics(rt)
        head_stats = train_head(rt, self.hp.head_epochs)
        P, mask = prototype_matrix(message_to_prototypes(msg, self.ctx.num_classes, PROTO), self.ctx.num_classes,
                                   self.feature_dim)
        P, mask = P.to(rt.device), mask.to(rt.device)
        lam = self.hp.lam if bool(mask.any()) else 0.0

        def loss_fn(model, x, y):
            z = model.features(x)
            loss = F.cross_entropy(model.head(z), y)
            return loss + lam * prototype_mse(z, P[y], mask[y].to(z.dtype)) if lam else loss

        stats = rt.train(loss_fn=loss_fn, params=named_params(rt.model, is_body))
        protos, counts = collect_prototypes(rt)
        upload = {**rt.model_state(), **prototypes_to_message(protos, counts, PROTO),
                  f"{STAT}/v": v.float(), f"{STAT}/h": h.float()}
        return Update(upload, {}, rt.num_train, {**stats.as_dict(), "head_loss": head_stats.loss})

    def evaluate(self, rt, msg: Message, state: State):
        rt.load(self.client_model(rt, msg))
        return {"personalized": rt.evaluate()}
