"""The generator interface shared by FedKTL and synthetic-data evolution, and its back-end registry.

A generator maps latents (its own prior's samples, flattened to ``latent_dim``) to images:

* ``sample_prior(n, rng)`` → (n, latent_dim) float32 latents from the generator's own prior
  (W vectors from a StyleGAN mapping network, flattened initial noise for diffusion, N(0, I) for a GAN);
* ``synthesize(latents, condition=None)`` → uint8 NHWC images (``condition``: a text prompt or class for
  conditioned back-ends; ignored by unconditional ones);
* ``vary(latents, strength, rng)`` → new latents near the given ones (strength 0 = same, 1 = fresh prior sample).

Back-ends register under a spec prefix (``builtin[:PATH]``, ``diffusers:DIR``, ``stylegan:FILE.pkl``) and are
built with :func:`load_generator`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np
import torch

from ..errors import FedforgeError
from ..registry import Registry

GENERATORS: Registry[Callable[..., Generator]] = Registry(
    "generator", "see `fedforge list generators`",
    populate=("fedforge.generative.builtin", "fedforge.generative.diffusion", "fedforge.generative.stylegan"))


class GeneratorError(FedforgeError):
    """A generator cannot be loaded or used as asked (missing weights, wrong latent shape, missing extra)."""


def as_generator(rng: np.random.Generator | torch.Generator | int | None) -> torch.Generator:
    """A torch.Generator from a seed, a numpy Generator or a torch Generator (reproducible sampling)."""
    if isinstance(rng, torch.Generator):
        return rng
    if isinstance(rng, np.random.Generator):
        return torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
    return torch.Generator().manual_seed(0 if rng is None else int(rng))


class Generator(ABC):
    """A pretrained image generator seen through its latent space."""

    latent_dim: int
    resolution: int
    channels: int = 3
    conditional: bool = False  # whether ``condition`` (e.g. a prompt) changes the output

    @abstractmethod
    def sample_prior(self, n: int, rng: np.random.Generator | torch.Generator | int | None = None) -> torch.Tensor:
        """(n, latent_dim) latents drawn from the generator's own prior."""

    @abstractmethod
    def synthesize(self, latents: torch.Tensor, condition: Any = None) -> np.ndarray:
        """uint8 NHWC images, one per latent."""

    def vary(self, latents: torch.Tensor, strength: float, rng: np.random.Generator | torch.Generator | int | None = None) -> torch.Tensor:
        """Latents near ``latents``: spherical-style mix sqrt(1−s²)… by default ``(1−s)·z + s·z_fresh`` rescaled
        so that the prior's scale is kept (s = 0: same latents; s = 1: fresh prior samples)."""
        z = self.check_variation(latents, strength)
        fresh = self.sample_prior(z.shape[0], rng).to(z)
        if strength == 0.0:
            return z.clone()
        if strength == 1.0:
            return fresh
        a, b = 1.0 - strength, strength
        return (a * z + b * fresh) / float(np.sqrt(a * a + b * b))

    def check_variation(self, latents: torch.Tensor, strength: float) -> torch.Tensor:
        """``latents`` checked as by :meth:`check_latents`, after refusing a strength outside [0, 1]."""
        if not 0.0 <= strength <= 1.0:
            raise GeneratorError(f"variation strength must lie in [0, 1], got {strength}.")
        return self.check_latents(latents)

    def check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        z = torch.as_tensor(latents, dtype=torch.float32)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise GeneratorError(f"latents must have shape (n, {self.latent_dim}), got {tuple(z.shape)}.")
        return z


def load_generator(spec: str, **options: Any) -> Generator:
    """Build a generator from ``builtin[:PATH]``, ``diffusers:DIR`` or ``stylegan:FILE.pkl``."""
    kind, _, arg = spec.partition(":")
    return GENERATORS.get(kind)(arg or None, **options)
