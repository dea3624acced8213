"""The one local SGD loop. Algorithms supply a loss, the parameters to update, and optionally a gradient hook.

Plain SGD without momentum or weight decay, as in PFLlib and the papers it reproduces; a step is
``p ← p − lr·g`` applied with one fused ``_foreach_add_``. Parameters left out of ``params`` are frozen
(autograd does not even compute their gradients).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

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

    def merge(self, other: "TrainStats") -> "TrainStats":
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


def train_loop(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], lr: float | Sequence[float], *,
               params: Sequence[torch.Tensor] | None = None, loss_fn: LossFn | None = None,
               grad_hook: GradHook | None = None, max_grad_norm: float | None = None,
               autocast: Callable[[], ContextManager] | None = None, train_mode: bool = True) -> TrainStats:
    """Run SGD over ``batches`` and return the mean loss.

    ``lr`` is one rate or one per parameter in ``params``; ``grad_hook(params, grads) -> grads`` may change the
    gradients before the step (SCAFFOLD's correction, FedProx's proximal gradient, ...).
    """
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    loss_fn = loss_fn or cross_entropy
    ctx = autocast or nullcontext
    model.train(train_mode)
    total = torch.zeros((), dtype=torch.float64)
    samples = steps = 0
    for x, y in batches:
        with ctx():
            loss = loss_fn(model, x, y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if grad_hook is not None:
            grads = grad_hook(params, grads)
        if max_grad_norm is not None:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            scale = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, scale)
        sgd_step(params, grads, lr)
        n = int(y.shape[0])
        total += loss.detach().double() * n
        samples += n
        steps += 1
    return TrainStats(float(total / samples) if samples else 0.0, samples, steps)


def params_of(model: nn.Module, prefixes: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[torch.Tensor]:
    """Parameters whose names start with one of ``prefixes`` (all if None) and with none of ``exclude``."""
    out = []
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
    """

    correct: int = 0
    total: int = 0
    loss_sum: float = 0.0
    off_class: int = 0
    own_correct: int = 0
    own_total: int = 0

    @property
    def acc(self) -> float:
        return self.correct / self.total if self.total else float("nan")


@torch.no_grad()
def eval_loop(predict: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
              autocast: Callable[[], ContextManager] | None = None, absent: torch.Tensor | None = None) -> EvalCounts:
    """Accuracy and summed cross-entropy of ``predict(x) -> logits`` (or scores) over batches.

    ``absent``: a boolean mask over classes (True: the client holds no training sample of it); when given, and the
    scores have one column per class, the off-class and own-class counts of :class:`EvalCounts` are filled too.
    """
    ctx = autocast or nullcontext
    out = EvalCounts()
    any_absent = absent is not None and bool(absent.any())  # once, not per batch
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
    return out
