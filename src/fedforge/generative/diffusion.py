"""Stable-Diffusion-compatible diffusers pipelines (``diffusers:DIR``), seen through their initial noise.

* latent = the initial noise of the denoising loop, ``in_channels × (H/f) × (W/f)`` flattened
  (4 × 64 × 64 = 16,384 for SD 1.5 at 512 px; f is the VAE's down-sampling factor, 8 for SD);
* prior = N(0, I) in that space (the pipeline scales it by the scheduler's ``init_noise_sigma`` itself);
* ``synthesize(latents, condition)`` runs the pipeline from exactly those latents, conditioned on the text
  prompt ``condition`` (default: the back-end's ``prompt`` option), with ``steps`` denoising steps and
  classifier-free ``guidance``;
* ``img2img(images, strength, condition, rng)`` varies images the way PCEvolve does (diffusers'
  ``StableDiffusionImg2ImgPipeline`` on the same components): each image is encoded by the VAE, noised to the
  level ``strength`` of the schedule and denoised for the last ``int(steps·strength)`` of ``steps`` steps under the
  prompt (strength 0 gives the images back, 1 starts from almost pure noise).

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


def _import_pipeline_class(name: str = "StableDiffusionPipeline"):
    try:
        import diffusers
    except ImportError:
        raise GeneratorError(INSTALL_HINT) from None
    return getattr(diffusers, name)


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
        self._img2img_pipe: Any = None
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

    def img2img_steps(self, strength: float) -> int:
        """Length of the schedule img2img uses at ``strength``: ``steps``, unless ``int(steps·strength)`` would be 0
        (diffusers would then denoise for no step); a weak variation then gets the shortest schedule that runs one
        step from noise level ≈ ``strength`` (0 when even one training timestep is too coarse for it)."""
        n = self.steps
        longest = int(getattr(self.pipe.scheduler.config, "num_train_timesteps", 1000))
        while int(n * strength) < 1 and n < longest:
            n += 1
        return n if int(n * strength) >= 1 else 0

    def _image_pipeline(self) -> Any:
        """diffusers' img2img pipeline on this pipeline's components (shared weights; its own scheduler state)."""
        if self._img2img_pipe is None:
            cls = _import_pipeline_class("StableDiffusionImg2ImgPipeline")
            parts = dict(self.pipe.components)
            parts["scheduler"] = type(parts["scheduler"]).from_config(parts["scheduler"].config)
            pipe = cls(**parts, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            self._img2img_pipe = pipe
        return self._img2img_pipe

    @torch.no_grad()
    def img2img(self, images: np.ndarray, strength: float, condition: Any = None,
                rng: np.random.Generator | torch.Generator | int | None = None) -> np.ndarray:
        """uint8 NHWC images at the generator's resolution: each input image (uint8 NHWC, any size and 1 or 3
        channels: fitted first) noised to ``strength`` and denoised under the prompt ``condition`` (default: the
        ``prompt`` option). The same ``rng`` gives the same images: one noise stream per image, drawn from ``rng``,
        so the result does not depend on ``batch_size``."""
        from .images import fit_to_input

        if not 0.0 <= float(strength) <= 1.0:
            raise GeneratorError(f"img2img strength must lie in [0, 1], got {strength}.")
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise GeneratorError(f"img2img takes uint8 NHWC images, got {getattr(images, 'dtype', type(images))} "
                                 f"of shape {getattr(images, 'shape', None)}.")
        x = fit_to_input(images, (3, self.resolution, self.resolution))
        n_steps = self.img2img_steps(float(strength))
        if n_steps == 0 or len(x) == 0:
            return x.copy()
        g = as_generator(rng)
        seeds = torch.randint(0, 2**62, (len(x),), generator=g, device=g.device).tolist()
        prompt = self.prompt if condition is None else str(condition)
        pipe = self._image_pipeline()
        out = []
        for i in range(0, len(x), self.batch_size):
            xi = torch.from_numpy(x[i : i + self.batch_size]).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            # CPU generators, as in synthesize: diffusers draws on the CPU and moves the noise, the same on every device
            gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[i : i + self.batch_size]]
            res = pipe(prompt=[prompt] * len(xi), image=xi, strength=float(strength), num_inference_steps=n_steps,
                       guidance_scale=self.guidance, generator=gens, output_type="np")
            imgs = np.asarray(res.images, dtype=np.float32)
            out.append(np.clip(np.rint(imgs * 255.0), 0, 255).astype(np.uint8))
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
