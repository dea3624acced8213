"""Model registry: every model is a feature extractor plus a head with a known feature dimension.

A model is registered with the input modalities it takes (``inputs=``; images when not said): ``image`` (C, H, W),
``series`` (C, L), ``tokens`` (L,) with a vocabulary size, ``vector`` (D,). :func:`create_model` reads the modality
off ``input_shape`` (three numbers: an image, two: a series, one: tokens when ``vocab_size`` is given, else a vector)
and refuses a model that does not take it, naming those that do.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..registry import Registry

MODELS: Registry[Callable[..., FedModel]] = Registry("model", "see `fedforge list models`",
                                                      populate=("fedforge.models.hetero", "fedforge.models.sensor",
                                                                "fedforge.models.text"))

# what one input looks like in each modality (for messages)
INPUT_LAYOUTS = {"image": "images (C, H, W)", "series": "series (C, L)", "tokens": "token ids (L,)",
                 "vector": "vectors (D,)"}


class FedModel(nn.Module):
    """``features(x) -> z`` (a vector of ``feature_dim``) and ``head(z) -> logits``.

    Parameter names start with ``features.`` or ``head.``, which is how algorithms tell body from head.
    """

    def __init__(self, features: nn.Module, head: nn.Module, feature_dim: int, arch: str = ""):
        super().__init__()
        self.features = features
        self.head = head
        self.feature_dim = int(feature_dim)
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _conv_out(h: int, k: int, p: int) -> int:
    return h + 2 * p - k + 1


@MODELS.register("cnn", summary="4-layer CNN of the FL literature (FedAvg/PFLlib FedAvgCNN): conv5x5·32 → pool → conv5x5·64 → pool → fc512 → head")
def cnn(input_shape: tuple[int, int, int], num_classes: int, feature_dim: int = 512) -> FedModel:
    c, h, w = input_shape
    pad = 0 if min(h, w) >= 16 else 2  # small inputs (8×8 digits) keep their size through the 5×5 convs
    h1, w1 = _conv_out(h, 5, pad) // 2, _conv_out(w, 5, pad) // 2
    h2, w2 = _conv_out(h1, 5, pad) // 2, _conv_out(w1, 5, pad) // 2
    if h2 < 1 or w2 < 1:
        raise ConfigError(f"the cnn model needs inputs of at least 8×8 pixels, got {h}×{w}.")
    features = nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * h2 * w2, feature_dim), nn.ReLU(inplace=True),
    )
    return FedModel(features, nn.Linear(feature_dim, num_classes), feature_dim, "cnn")


@MODELS.register("cnn_bn", summary="the 4-layer cnn with BatchNorm after each conv and the fc layer (FedBN's setting)")
def cnn_bn(input_shape: tuple[int, int, int], num_classes: int, feature_dim: int = 512) -> FedModel:
    base = cnn(input_shape, num_classes, feature_dim)
    conv1, conv2, fc = base.features[0], base.features[3], base.features[7]
    features = nn.Sequential(
        conv1, nn.BatchNorm2d(conv1.out_channels), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        conv2, nn.BatchNorm2d(conv2.out_channels), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), fc, nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True),
    )
    return FedModel(features, base.head, feature_dim, "cnn_bn")


@MODELS.register("mlp", summary="2-hidden-layer perceptron (FedAvg's 2NN): 200 → 200 → head; flattens images and "
                                 "series, takes vectors", inputs=("image", "series", "vector"))
def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 200) -> FedModel:
    width = math.prod(int(v) for v in input_shape)
    features = nn.Sequential(nn.Flatten(), nn.Linear(width, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
    return FedModel(features, nn.Linear(hidden, num_classes), hidden, "mlp")


def _vector_mlp(widths: tuple[int, ...]):
    """Linear+ReLU layers ``D → widths...``; the last width is the feature dimension (HtFLlib's AmazonMLP family:
    hidden layers, then a 100-d ReLU layer, then the head)."""

    def build(input_shape: tuple[int, ...], num_classes: int) -> FedModel:
        d = math.prod(int(v) for v in input_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        for w in widths:
            layers += [nn.Linear(d, w), nn.ReLU(inplace=True)]
            d = w
        return FedModel(nn.Sequential(*layers), nn.Linear(d, num_classes), d, "mlp-" + "-".join(map(str, widths)))

    return build


# HtFLlib's "MLPs" model family (AmazonMLP(feature_dim=[...]): hidden layers, then 100-d features); mlp-1000-500-100 is
# PFLlib's AmazonMLP (5000 → 1000 → 500 → 100 → head on Amazon Review's bag-of-words vectors)
for _widths, _what in (((100,), "no hidden layer"), ((500, 100), "one hidden layer of 500"),
                       ((1000, 500, 100), "PFLlib's AmazonMLP"), ((1000, 500, 200, 100), "three hidden layers")):
    MODELS.add("mlp-" + "-".join(map(str, _widths)), _vector_mlp(_widths), inputs=("vector", "series", "image"),
               summary=f"perceptron D → {' → '.join(map(str, _widths))} → head ({_what}; HtFLlib's MLPs family)")


class _Backbone(nn.Module):
    """Wrap a torchvision trunk so that it ends in a flat feature vector."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.trunk(x)))


def _resnet(depth: int):
    def build(input_shape: tuple[int, int, int], num_classes: int, small_input_stem: bool | None = None) -> FedModel:
        import torchvision

        c, h, w = input_shape
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        small = (min(h, w) <= 64) if small_input_stem is None else small_input_stem
        if small:  # CIFAR-style stem: 3×3 stride-1 conv, no max-pool (He et al. 2016, §4.2)
            net.conv1 = nn.Conv2d(c, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif c != 3:
            net.conv1 = nn.Conv2d(c, 64, 7, 2, 3, bias=False)
        dim = net.fc.in_features
        trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        return FedModel(_Backbone(trunk), nn.Linear(dim, num_classes), dim, f"resnet{depth}")

    build.__doc__ = f"torchvision ResNet-{depth}, adapted to small inputs (3×3 stem, no max-pool below 64 px)"
    return build


MODELS.add("resnet18", _resnet(18), summary="torchvision ResNet-18 adapted to 32×32 inputs (3×3 stem, no max-pool)")
MODELS.add("resnet34", _resnet(34), summary="torchvision ResNet-34 adapted to 32×32 inputs (3×3 stem, no max-pool)")


@MODELS.register("mobilenet_v2", summary="torchvision MobileNetV2 (first conv stride 1 for inputs up to 64 px)")
def mobilenet_v2(input_shape: tuple[int, int, int], num_classes: int) -> FedModel:
    import torchvision

    c, h, w = input_shape
    net = torchvision.models.mobilenet_v2(weights=None)
    first = net.features[0][0]
    stride = 1 if min(h, w) <= 64 else 2
    net.features[0][0] = nn.Conv2d(c, first.out_channels, 3, stride, 1, bias=False)
    dim = net.last_channel
    return FedModel(_Backbone(net.features), nn.Linear(dim, num_classes), dim, "mobilenet_v2")


def input_modality(input_shape: tuple[int, ...], vocab_size: int | None = None) -> str:
    """The modality of one model input: (C, H, W) image, (C, L) series, (L,) tokens (with a vocabulary) or (D,) vector."""
    n = len(tuple(input_shape))
    if vocab_size is not None:
        if n != 1:
            raise ConfigError(f"token inputs have the shape (L,), got {tuple(input_shape)} with a vocabulary of {vocab_size}.")
        return "tokens"
    if n in (1, 2, 3):
        return ("vector", "series", "image")[n - 1]
    raise ConfigError(f"a model input has 1 to 3 dimensions ((D,), (C, L) or (C, H, W)), got {tuple(input_shape)}.")


def models_for(modality: str) -> list[str]:
    """Registered models that take ``modality``."""
    return [e.name for e in MODELS.entries() if modality in e.meta.get("inputs", ("image",))]


def create_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int | None = None, *,
                 vocab_size: int | None = None, **kwargs) -> FedModel:
    """Build a registered model; with ``seed`` its initial weights are reproducible (global RNG untouched).

    ``vocab_size`` (token data only) is the number of token ids; it reaches the factories of text models.
    """
    entry = MODELS.entry(name)
    fn = entry.obj
    modality = input_modality(input_shape, vocab_size)
    takes = entry.meta.get("inputs", ("image",))
    if modality not in takes:
        fits = ", ".join(models_for(modality)) or "none"
        raise ConfigError(f"model '{name}' takes {' or '.join(INPUT_LAYOUTS[m] for m in takes)}, but the data are "
                          f"{INPUT_LAYOUTS[modality].split(' (')[0]} of shape {tuple(input_shape)}; models for them: {fits} "
                          f"(see `fedforge list models`).")
    if modality == "tokens":
        kwargs["vocab_size"] = int(vocab_size)
    if seed is None:
        model = fn(tuple(input_shape), int(num_classes), **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = fn(tuple(input_shape), int(num_classes), **kwargs)
    if not isinstance(model, FedModel):
        raise TypeError(f"model factory '{name}' must return a FedModel")
    model.arch = model.arch or name
    return model
