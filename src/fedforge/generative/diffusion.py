"""Stable-Diffusion-compatible diffusers pipelines (``diffusers:DIR``), seen through their initial noise.

* latent = the initial noise of the denoising loop, ``in_channels × (H/f) × (W/f)`` flattened
  (4 × 64 × 64 = 16,384 for SD 1.5 at 512 px; f is the VAE's down-sampling factor, 8 for SD);
* prior = N(0, I) in that space (the pipeline scales it by the scheduler's ``init_noise_sigma`` itself);
* ``synthesize(latents, condition)`` runs the pipeline from exactly those latents, conditioned on the text
  prompt ``condition`` (default: the back-end's ``prompt`` option), with ``steps`` denoising steps and
  classifier-free ``guidance``.

An optional extra: ``pip install "fedforge[diffusers]"``. The folder is read with ``local_files_only``: nothing
is downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import GENERATORS, Generator, GeneratorError, as_generator

INSTALL_HINT = 'the diffusers back-end needs the optional extra: pip install "fedforge[diffusers]" (diffusers and transformers).'


def _import_pipeline_class():
    try:
        from diffusers import StableDiffusionPipeline
    except ImportError:
        raise GeneratorError(INSTALL_HINT) from None
    return StableDiffusionPipeline


class DiffusersGenerator(Generator):
    """A Stable-Diffusion-compatible pipeline; kind ``stable-diffusion``."""

    kind = "stable-diffusion"
    conditional = True

    def __init__(self, pipe: Any, prompt: str = "a cat", steps: int = 50, guidance: float = 7.5,
                 batch_size: int = 4, source: str = ""):
        self.pipe = pipe
        cfg = pipe.unet.config
        self.latent_channels = int(cfg.in_channels)
        self.latent_size = int(cfg.sample_size)
        self.scale_factor = int(getattr(pipe, "vae_scale_factor", 8))
        self.latent_dim = self.latent_channels * self.latent_size * self.latent_size
        self.resolution = self.latent_size * self.scale_factor
        self.channels = 3
        self.prompt, self.steps, self.guidance, self.batch_size = str(prompt), int(steps), float(guidance), int(batch_size)
        self.source = source
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def sample_prior(self, n: int, rng=None) -> torch.Tensor:
        return torch.randn(int(n), self.latent_dim, generator=as_generator(rng))

    @torch.no_grad()
    def synthesize(self, latents: torch.Tensor, condition: Any = None) -> np.ndarray:
        z = self.check_latents(latents)
        prompt = self.prompt if condition is None else str(condition)
        dtype = self.pipe.unet.dtype
        out = []
        for i in range(0, z.shape[0], self.batch_size):
            zi = z[i : i + self.batch_size]
            shaped = zi.view(-1, self.latent_channels, self.latent_size, self.latent_size).to(self.device, dtype)
            res = self.pipe(prompt=[prompt] * zi.shape[0], latents=shaped, num_inference_steps=self.steps,
                            guidance_scale=self.guidance, output_type="np",
                            generator=torch.Generator(device="cpu").manual_seed(0),
                            height=self.resolution, width=self.resolution)
            imgs = np.asarray(res.images, dtype=np.float32)
            out.append(np.clip(np.rint(imgs * 255.0), 0, 255).astype(np.uint8))
        if not out:
            return np.zeros((0, self.resolution, self.resolution, 3), np.uint8)
        return np.concatenate(out)

    def __repr__(self) -> str:
        return f"DiffusersGenerator({self.source}, latent {self.latent_dim}, {self.resolution}px, {self.steps} steps)"


@GENERATORS.register("diffusers", summary='Stable-Diffusion-compatible diffusers folder: diffusers:DIR (pip install "fedforge[diffusers]")')
def _diffusers_factory(arg: str | None, device: str = "cpu", trust_pickle: bool = False, prompt: str = "a cat",
                       steps: int = 50, guidance: float = 7.5, batch_size: int = 4, dtype: str = "float32",
                       **options: Any) -> DiffusersGenerator:
    if options:
        raise GeneratorError(f"the diffusers generator has no option '{next(iter(options))}'; "
                             f"it takes prompt, steps, guidance, batch_size, dtype and device.")
    if not arg:
        raise GeneratorError("diffusers: needs a pipeline folder, as in --generator diffusers:/path/to/stable-diffusion-v1-5.")
    if int(steps) < 1 or float(guidance) < 0:
        raise GeneratorError(f"diffusers: steps must be >= 1 and guidance >= 0, got steps={steps}, guidance={guidance}.")
    cls = _import_pipeline_class()
    folder = Path(arg).expanduser()
    if not (folder / "model_index.json").is_file():
        raise GeneratorError(f"{folder} is not a diffusers pipeline folder (no model_index.json); give a local "
                             f"Stable-Diffusion-compatible folder such as one written by save_pretrained.")
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(dtype))
    if torch_dtype is None:
        raise GeneratorError(f"diffusers: dtype must be float32, float16 or bfloat16, got {dtype}.")
    try:
        extra = {} if torch_dtype is torch.float32 else {"torch_dtype": torch_dtype}
        pipe = cls.from_pretrained(str(folder), local_files_only=True, safety_checker=None,
                                   requires_safety_checker=False, **extra)
    except Exception as e:  # diffusers raises many error types for incomplete or corrupt folders
        raise GeneratorError(f"cannot load the diffusers pipeline in {folder} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                             f"check that it is a complete Stable-Diffusion-compatible folder.") from None
    pipe = pipe.to(device)
    return DiffusersGenerator(pipe, prompt, steps, guidance, batch_size, source=str(folder))
