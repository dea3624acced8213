"""Server optimisers by composition (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

Any algorithm that shares model weights aggregates as it always does; the server optimiser then treats the change of
the global weights, Δ = x̄ − x (x̄: what the algorithm's ``aggregate`` produced, x: the weights before the round), as a
pseudo-gradient and takes its own step from x::

    sgd      x ← x + η·Δ                                     (η = 1: plain aggregation, bit for bit)
    avgm     m ← β₁·m + Δ;                x ← x + η·m         (FedAvgM, Hsu et al. 2019)
    adagrad  v ← v + Δ²;                  x ← x + η·m/(√v + τ), m ← β₁·m + (1 − β₁)·Δ
    adam     v ← β₂·v + (1 − β₂)·Δ²;      (same x step)
    yogi     v ← v − (1 − β₂)·Δ²·sign(v − Δ²); (same x step)

Defaults follow the paper: β₁ = 0.9, β₂ = 0.99, τ = 10⁻³, v₀ = τ² (its Algorithm 2). The step applies to the
model's parameters (floating ``state_dict`` entries that are parameters, not buffers such as BatchNorm statistics,
which keep the algorithm's aggregate); its state (m, v) lives in the server state under ``server_opt/`` and is
checkpointed with it. Combine with any weight-sharing algorithm: ``--server-opt adam --server-lr 0.01``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

KINDS = ("sgd", "avgm", "adagrad", "adam", "yogi")
PREFIX = "server_opt/"
RESERVED = (PREFIX, "privacy/")  # server-state entries of compositions around aggregate, out of the algorithm's view


@dataclass(frozen=True)
class ServerOptimizer:
    kind: str
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def check(self, server: dict[str, torch.Tensor], params: set[str]) -> set[str]:
        """The server-state entries it steps (the model's floating parameters), or a ConfigError when there are none."""
        names = {k for k in params if k in server and server[k].is_floating_point()}
        if not names:
            raise ConfigError(f"--server-opt {self.kind} steps the global model's weights, but this algorithm's server "
                              f"state holds none (it shares prototypes, logits or heads only); leave --server-opt out.")
        return names

    def step(self, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor],
             names: set[str]) -> dict[str, torch.Tensor]:
        """The server state after the optimiser's step from ``old`` (which holds the optimiser's state under
        ``server_opt/``) given the algorithm's aggregate ``new``."""
        out = dict(new)
        for k in sorted(names):
            x, agg = old[k], new[k]
            delta = agg - x
            if self.kind == "sgd":
                out[k] = agg + (self.lr - 1.0) * delta  # η = 1 leaves the aggregate exactly as it is
                continue
            m = old.get(f"{PREFIX}m/{k}", torch.zeros_like(x))
            if self.kind == "avgm":
                m = self.beta1 * m + delta
                out[k] = x + self.lr * m
                out[f"{PREFIX}m/{k}"] = m
                continue
            v = old.get(f"{PREFIX}v/{k}", torch.full_like(x, self.tau ** 2))
            m = self.beta1 * m + (1.0 - self.beta1) * delta
            d2 = delta * delta
            if self.kind == "adagrad":
                v = v + d2
            elif self.kind == "adam":
                v = self.beta2 * v + (1.0 - self.beta2) * d2
            else:  # yogi
                v = v - (1.0 - self.beta2) * d2 * torch.sign(v - d2)
            out[k] = x + self.lr * m / (v.sqrt() + self.tau)
            out[f"{PREFIX}m/{k}"], out[f"{PREFIX}v/{k}"] = m, v
        return out


def algorithm_view(server: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The server state as the algorithm knows it (without the server optimiser's or the privacy step's state)."""
    return {k: v for k, v in server.items() if not k.startswith(RESERVED)}
