"""A tiny StyleGAN-shaped network and its pickle (the attributes and calls fedforge reads from NVlabs' ``G_ema``).

Importable (``tests.support.tiny_stylegan``), so a pickle written by one test can be unpickled by any command in the
test process, as an NVlabs pickle is unpickled with NVlabs' modules importable.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyMapping(nn.Module):
    """z (and a one-hot class) → W, broadcast to num_ws copies, with truncation towards w_avg (StyleGAN's API)."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.embed = nn.Linear(c_dim, z_dim) if c_dim else None
        self.fc = nn.Sequential(nn.Linear(2 * z_dim if c_dim else z_dim, w_dim), nn.LeakyReLU(0.2), nn.Linear(w_dim, w_dim))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z, c, truncation_psi=1.0, truncation_cutoff=None, update_emas=False):
        x = F.normalize(z, dim=1) * z.shape[1] ** 0.5
        if self.c_dim:
            x = torch.cat([x, self.embed(c)], dim=1)
        w = self.fc(x)
        w = self.w_avg + (w - self.w_avg) * truncation_psi
        return w.unsqueeze(1).repeat(1, self.num_ws, 1)


class TinySynthesis(nn.Module):
    """W⁺ → image in [−1, 1]: a learned 4×4 constant, style-modulated, up-sampled twice."""

    def __init__(self, w_dim: int, num_ws: int, resolution: int, channels: int):
        super().__init__()
        self.num_ws, self.img_resolution = num_ws, resolution
        self.const = nn.Parameter(torch.randn(8, 4, 4))
        self.styles = nn.ModuleList(nn.Linear(w_dim, 8) for _ in range(num_ws))
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(num_ws - 1))
        self.to_img = nn.Conv2d(8, channels, 1)

    def forward(self, ws, noise_mode="random", force_fp32=False, **kwargs):
        x = self.const.unsqueeze(0).repeat(ws.shape[0], 1, 1, 1) * self.styles[0](ws[:, 0])[:, :, None, None]
        for i, conv in enumerate(self.convs):
            x = F.interpolate(x, scale_factor=2) if x.shape[-1] < self.img_resolution else x
            x = F.leaky_relu(conv(x * self.styles[i + 1](ws[:, i + 1])[:, :, None, None]), 0.2)
        return torch.tanh(self.to_img(x))


class TinyStyleGAN(nn.Module):
    """A network with the attributes FedKTL and the StyleGAN back-end read from NVlabs' G_ema."""

    def __init__(self, c_dim: int = 0):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = 12, c_dim, 10, 3
        self.img_resolution, self.img_channels = 16, 3
        self.mapping = TinyMapping(self.z_dim, c_dim, self.w_dim, self.num_ws)
        self.synthesis = TinySynthesis(self.w_dim, self.num_ws, 16, 3)

    def forward(self, z, c, **kw):
        return self.synthesis(self.mapping(z, c, **kw), **kw)


def write_stylegan_pickle(path: Path, c_dim: int = 0) -> Path:
    torch.manual_seed(0)
    with open(path, "wb") as f:
        pickle.dump({"G_ema": TinyStyleGAN(c_dim), "training_set_kwargs": {}}, f)
    return path
