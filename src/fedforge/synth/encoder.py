"""The client's image encoder: embeds uint8 NHWC images into feature vectors (frozen, eval mode).

An encoder spec is one of

* ``builtin`` (default): the small CNN shipped in ``fedforge/assets/encoder_cifar100_0-49.*`` (the zoo's ``cnn``
  trained on CIFAR-100 classes 0-49; ``benchmarks/synth_encoder.py`` rebuilds it);
* ``checkpoint:PATH`` or a bare ``PATH`` ending in ``.safetensors``: a fedforge model checkpoint, i.e. a
  safetensors file of a :class:`~fedforge.models.FedModel` state dict plus a JSON file of the same stem
  (``{"model": "cnn", "input_shape": [C, H, W], "num_classes": K, "mean": [...], "std": [...]}``), as written by
  :func:`save_checkpoint`;
* ``run:DIR``: the global model of a ``fedforge run`` directory's latest checkpoint (one architecture);
* ``torchvision:NAME`` (e.g. ``torchvision:resnet18``): torchvision's ImageNet weights, used only when they are
  already in the local torch cache; nothing is downloaded at run time.

The embedding is the model's ``features(x)`` (for torchvision models: the globally pooled last feature map).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUILTIN_STEM = "encoder_cifar100_0-49"
CHECKPOINT_FORMAT = "fedforge-model/1"


@dataclass
class Encoder:
    """A frozen feature extractor with its input normalisation.

    ``net`` maps a normalised float NCHW batch to (n, d) features; ``input_shape`` is (C, H, W), or None for a
    network that takes any size (images are then resized to ``resize`` if given).
    """

    net: nn.Module
    input_shape: tuple[int, int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "encoder"
    resize: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.net = self.net.to(self.device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    @property
    def channels(self) -> int:
        return self.input_shape[0] if self.input_shape else len(self.mean)

    def check_images(self, shape: Sequence[int], what: str = "the private images") -> None:
        """One clear sentence when images of NHWC ``shape`` cannot go through this encoder."""
        _, h, w, c = (int(s) for s in shape)
        if self.input_shape is None:
            if c not in (1, 3) or (c != self.channels and c != 1):
                raise ConfigError(f"the encoder {self.name} takes {self.channels}-channel images but {what} have {c} "
                                  f"channels; choose an encoder trained on {c}-channel images (--encoder checkpoint:PATH).")
            return
        ec, eh, ew = self.input_shape
        if (c, h, w) != (ec, eh, ew):
            raise ConfigError(
                f"the encoder {self.name} expects {ec}x{eh}x{ew} inputs (CxHxW) but {what} are {c}x{h}x{w}; "
                f"choose an encoder trained on {c}x{h}x{w} images (--encoder checkpoint:PATH).")

    def to_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if self.resize is not None and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False, antialias=True)
        c = x.shape[1]
        mean = torch.tensor(self.mean[:c], device=x.device).view(1, c, 1, 1)
        std = torch.tensor(self.std[:c], device=x.device).view(1, c, 1, 1)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """(n, d) float32 features of uint8 NHWC ``images``."""
        n = len(images)
        if n == 0:
            return torch.zeros(0, self.feature_dim)
        outs = [self.net(self.to_input(images[s : s + batch_size])).float().flatten(1).cpu()
                for s in range(0, n, batch_size)]
        return torch.cat(outs)

    @property
    def feature_dim(self) -> int:
        d = getattr(self.net, "feature_dim", None)
        if d is None:
            shape = self.input_shape or (self.channels, self.resize or 32, self.resize or 32)
            with torch.no_grad():
                d = int(self.net(torch.zeros(1, *shape, device=self.device)).flatten(1).shape[1])
            self.net.feature_dim = d  # type: ignore[assignment]
        return int(d)


class _Features(nn.Module):
    """A FedModel seen through ``features`` only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.feature_dim = int(getattr(model, "feature_dim", 0)) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def encoder_from_model(model: nn.Module, input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
                       name: str = "model", device: str = "cpu", meta: dict[str, Any] | None = None) -> Encoder:
    """Wrap a FedModel (``features(x) -> z``) as an encoder."""
    if not hasattr(model, "features"):
        raise ConfigError(f"encoder {name} has no features(x) method; pass a fedforge model (see `fedforge list models`).")
    return Encoder(_Features(model), tuple(int(v) for v in input_shape), tuple(float(v) for v in mean),
                   tuple(float(v) for v in std), name=name, meta=dict(meta or {}), device=device)


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str | Path, model: nn.Module, arch: str, input_shape: Sequence[int], num_classes: int,
                    mean: Sequence[float], std: Sequence[float], **meta: Any) -> tuple[Path, Path]:
    """Write a fedforge model checkpoint: ``PATH.safetensors`` (state dict) + ``PATH.json`` (how to rebuild it)."""
    from safetensors.torch import save_file

    from ..results.rundir import atomic_write_text, dumps

    path = Path(path)
    stem = path.with_suffix("") if path.suffix == ".safetensors" else path
    weights, config = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = weights.with_name("." + weights.name + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(weights)
    cfg = {"format": CHECKPOINT_FORMAT, "model": arch, "input_shape": [int(v) for v in input_shape],
           "num_classes": int(num_classes), "mean": [float(v) for v in mean], "std": [float(v) for v in std], **meta}
    atomic_write_text(config, dumps(cfg) + "\n")
    return weights, config


def load_checkpoint(path: str | Path, device: str = "cpu") -> Encoder:
    """Encoder from a fedforge model checkpoint (``.safetensors`` plus its ``.json``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..models import create_model

    path = Path(path).expanduser()
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    weights, config = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    if not weights.is_file():
        raise ConfigError(f"encoder checkpoint {weights} does not exist; give a .safetensors file written by "
                          f"fedforge (with its .json beside it), or use --encoder builtin.")
    if not config.is_file():
        raise ConfigError(f"encoder checkpoint {weights} has no {config.name} beside it; that JSON file says which "
                          f"model and input shape the weights belong to.")
    try:
        cfg = json.loads(config.read_text())
        arch, shape, k = cfg["model"], tuple(int(v) for v in cfg["input_shape"]), int(cfg["num_classes"])
        mean, std = cfg["mean"], cfg["std"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{config} is not a fedforge checkpoint description (missing or bad {e}); it needs "
                          f"model, input_shape, num_classes, mean and std.") from None
    model = create_model(arch, shape, k, seed=0)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"encoder checkpoint {weights} cannot be read ({e}); rebuild it.") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"encoder checkpoint {weights} does not fit model '{arch}' with input {shape} ({first}).") from None
    meta = {k2: v for k2, v in cfg.items() if k2 not in ("mean", "std")}
    return encoder_from_model(model, shape, mean, std, name=str(weights.name), device=device, meta=meta)


# ------------------------------------------------------------------------------------------ run directories
def _run_encoder(run_dir: str, device: str = "cpu", data_root: str | None = None) -> Encoder:
    """The global model of a fedforge run directory's latest checkpoint (a single architecture)."""
    import yaml

    from ..core.checkpoint import load_checkpoint as load_run_checkpoint
    from ..data import load_dataset
    from ..models import create_model

    base = Path(run_dir).expanduser()
    cfg_path = base / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{base} is not a fedforge run directory (no config.yaml); give one written by `fedforge run`.")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    ck = load_run_checkpoint(base)
    if ck is None:
        raise ConfigError(f"run directory {base} has no checkpoint; run it with checkpoints or use --encoder checkpoint:PATH.")
    state = {k: v for k, v in ck.server.items() if k.startswith(("features.", "head."))}
    arch = str(cfg.get("model", ""))
    if not state or "," in arch:
        raise ConfigError(f"run {base} has no single global model to use as an encoder (model '{arch}'); "
                          f"use a run of one architecture or --encoder checkpoint:PATH.")
    ds = load_dataset(cfg.get("dataset", ""), data_root or cfg.get("data_root"), class_subset=cfg.get("class_subset"))
    model = create_model(arch, ds.input_shape, ds.num_classes, seed=0)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"the checkpoint of {base} does not fit model '{arch}' ({str(e).splitlines()[0]}).") from None
    return encoder_from_model(model, ds.input_shape, ds.mean, ds.std, name=f"run:{base.name}", device=device,
                              meta={"round": ck.round, "dataset": ds.name})


# ------------------------------------------------------------------------------------------ torchvision
def _torchvision_encoder(name: str, device: str = "cpu") -> Encoder:
    import torchvision

    try:
        weights_enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise ConfigError(f"torchvision has no model '{name}' with pretrained weights; try torchvision:resnet18.") from None
    weights = weights_enum.DEFAULT
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cache.is_file():
        raise ConfigError(
            f"torchvision weights for {name} are not in the local torch cache ({cache}); fedforge never downloads "
            f"them at run time, so copy {Path(weights.url).name} there or use --encoder builtin.")
    net = torchvision.models.get_model(name, weights=None)
    net.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
    for attr in ("fc", "classifier", "heads", "head"):
        if hasattr(net, attr):
            setattr(net, attr, nn.Identity())
            break
    tr = weights.transforms()
    size = int(getattr(tr, "crop_size", [224])[0])
    return Encoder(net, None, tuple(tr.mean), tuple(tr.std), name=f"torchvision:{name}", resize=size, device=device)


def load_encoder(spec: str | Encoder | None = "builtin", device: str = "cpu") -> Encoder:
    """Build the encoder named by ``spec`` (see the module docstring)."""
    if isinstance(spec, Encoder):
        return spec
    spec = (spec or "builtin").strip()
    kind, _, arg = spec.partition(":")
    if kind == "builtin":
        path = Path(arg) if arg else ASSETS / f"{BUILTIN_STEM}.safetensors"
        if not path.is_file():
            raise ConfigError(f"the built-in encoder {path} is missing from this installation; rebuild it with "
                              f"`python benchmarks/synth_encoder.py` or pass --encoder checkpoint:PATH.")
        enc = load_checkpoint(path, device)
        enc.name = "builtin"
        return enc
    if kind == "checkpoint":
        if not arg:
            raise ConfigError("--encoder checkpoint: needs a path, as in --encoder checkpoint:model.safetensors.")
        return load_checkpoint(arg, device)
    if kind == "run":
        if not arg:
            raise ConfigError("--encoder run: needs a run directory, as in --encoder run:runs/my-fedavg-run.")
        return _run_encoder(arg, device)
    if kind == "torchvision":
        if not arg:
            raise ConfigError("--encoder torchvision: needs a model name, as in --encoder torchvision:resnet18.")
        return _torchvision_encoder(arg, device)
    if spec.endswith(".safetensors"):
        return load_checkpoint(spec, device)
    raise ConfigError(f"unknown encoder '{spec}'; use builtin, checkpoint:PATH (a fedforge .safetensors "
                      f"checkpoint), run:DIR (a run's global model) or torchvision:NAME (weights already in the torch cache).")
