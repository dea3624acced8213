"""Image helpers for generated data: fit images to a client's input shape, tile them into a grid, write PNGs.

All images here are uint8 NHWC (the dataset cache format), so generated images go through exactly the same
normalisation as a client's real data (``Federation.to_input``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import GeneratorError

# ITU-R BT.601 luma weights (what PIL's "L" conversion uses)
_LUMA = (0.299, 0.587, 0.114)


def _as_nhwc_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if a.ndim == 3:  # one grayscale batch without a channel axis
        a = a[..., None]
    if a.ndim != 4 or a.shape[3] not in (1, 3, 4):
        raise GeneratorError(f"images must be uint8 NHWC with 1, 3 or 4 channels, got shape {a.shape}.")
    if a.dtype != np.uint8:
        raise GeneratorError(f"images must be uint8 (0-255), got {a.dtype}; convert them with to_uint8 first.")
    return a[..., :3] if a.shape[3] == 4 else a


def to_uint8(images: torch.Tensor, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """Float NCHW images in [low, high] → uint8 NHWC (rounded, clipped)."""
    x = images.detach().float().cpu()
    x = (x - low) * (255.0 / (high - low))
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 NHWC with 1 or 3 channels → ``channels`` (RGB → gray by BT.601 luma; gray → RGB by repetition)."""
    a = _as_nhwc_uint8(images)
    c = a.shape[3]
    if c == channels:
        return a
    if channels == 1 and c == 3:
        luma = a.astype(np.float32) @ np.asarray(_LUMA, dtype=np.float32)
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    if channels == 3 and c == 1:
        return np.repeat(a, 3, axis=3)
    raise GeneratorError(f"cannot convert {c}-channel images to {channels} channels; clients need 1 or 3 channels.")


def resize_images(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 NHWC images so that the shorter side fits, then centre-crop to (height, width).

    Downsizing uses antialiased bilinear interpolation (no aliasing when a 512-px diffusion image becomes 32 px).
    """
    a = _as_nhwc_uint8(images)
    n, h, w, c = a.shape
    if (h, w) == (height, width):
        return a.copy()
    scale = max(height / h, width / w)
    nh, nw = max(height, int(round(h * scale))), max(width, int(round(w * scale)))
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def fit_to_input(images: np.ndarray, input_shape: tuple[int, int, int]) -> np.ndarray:
    """Generated uint8 NHWC images → the client's input shape ``(C, H, W)``: resize/crop, then convert channels."""
    c, h, w = (int(v) for v in input_shape)
    return convert_channels(resize_images(images, h, w), c)


def image_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC image (``ncol`` columns; about square by default)."""
    a = _as_nhwc_uint8(images)
    n, h, w, c = a.shape
    if n == 0:
        return np.full((h or 1, w or 1, c), fill, dtype=np.uint8)
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y : y + h, x : x + w] = a[i]
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike, upscale: int = 1) -> Path:
    """Write one HWC (or HW) uint8 image as a PNG (nearest-neighbour ``upscale`` for tiny images)."""
    from PIL import Image

    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if upscale > 1:
        a = np.repeat(np.repeat(a, upscale, axis=0), upscale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    Image.fromarray(a).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
