"""What fedforge's built-in GANs (version 1, :mod:`.builtin`; version 2, :mod:`.cgan`) share: the file format,
the image-size rule, optimiser-state flattening for safetensors checkpoints, the weight average's decay ramp,
BatchNorm recalibration of the averaged weights and the loss plot."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .._io import atomic_write_bytes, atomic_write_text
from .base import GeneratorError

FORMAT = "fedforge-builtin-generator"
WEIGHTS, CONFIG = "generator.safetensors", "generator.json"
CKPT, CKPT_META, LOSSES = "checkpoint.safetensors", "checkpoint.json", "losses.jsonl"


def _levels(resolution: int) -> int:
    k = int(round(math.log2(resolution / 4)))
    if resolution < 8 or 4 * 2**k != resolution:
        raise GeneratorError(f"the built-in generator makes square images of 4·2^k pixels (8, 16, 32, 64, ...), not {resolution}.")
    return k


def save_builtin(net: nn.Module, config: dict, out: str | os.PathLike, half: bool = True) -> Path:
    """Write ``generator.safetensors`` (fp16 by default: half the size, no visible change) and ``generator.json``."""
    from safetensors.torch import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in net.state_dict().items()}
    atomic_write_bytes(out / WEIGHTS, save(state))
    atomic_write_text(out / CONFIG, json.dumps({**config, "format": FORMAT, "dtype": "float16" if half else "float32"}, indent=2) + "\n")
    for f in (WEIGHTS, CONFIG):
        os.chmod(out / f, 0o644)  # shareable files, not private temporaries
    return out


def _flatten_opt(prefix: str, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for name, t in st.items():
            out[f"{prefix}/{idx}/{name}"] = torch.as_tensor(t).detach().clone().contiguous()
    return out


def _restore_opt(prefix: str, opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    p = prefix + "/"
    for k, v in flat.items():
        if k.startswith(p):
            idx, name = k[len(p):].split("/", 1)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, latent_dim: int, gen: torch.Generator, batches: int = 20, batch_size: int = 256,
                          sample: Callable[[int], torch.Tensor] | None = None) -> None:
    """Recompute BatchNorm running statistics as exact averages over fresh prior batches (for the EMA weights).

    ``sample(m)`` draws m network inputs (default: N(0, I) latents of ``latent_dim``)."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    for _ in range(batches):
        net(sample(batch_size) if sample is not None else torch.randn(batch_size, latent_dim, generator=gen))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    net.eval()


def plot_losses(log: list[dict], path: str | os.PathLike, title: str = "built-in generator training") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, label in (("d_loss", "discriminator (hinge)"), ("g_loss", "generator (−D(G(z)))")):
        axes[0].plot(steps, [r[key] for r in log], label=label, lw=1)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss (mean over the logging interval)")
    axes[0].legend()
    axes[0].set_title("losses")
    for key, label in (("d_real", "D(real)"), ("d_fake", "D(G(z))")):
        axes[1].plot(steps, [r[key] for r in log], label=label, lw=1)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("mean discriminator score")
    axes[1].legend()
    axes[1].set_title("discriminator scores")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ema_decay_at(step: int, decay: float) -> float:
    """Decay of the weight average at ``step`` (0-based): min(decay, (1 + step) / (10 + step)).

    A fixed 0.999 from the first step leaves 0.999^k of the random initialisation in the average after k steps
    (78 % after 250 steps, so a short run exported noise); the ramp makes the average follow the generator early
    and reach the full decay after about 9,000 steps.
    """
    return min(decay, (1.0 + step) / (10.0 + step))
