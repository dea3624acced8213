"""Messages and states are flat mappings of names to tensors.

Model weights use their ``state_dict`` names (``features.0.weight``); anything else uses a name with a
``/`` (``control/features.0.weight``, ``proto/3``), which no ``state_dict`` key contains. The engine counts
the bytes of every message it moves, so communication cost is measured, not estimated.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence, overload

import torch

Message = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


def nbytes(msg: Mapping[str, torch.Tensor] | None) -> int:
    """Bytes of the tensors in a message (the payload that would cross the network)."""
    if not msg:
        return 0
    return int(sum(t.numel() * t.element_size() for t in msg.values()))


def numel(msg: Mapping[str, torch.Tensor] | None) -> int:
    """Number of scalars in a message (papers report communication in parameters)."""
    if not msg:
        return 0
    return int(sum(t.numel() for t in msg.values()))


def with_prefix(d: Mapping[str, torch.Tensor], prefix: str) -> Message:
    return {f"{prefix}/{k}": v for k, v in d.items()}


def under(d: Mapping[str, torch.Tensor], prefix: str) -> Message:
    """Entries named ``prefix/...``, with the prefix removed."""
    p = prefix + "/"
    return {k[len(p):]: v for k, v in d.items() if k.startswith(p)}


def model_entries(d: Mapping[str, torch.Tensor]) -> Message:
    """Entries that are model weights (no ``/`` in the name)."""
    return {k: v for k, v in d.items() if "/" not in k}


@overload
def to_device(d: Mapping[str, torch.Tensor], device: str | torch.device) -> Message: ...
@overload
def to_device(d: None, device: str | torch.device) -> None: ...
@overload
def to_device(d: Mapping[str, torch.Tensor] | None, device: str | torch.device) -> Message | None: ...
def to_device(d: Mapping[str, torch.Tensor] | None, device: str | torch.device) -> Message | None:
    """The same entries on ``device`` (tensors already there are passed as they are, not copied)."""
    if d is None:
        return None
    dev = torch.device(device)
    return {k: v if v.device == dev else v.to(dev) for k, v in d.items()}


def detach_clone(d: Mapping[str, torch.Tensor]) -> Message:
    return {k: v.detach().clone() for k, v in d.items()}


def weighted_average(dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                     keys: Iterable[str] | None = None) -> Message:
    """Weighted mean of floating tensors; integer tensors (e.g. BatchNorm's step counter) take the maximum."""
    if not dicts:
        return {}
    keys = list(keys) if keys is not None else list(dicts[0].keys())
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if w.sum() <= 0:
        w = torch.ones_like(w)
    shares: list[float] = (w / w.sum()).tolist()
    out: Message = {}
    for k in keys:
        first = dicts[0][k]
        if first.is_floating_point() or first.is_complex():
            acc = torch.zeros_like(first, dtype=torch.float64 if first.dtype == torch.float64 else torch.float32)
            for d, wi in zip(dicts, shares):
                acc.add_(d[k].to(acc.dtype) * wi)  # multiply, then add (as PFLlib: its aggregates are then bit-identical)
            out[k] = acc.to(first.dtype)
        else:
            out[k] = torch.stack([d[k] for d in dicts]).amax(0)
    return out
