"""The built-in generator, version 2: a class-conditional residual GAN (SNGAN/BigGAN family) trained with DiffAugment.

Why this design (issue 23): FedKTL and ``fedforge synth`` draw thousands of images per round on clients' machines
and CPUs, so the generator must make an image in one forward pass (a diffusion model needs 20-50 passes); on
CIFAR-sized data the residual GAN with a projection discriminator and spectral normalisation (Miyato & Koyama, 2018;
Brock et al., 2019) is the strongest one-pass design, and DiffAugment (Zhao et al., 2020: the same differentiable
colour/translation/cut-out augmentation applied to real and generated images before the discriminator) keeps the
discriminator from over-fitting the 25,000-50,000 training images — the failure of version 1, whose discriminator
stopped separating real from generated images half-way through its training.

* Generator: latent ``w = [z, e]`` with ``z ~ N(0, I)`` (``z_dim``) and ``e`` a class embedding (``embed_dim``) →
  Linear → 4×4 map → transposed-convolution up-blocks whose BatchNorms are conditioned on ``w`` (gain and bias
  predicted from ``w``, BigGAN's conditional BatchNorm) → tanh image. The DCGAN shape of version 1, not BigGAN's
  residual blocks: on this project's 2-core CPU (AVX2, no bf16 units) a residual 128-channel generator costs ~20 s
  per step, this one well under a second.
* Discriminator (training only): SN-DCGAN's convolutions with spectral normalisation, global sum pooling, a
  linear score plus the projection ``<embed(y), h>`` of the class.
* Hinge loss, Adam(β = (0.5, 0.999)), ``d_steps`` discriminator steps per generator step, an exponential moving
  average of the generator's weights (what gets saved, with BatchNorm statistics recomputed over prior samples).

The latent space seen through :class:`~fedforge.generative.base.Generator` is ``w``: ``sample_prior`` draws
``z ~ N(0, I)`` and the embedding of a uniformly drawn class, so a latent carries its class the way a StyleGAN-XL
``W`` vector does (FedKTL maps prototypes into this space). ``synthesize(w, condition)`` with a class condition
(a dataset class id, or a text naming one of the generator's class names, as in PCEvolve's prompts) replaces the
embedding part of every latent with that class's embedding; ``condition=None`` keeps each latent's own.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Generator, GeneratorError, as_generator
from .gan_common import (
    StepResult,
    _levels,
    plot_losses,
    recalibrate_batchnorm,
    run_gan_training,
    save_builtin,
    strided_sn_convs,
    synthesize_in_chunks,
)
from .images import image_grid, save_png

ARCHITECTURE = "cgan"


# -------------------------------------------------------------------------------------------- networks
class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine parameters; gain ``1 + Γ(w)`` and bias ``B(w)`` come from the latent."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Linear(cond_dim, channels, bias=False)
        self.bias = nn.Linear(cond_dim, channels, bias=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        g = 1.0 + self.gain(w)
        return self.bn(x) * g[:, :, None, None] + self.bias(w)[:, :, None, None]


class CGANGenerator(nn.Module):
    """w = [z, class embedding] → image in [−1, 1] (NCHW); ``embed`` maps class indices to their embedding.

    Linear → 4×4 map → k transposed-convolution up-blocks (widths ``width·2^(k-1) … width``), each followed by a
    BatchNorm conditioned on ``w`` and ReLU → a last transposed convolution to the image, tanh."""

    def __init__(self, num_classes: int, z_dim: int = 128, embed_dim: int = 128, resolution: int = 32,
                 channels: int = 3, width: int = 64):
        super().__init__()
        k = _levels(resolution)
        self.z_dim, self.embed_dim, self.width = z_dim, embed_dim, width
        cond = z_dim + embed_dim
        widths = [width * 2 ** (k - 1 - i) for i in range(k)]  # e.g. 256, 128, 64 for 32 px
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.fc = nn.Linear(cond, widths[0] * 16)
        self.bn0 = ConditionalBatchNorm(widths[0], cond)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[i], widths[i + 1], 4, 2, 1, bias=False) for i in range(k - 1))
        self.bns = nn.ModuleList(ConditionalBatchNorm(widths[i + 1], cond) for i in range(k - 1))
        self.out = nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1)
        self.width0 = widths[0]

    def latent(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([z, self.embed(y)], dim=1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn0(self.fc(w).view(w.shape[0], self.width0, 4, 4), w))
        for up, bn in zip(self.ups, self.bns):
            h = F.relu(bn(up(h), w))
        return torch.tanh(self.out(h))


class CGANDiscriminator(nn.Module):
    """image, class → score: strided 4×4 convolutions (widths ``width·2^i``) and a last 3×3 one, all spectrally
    normalised, LeakyReLU(0.1), global sum pooling, a linear score plus the projection ``<embed(y), h>`` of the class."""

    def __init__(self, num_classes: int, resolution: int = 32, channels: int = 3, width: int = 32):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers, c_in = strided_sn_convs(channels, width, _levels(resolution), 0.1)
        layers += [sn(nn.Conv2d(c_in, 2 * c_in, 3, 1, 1)), nn.LeakyReLU(0.1, True)]
        self.body = nn.Sequential(*layers)
        self.score = sn(nn.Linear(2 * c_in, 1))
        self.project = sn(nn.Embedding(num_classes, 2 * c_in))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.body(x).sum(dim=(2, 3))
        return self.score(h).flatten() + (self.project(y) * h).sum(1)


# ------------------------------------------------------------------------------------------ DiffAugment
def diff_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """DiffAugment's colour + translation (1/8) + cut-out (1/2) policy, differentiable in ``x``; random draws from
    ``gen`` (on ``x``'s device is not needed: the draws are small and made on the CPU, then moved)."""
    n, _, h, w = x.shape
    dev = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(dev)

    x = x + (rand(n, 1, 1, 1) - 0.5)  # brightness
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (rand(n, 1, 1, 1) * 2) + m  # saturation
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - m) * (rand(n, 1, 1, 1) + 0.5) + m  # contrast
    # translation by up to 1/8 of the size, zero padding
    sh, sw = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
    tx = torch.randint(-sh, sh + 1, (n, 1, 1), generator=gen).to(dev)
    ty = torch.randint(-sw, sw + 1, (n, 1, 1), generator=gen).to(dev)
    gi, gj = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    gi = torch.clamp(gi[None] + tx + 1, 0, h + 1)
    gj = torch.clamp(gj[None] + ty + 1, 0, w + 1)
    pad = F.pad(x, [1, 1, 1, 1])
    x = pad.permute(0, 2, 3, 1)[torch.arange(n, device=dev)[:, None, None], gi, gj].permute(0, 3, 1, 2)
    # cut-out of half the size
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), generator=gen).to(dev)
    oy = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), generator=gen).to(dev)
    ci, cj = torch.meshgrid(torch.arange(ch, device=dev), torch.arange(cw, device=dev), indexing="ij")
    ci = torch.clamp(ci[None] + ox - ch // 2, 0, h - 1)
    cj = torch.clamp(cj[None] + oy - cw // 2, 0, w - 1)
    mask = torch.ones(n, h, w, device=dev, dtype=x.dtype)
    mask[torch.arange(n, device=dev)[:, None, None], ci, cj] = 0
    return x * mask[:, None]


# ------------------------------------------------------------------------------------------ the back-end
class ConditionalGenerator(Generator):
    """A trained :class:`CGANGenerator` seen through the :class:`Generator` interface (latent ``[z, e]``)."""

    kind = "builtin"
    conditional = True

    def __init__(self, net: CGANGenerator, config: dict, device: str | torch.device = "cpu", source: str = ""):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval().requires_grad_(False)
        self.config = config
        self.z_dim, self.embed_dim = net.z_dim, net.embed_dim
        self.latent_dim = self.z_dim + self.embed_dim
        self.resolution = int(config["resolution"])
        self.channels = int(config["channels"])
        self.classes: list[int] = [int(c) for c in config["classes"]]
        self.class_names: list[str] = [str(s) for s in config.get("class_names") or []]
        self.source = source

    def _class_index(self, condition: Any) -> int | None:
        """The generator's own class index of a condition (dataset class id, or a text naming a class), or None."""
        if condition is None:
            return None
        if isinstance(condition, (int, np.integer)) and not isinstance(condition, bool):
            if int(condition) not in self.classes:
                raise GeneratorError(f"class {int(condition)} is not one of this generator's classes "
                                     f"({self.classes[0]}..{self.classes[-1]}, {len(self.classes)} in all).")
            return self.classes.index(int(condition))
        text = str(condition).lower().replace("_", " ")
        best: tuple[int, int] | None = None  # (length of the matched name, index)
        for i, name in enumerate(self.class_names):
            pattern = r"\b" + re.escape(name.lower().replace("_", " ")) + r"\b"
            if re.search(pattern, text) and (best is None or len(name) > best[0]):
                best = (len(name), i)
        return None if best is None else best[1]

    def class_latents(self, z: torch.Tensor, condition: Any) -> torch.Tensor:
        """Latents with the embedding part set to the condition's class (unchanged when it names no class)."""
        w = self.check_latents(z)
        i = self._class_index(condition)
        if i is None:
            return w
        e = self.net.embed.weight[i].detach().to(w)
        return torch.cat([w[:, : self.z_dim], e.expand(w.shape[0], -1)], dim=1)

    def sample_prior(self, n: int, rng=None) -> torch.Tensor:
        gen = as_generator(rng)
        z = torch.randn(int(n), self.z_dim, generator=gen)
        y = torch.randint(0, len(self.classes), (int(n),), generator=gen)
        with torch.no_grad():
            e = self.net.embed.weight.detach().cpu().float()[y]
        return torch.cat([z, e], dim=1)

    @torch.no_grad()
    def synthesize(self, latents: torch.Tensor, condition: Any = None) -> np.ndarray:
        return synthesize_in_chunks(self.net, self.class_latents(latents, condition), self.device, self.resolution,
                                    self.channels)

    def vary(self, latents: torch.Tensor, strength: float, rng=None) -> torch.Tensor:
        """Vary the noise part only; the class part stays (a class-preserving variation)."""
        w = self.check_variation(latents, strength)
        z = w[:, : self.z_dim]
        fresh = torch.randn(z.shape, generator=as_generator(rng)).to(z)
        a, b = 1.0 - strength, strength
        z2 = z.clone() if strength == 0.0 else (a * z + b * fresh) / float(np.sqrt(a * a + b * b))
        return torch.cat([z2, w[:, self.z_dim:]], dim=1)

    def __repr__(self) -> str:
        return (f"ConditionalGenerator({self.source or 'in memory'}, {len(self.classes)} classes, "
                f"latent {self.latent_dim} = z {self.z_dim} + class {self.embed_dim}, {self.resolution}px)")


def build_from_config(config: dict) -> CGANGenerator:
    return CGANGenerator(len(config["classes"]), int(config["z_dim"]), int(config["embed_dim"]),
                         int(config["resolution"]), int(config["channels"]), int(config["width"]))


# --------------------------------------------------------------------------------------------- training
def train_cgan(x: np.ndarray, y: np.ndarray, classes: Sequence[int], out: str | os.PathLike, *, steps: int = 20000,
               batch_size: int = 64, z_dim: int = 128, embed_dim: int = 128, width: int = 64, d_width: int = 32,
               lr_g: float = 2e-4, lr_d: float = 2e-4, d_steps: int = 1, ema_decay: float = 0.999, seed: int = 0,
               bf16: bool = False, class_names: Sequence[str] | None = None, checkpoint_every: int = 250,
               log_every: int = 25, meta: dict | None = None, progress: bool = True,
               on_log: Callable[[dict], None] | None = None) -> dict:
    """Train the class-conditional GAN on uint8 NHWC images ``x`` with dataset labels ``y`` (each in ``classes``)
    and write it into ``out`` (weights, config, curves, a class-by-row sample grid). Resumes from ``out``'s checkpoint.

    ``bf16``: run both networks under CPU/CUDA bfloat16 autocast (AMX units make it several times faster on recent
    CPUs); the weights, optimiser states and the weight average stay float32.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n, h, w_, c = x.shape
    if h != w_:
        raise GeneratorError(f"the built-in generator is trained on square images, got {h}×{w_}.")
    classes = [int(k) for k in classes]
    lookup = {k: i for i, k in enumerate(classes)}
    missing = sorted(set(np.unique(y).tolist()) - set(lookup))
    if missing:
        raise GeneratorError(f"labels {missing[:5]} are not among the generator's classes.")
    arch = {"architecture": ARCHITECTURE, "z_dim": z_dim, "embed_dim": embed_dim, "resolution": h, "channels": c,
            "width": width, "d_width": d_width, "batch_size": batch_size, "lr_g": lr_g, "lr_d": lr_d,
            "d_steps": d_steps, "ema_decay": ema_decay, "seed": seed, "bf16": bool(bf16), "classes": classes}
    torch.manual_seed(seed)
    K = len(classes)
    G, D = CGANGenerator(K, z_dim, embed_dim, h, c, width), CGANDiscriminator(K, h, c, d_width)
    G_ema = CGANGenerator(K, z_dim, embed_dim, h, c, width)
    G_ema.load_state_dict(G.state_dict())
    G_ema.requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr_g, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr_d, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(np.ascontiguousarray(x))
    labels = torch.as_tensor([lookup[int(v)] for v in y], dtype=torch.long)
    fixed = torch.Generator().manual_seed(seed + 1)
    shown = [int(i) for i in np.linspace(0, K - 1, min(K, 10)).round()]
    fixed_z = torch.randn(8, z_dim, generator=fixed)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(bf16))

    def export(log: list[dict], step: int, elapsed: float) -> dict:
        final = CGANGenerator(K, z_dim, embed_dim, h, c, width)
        final.load_state_dict(G_ema.state_dict())
        g_cpu = torch.Generator().manual_seed(seed + 2)

        def prior(m: int) -> torch.Tensor:
            return final.latent(torch.randn(m, z_dim, generator=g_cpu), torch.randint(0, K, (m,), generator=g_cpu))

        recalibrate_batchnorm(final, 0, g_cpu, sample=prior)
        config = {"architecture": ARCHITECTURE, "z_dim": z_dim, "embed_dim": embed_dim, "latent_dim": z_dim + embed_dim,
                  "width": width, "resolution": h, "channels": c, "classes": classes,
                  "class_names": list(class_names or []), "prior": "[z ~ N(0, I), embedding of a uniform class]",
                  "steps": step, "train_seconds": round(elapsed, 1), "train_images": int(n), "batch_size": batch_size,
                  "lr_g": lr_g, "lr_d": lr_d, "d_steps": d_steps, "d_width": d_width, "ema_decay": ema_decay,
                  "diffaugment": "color,translation,cutout", "bf16": bool(bf16), "seed": seed,
                  "torch_threads": torch.get_num_threads(), **(meta or {})}
        save_builtin(final, config, out)
        g = ConditionalGenerator(final, config)
        grid = np.concatenate([g.synthesize(torch.cat([fixed_z, torch.zeros(8, embed_dim)], 1), classes[i]) for i in shown])
        save_png(image_grid(grid, ncol=8), out / "samples.png", upscale=2)
        if log:
            plot_losses(log, out / "losses.png", title="built-in generator v2 (class-conditional GAN) training")
        return config

    def real_batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        real = data[idx].permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        if c == 3:
            flip = torch.rand(batch_size, generator=gen) < 0.5
            real[flip] = real[flip].flip(-1)
        return real, labels[idx]

    def fake_batch() -> tuple[torch.Tensor, torch.Tensor]:
        yf = torch.randint(0, K, (batch_size,), generator=gen)
        z = torch.randn(batch_size, z_dim, generator=gen)
        return G(G.latent(z, yf)), yf

    def one_step() -> StepResult:
        for _ in range(d_steps):
            real, yr = real_batch()
            with autocast:
                with torch.no_grad():
                    fake, yf = fake_batch()
                s_real = D(diff_augment(real, gen), yr).float()
                s_fake = D(diff_augment(fake.float(), gen), yf).float()
                d_loss = F.relu(1.0 - s_real).mean() + F.relu(1.0 + s_fake).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        with autocast:
            fake, yf = fake_batch()
            g_loss = -D(diff_augment(fake.float(), gen), yf).float().mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        return d_loss, g_loss, s_real, s_fake

    return run_gan_training(out, arch, G, D, G_ema, opt_g, opt_d, gen, one_step, export, steps=steps, ema_decay=ema_decay,
                            checkpoint_every=checkpoint_every, log_every=log_every, progress=progress, desc="generator v2",
                            on_log=on_log)
