"""What fedforge's built-in GANs (version 1, :mod:`.builtin`; version 2, :mod:`.cgan`) share: the file format,
the image-size rule, optimiser-state flattening for safetensors checkpoints, the weight average's decay ramp,
BatchNorm recalibration of the averaged weights and the loss plot."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
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


def strided_sn_convs(channels: int, width: int, levels: int, slope: float) -> tuple[list[nn.Module], int]:
    """The discriminators' body: ``levels`` spectrally normalised strided 4×4 convolutions of widths ``width·2^i``,
    each followed by LeakyReLU(``slope``); returns the layers and the last width."""
    sn = nn.utils.parametrizations.spectral_norm
    layers: list[nn.Module] = []
    c_in = channels
    for i in range(levels):
        c_out = width * 2**i
        layers += [sn(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(slope, True)]
        c_in = c_out
    return layers, c_in


@torch.no_grad()
def synthesize_in_chunks(net: nn.Module, latents: torch.Tensor, device: torch.device, resolution: int, channels: int,
                         chunk: int = 256) -> np.ndarray:
    """uint8 NHWC images of ``net`` (latents → images in [−1, 1]) on ``device``, ``chunk`` latents at a time."""
    from .images import to_uint8

    out = [to_uint8(net(latents[i: i + chunk].to(device))) for i in range(0, latents.shape[0], chunk)]
    if not out:
        return np.zeros((0, resolution, resolution, channels), np.uint8)
    return np.concatenate(out)


StepResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # d_loss, g_loss, D(real), D(fake)


def run_gan_training(out: Path, arch: dict, G: nn.Module, D: nn.Module, G_ema: nn.Module,
                     opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, gen: torch.Generator,
                     one_step: Callable[[], StepResult], export: Callable[[list[dict], int, float], dict], *,
                     steps: int, ema_decay: float, checkpoint_every: int, log_every: int, progress: bool, desc: str,
                     on_log: Callable[[dict], None] | None = None) -> dict:
    """The training loop both built-in GANs share: resume from ``out``'s checkpoint (which must be of ``arch``), call
    ``one_step()`` (the discriminator and generator updates, drawing from ``gen``) until ``steps``, update the weight
    average ``G_ema``, log means over ``log_every`` steps, and every ``checkpoint_every`` steps write a checkpoint
    (both networks, the average, both Adam states, the random stream) and ``export(log, step, seconds)``.
    Returns the last export's config."""
    from safetensors.torch import load_file, save

    step, elapsed, log = 0, 0.0, []
    if (out / CKPT_META).is_file() and (out / CKPT).is_file():
        meta_ck = json.loads((out / CKPT_META).read_text())
        if meta_ck.get("arch") != arch:
            raise GeneratorError(f"{out} holds a checkpoint of another configuration ({meta_ck.get('arch')}); use another --out.")
        flat = load_file(str(out / CKPT))
        for prefix, mod in (("G", G), ("D", D), ("G_ema", G_ema)):
            mod.load_state_dict({k[len(prefix) + 1:]: v for k, v in flat.items() if k.startswith(prefix + ".")})
        _restore_opt("opt_g", opt_g, flat)
        _restore_opt("opt_d", opt_d, flat)
        gen.set_state(flat["rng"])
        step, elapsed = int(meta_ck["step"]), float(meta_ck["elapsed_seconds"])
        if (out / LOSSES).is_file():
            log = [json.loads(line) for line in (out / LOSSES).read_text().splitlines() if line.strip()]
            log = [r for r in log if r["step"] <= step]

    def checkpoint() -> None:
        flat = {f"G.{k}": v for k, v in G.state_dict().items()} | {f"D.{k}": v for k, v in D.state_dict().items()}
        flat |= {f"G_ema.{k}": v for k, v in G_ema.state_dict().items()}
        flat |= _flatten_opt("opt_g", opt_g) | _flatten_opt("opt_d", opt_d)
        flat["rng"] = gen.get_state()
        flat = {k: v.detach().contiguous().cpu() for k, v in flat.items()}
        atomic_write_bytes(out / CKPT, save(flat))
        atomic_write_text(out / LOSSES, "".join(json.dumps(r) + "\n" for r in log))
        atomic_write_text(out / CKPT_META, json.dumps({"arch": arch, "step": step, "elapsed_seconds": elapsed}, indent=2) + "\n")

    bar = None
    if progress and step < steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=step, desc=desc, unit="step", dynamic_ncols=True)
    keys = ("d_loss", "g_loss", "d_real", "d_fake")
    acc, n_acc = dict.fromkeys(keys, 0.0), 0
    G.train()
    D.train()
    t_last = time.perf_counter()
    while step < steps:
        values = one_step()
        with torch.no_grad():
            decay = ema_decay_at(step, ema_decay)
            for pe, p in zip(G_ema.parameters(), G.parameters()):
                pe.lerp_(p, 1.0 - decay)
            for be, b in zip(G_ema.buffers(), G.buffers()):
                be.copy_(b)
        step += 1
        for key, v in zip(keys, values):
            acc[key] += float(v.detach().float().mean())
        n_acc += 1
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        if step % log_every == 0 or step == steps:
            rec = {"step": step, **{key: v / n_acc for key, v in acc.items()}, "seconds": round(elapsed, 1)}
            log.append(rec)
            acc, n_acc = dict.fromkeys(keys, 0.0), 0
            if on_log:
                on_log(rec)
            if bar is not None:
                bar.set_postfix(d=f"{rec['d_loss']:.3f}", g=f"{rec['g_loss']:.3f}", refresh=False)
        if bar is not None:
            bar.update(1)
        if step % checkpoint_every == 0 or step == steps:
            checkpoint()
            export(log, step, elapsed)
            t_last = time.perf_counter()  # writing outputs is not training time
    if bar is not None:
        bar.close()
    if not (out / CKPT).is_file():
        checkpoint()
    return export(log, step, elapsed)
