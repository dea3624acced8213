"""Architectures and named groups for heterogeneous-model FL (HtFL).

Two families are registered here.

**Stand-alone models** follow the zoo's convention (``resnet18`` in :mod:`.zoo`): ``resnet4``/``6``/``8``/``10``/
``50``/``101``/``152`` get the small-input ResNet stem below 64 px (3×3 stride-1 convolution, no max-pool) and keep
their native feature width (64/128/256/512/2048/2048/2048); ``googlenet`` is torchvision's GoogLeNet (1024-d features);
``vit_b_16``/``vit_b_32`` are torchvision's ViT-B at the input resolution (768-d class token).

**Group members** (``ht_*``) are what the HtFL literature runs (HtFLlib's ``BaseHeadSplit``): the torchvision
architecture *unmodified* (ImageNet stem: ResNets keep the 7×7 stride-2 convolution and max-pool, MobileNetV2 its
stride-2 first convolution, GoogLeNet its stem) with only the first convolution's input channels set to the data's
(1 for MNIST-like images); the classifier is removed and the flat backbone output is average-pooled to the common
feature dimension (512 by default) with parameter-free 1-D adaptive average pooling, exactly as HtFLlib does
(ResNet-50's 2048-d and GoogLeNet's 1024-d vectors are averaged in windows, ResNet-4's 64-d vector is repeated).
Dropout in front of the removed classifier stays, as in HtFLlib (GoogLeNet's and MobileNetV2's, p 0.2).
The head is ``Linear(512, C)``; ViT members get HtFLlib's ``Linear(512, 768) → Tanh → Linear(768, C)``.

Input resolution: 28×28×1 and 32×32×3 images go through every member as they are (spatial maps shrink to 1×1 at
the last stages, as in HtFLlib on CIFAR). ViTs need a side divisible by the patch size, so their input is resized
bilinearly to the next multiple of the patch (28 → 32 for both ViT-B/16 and ViT-B/32; 32 stays 32, giving four
16-px patches or one 32-px patch, as HtFLlib's ``image_size=32``). The CNN member is the zoo's ``cnn``
(FedAvgCNN: fc 1600 → 512 on 32×32, 1024 → 512 on 28×28).

``ht_*`` members are 16× cheaper on 32×32 inputs than CIFAR-stem ResNets and match the published HtFL tables;
use the stand-alone names for single-architecture work.

Heterogeneous heads (``htfe-img-8-htc-img-4``): HtFLlib assigns head ``i mod 4`` of ``Head([512])``,
``Head([512, 512])``, ``Head([512, 256])``, ``Head([512, 128])``; with eight extractors, extractor ``j`` always meets
head ``j mod 4``, so the group lists eight members whose names carry their head (``ht_resnet18-h128``: one hidden
layer of 128). HtFLlib's ``Head`` puts a ReLU after the output layer too (clipping logits at zero); here the
ReLU sits only between layers.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .groups import GROUPS
from .zoo import MODELS, FedModel

FEATURE_DIM = 512  # the common feature dimension of every group member (HtFLlib's -fd default)


# ------------------------------------------------------------------------------------------ pieces
class PoolTo(nn.Module):
    """Parameter-free 1-D adaptive average pooling of a flat feature vector to ``dim`` values."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = int(dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[1] == self.dim:
            return z
        return F.adaptive_avg_pool1d(z.unsqueeze(1), self.dim).squeeze(1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class ResizeTo(nn.Module):
    """Bilinear resize of NCHW images to ``size``×``size`` (identity when they already have that size)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


class Trunk(nn.Module):
    """A backbone that ends in a flat vector, optionally dropped out and pooled to a common width."""

    def __init__(self, body: nn.Module, spatial: bool, width: int, pool_to: int | None, dropout: float = 0.0):
        super().__init__()
        self.body = body
        self.spatial = spatial  # body returns a feature map that needs global average pooling
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.pool = PoolTo(pool_to) if pool_to and pool_to != width else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body(x)
        if self.spatial:
            z = torch.flatten(F.adaptive_avg_pool2d(z, 1), 1)
        return self.pool(self.drop(z))


def mlp_head(in_dim: int, hidden: Sequence[int], num_classes: int) -> nn.Module:
    """Linear layers ``in_dim → hidden... → num_classes`` with ReLU between them (none after the logits)."""
    if not hidden:
        return nn.Linear(in_dim, num_classes)
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU(inplace=True)]
        d = h
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def _first_conv(conv: nn.Conv2d, in_channels: int, stride: int | None = None, kernel: int | None = None) -> nn.Conv2d:
    """A copy of ``conv``'s shape with other input channels (and optionally stride/kernel); fresh weights."""
    k = kernel or conv.kernel_size[0]
    s = stride or conv.stride[0]
    pad = k // 2 if kernel else conv.padding[0]
    return nn.Conv2d(in_channels, conv.out_channels, k, s, pad, bias=conv.bias is not None)


# --------------------------------------------------------------------------------------- backbones
_RESNET_BLOCKS = {4: ("basic", [1]), 6: ("basic", [1, 1]), 8: ("basic", [1, 1, 1]), 10: ("basic", [1, 1, 1, 1]),
                  18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3]),
                  101: ("bottleneck", [3, 4, 23, 3]), 152: ("bottleneck", [3, 8, 36, 3])}


def resnet_trunk(depth: int, in_channels: int, small_stem: bool) -> tuple[nn.Module, int]:
    """torchvision ResNet body (stages 1..k; ResNet-4/6/8/10 keep the first 1/2/3/4 one-block stages, as PFLlib's)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    kind, blocks = _RESNET_BLOCKS[depth]
    block = BasicBlock if kind == "basic" else Bottleneck
    stages = len(blocks)
    net = ResNet(block, blocks + [1] * (4 - stages))  # build four stages, keep the first ``stages``
    if small_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = _first_conv(net.conv1, in_channels)
    layers = [net.layer1, net.layer2, net.layer3, net.layer4][:stages]
    width = 64 * 2 ** (stages - 1) * block.expansion
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *layers), width


def googlenet_trunk(in_channels: int) -> tuple[nn.Module, int]:
    """torchvision GoogLeNet (no auxiliary classifiers) up to its dropout; the fc layer is removed."""
    from torchvision.models.googlenet import GoogLeNet

    net = GoogLeNet(num_classes=10, aux_logits=False, transform_input=False, init_weights=True)
    if in_channels != 3:
        net.conv1.conv = _first_conv(net.conv1.conv, in_channels)
    net.fc = nn.Identity()
    return net, 1024


def mobilenet_v2_trunk(in_channels: int) -> tuple[nn.Module, int]:
    """torchvision MobileNetV2 features (stride-2 first convolution kept); the classifier is removed."""
    import torchvision

    net = torchvision.models.mobilenet_v2(weights=None)
    if in_channels != 3:
        net.features[0][0] = _first_conv(net.features[0][0], in_channels)
    return net.features, net.last_channel


def vit_trunk(patch: int, input_shape: tuple[int, int, int]) -> tuple[nn.Module, int]:
    """torchvision ViT-B/``patch`` at the input resolution rounded up to a multiple of the patch; class token out."""
    import torchvision

    c, h, w = input_shape
    side = max(patch, int(math.ceil(max(h, w) / patch)) * patch)
    net = getattr(torchvision.models, f"vit_b_{patch}")(weights=None, image_size=side)
    if c != 3:
        old = net.conv_proj
        net.conv_proj = nn.Conv2d(c, old.out_channels, old.kernel_size, old.stride)
    net.heads = nn.Identity()
    return nn.Sequential(ResizeTo(side), net), net.hidden_dim


def _trunk(arch: str, input_shape: tuple[int, int, int], small_stem: bool) -> tuple[nn.Module, bool, int]:
    """(body, needs spatial pooling, width) of an architecture name."""
    c = input_shape[0]
    if arch.startswith("resnet"):
        body, width = resnet_trunk(int(arch[6:]), c, small_stem)
        return body, True, width
    if arch == "googlenet":
        body, width = googlenet_trunk(c)
        return body, False, width
    if arch == "mobilenet_v2":
        body, width = mobilenet_v2_trunk(c)
        return body, True, width
    if arch.startswith("vit_b_"):
        body, width = vit_trunk(int(arch[6:]), input_shape)
        return body, False, width
    raise ValueError(arch)


# ---------------------------------------------------------------------------------------- factories
def _standalone(arch: str):
    def build(input_shape: tuple[int, int, int], num_classes: int) -> FedModel:
        small = min(input_shape[1:]) <= 64 and arch.startswith("resnet")
        body, spatial, width = _trunk(arch, tuple(input_shape), small)
        return FedModel(Trunk(body, spatial, width, None), nn.Linear(width, num_classes), width, arch)

    return build


def _member(arch: str, head_hidden: Sequence[int] = ()):
    name = "ht_" + arch + (f"-h{'-'.join(map(str, head_hidden))}" if head_hidden else "")

    def build(input_shape: tuple[int, int, int], num_classes: int, feature_dim: int = FEATURE_DIM) -> FedModel:
        if feature_dim < 1:
            raise ConfigError(f"feature_dim must be a positive integer, got {feature_dim}.")
        body, spatial, width = _trunk(arch, tuple(input_shape), small_stem=False)
        # HtFLlib's MobileNetV2 keeps its dropout (p 0.2) in front of the classifier it replaces by the pooling
        # (GoogLeNet's dropout sits inside torchvision's trunk and stays anyway)
        dropout = 0.2 if arch == "mobilenet_v2" else 0.0
        if arch.startswith("vit_b_") and not head_hidden:
            head = nn.Sequential(nn.Linear(feature_dim, 768), nn.Tanh(), nn.Linear(768, num_classes))
        else:
            head = mlp_head(feature_dim, head_hidden, num_classes)
        return FedModel(Trunk(body, spatial, width, feature_dim, dropout), head, feature_dim, name)

    return name, build


_STANDALONE = {
    "resnet4": "ResNet-4 (one 64-channel basic block; PFLlib/HtFLlib's local resnet)",
    "resnet6": "ResNet-6 (two one-block stages, 128-d features)",
    "resnet8": "ResNet-8 (three one-block stages, 256-d features)",
    "resnet10": "ResNet-10 (four one-block stages, 512-d features)",
    "resnet50": "torchvision ResNet-50 (2048-d features)",
    "resnet101": "torchvision ResNet-101 (2048-d features)",
    "resnet152": "torchvision ResNet-152 (2048-d features)",
}
for _name, _text in _STANDALONE.items():
    MODELS.add(_name, _standalone(_name), summary=f"{_text}, small-input stem below 64 px (3×3 stride-1 conv, no max-pool)")
MODELS.add("googlenet", _standalone("googlenet"), summary="torchvision GoogLeNet without auxiliary heads (1024-d features)")
MODELS.add("vit_b_16", _standalone("vit_b_16"),
           summary="torchvision ViT-B/16 at the input resolution (side rounded up to a multiple of 16; 768-d features)")
MODELS.add("vit_b_32", _standalone("vit_b_32"),
           summary="torchvision ViT-B/32 at the input resolution (side rounded up to a multiple of 32; 768-d features)")

_MEMBERS = ["resnet4", "resnet6", "resnet8", "resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
            "googlenet", "mobilenet_v2", "vit_b_16", "vit_b_32"]
for _arch in _MEMBERS:
    _n, _fn = _member(_arch)
    MODELS.add(_n, _fn, summary=f"HtFL group member: torchvision {_arch} as published (ImageNet stem), "
                                f"features average-pooled to 512, {'Linear-Tanh-Linear' if 'vit' in _arch else 'linear'} head")

# HtFE-img-8-HtC-img-4: extractor j gets head j mod 4 of [512], [512, 512], [512, 256], [512, 128]
_HTC_HEADS = [(), (512,), (256,), (128,)]
_HTFE8 = ["cnn", "ht_googlenet", "ht_mobilenet_v2", "ht_resnet18", "ht_resnet34", "ht_resnet50", "ht_resnet101",
          "ht_resnet152"]
_HTC8 = []
for _j, _m in enumerate(_HTFE8):
    _hidden = _HTC_HEADS[_j % 4]
    if not _hidden:
        _HTC8.append(_m)
        continue
    _n, _fn = _member(_m[3:], _hidden)
    MODELS.add(_n, _fn, summary=f"HtFL group member {_m} with an MLP head (hidden {', '.join(map(str, _hidden))})")
    _HTC8.append(_n)

_GROUPS = {
    "htfe-img-2": (["cnn", "ht_resnet18"], "HtFLlib HtFE-img-2: 4-layer CNN, ResNet-18"),
    "htfe-img-3": (["ht_resnet10", "ht_resnet18", "ht_resnet34"], "HtFLlib HtFE-img-3: ResNet-10/18/34"),
    "htfe-img-4": (["cnn", "ht_googlenet", "ht_mobilenet_v2", "ht_resnet18"],
                   "HtFLlib HtFE-img-4: CNN, GoogLeNet, MobileNetV2, ResNet-18"),
    "htfe-img-5": (["ht_googlenet", "ht_mobilenet_v2", "ht_resnet18", "ht_resnet34", "ht_resnet50"],
                   "HtFLlib HtFE-img-5: GoogLeNet, MobileNetV2, ResNet-18/34/50"),
    "htfe-img-8": (_HTFE8, "HtFLlib HtFE-img-8: CNN, GoogLeNet, MobileNetV2, ResNet-18/34/50/101/152"),
    "htfe-img-9": (["ht_resnet4", "ht_resnet6", "ht_resnet8", "ht_resnet10", "ht_resnet18", "ht_resnet34", "ht_resnet50",
                    "ht_resnet101", "ht_resnet152"], "HtFLlib HtFE-img-9: ResNet-4/6/8/10/18/34/50/101/152"),
    "htm-img-10": (_HTFE8 + ["ht_vit_b_16", "ht_vit_b_32"], "HtFLlib HtM-img-10: HtFE-img-8 plus ViT-B/16 and ViT-B/32"),
    "htfe-img-8-htc-img-4": (_HTC8, "HtFLlib HtFE-img-8-HtC-img-4: HtFE-img-8 extractors with four different heads"),
}
for _g, (_members, _text) in _GROUPS.items():
    GROUPS.add(_g, list(_members), summary=_text)

__all__ = ["FEATURE_DIM", "PoolTo", "ResizeTo", "Trunk", "mlp_head"]
