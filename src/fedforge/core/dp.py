"""Client-level differential privacy: DP-SGD inside the one training loop (Abadi et al., "Deep Learning with
Differential Privacy", CCS 2016).

With ``--dp-epsilon ε`` every step of :func:`~fedforge.core.training.train_loop` — hence every algorithm's
``rt.train(...)``, which knows nothing of it — becomes a DP-SGD step on the batch B_t::

    g_i   = ∇ℓ(w; x_i, y_i)                          per-sample gradients of the algorithm's own loss
    ḡ_i   = g_i · min(1, C / ‖g_i‖)                  each clipped to norm C (‖·‖ over all trained parameters)
    g̃     = (Σ_i ḡ_i + N(0, σ²C²·I)) / |B_t|         Gaussian noise on the sum, averaged over the batch

and the algorithm's gradient hook (FedProx's pull, SCAFFOLD's correction, ...), ``max_grad_norm`` and the local
optimiser then act on g̃ as on any gradient (post-processing of a private quantity).

Per-sample gradients come from ``torch.func`` (``vmap`` of ``grad`` over the batch, each sample run through the
algorithm's loss as a batch of one, the trained parameters swapped in with ``functional_call``), not from Opacus's
``GradSampleModule``: the loss an algorithm hands to ``rt.train`` may run the model's parts (``m.features``,
``m.head``), other models and extra terms, which ``GradSampleModule``'s per-layer hooks do not see as one loss, and the
worker's model must stay the plain module loaded in place (no ``_module.`` wrapper). A loss ``vmap`` cannot batch
(recurrent layers, data-dependent branches) or parameters outside the model (trained jointly with another model) fall
back to one backward pass per sample: the same numbers, slower.

σ comes from the target (ε, δ) over the client's whole training with Opacus's RDP accountant
(``opacus.accountants.utils.get_noise_multiplier``): T = rounds × passes × steps per pass DP steps at sampling rate
q = B / n_i (1 when the client holds at most one batch). RDP rather than PRV because it is a closed form that is
stable for every (q, T) — including q = 1 and a handful of steps, where PRV's numerical composition fails or needs
tuning — and costs a fraction of a second per client; it is the accountant of Abadi et al. and Opacus's default. It is
a valid upper bound, slightly looser than PRV (so σ is slightly larger than strictly needed).

Assumptions, stated: the accountant's analysis is for Poisson sampling of each example with probability q; the
federation draws shuffled fixed-size batches (sampling without replacement), the usual approximation (Abadi et al.,
Opacus without ``poisson_sampling``). Each client is calibrated as if it took part in every round (an upper bound
when ``--join-ratio`` < 1). Every ``rt.train`` step counts: an algorithm that trains twice per round on the private
data (Ditto: global and personal model) spends two passes; tell the calibration with ``--dp-epochs`` (the metrics
report what was really spent either way). Gradients an algorithm computes outside ``rt.train`` (Per-FedAvg's
meta-gradient, FedAS's Fisher information, FedL2G's) are not covered.

The number of DP steps a client has taken lives in its state under ``dp/steps`` (taken out before the algorithm sees
the state and put back after it, like the optimiser's ``optim/``), so it is checkpointed and a resumed run continues
the count bit for bit; the spent ε is the accountant's value for those steps.
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError

log = logging.getLogger("fedforge")

PREFIX = "dp/"  # client-state prefix of the DP accountant's state
STEPS = "dp/steps"  # DP-SGD steps this client has taken so far (int64 scalar)
ACCOUNTANT = "rdp"
INSTALL_HINT = "differential privacy needs Opacus: pip install 'fedforge[dp]'"


def _opacus() -> Any:
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise ConfigError(f"{INSTALL_HINT}.") from None
    return opacus


# --------------------------------------------------------------------------------------------- accountant
@functools.lru_cache(maxsize=4096)  # a pure function of its arguments; a resumed or repeated set-up reuses it
def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """σ such that ``steps`` subsampled Gaussian steps at ``sample_rate`` are (ε, δ)-DP under Opacus's RDP
    accountant (its ``get_noise_multiplier``; 0 when there is no step)."""
    _opacus()
    from opacus.accountants.utils import get_noise_multiplier

    if steps <= 0:
        return 0.0
    with _quiet():
        try:
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                              steps=steps, accountant=ACCOUNTANT))
        except ValueError as e:
            raise ConfigError(f"no noise level reaches ε = {epsilon:g} at δ = {delta:g} over {steps} steps at sampling "
                              f"rate {sample_rate:.4g} ({e}); raise --dp-epsilon or --dp-delta, or train fewer "
                              f"steps.") from None


def epsilon_spent(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε after ``steps`` subsampled Gaussian steps of noise multiplier ``sigma`` (Opacus's RDP accountant);
    0 before any step, ∞ without noise."""
    if steps <= 0:
        return 0.0
    if sigma <= 0:
        return math.inf
    _opacus()
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(sigma), float(sample_rate), int(steps))]
    with _quiet():
        return float(acc.get_epsilon(delta=delta))


class _quiet(warnings.catch_warnings):
    """Silence the RDP accountant's note that the best order is the largest it tries (its bound is then a little
    loose, never wrong)."""

    def __enter__(self) -> Any:
        out = super().__enter__()
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        return out


def steps_per_pass(n: int, batch_size: int) -> int:
    """Batches per pass over ``n`` samples as the federation cuts them (an incomplete last batch dropped unless it
    is the only one)."""
    return n // batch_size if n > batch_size else (1 if n else 0)


def sample_rate(n: int, batch_size: int) -> float:
    return min(1.0, batch_size / n) if n else 1.0


@dataclass(frozen=True)
class ClientDP:
    """Client-level DP-SGD of a run: the target (ε, δ), the clip norm C, and each client's sampling rate, planned
    steps and noise multiplier σ_i (calibrated once at set-up, so every worker uses the same numbers)."""

    epsilon: float
    delta: float
    max_grad_norm: float
    sample_rates: tuple[float, ...]
    planned_steps: tuple[int, ...]
    sigmas: tuple[float, ...]

    def sgd(self, cid: int, generator: torch.Generator) -> DPSGD:
        return DPSGD(self.max_grad_norm, self.sigmas[cid], generator)

    def epsilon_after(self, cid: int, steps: int) -> float:
        """ε client ``cid`` has spent after ``steps`` DP-SGD steps (at δ)."""
        return epsilon_spent(self.sigmas[cid], self.sample_rates[cid], steps, self.delta)


def client_dp(epsilon: float, delta: float, max_grad_norm: float, train_sizes: Sequence[int], batch_size: int,
              rounds: int, epochs: int) -> ClientDP:
    """Calibrate σ_i for every client: T_i = rounds × epochs × steps per pass, q_i = B / n_i (clients with the same
    (q, T) share one computation)."""
    rates = tuple(sample_rate(n, batch_size) for n in train_sizes)
    planned = tuple(rounds * epochs * steps_per_pass(n, batch_size) for n in train_sizes)
    cache: dict[tuple[float, int], float] = {}
    distinct = len(set(zip(rates, planned)))
    if distinct > 1:
        log.info("DP-SGD: calibrating the noise of %d client sizes for ε = %g, δ = %g (RDP accountant)", distinct,
                 epsilon, delta)
    sigmas = []
    for q, t in zip(rates, planned):
        if (q, t) not in cache:
            cache[(q, t)] = noise_multiplier(epsilon, delta, q, t)
        sigmas.append(cache[(q, t)])
    return ClientDP(epsilon, delta, max_grad_norm, rates, planned, tuple(sigmas))


# ------------------------------------------------------------------------------------------- the models
def check_model(model: nn.Module, arch: str = "") -> None:
    """Refuse a model whose layers mix the samples of a batch (BatchNorm; InstanceNorm with running statistics),
    as Opacus's ``ModuleValidator`` finds them: a per-sample gradient is not defined there."""
    _opacus()
    from opacus.validators import ModuleValidator

    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._NormBase):
            continue
        if ModuleValidator.validate(m, strict=False):
            raise ConfigError(f"differential privacy needs per-sample gradients, but model {arch or type(model).__name__} "
                              f"has {type(m).__name__} ('{name}'), which mixes the samples of a batch; use a model "
                              f"without BatchNorm (e.g. cnn instead of cnn_bn) or leave --dp-epsilon out.")


# ------------------------------------------------------------------------------------- per-sample gradients
class _LossModule(nn.Module):
    """The algorithm's loss as a module whose only submodule is the model, so that ``functional_call`` can swap the
    model's trained parameters for the duration of the loss (``m(x)``, ``m.features``, ``m.head`` included)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, x, y)


def per_sample_gradients(model: nn.Module, params: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
                         x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(per-sample losses (B,), per-sample gradients [(B, *p.shape) for p in params]): the loss of each sample as a
    batch of one, differentiated with ``torch.func`` (``vmap`` of ``grad_and_value``) when every trained tensor is a
    parameter of ``model``, else (or where ``vmap`` cannot batch the loss) one backward pass per sample."""
    names = {id(p): n for n, p in model.named_parameters()}
    if all(id(p) in names for p in params):
        try:
            return _vmapped(model, [names[id(p)] for p in params], params, loss_fn, x, y)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            if not _vmap_limit(e):
                raise
            log.debug("DP-SGD: vmap cannot batch this loss (%s); one backward pass per sample", e)
    return _looped(model, params, loss_fn, x, y)


def _vmap_limit(e: BaseException) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("vmap", "batching rule", "batched tensor", "functorch", "data-dependent",
                                   "item()", "not supported", "not implemented"))


def _vmapped(model: nn.Module, names: list[str], params: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
             x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    wrapper = _LossModule(model, loss_fn)
    trained = {f"model.{n}": p.detach() for n, p in zip(names, params)}

    def one(ps: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(wrapper, ps, (xi.unsqueeze(0), yi.unsqueeze(0)))
        return out

    grads, losses = torch.func.vmap(torch.func.grad_and_value(one), in_dims=(None, 0, 0), randomness="different")(
        trained, x, y)
    return losses, [grads[f"model.{n}"] for n in names]


def _looped(model: nn.Module, params: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor], x: torch.Tensor,
            y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    losses: list[torch.Tensor] = []
    per: list[list[torch.Tensor]] = [[] for _ in params]
    for i in range(int(y.shape[0])):
        loss = loss_fn(model, x[i:i + 1], y[i:i + 1])
        gs = torch.autograd.grad(loss, list(params), allow_unused=True)
        for slot, p, g in zip(per, params, gs):
            slot.append(torch.zeros_like(p) if g is None else g)
        losses.append(loss.detach())
    return torch.stack(losses), [torch.stack(s) for s in per]


def clip_per_sample(per_sample: Sequence[torch.Tensor], max_grad_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each sample's gradient scaled by min(1, C / ‖g_i‖) (the norm over all tensors, as Opacus's flat clipping);
    returns the clipped per-sample gradients and the factors."""
    b = per_sample[0].shape[0]
    norms = torch.linalg.vector_norm(torch.stack([g.reshape(b, -1).norm(2, dim=1) for g in per_sample], dim=1), dim=1)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return [g * factor.view(-1, *([1] * (g.dim() - 1))).to(g.dtype) for g in per_sample], factor


def noisy_mean(clipped: Sequence[torch.Tensor], max_grad_norm: float, sigma: float,
               generator: torch.Generator | None) -> list[torch.Tensor]:
    """(Σ_i ḡ_i + N(0, σ²C²)) / B for each tensor, the noise drawn from ``generator`` (on the gradients' device)."""
    out = []
    for g in clipped:
        total = g.sum(0)
        if sigma > 0:
            noise = torch.randn(total.shape, generator=generator, device=total.device, dtype=total.dtype)
            total = total + noise * (sigma * max_grad_norm)
        out.append(total / g.shape[0])
    return out


@dataclass
class DPSGD:
    """What :func:`~fedforge.core.training.train_loop` asks for the gradient of a batch under DP-SGD: clip C, noise
    multiplier σ and the task's noise generator (on the device)."""

    max_grad_norm: float
    noise_multiplier: float
    generator: torch.Generator | None = None

    def gradients(self, model: nn.Module, params: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
                  x: torch.Tensor, y: torch.Tensor, autocast: Callable[[], ContextManager[Any]]
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the batch's mean loss, the private gradient of each tensor in ``params``)."""
        with autocast():
            losses, per = per_sample_gradients(model, params, loss_fn, x, y)
        clipped, _ = clip_per_sample([g.float() if g.dtype != p.dtype else g for g, p in zip(per, params)],
                                     self.max_grad_norm)
        grads = noisy_mean(clipped, self.max_grad_norm, self.noise_multiplier, self.generator)
        return losses.detach().float().mean(), [g.to(p.dtype) for g, p in zip(grads, params)]


# -------------------------------------------------------------------------------- the client's state
def take_steps(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """(the state without ``dp/`` entries, the DP steps taken so far)."""
    if not any(k.startswith(PREFIX) for k in state):
        return state, 0
    steps = int(state[STEPS]) if STEPS in state else 0
    return {k: v for k, v in state.items() if not k.startswith(PREFIX)}, steps


def give_steps(state: dict[str, torch.Tensor], steps: int) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    out[STEPS] = torch.tensor(int(steps), dtype=torch.int64)
    return out
