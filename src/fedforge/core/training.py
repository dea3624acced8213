"""The one local SGD loop. Algorithms supply a loss, the parameters to update, and optionally a gradient hook.

Plain SGD without momentum or weight decay, as in PFLlib and the papers it reproduces; a step is
``p ← p − lr·g`` applied with one fused ``_foreach_add_``. Parameters left out of ``params`` are frozen
(autograd does not even compute their gradients).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from .dp import DPSGD

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
GradHook = Callable[[Sequence[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


@dataclass
class TrainStats:
    loss: float = 0.0  # mean loss per sample
    samples: int = 0
    steps: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "samples": self.samples, "steps": self.steps}

    def merge(self, other: TrainStats) -> TrainStats:
        n = self.samples + other.samples
        loss = (self.loss * self.samples + other.loss * other.samples) / n if n else 0.0
        return TrainStats(loss, n, self.steps + other.steps)


def sgd_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: float | Sequence[float]) -> None:
    with torch.no_grad():
        if isinstance(lr, (int, float)):
            torch._foreach_add_(list(params), list(grads), alpha=-float(lr))
        else:
            for p, g, l in zip(params, grads, lr):
                p.add_(g, alpha=-float(l))


@dataclass(frozen=True)
class Optimizer:
    """The local optimiser: ``sgd`` (plain, the default: no state), ``momentum`` (heavy-ball SGD) or ``adam``, each
    with optional L2 weight decay; the two with state use torch.optim's implementations. Their state (momentum
    buffers, Adam's moments and step) is handed in and out of :func:`train_loop` so that it persists across rounds
    in the client's state, as a client object's optimizer does in PFLlib, and is checkpointed with it."""

    kind: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0

    @property
    def plain(self) -> bool:
        return self.kind == "sgd" and self.weight_decay == 0

    def build(self, params: list[torch.Tensor], lr: float | Sequence[float],
              state: dict[int, dict[str, torch.Tensor]]) -> torch.optim.Optimizer:
        lrs = [float(lr)] * len(params) if isinstance(lr, (int, float)) else [float(v) for v in lr]
        groups = [{"params": [p], "lr": v} for p, v in zip(params, lrs)]
        opt: torch.optim.Optimizer
        if self.kind == "adam":
            opt = torch.optim.Adam(groups, lr=lrs[0] if lrs else 1e-3, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.SGD(groups, lr=lrs[0] if lrs else 1e-3, weight_decay=self.weight_decay,
                                  momentum=self.momentum if self.kind == "momentum" else 0.0)
        for i, p in enumerate(params):
            saved = state.get(i)
            if saved and all(v.shape == p.shape for k, v in saved.items() if k != "step"):
                opt.state[p] = {k: v.to(p.device).clone() for k, v in saved.items()}
        return opt


def train_loop(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], lr: float | Sequence[float], *,
               params: Sequence[torch.Tensor] | None = None, loss_fn: LossFn | None = None,
               grad_hook: GradHook | None = None, max_grad_norm: float | None = None,
               autocast: Callable[[], ContextManager[Any]] | None = None, train_mode: bool = True,
               optimizer: Optimizer | None = None, opt_state: dict[int, dict[str, torch.Tensor]] | None = None,
               dp: DPSGD | None = None) -> TrainStats:
    """Run the local optimiser (plain SGD by default) over ``batches`` and return the mean loss.

    ``lr`` is one rate or one per parameter in ``params``; ``grad_hook(params, grads) -> grads`` may change the
    gradients before the step (SCAFFOLD's correction, FedProx's proximal gradient, ...). With a stateful
    ``optimizer``, ``opt_state`` (parameter position → its optimiser state) is read before the first step and
    replaced by the state after the last one. ``dp`` (:class:`~fedforge.core.dp.DPSGD`, ``--dp-epsilon``) makes each
    step's gradient DP-SGD's: per-sample gradients of ``loss_fn`` clipped and noised before the hook and the step.
    """
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = None if optimizer is None or optimizer.plain else optimizer.build(params, lr, opt_state or {})
    loss_fn = loss_fn or cross_entropy
    ctx = autocast or nullcontext
    model.train(train_mode)
    total: torch.Tensor | None = None  # summed loss, kept on the loss's device and read once at the end
    samples = steps = 0
    for x, y in batches:
        if dp is None:
            with ctx():
                loss = loss_fn(model, x, y)
            raw = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw)]
        else:
            loss, grads = dp.gradients(model, params, loss_fn, x, y, ctx)
        if grad_hook is not None:
            grads = grad_hook(params, grads)
        if max_grad_norm is not None:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            scale = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, scale)
        if opt is None:
            sgd_step(params, grads, lr)
        else:
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        n = int(y.shape[0])
        term = loss.detach().double() * n
        total = term if total is None else total + term
        samples += n
        steps += 1
    if opt is not None:
        for p in params:
            p.grad = None
        if opt_state is not None:
            opt_state.clear()
            opt_state.update({i: {k: v.detach() for k, v in opt.state[p].items()} for i, p in enumerate(params)
                              if opt.state.get(p)})
    return TrainStats(float(total / samples) if samples and total is not None else 0.0, samples, steps)


def params_of(model: nn.Module, prefixes: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[torch.Tensor]:
    """Parameters whose names start with one of ``prefixes`` (all if None) and with none of ``exclude``."""
    out: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        if prefixes is not None and not any(name.startswith(pre) for pre in prefixes):
            continue
        if any(name.startswith(pre) for pre in exclude):
            continue
        out.append(p)
    return out


@dataclass
class EvalCounts:
    """Sums over one client's evaluation data; accuracy = correct / total.

    Label-skew diagnostics (counted when the evaluation knows which classes the client holds no training sample
    of, as :meth:`ClientRuntime.evaluate` does): ``off_class`` predictions that name such an absent class, and
    ``own_correct`` answers that are right once the absent classes' scores are masked out, both out of
    ``own_total`` samples (0 where they were not counted).

    Where the scores have one column per class: ``confusion`` (true class × predicted class counts, for macro-F1
    over the pooled predictions) and ``auc``, the client's micro-averaged one-vs-rest ROC-AUC of the softmax scores
    (as PFLlib reports it; pooled over clients weighted by their test samples).
    """

    correct: int = 0
    total: int = 0
    loss_sum: float = 0.0
    off_class: int = 0
    own_correct: int = 0
    own_total: int = 0
    confusion: np.ndarray | None = None
    auc: float = float("nan")

    @property
    def acc(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def micro_auc(probs: np.ndarray, y: np.ndarray) -> float:
    """Micro-averaged one-vs-rest ROC-AUC (scikit-learn's) of (N, C) scores; NaN where it is undefined."""
    from sklearn.metrics import roc_auc_score

    n, c = probs.shape
    if n == 0 or c < 2:
        return float("nan")
    onehot = np.zeros((n, c), dtype=np.int8)
    onehot[np.arange(n), y] = 1
    return float(roc_auc_score(onehot, probs, average="micro"))


def macro_f1(confusion: np.ndarray) -> float:
    """Mean F1 over the classes that occur as a label or a prediction (scikit-learn's ``average='macro'``)."""
    tp = np.diag(confusion).astype(np.float64)
    fp = confusion.sum(0) - tp
    fn = confusion.sum(1) - tp
    seen = (confusion.sum(0) + confusion.sum(1)) > 0
    if not seen.any():
        return float("nan")
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    return float(f1[seen].mean())


@torch.no_grad()
def eval_loop(predict: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
              autocast: Callable[[], ContextManager[Any]] | None = None, absent: torch.Tensor | None = None,
              num_classes: int | None = None) -> EvalCounts:
    """Accuracy and summed cross-entropy of ``predict(x) -> logits`` (or scores) over batches.

    ``absent``: a boolean mask over classes (True: the client holds no training sample of it); when given, and the
    scores have one column per class, the off-class and own-class counts of :class:`EvalCounts` are filled too.
    ``num_classes``: when given and the scores have that many columns, the confusion matrix and the AUC are filled.
    """
    ctx = autocast or nullcontext
    out = EvalCounts()
    any_absent = absent is not None and bool(absent.any())  # once, not per batch
    probs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for x, y in batches:
        with ctx():
            logits = predict(x)
        logits = logits.float()
        pred = logits.argmax(1)
        out.correct += int((pred == y).sum())
        out.total += int(y.numel())
        out.loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        if absent is not None and logits.shape[1] == absent.numel():
            absent = absent.to(logits.device)
            out.off_class += int(absent[pred].sum())
            own = logits.masked_fill(absent, float("-inf")).argmax(1) if any_absent else pred
            out.own_correct += int((own == y).sum())
            out.own_total += int(y.numel())
        if num_classes is not None and logits.shape[1] == num_classes:
            probs.append(logits.softmax(1).cpu())
            labels.append(y.cpu())
    if probs:
        assert num_classes is not None  # scores are kept only when it is given
        p, t = torch.cat(probs).cpu().numpy(), torch.cat(labels).cpu().numpy()  # (already host copies)
        out.confusion = np.bincount(t * num_classes + p.argmax(1), minlength=num_classes * num_classes) \
            .reshape(num_classes, num_classes)
        out.auc = micro_auc(p, t)
    return out


def summarize_counts(results: Iterable[Any]) -> dict[str, Any]:
    """One evaluation's metrics over all clients (``results``: objects with ``counts: {view: EvalCounts}``).

    For the ``global`` and ``personalized`` views: ``<view>_acc`` (pooled over all test samples), ``<view>_loss``,
    and the spread of the clients' accuracies (``_acc_std``, ``_acc_min``, ``_acc_max``); ``<view>_acc`` for any
    further view; for every view that has them, the label-skew diagnostics ``<view>_offclass`` and
    ``<view>_ownclass_acc`` (see :class:`EvalCounts`), ``<view>_auc`` (clients' AUCs weighted by their test
    samples) and ``<view>_macro_f1`` (over the pooled confusion matrix).
    """
    results = list(results)
    views = {k: [r.counts[k] for r in results if k in r.counts] for r in results for k in r.counts}
    main = ("global", "personalized")
    rec: dict[str, Any] = {}
    summ = {v: _summarize_view(views.get(v, [])) for v in sorted(views.keys() | set(main), key=lambda v: (v not in main, v))}
    for v in main:
        s = summ[v]
        rec[f"{v}_acc"] = s["acc"] if s else None
    for v in main:
        s = summ[v]
        rec[f"{v}_loss"] = s["loss"] if s else None
    for v in main:
        s = summ[v]
        if s:
            rec |= {f"{v}_acc_{k}": s[k] for k in ("std", "min", "max")}
    for v, s in summ.items():
        if v not in main:
            rec[f"{v}_acc"] = s["acc"] if s else None
    for v, s in summ.items():
        if s and s["offclass"] is not None:
            rec[f"{v}_offclass"] = s["offclass"]
            rec[f"{v}_ownclass_acc"] = s["ownclass_acc"]
    for v, s in summ.items():
        if s and s["auc"] is not None:
            rec[f"{v}_auc"] = s["auc"]
        if s and s["macro_f1"] is not None:
            rec[f"{v}_macro_f1"] = s["macro_f1"]
    return rec


def summarize_groups(results: Iterable[Any], groups: Mapping[str, Sequence[int]], label: str = "domain") -> dict[str, Any]:
    """Accuracy per group of clients (e.g. the clients of each domain of a feature-shift partition): for every view,
    ``<view>_acc_<label>/<name>`` pooled over the test samples of the group's clients that are among ``results``
    (a group none of them belongs to gets no key). The groups' accuracies, weighted by their test samples, pool to
    ``<view>_acc`` when the groups cover the clients."""
    by_cid = {r.cid: r for r in results}
    views = sorted({v for r in by_cid.values() for v in r.counts}, key=lambda v: (v not in ("global", "personalized"), v))
    out: dict[str, Any] = {}
    for v in views:
        for name, cids in groups.items():
            counts = [by_cid[c].counts[v] for c in cids if c in by_cid and v in by_cid[c].counts]
            total = sum(c.total for c in counts)
            if counts:
                out[f"{v}_acc_{label}/{name}"] = sum(c.correct for c in counts) / total if total else float("nan")
    return out


def _summarize_view(counts: list[EvalCounts]) -> dict[str, Any] | None:
    if not counts:
        return None
    correct = sum(c.correct for c in counts)
    total = sum(c.total for c in counts)
    accs = np.array([c.acc for c in counts if c.total > 0], dtype=np.float64)
    own_total = sum(c.own_total for c in counts)
    with_auc = [c for c in counts if c.total > 0 and np.isfinite(c.auc)]
    auc_n = sum(c.total for c in with_auc)
    confusions = [c.confusion for c in counts if c.confusion is not None]
    return {
        "acc": correct / total if total else float("nan"),
        "loss": sum(c.loss_sum for c in counts) / total if total else float("nan"),
        "std": float(accs.std()) if len(accs) else float("nan"),
        "min": float(accs.min()) if len(accs) else float("nan"),
        "max": float(accs.max()) if len(accs) else float("nan"),
        "offclass": sum(c.off_class for c in counts) / own_total if own_total else None,
        "ownclass_acc": sum(c.own_correct for c in counts) / own_total if own_total else None,
        "auc": sum(c.auc * c.total for c in with_auc) / auc_n if auc_n else None,
        "macro_f1": macro_f1(sum(confusions[1:], confusions[0])) if confusions else None,
    }
