"""Device memory: a run's peak (``summary.json``'s ``peak_gpu_memory_mb``) and the ``--gpu-memory`` budget that sizes
the vectorized executor's chunks of clients.

The peak is ``torch.cuda.max_memory_allocated`` of the run's device since the run started (this process's tensors; a
process pool's workers are not seen). Nothing here resets the allocator's peak counter during a run, so other
measurements of it (``benchmarks/gpu_check.py``) stay whole.

A chunk's size comes from an estimate of one client's memory (:func:`per_client_bytes`: its stacked weights,
gradients, update temporaries and activations) and, on a GPU, from the measured peak of an earlier chunk
(:class:`ChunkSizer`), so that the run stays under the budget.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def _cuda(device: str | torch.device) -> torch.device | None:
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return dev


def start_run(device: str | torch.device) -> None:
    """Forget earlier peaks of ``device`` (a run starts)."""
    dev = _cuda(device)
    if dev is not None:
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gpu_memory_mb(device: str | torch.device) -> float | None:
    """Peak memory allocated on the run's GPU since the run started, in MiB; None on a CPU run."""
    dev = _cuda(device)
    if dev is None:
        return None
    return round(int(torch.cuda.max_memory_allocated(dev)) / 2**20, 1)


def allocated(device: str | torch.device) -> int:
    """Bytes allocated on ``device`` now (0 on a CPU)."""
    dev = _cuda(device)
    return int(torch.cuda.memory_allocated(dev)) if dev is not None else 0


def peak(device: str | torch.device) -> int:
    """The allocator's peak of ``device`` so far (0 on a CPU)."""
    dev = _cuda(device)
    return int(torch.cuda.max_memory_allocated(dev)) if dev is not None else 0


_ACTIVATIONS: dict[tuple[Any, ...], int] = {}


def activation_elements(model: nn.Module, x: torch.Tensor) -> int:
    """Elements of every leaf module's output per sample of the batch ``x`` (a training-mode forward; cached per
    model and sample shape)."""
    key = (id(model), tuple(x.shape[1:]), str(x.device))
    if key in _ACTIVATIONS:
        return _ACTIVATIONS[key]
    total = 0

    def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was = model.training
    try:
        model.train()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    _ACTIVATIONS[key] = max(1, total // max(1, x.shape[0]))
    return _ACTIVATIONS[key]


def per_client_bytes(num_params: int, models: int, activations: int, batch: int, sample_bytes: int,
                     extra: int = 0) -> int:
    """Estimated device bytes of one client in a vectorized training step: ``models`` stacked weight sets
    (trained and frozen), the gradients and update temporaries of one of them, the batch, and its activations
    (kept for the backward pass, their gradients, and vmap's temporaries: about three times the forward's)."""
    weights = 4 * num_params * (models + 2)
    acts = 4 * activations * batch * 3
    return weights + acts + batch * sample_bytes * 5 + extra


class ChunkSizer:
    """How many clients to process at once under a memory budget (``budget_gb``; None: ``cap`` or ``default``).

    The budget, minus what the device already holds, divided by the bytes per client: the estimate until a chunk of
    the same kind was measured on a GPU (a chunk that raised the device's peak tells its own peak), then that."""

    def __init__(self, budget_gb: float | None, device: torch.device, cap: int | None, default: int):
        self.budget = None if budget_gb is None else int(budget_gb * 1e9)
        self.device = device
        self.cap = cap
        self.default = default
        self.measured: dict[Any, float] = {}

    def size(self, key: Any, estimate: int) -> int:
        if self.budget is None:
            return self.cap or self.default
        per = self.measured.get(key, float(estimate))
        room = self.budget - allocated(self.device)
        n = max(1, int(room * 0.9 // max(per, 1.0)))
        return min(n, self.cap) if self.cap else n

    def begin(self) -> tuple[int, int]:
        """Call before a chunk: (bytes held, the peak so far)."""
        return allocated(self.device), peak(self.device)

    def observe(self, key: Any, clients: int, before: tuple[int, int]) -> None:
        """Call after a chunk of ``clients`` (GPU only: CPU memory is not measured)."""
        if self.budget is None or clients <= 0 or _cuda(self.device) is None:
            return
        base, old_peak = before
        now = peak(self.device)
        if now > old_peak:  # the chunk set a new peak: that is its own
            self.measured[key] = 1.05 * (now - base) / clients
