"""Small helpers shared by FedALA, FedCP, GPFL and FedDBE (not an algorithm; not auto-imported).

* :func:`require_split` checks, once at start-up, that the run's model is a feature extractor plus a trainable head
  whose ``features(x)`` returns vectors of ``feature_dim`` (the split these methods act on);
* :func:`seeded` builds extra modules (policy net, GCE, CoV) deterministically from the run's seed, so the server
  state every client starts from is the same on every executor;
* :func:`gumbel_softmax` draws its noise from the task's own generator (``rt.gen``), never from global randomness;
* :func:`head_weight` folds a head's weight matrices into one (classes × feature_dim) matrix.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.context import Context, derive_seed
from ..errors import ConfigError
from ..models import FedModel


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global generator seeded, restoring the caller's random state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % (2**63))
        yield


def module_seed(ctx: Context, algorithm: str, part: str) -> int:
    """The seed an algorithm's extra module ``part`` is initialised from (same for every client and executor)."""
    return derive_seed(ctx.seed, "init", algorithm, part)


def require_split(ctx: Context, algorithm: str) -> FedModel:
    """The run's model, after checking it has the feature-extractor/head split ``algorithm`` needs.

    Raises a ConfigError naming the model and the fix when the model is not a FedModel, its head has no trainable
    parameters, or ``features(x)`` does not return vectors of ``feature_dim``.
    """
    arch = ctx.archs[0]
    model = ctx.build_model(arch)
    fix = "use a model built as FedModel(features, head, feature_dim), such as cnn, mlp or resnet18"
    if not isinstance(model, FedModel) or not isinstance(getattr(model, "head", None), nn.Module):
        raise ConfigError(f"{algorithm} needs a model split into a feature extractor and a head, and '{arch}' is not; {fix}.")
    if not any(True for _ in model.head.parameters()):
        raise ConfigError(f"{algorithm} trains a personal head, but model '{arch}' has a head without parameters; {fix}.")
    with torch.no_grad():
        was = model.training
        model.eval()
        z = model.features(torch.zeros(2, *ctx.input_shape, device=next(model.parameters()).device))
        model.train(was)
    if z.dim() != 2 or z.shape[1] != model.feature_dim or model.feature_dim <= 0:
        raise ConfigError(f"{algorithm} needs features(x) to return vectors of feature_dim={model.feature_dim}, but model "
                          f"'{arch}' returns shape {tuple(z.shape[1:])}; {fix}.")
    return model


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None, dim: int = -1) -> torch.Tensor:
    """softmax((logits + g) / tau) with g ~ Gumbel(0, 1) drawn from ``generator`` (on the generator's device, then
    moved to the logits'); without a generator, no noise."""
    if generator is None:
        return F.softmax(logits / tau, dim=dim)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float32, device=generator.device)
    u = u.to(logits.device, logits.dtype)
    g = -torch.log(-torch.log(u.clamp_(1e-20, 1.0 - 1e-7)))
    return F.softmax((logits + g) / tau, dim=dim)


def head_weight(head: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The head's weight matrices multiplied into one (classes × feature_dim) matrix (a linear head: its weight)."""
    mats = [v for k, v in head.items() if k.endswith("weight") and v.dim() == 2]
    if not mats:
        raise ConfigError("the head has no weight matrix to derive the client's context from; use a linear head.")
    w = mats[-1]
    for m in reversed(mats[:-1]):
        w = w @ m
    return w.detach()


def params_for(msg: Mapping[str, torch.Tensor], prefix: str, device: torch.device | str | None = None,
               trainable: bool = True) -> dict[str, torch.Tensor]:
    """Copies of the entries ``prefix/...`` of a message (names without the prefix), on ``device``, as trainable
    leaves unless ``trainable`` is False."""
    p = prefix + "/"
    return {k[len(p):]: v.detach().to(device).clone().requires_grad_(trainable) for k, v in msg.items() if k.startswith(p)}
