"""Models for sensor series (C, L): the HAR-CNN of the FL-IoT/PFLlib literature, a 1-D CNN, and HtFLlib's
heterogeneous sensor groups (``HtFE-sen-*``).

``harcnn`` is the HAR-CNN of FL-IoT and PFLlib (after Wang et al.'s activity-recognition CNN): two blocks of a
(1×9) convolution (32, then 64 channels), ReLU and a (1×2) max-pool with stride 2, then Linear(→1024) · ReLU ·
Linear(1024→512) · ReLU · Linear(512→K). Its layers have the reference's shapes (the convolutions are 2-D with a
1×k kernel over the series seen as (C, 1, L)), so weights load across. On HAR (9 × 128) it has 2,253,958 parameters,
as FL-IoT's ``HARCNN(9, dim_hidden=1664, num_classes=6)``. The split: features end at the 512-d ReLU layer, the
head is the last Linear (as the zoo's ``cnn``); PFLlib's ``BaseHeadSplit`` makes the whole three-layer ``fc`` block
its head instead.

PAMAP2's windows (9 signals × 3 IMUs × 256) arrive as 27 channels (``pfllib:`` flattens the IMU rows into
channels), so ``harcnn``'s first convolution reads all three IMUs. FL-IoT's HARCNN reads them as 9 channels of 3
rows, and its stride-2 pooling (which strides the row axis too) leaves only the first IMU's row at the classifier;
both end with 64 × 58 = 3,712 flattened values.

HtFLlib's sensor members (``ht_harcnn-s1`` …) are its ``HARCNN``/``HARCNN1``/``HARCNN3`` convolution stacks with
stride 1, 2 or 3, flattened and average-pooled to the common 512-d feature (HtFLlib's ``BaseHeadSplit`` replaces
the whole ``fc`` block with ``AdaptiveAvgPool1d(512)``) and a ``Linear(512, K)`` head.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from .groups import GROUPS
from .hetero import FEATURE_DIM, PoolTo
from .zoo import MODELS, FedModel

SERIES = ("series",)


class SeriesConv(nn.Module):
    """Blocks of Conv2d(1×kernel, stride) · ReLU · MaxPool2d(1×2, stride 2) over a series seen as (C, 1, L), flattened."""

    def __init__(self, in_channels: int, widths: Sequence[int] = (32, 64), kernel: int = 9, stride: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers.append(nn.Sequential(nn.Conv2d(c, w, kernel_size=(1, kernel), stride=stride), nn.ReLU(),
                                        nn.MaxPool2d(kernel_size=(1, 2), stride=2)))
            c = w
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.blocks(x.unsqueeze(2)), 1)


def _flat_width(body: nn.Module, input_shape: tuple[int, ...], name: str) -> int:
    """The flattened output width of ``body`` for one input (ConfigError when the series is too short)."""
    c, length = input_shape
    try:
        with torch.no_grad():
            return int(body(torch.zeros(1, c, length)).shape[1])
    except RuntimeError:
        raise ConfigError(f"model '{name}' needs longer series than {length} steps (its convolutions and pooling "
                          f"shrink them to nothing); use cnn1d or mlp for short series.") from None


def _series_shape(input_shape: tuple[int, ...], name: str) -> tuple[int, int]:
    if len(input_shape) != 2:
        raise ConfigError(f"model '{name}' takes series (C, L), got input shape {tuple(input_shape)}.")
    return int(input_shape[0]), int(input_shape[1])


@MODELS.register("harcnn", inputs=SERIES,
                 summary="HAR-CNN of FL-IoT/PFLlib for sensor series: 2 × (conv 1×9 · pool) → fc1024 → fc512 → head")
def harcnn(input_shape: tuple[int, ...], num_classes: int, kernel: int = 9, hidden: int = 1024,
           feature_dim: int = 512) -> FedModel:
    c, length = _series_shape(input_shape, "harcnn")
    conv = SeriesConv(c, (32, 64), kernel)
    flat = _flat_width(conv, (c, length), "harcnn")
    features = nn.Sequential(conv, nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim), nn.ReLU())
    return FedModel(features, nn.Linear(feature_dim, num_classes), feature_dim, "harcnn")


class Conv1dTrunk(nn.Module):
    """Conv1d(k 5, 'same') · BatchNorm · ReLU blocks (max-pool 2 between them), global average pooling, Linear · ReLU."""

    def __init__(self, in_channels: int, widths: Sequence[int], feature_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv1d(c, w, 5, padding=2), nn.BatchNorm1d(w), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool1d(2, ceil_mode=True))
            c = w
        self.body = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Linear(c, feature_dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(dim=2))


@MODELS.register("cnn1d", inputs=SERIES,
                 summary="1-D CNN for sensor series of any length: 3 × (conv5 · BN · ReLU) 64/128/256, global average "
                         "pool → fc512 → head")
def cnn1d(input_shape: tuple[int, ...], num_classes: int, feature_dim: int = 512) -> FedModel:
    c, _ = _series_shape(input_shape, "cnn1d")
    return FedModel(Conv1dTrunk(c, (64, 128, 256), feature_dim), nn.Linear(feature_dim, num_classes), feature_dim, "cnn1d")


# ------------------------------------------------------------------------------- HtFLlib's sensor members
# name → (conv widths, kernel, stride): HtFLlib's HARCNN (32, 64; 1×9), HARCNN1 (32; 1×9), HARCNN3 (32, 64, 128; 1×5)
_HT_SENSOR = {
    f"ht_harcnn-s{s}": ((32, 64), 9, s) for s in (1, 2, 3)
} | {
    f"ht_harcnn1-s{s}": ((32,), 9, s) for s in (1, 2, 3)
} | {
    f"ht_harcnn3-s{s}": ((32, 64, 128), 5, s) for s in (1, 2)
}


def _ht_sensor(name: str, widths: tuple[int, ...], kernel: int, stride: int):
    def build(input_shape: tuple[int, ...], num_classes: int, feature_dim: int = FEATURE_DIM) -> FedModel:
        c, length = _series_shape(input_shape, name)
        conv = SeriesConv(c, widths, kernel, stride)
        _flat_width(conv, (c, length), name)
        return FedModel(nn.Sequential(conv, PoolTo(feature_dim)), nn.Linear(feature_dim, num_classes), feature_dim, name)

    return build


for _name, (_widths, _kernel, _stride) in _HT_SENSOR.items():
    MODELS.add(_name, _ht_sensor(_name, _widths, _kernel, _stride), inputs=SERIES,
               summary=f"HtFL sensor member: {len(_widths)} conv block(s) {'/'.join(map(str, _widths))} (1×{_kernel}, "
                       f"stride {_stride}), flattened and average-pooled to 512, linear head")

_SEN = ["ht_harcnn-s1", "ht_harcnn-s2", "ht_harcnn-s3"]
for _g, _members in {
    "htfe-sen-2": _SEN[:2],
    "htfe-sen-3": _SEN,
    "htfe-sen-5": _SEN + ["ht_harcnn1-s1", "ht_harcnn3-s1"],
    "htfe-sen-8": _SEN + ["ht_harcnn1-s1", "ht_harcnn1-s2", "ht_harcnn1-s3", "ht_harcnn3-s1", "ht_harcnn3-s2"],
}.items():
    GROUPS.add(_g, list(_members), summary=f"HtFLlib {_g.replace('htfe-sen', 'HtFE-sen')} (sensor series): "
                                           + ", ".join(_members))

__all__ = ["Conv1dTrunk", "SeriesConv"]
