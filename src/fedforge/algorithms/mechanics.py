"""Shared mechanics that algorithms compose: proximal terms, prototypes, distillation losses, MMD, head/body split.

These live once; no algorithm re-implements them. The local SGD loop itself is
:func:`fedforge.core.training.train_loop` (reached through ``rt.train``).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.algorithm import Update
from ..core.messages import Message, State
from ..core.objective import batch_independent, frozen_feature_batches  # noqa: F401  (re-exported from core)

HEAD = "head."
BODY = "features."


# ------------------------------------------------------------------------------------ body / head
def is_head(name: str) -> bool:
    return name.startswith(HEAD)


def is_body(name: str) -> bool:
    return name.startswith(BODY)


def select(d: Mapping[str, torch.Tensor], keep: Callable[[str], bool]) -> Message:
    return {k: v for k, v in d.items() if keep(k)}


def named_params(model: nn.Module, keep: Callable[[str], bool]) -> list[torch.Tensor]:
    """Parameters of ``model`` whose names pass ``keep`` (e.g. :func:`is_head`), for training a part only."""
    return [p for n, p in model.named_parameters() if keep(n)]


def head_loss(model: nn.Module, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the head alone on given features (the loss for :func:`frozen_feature_batches`)."""
    return F.cross_entropy(model.head(z), y)


def head_only_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the head on features of the frozen body (no activations of the body are kept)."""
    with torch.no_grad():
        z = model.features(x)
    return F.cross_entropy(model.head(z), y)


def train_head(rt, epochs: int | None = None):
    """Train ``rt.model``'s head alone with cross-entropy for ``epochs`` (the run's local epochs by default), the
    body frozen: on features computed once (:func:`frozen_feature_batches`) where that is exact, otherwise batch by
    batch through the body. Both paths give the same head up to float rounding; returns the training stats."""
    params = named_params(rt.model, is_head)
    cached = frozen_feature_batches(rt, epochs=epochs)
    if cached is not None:
        return rt.train(loss_fn=head_loss, params=params, batches=cached)
    return rt.train(loss_fn=head_only_loss, params=params, epochs=epochs)


# ------------------------------------------------------------------------------- own-head evaluation
OWN_HEAD = "own_head/"  # state prefix of a locally trained head kept only for evaluation (never sent)


def keep_own_head(params: Mapping[str, torch.Tensor]) -> State:
    """The head entries of a trained model under :data:`OWN_HEAD`, for a method whose state would not keep them."""
    return {OWN_HEAD + k: v.detach().clone() for k, v in params.items() if is_head(k)}


def evaluate_own_head(rt, state: State):
    """Accuracy of the client's extractor with the head it trained itself, for methods that judge a client with a
    shared or server-made head (LG-FedAvg, FedGen, FedGH): it separates the extractor's quality from the shared
    head's. Reads the head from the state's model entries, or from :data:`OWN_HEAD` entries where the method keeps
    it apart; ``None`` before a client has trained such a head."""
    own = {k[len(OWN_HEAD):]: v for k, v in state.items() if k.startswith(OWN_HEAD)}
    model = {k: v for k, v in state.items() if "/" not in k}
    if not own and not any(is_head(k) for k in model):
        return None
    rt.load({**model, **own})
    return rt.evaluate()


def with_own_head(out: dict, rt, state: State) -> dict:
    """``out`` (a method's evaluation views) with ``head``: :func:`evaluate_own_head`, where there is one."""
    own = evaluate_own_head(rt, state)
    if own is not None:
        out["head"] = own
    return out


# -------------------------------------------------------------------------------------- proximal
def proximal_term(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """mu/2 · Σ ||w − w_anchor||² (differentiable in ``params``)."""
    total = sum(((p - a.detach()) ** 2).sum() for p, a in zip(params, anchors))
    return 0.5 * mu * total


def proximal_grads(params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
                   anchors: Mapping[str, torch.Tensor], mu: float) -> dict[str, torch.Tensor]:
    """``grads`` plus mu·(w − w_anchor), by parameter name: the gradient of :func:`proximal_term` added, for an
    objective's gradient function (``Phase.grad``; FedProx, Ditto). The same arithmetic as :func:`proximal_grad_hook`."""
    return {n: g.add(params[n].detach() - anchors[n], alpha=mu) for n, g in grads.items()}


def proximal_grad_hook(anchors: Sequence[torch.Tensor], mu: float):
    """Gradient hook adding mu·(w − w_anchor): the gradient of :func:`proximal_term`, without building a graph."""

    def hook(params: Sequence[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if mu == 0:
            return grads
        return [g.add(p.detach() - a, alpha=mu) for p, g, a in zip(params, grads, anchors)]

    return hook


# ------------------------------------------------------------------------------------ clipping
def clip_each(sizes: Sequence[int], max_norm: float):
    """Gradient hook clipping each consecutive group of ``sizes`` parameters to the norm ``max_norm`` on its own, as
    code that calls ``clip_grad_norm_`` once per module does (FedKTL's client clips its model and its projection h'
    separately); ``rt.train(max_grad_norm=...)`` clips all parameters together instead."""

    def hook(params: Sequence[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        start = 0
        for n in sizes:
            group, start = grads[start:start + n], start + n
            if group:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in group]))
                factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
                out += [g * factor for g in group]
        return out + grads[start:]

    return hook


# ------------------------------------------------------------------------------------ prototypes
@torch.no_grad()
def class_means(features: Callable[[torch.Tensor], torch.Tensor], batches, num_classes: int,
                normalize: bool = False, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean of ``features(x)`` over ``batches``: (C, d) means (zero rows for absent classes), (C,) counts.

    Both are on the device of the features (``device`` when there are no batches: then the means are (C, 0))."""
    sums = counts = None
    for x, y in batches:
        z = features(x).float()
        if normalize:
            z = F.normalize(z, dim=1)
        if sums is None:
            sums = torch.zeros(num_classes, z.shape[1], dtype=torch.float32, device=z.device)
            counts = torch.zeros(num_classes, dtype=torch.long, device=z.device)
        sums.index_add_(0, y.to(z.device), z)
        counts += torch.bincount(y.to(z.device), minlength=num_classes)
    if sums is None:
        return (torch.zeros(num_classes, 0, device=device),
                torch.zeros(num_classes, dtype=torch.long, device=device))
    means = sums / counts.clamp(min=1).unsqueeze(1).float()
    if normalize:
        means = F.normalize(means, dim=1) * (counts > 0).unsqueeze(1)
    return means, counts


def collect_prototypes(rt, model: nn.Module | None = None, features: Callable | None = None,
                       normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes of this client's training data, from the model *after* local training, in eval mode.

    (HtFLlib's FedProto/FedTGP clients upload prototypes computed from the start-of-round model; the papers
    describe prototypes of the locally trained model, which is what this computes.)
    """
    m = model if model is not None else rt.model
    was_training = m.training
    m.eval()
    try:
        return class_means(features or m.features, rt.fed.test_batches(rt.cid, rt.ctx.eval_batch_size, part="train"),
                           rt.ctx.num_classes, normalize, device=rt.device)
    finally:
        m.train(was_training)


def prototypes_to_message(protos: torch.Tensor, counts: torch.Tensor, prefix: str = "proto") -> Message:
    """Only the classes the client holds are sent: ``proto/<c>`` → (d,) vector, plus its sample count."""
    msg: Message = {}
    for c in torch.nonzero(counts > 0).flatten().tolist():
        msg[f"{prefix}/{c}"] = protos[c].detach().clone()
    return msg


def message_to_prototypes(msg: Mapping[str, torch.Tensor], num_classes: int, prefix: str = "proto") -> dict[int, torch.Tensor]:
    p = prefix + "/"
    return {int(k[len(p):]): v for k, v in msg.items() if k.startswith(p)}


def average_prototypes(uploads: Sequence[Mapping[str, torch.Tensor]], prefix: str = "proto",
                       weights: Sequence[float] | None = None) -> dict[int, torch.Tensor]:
    """Per-class mean of the uploaded prototypes (unweighted, as in FedProto, unless ``weights`` are given)."""
    acc: dict[int, list[tuple[torch.Tensor, float]]] = {}
    for i, up in enumerate(uploads):
        w = 1.0 if weights is None else float(weights[i])
        for c, v in message_to_prototypes(up, -1, prefix).items():
            acc.setdefault(c, []).append((v, w))
    return {c: sum(v * w for v, w in items) / sum(w for _, w in items) for c, items in sorted(acc.items())}


def prototype_update(rt, stats, prefix: str = "proto", features: Callable | None = None) -> Update:
    """A prototype-exchanging client's update after ``rt.train`` returned ``stats``: the class prototypes of the
    trained model (:func:`collect_prototypes`; ``features`` as there) uploaded as ``<prefix>/<c>``, the whole model
    kept as state."""
    means, counts = collect_prototypes(rt, features=features)
    return Update(prototypes_to_message(means.cpu(), counts, prefix), rt.model_state(), rt.num_train, stats.as_dict())


def aggregate_prototypes(server: State, updates: Sequence[Update], prefix: str = "proto") -> State:
    """The server state of a prototype exchange: the per-class mean of the uploads (:func:`average_prototypes`) as
    ``<prefix>/<c>`` entries; ``server`` unchanged when no client reported."""
    if not updates:
        return server
    avg = average_prototypes([u.upload for u in updates], prefix)
    return {f"{prefix}/{c}": v for c, v in avg.items()}


# ---------------------------------------------------------------------------------- distillation
def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) · T², batch mean (Hinton et al., 2015).

    ``weight`` (N,): per-sample weights; the result is then Σ_i w_i·KL_i / Σ_i w_i (0 where all weights are 0),
    which with 0/1 weights is the batch mean over the samples weighted 1, without selecting rows (vmappable)."""
    t = temperature
    log_p = F.log_softmax(student_logits / t, dim=1)
    target = F.softmax(teacher_logits.detach() / t, dim=1)
    if weight is None:
        return F.kl_div(log_p, target, reduction="batchmean") * (t * t)
    per = F.kl_div(log_p, target, reduction="none") * weight.to(log_p.dtype).unsqueeze(1)
    return per.sum() / weight.sum().to(log_p.dtype).clamp(min=1.0) * (t * t)


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a soft target distribution."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(1).mean()


# -------------------------------------------------------------------------------------------- MMD
def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (1.0,)) -> torch.Tensor:
    """Squared maximum mean discrepancy with a sum of RBF kernels exp(−‖a−b‖² / (2σ²))."""
    xx, yy, xy = torch.cdist(x, x) ** 2, torch.cdist(y, y) ** 2, torch.cdist(x, y) ** 2
    k = lambda d: sum(torch.exp(-d / (2.0 * s * s)) for s in bandwidths)  # noqa: E731
    return k(xx).mean() + k(yy).mean() - 2.0 * k(xy).mean()


# ------------------------------------------------------------------------------- model mixtures
def mix_params(param_sets: Sequence[Mapping[str, torch.Tensor]], coefs: Sequence[float | torch.Tensor],
               keys: Sequence[str] | None = None) -> Message:
    """Σ_j c_j · P_j[k] for every floating entry k, differentiable in the tensors and in tensor coefficients.

    Coefficients are used as given (no normalisation; they may be learned, as APFL's α or APPLE's p). Integer
    entries (e.g. BatchNorm's step counter) are taken from the first set. Used by APFL, APPLE, FedAMP, FedFomo.
    """
    if not param_sets:
        return {}
    keys = list(keys) if keys is not None else list(param_sets[0].keys())
    out: Message = {}
    for k in keys:
        first = param_sets[0][k]
        if not first.is_floating_point():
            out[k] = first
            continue
        acc = None
        for d, c in zip(param_sets, coefs):
            term = d[k] * c
            acc = term if acc is None else acc + term
        out[k] = acc
    return out


def forward_with(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` computed with ``params`` in place of the model's own entries (the rest are the model's).

    Gradients flow to whatever ``params`` were built from (an inner MAML step, a mixture of models), which is
    how Per-FedAvg, APFL and APPLE differentiate through a model they never load.
    """
    return torch.func.functional_call(model, dict(params), (x,))


def sq_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None) -> float:
    """Σ_k ‖a_k − b_k‖² over the floating entries (float64 accumulation), e.g. ‖θ_j − θ_i‖² between two models."""
    keys = list(keys) if keys is not None else [k for k, v in a.items() if v.is_floating_point()]
    total: torch.Tensor | None = None  # on the tensors' device, read once at the end
    for k in keys:
        term = (a[k].detach().double() - b[k].detach().double()).pow(2).sum()
        total = term if total is None else total + term
    return float(total) if total is not None else 0.0


# --------------------------------------------------------------------------- heterogeneous models
def architecture_facts(ctx) -> dict[str, dict]:
    """Per architecture of the federation: its ``feature_dim`` and its head's entry shapes (built once per process)."""
    vocab = getattr(ctx, "vocab_size", None)
    return {a: _arch_facts(a, tuple(ctx.input_shape), int(ctx.num_classes), vocab) for a in ctx.arch_set}


_FACTS: dict[tuple, dict] = {}


def _arch_facts(arch: str, input_shape: tuple, num_classes: int, vocab_size: int | None = None) -> dict:
    key = (arch, input_shape, num_classes, vocab_size)
    if key not in _FACTS:
        from ..models import create_model

        m = create_model(arch, input_shape, num_classes, seed=0, vocab_size=vocab_size)
        _FACTS[key] = {"feature_dim": m.feature_dim,
                       "head": tuple((k, tuple(v.shape)) for k, v in m.head.state_dict().items())}
    return _FACTS[key]


def require_common_feature_dim(ctx, who: str) -> int:
    """The feature dimension every client's model shares; ConfigError naming the mismatch otherwise."""
    from ..errors import ConfigError

    dims = {a: f["feature_dim"] for a, f in architecture_facts(ctx).items()}
    if len(set(dims.values())) != 1:
        listing = ", ".join(f"{a}: {d}" for a, d in dims.items())
        raise ConfigError(f"{who} exchanges feature-space vectors, so every architecture needs the same feature "
                          f"dimension, but they differ ({listing}); use a model group (`fedforge list models`) "
                          f"or ht_* architectures, which all map to 512.")
    return next(iter(dims.values()))


def require_same_head(ctx, who: str) -> None:
    """Methods that average or share the head need one head shape across architectures."""
    from ..errors import ConfigError

    heads = {a: f["head"] for a, f in architecture_facts(ctx).items()}
    first = next(iter(heads))
    for a, h in heads.items():
        if h != heads[first]:
            raise ConfigError(f"{who} shares the classification head, so every architecture needs the same head, "
                              f"but {a} and {first} differ; choose a group without heterogeneous heads "
                              f"(e.g. htfe-img-8 instead of htfe-img-8-htc-img-4).")


def prototype_matrix(protos: Mapping[int, torch.Tensor], num_classes: int, dim: int,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, d) matrix of class prototypes (zero rows where absent) and the (C,) mask of classes that have one, on
    ``device`` (default: the prototypes' device; the CPU when there are none)."""
    if device is None:
        device = next(iter(protos.values())).device if protos else torch.device("cpu")
    P = torch.zeros(num_classes, dim, device=device)
    mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
    for c, v in protos.items():
        P[c] = v.detach().float().reshape(-1).to(P.device)
        mask[c] = True
    return P, mask


def nearest_prototype_scores(z: torch.Tensor, P: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores for nearest-prototype inference: −‖z − P_c‖₂ per class; classes without a prototype score lowest."""
    d = torch.cdist(z.float(), P.to(z.device).float())
    scores = -d
    if not bool(mask.all()):
        low = scores.detach().min() - 50.0
        scores = torch.where(mask.to(z.device).unsqueeze(0), scores, low)
    return scores


# ------------------------------------------------------------------------------ held-out splits
def holdout_positions(n: int, count: int, seed: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split of positions ``0..n-1`` into (held out, rest), ``count`` held out (at most n − 1, so
    that the rest is never empty), drawn from a generator seeded with ``seed`` (e.g. FedL2G's quiz set)."""
    count = max(0, min(int(count), n - 1))
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same split on every device
    perm = torch.randperm(n, generator=gen, device=gen.device).to(device)
    return perm[:count], perm[count:]


# ------------------------------------------------------------------------------- feature tensors
@torch.no_grad()
def collect_features(features: Callable[[torch.Tensor], torch.Tensor], batches,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``features(x)`` of every sample in ``batches`` stacked (N, d) in float32, with the labels (N,) (empty, on
    ``device``, when there are no batches)."""
    zs, ys = [], []
    for x, y in batches:
        zs.append(features(x).float().flatten(1))
        ys.append(y)
    if not zs:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(zs), torch.cat(ys)


def train_features(rt, model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of the client's training samples under ``model`` (``rt.model`` by default) in eval mode."""
    m = model if model is not None else rt.model
    was = m.training
    m.eval()
    try:
        return collect_features(m.features, rt.fed.test_batches(rt.cid, rt.ctx.eval_batch_size, part="train"),
                                device=rt.device)
    finally:
        m.train(was)


def features_and_logits(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of a :class:`~fedforge.models.FedModel` computed with ``params`` (state-dict names) in place
    of its own parameters, differentiable in ``params`` (a virtual SGD step, as in FedL2G's meta step)."""
    body = {k[len(BODY):]: v for k, v in params.items() if k.startswith(BODY)}
    head = {k[len(HEAD):]: v for k, v in params.items() if k.startswith(HEAD)}
    z = torch.func.functional_call(model.features, body, (x,))
    return z, torch.func.functional_call(model.head, head, (z,))


# -------------------------------------------------------------------------------- hypernetworks
def hypernet_grads(outputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                   deltas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Gradient of a server-side network's parameters through the tensors it generated for a client:
    (∂θ/∂φ)ᵀ Δθ with Δθ = θ_sent − θ_trained (the client's update taken as the negative gradient at θ_sent, as in
    pFedHN and pFedLA). Parameters that did not take part get zero gradients."""
    grads = torch.autograd.grad(list(outputs), list(params), grad_outputs=[d.to(o.dtype) for o, d in zip(outputs, deltas)],
                                allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def sgd_momentum_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor] | None,
                      lr: float | Sequence[float], momentum: float = 0.0, weight_decay: float = 0.0,
                      max_norm: float | None = None) -> list[torch.Tensor] | None:
    """One step of SGD with (PyTorch-style) momentum and L2 weight decay on a server-side network, gradients clipped
    to a total norm of ``max_norm`` first. ``bufs`` are the momentum buffers (None before the first step); returns the
    new buffers (None without momentum). The tensors are changed in place."""
    grads = [g.detach().clone() for g in grads]
    if max_norm is not None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        grads = [g * scale for g in grads]
    lrs = [lr] * len(grads) if isinstance(lr, (int, float)) else list(lr)
    new_bufs = []
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(params, grads)):
            if weight_decay:
                g = g.add(p, alpha=weight_decay)
            if momentum:
                b = g.clone() if bufs is None else bufs[i].mul(momentum).add_(g)
                new_bufs.append(b)
                g = b
            p.add_(g, alpha=-float(lrs[i]))
    return new_bufs if momentum else None


# ------------------------------------------------------------------------------------ warm-up
def warmup_length(fraction: float, rounds: int) -> int:
    """Warm-up rounds as a fraction of the run's rounds (pFedSim and FedAP state it so), rounded down."""
    return int(rounds * fraction)


# ------------------------------------------------------------------------------ prototype pull
def prototype_mse(z: torch.Tensor, target: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Σ_i has_i · ‖z_i − target_i‖² / (B · d): the squared distance of each feature vector to its class's prototype,
    averaged over the batch and the feature dimensions, samples whose class has no prototype (``has`` 0) adding 0
    (PFLlib's ``MSELoss(proto_new, rep)``; FedProto's regulariser and FedPAC's feature alignment)."""
    sq = ((z - target) ** 2).sum(1) * has
    return sq.sum() / (z.shape[0] * z.shape[1])


def indexed_batches(rt, epochs: int | None = None):
    """``rt.batches(epochs)``'s batches (same order, same draws from ``rt.gen``, augmentation included) with each
    sample's position in the client's training data: ``((x, positions), y)``, for per-sample weights (FedEM)."""
    fed = rt.fed
    idx = fed.train_indices(rt.cid)
    n_epochs = rt.local_epochs if epochs is None else epochs
    for pos in fed.train_positions(idx.numel(), rt.batch_size, rt.gen, n_epochs):
        x, y = fed.inputs(idx[pos])
        if fed.augment:
            x = fed._augment(x, rt.gen)
        yield (x, pos), y
