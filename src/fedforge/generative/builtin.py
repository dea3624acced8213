"""The built-in generator: a small DCGAN-style image GAN with an explicit N(0, I) latent prior.

* Generator: z ∈ R^d ~ N(0, I) → Linear → 4×4 map → k transposed-conv up-blocks (BatchNorm, ReLU) → tanh image.
* Discriminator (training only): strided 4×4 convolutions with spectral normalisation (Miyato et al., 2018),
  LeakyReLU(0.2), a linear score. Hinge loss (Lim & Ye, 2017; Miyato et al., 2018), Adam(2e-4, β = (0.5, 0.999)),
  one discriminator step per generator step, and an exponential moving average of the generator's weights
  (the "G_ema" of the StyleGAN family) which is what gets saved.

Saved as ``generator.safetensors`` (weights) plus ``generator.json`` (architecture and provenance); never pickles.
Training checkpoints (``checkpoint.safetensors`` + ``checkpoint.json``) hold both networks, both Adam states and
the random stream, so an interrupted training resumes exactly where it stopped.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import GENERATORS, Generator, GeneratorError, as_generator
from .cgan import CGANGenerator, ConditionalGenerator, build_from_config
from .gan_common import (  # noqa: F401  (CONFIG, WEIGHTS, ema_decay_at, save_builtin: re-exported)
    CONFIG,
    FORMAT,
    WEIGHTS,
    StepResult,
    _levels,
    ema_decay_at,
    plot_losses,
    recalibrate_batchnorm,
    run_gan_training,
    save_builtin,
    strided_sn_convs,
    synthesize_in_chunks,
)
from .images import image_grid, save_png

DEFAULT_ASSET = "builtin-cifar100-0-49"  # under fedforge/assets/
C100_ASSET = "builtin-cifar100"  # all 100 classes (generator v2 only)


# -------------------------------------------------------------------------------------------- networks
class GeneratorNet(nn.Module):
    """z → image in [−1, 1] (NCHW)."""

    def __init__(self, latent_dim: int = 128, resolution: int = 32, channels: int = 3, base_channels: int = 128):
        super().__init__()
        k = _levels(resolution)
        width = [base_channels * 2 ** (k - 1 - i) for i in range(k)]  # e.g. 512, 256, 128 for k=3, base 128
        self.fc = nn.Linear(latent_dim, width[0] * 16)
        self.bn0 = nn.BatchNorm2d(width[0])
        blocks: list[nn.Module] = []
        for i in range(k - 1):
            blocks += [nn.ConvTranspose2d(width[i], width[i + 1], 4, 2, 1, bias=False), nn.BatchNorm2d(width[i + 1]), nn.ReLU(True)]
        blocks += [nn.ConvTranspose2d(width[-1], channels, 4, 2, 1), nn.Tanh()]
        self.up = nn.Sequential(*blocks)
        self.width0 = width[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self.width0, 4, 4)
        return self.up(F.relu(self.bn0(h)))


class DiscriminatorNet(nn.Module):
    """image → one real/fake score (spectrally normalised convolutions)."""

    def __init__(self, resolution: int = 32, channels: int = 3, base_channels: int = 64):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers, c_in = strided_sn_convs(channels, base_channels, _levels(resolution), 0.2)
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.score = sn(nn.Linear(c_in * 16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.body(x)).flatten()


# ------------------------------------------------------------------------------------------ the back-end
class BuiltinGenerator(Generator):
    """A trained :class:`GeneratorNet` seen through the :class:`Generator` interface (prior N(0, I))."""

    kind = "builtin"

    def __init__(self, net: GeneratorNet, config: dict, device: str | torch.device = "cpu", source: str = ""):
        self.net = net.to(device).eval().requires_grad_(False)
        self.config = config
        self.device = torch.device(device)
        self.latent_dim = int(config["latent_dim"])
        self.resolution = int(config["resolution"])
        self.channels = int(config["channels"])
        self.source = source

    def sample_prior(self, n: int, rng=None) -> torch.Tensor:
        return torch.randn(int(n), self.latent_dim, generator=as_generator(rng))

    @torch.no_grad()
    def synthesize(self, latents: torch.Tensor, condition: Any = None) -> np.ndarray:
        return synthesize_in_chunks(self.net, self.check_latents(latents), self.device, self.resolution, self.channels)

    def __repr__(self) -> str:
        return f"BuiltinGenerator({self.source or 'in memory'}, latent {self.latent_dim}, {self.resolution}px)"


def default_asset_dir(asset: str = DEFAULT_ASSET) -> Path:
    return Path(str(resources.files("fedforge") / "assets" / asset))


def _resolve(path: str | None) -> tuple[Path, Path]:
    if not path:
        base = default_asset_dir()
        return base / WEIGHTS, base / CONFIG
    p = Path(path).expanduser()
    if p.is_dir():
        return p / WEIGHTS, p / CONFIG
    if p.suffix == ".json":
        return p.with_suffix(".safetensors"), p
    return p, p.with_suffix(".json")


def load_builtin(path: str | None = None, device: str | torch.device = "cpu") -> Generator:
    """Load ``generator.safetensors`` + ``generator.json`` from a folder (default: the shipped CIFAR-100 0–49 model)."""
    from safetensors.torch import load_file

    weights, cfg_path = _resolve(path)
    where = path or "the shipped built-in generator"
    for f in (weights, cfg_path):
        if not f.is_file():
            raise GeneratorError(
                f"built-in generator file {f} is missing; train one with `fedforge generator train --out DIR` "
                f"and pass --generator builtin:DIR (a folder holding {WEIGHTS} and {CONFIG}).")
    try:
        config = json.loads(cfg_path.read_text())
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ValueError("not a fedforge built-in generator config")
        conditional = config.get("architecture") == "cgan"
        net: nn.Module
        if conditional:
            net = build_from_config(config)
        else:
            net = GeneratorNet(int(config["latent_dim"]), int(config["resolution"]), int(config["channels"]), int(config["base_channels"]))
    except GeneratorError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise GeneratorError(f"{cfg_path} is not a valid built-in generator config ({e}); re-copy it or retrain the generator.") from None
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise GeneratorError(f"{weights} is corrupt or not a safetensors file ({type(e).__name__}); re-copy it or retrain the generator.") from None
    own = net.state_dict()
    if set(state) != set(own) or any(tuple(state[k].shape) != tuple(own[k].shape) for k in own):
        raise GeneratorError(f"{weights} does not match the architecture in {cfg_path}; keep the two files of one training together.")
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    if conditional:
        assert isinstance(net, CGANGenerator)
        return ConditionalGenerator(net, config, device, source=str(where))
    assert isinstance(net, GeneratorNet)
    return BuiltinGenerator(net, config, device, source=str(where))


@GENERATORS.register("builtin", summary="fedforge's own GAN; builtin[:DIR] (default: shipped, CIFAR-100 classes 0-49)")
def _builtin_factory(arg: str | None, device: str = "cpu", trust_pickle: bool = False, **options: Any) -> Generator:
    if options:
        raise GeneratorError(f"the builtin generator has no option '{next(iter(options))}'; it takes none besides device.")
    return load_builtin(arg, device)


@GENERATORS.register("builtin-c100", summary="fedforge's shipped class-conditional GAN on all 100 CIFAR-100 classes (held-out split excluded)")
def _builtin_c100_factory(arg: str | None, device: str = "cpu", trust_pickle: bool = False, **options: Any) -> Generator:
    if options:
        raise GeneratorError(f"the builtin-c100 generator has no option '{next(iter(options))}'; it takes none besides device.")
    if arg:
        raise GeneratorError("builtin-c100 takes no path; use builtin:DIR for a generator folder of your own.")
    folder = default_asset_dir(C100_ASSET)
    if not (folder / WEIGHTS).is_file():
        raise GeneratorError(f"the builtin-c100 generator is not installed in {folder}; train it with "
                             f"`python benchmarks/generator_builtin.py --variant builtin-c100 --out DIR`.")
    return load_builtin(str(folder), device)


# --------------------------------------------------------------------------------------------- training
def train_builtin(x: np.ndarray, out: str | os.PathLike, *, steps: int = 6000, batch_size: int = 64, latent_dim: int = 128,
                  base_channels: int = 64, d_channels: int = 32, lr: float = 2e-4, ema_decay: float = 0.999,
                  seed: int = 0, checkpoint_every: int = 250, log_every: int = 25, meta: dict | None = None,
                  progress: bool = True, on_log: Callable[[dict], None] | None = None) -> dict:
    """Train the built-in GAN on uint8 NHWC images ``x`` and write it (and its curves and samples) into ``out``.

    Resumes from ``out/checkpoint.*`` when present (the architecture must match; ``steps`` may grow).
    Returns the final ``generator.json`` contents.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n, h, w, c = x.shape
    if h != w:
        raise GeneratorError(f"the built-in generator is trained on square images, got {h}×{w}.")
    arch = {"latent_dim": latent_dim, "resolution": h, "channels": c, "base_channels": base_channels, "d_channels": d_channels,
            "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay, "seed": seed}
    torch.manual_seed(seed)
    G, D = GeneratorNet(latent_dim, h, c, base_channels), DiscriminatorNet(h, c, d_channels)
    G_ema = GeneratorNet(latent_dim, h, c, base_channels)
    G_ema.load_state_dict(G.state_dict())
    G_ema.requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(np.ascontiguousarray(x))
    fixed_z = torch.randn(64, latent_dim, generator=torch.Generator().manual_seed(seed + 1))

    def export(log: list[dict], step: int, elapsed: float) -> dict:
        final = GeneratorNet(latent_dim, h, c, base_channels)
        final.load_state_dict(G_ema.state_dict())
        recalibrate_batchnorm(final, latent_dim, torch.Generator().manual_seed(seed + 2))
        config = {"latent_dim": latent_dim, "resolution": h, "channels": c, "base_channels": base_channels,
                  "prior": "N(0, I)", "steps": step, "train_seconds": round(elapsed, 1), "train_images": int(n),
                  "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay, "d_channels": d_channels, "seed": seed,
                  "torch_threads": torch.get_num_threads(), **(meta or {})}
        save_builtin(final, config, out)
        g = BuiltinGenerator(final, config)
        save_png(image_grid(g.synthesize(fixed_z), ncol=8), out / "samples.png", upscale=2)
        if log:
            plot_losses(log, out / "losses.png")
        return config

    def one_step() -> StepResult:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        real = data[idx].permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        if c == 3:
            flip = torch.rand(batch_size, generator=gen) < 0.5
            real[flip] = real[flip].flip(-1)
        z = torch.randn(batch_size, latent_dim, generator=gen)
        fake = G(z)
        s_real, s_fake = D(real), D(fake.detach())
        d_loss = F.relu(1.0 - s_real).mean() + F.relu(1.0 + s_fake).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = -D(fake).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        return d_loss, g_loss, s_real, s_fake

    return run_gan_training(out, arch, G, D, G_ema, opt_g, opt_d, gen, one_step, export, steps=steps, ema_decay=ema_decay,
                            checkpoint_every=checkpoint_every, log_every=log_every, progress=progress, desc="generator",
                            on_log=on_log)
