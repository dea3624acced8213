"""StyleGAN2 / StyleGAN3 / StyleGAN-XL network pickles (``stylegan:FILE.pkl``), seen through their W space.

The file is a pickle whose ``G_ema`` network has ``mapping`` (z, c → W⁺), ``synthesis`` (W⁺ → image in [−1, 1]),
``z_dim``, ``w_dim``, ``c_dim``, ``num_ws``, ``img_resolution`` and ``img_channels``.

* latent = one W vector (``w_dim``); the prior is ``mapping(z ~ N(0, I), c)`` of a random class for
  class-conditional networks (StyleGAN-XL's ImageNet models), read at the first of the ``num_ws`` copies;
* ``synthesize`` repeats the W vector ``num_ws`` times and runs ``synthesis`` with constant noise;
* ``vary`` interpolates linearly in W towards a fresh prior sample (W is not a centred Gaussian).

Unpickling runs code from the file, so it is refused unless the caller passes ``trust_pickle=True``
(``--trust-generator-pickle``). Official NVlabs pickles also need NVlabs' ``dnnlib`` and ``torch_utils`` packages
importable (from the stylegan3 or stylegan-xl repository, e.g. on ``PYTHONPATH``).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import GENERATORS, Generator, GeneratorError, as_generator
from .images import to_uint8

REQUIRED = ("mapping", "synthesis", "z_dim", "w_dim", "num_ws")
NVLABS_MODULES = ("dnnlib", "torch_utils", "legacy", "training", "pg_modules")


class StyleGANGenerator(Generator):
    """A StyleGAN-family ``G_ema`` network (kind ``stylegan-xl`` when class-conditional, else ``stylegan``)."""

    def __init__(self, G: torch.nn.Module, device: str | torch.device = "cpu", truncation: float = 1.0,
                 batch_size: int = 16, source: str = ""):
        missing = [a for a in REQUIRED if not hasattr(G, a)]
        if missing:
            raise GeneratorError(f"{source or 'the network'} is not a StyleGAN generator (G_ema lacks {', '.join(missing)}).")
        self.device = torch.device(device)
        self.G = G.to(self.device).eval().requires_grad_(False)
        self.z_dim, self.latent_dim = int(G.z_dim), int(G.w_dim)
        self.c_dim, self.num_ws = int(getattr(G, "c_dim", 0) or 0), int(G.num_ws)
        self.resolution = int(getattr(G, "img_resolution", 0) or 0)
        self.channels = int(getattr(G, "img_channels", 3) or 3)
        self.truncation = float(truncation)
        self.batch_size = int(batch_size)
        self.kind = "stylegan-xl" if self.c_dim > 0 else "stylegan"
        self.source = source

    @torch.no_grad()
    def sample_prior(self, n: int, rng=None) -> torch.Tensor:
        gen = as_generator(rng)
        z = torch.randn(int(n), self.z_dim, generator=gen)
        c = None
        if self.c_dim > 0:
            cls = torch.randint(0, self.c_dim, (int(n),), generator=gen)
            c = torch.nn.functional.one_hot(cls, self.c_dim).float()
        out = []
        for i in range(0, int(n), self.batch_size):
            zi = z[i : i + self.batch_size].to(self.device)
            ci = None if c is None else c[i : i + self.batch_size].to(self.device)
            ws = self.G.mapping(zi, ci, truncation_psi=self.truncation)
            out.append(ws[:, 0, :].float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.latent_dim)

    @torch.no_grad()
    def synthesize(self, latents: torch.Tensor, condition: Any = None) -> np.ndarray:
        w = self.check_latents(latents)
        out = []
        for i in range(0, w.shape[0], self.batch_size):
            ws = w[i : i + self.batch_size].to(self.device).unsqueeze(1).repeat(1, self.num_ws, 1)
            out.append(to_uint8(self.G.synthesis(ws, noise_mode="const")))
        if not out:
            return np.zeros((0, self.resolution, self.resolution, self.channels), np.uint8)
        return np.concatenate(out)

    def vary(self, latents: torch.Tensor, strength: float, rng=None) -> torch.Tensor:
        """(1 − s)·w + s·w_fresh: linear interpolation in W (s = 0 keeps w, s = 1 is a fresh prior sample)."""
        w = self.check_variation(latents, strength)
        if strength == 0.0:
            return w.clone()
        return torch.lerp(w, self.sample_prior(w.shape[0], rng).to(w), float(strength))

    def __repr__(self) -> str:
        return f"StyleGANGenerator({self.source}, w_dim {self.latent_dim}, {self.resolution}px, {self.kind})"


def load_stylegan_pickle(path: str | Path, trust_pickle: bool = False) -> torch.nn.Module:
    """The ``G_ema`` network of a StyleGAN pickle (refused unless ``trust_pickle``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise GeneratorError(f"StyleGAN network file {p} does not exist; give the path of a .pkl with a G_ema network.")
    if not trust_pickle:
        raise GeneratorError(
            f"{p} is a Python pickle and loading it runs code from the file; pass --trust-generator-pickle "
            f"if you trust where it came from (official NVlabs networks also need NVlabs' dnnlib and torch_utils importable).")
    try:
        with open(p, "rb") as f:
            data = pickle.load(f)  # noqa: S301 - gated by the explicit trust flag above
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in NVLABS_MODULES:
            raise GeneratorError(
                f"{p} needs NVlabs' '{e.name}' module to load; put the stylegan3 (or stylegan-xl) repository, which holds "
                f"dnnlib and torch_utils, on PYTHONPATH.") from None
        raise GeneratorError(f"{p} needs the Python module '{e.name}' to load; install it or put it on PYTHONPATH.") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError, OSError) as e:
        raise GeneratorError(f"{p} is corrupt or not a StyleGAN network pickle ({type(e).__name__}); re-download it.") from None
    G = data.get("G_ema") if isinstance(data, dict) else None
    if G is None:
        raise GeneratorError(f"{p} holds no 'G_ema' network; give a StyleGAN2/3/XL network pickle.")
    return G


@GENERATORS.register("stylegan", summary="StyleGAN2/3/XL network pickle: stylegan:FILE.pkl (needs --trust-generator-pickle)")
def _stylegan_factory(arg: str | None, device: str = "cpu", trust_pickle: bool = False, truncation: float = 1.0,
                      batch_size: int = 16, **options: Any) -> StyleGANGenerator:
    if options:
        raise GeneratorError(f"the stylegan generator has no option '{next(iter(options))}'; it takes truncation and batch_size.")
    if not arg:
        raise GeneratorError("stylegan: needs a network pickle, as in --generator stylegan:/path/to/network.pkl.")
    G = load_stylegan_pickle(arg, trust_pickle)
    return StyleGANGenerator(G, device, truncation, batch_size, source=str(arg))
