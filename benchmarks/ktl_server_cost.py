"""FedKTL's server work per round (domain alignment + generating one image per class), measured on this machine.

* builtin: the shipped generator with the authors' server settings (100 epochs, batch 100) for C classes and
  P uploaded prototypes (P = C for one client; about 0.45·C·N for N Dirichlet clients);
* diffusers: a *tiny randomly initialised* Stable-Diffusion-shaped pipeline (the one the tests build; 16 px,
  4×8×8 latent) with 50 DDIM steps and guidance 7.5, i.e. the real pipeline code at toy size;
* Stable Diffusion 1.5 at its real size: one UNet forward pass (batch 2: the two halves of classifier-free
  guidance) and one VAE decode of SD 1.5's architecture with random weights at 512 px, timed once, plus the
  alignment at SD's 16,384-dim latent; a round needs C·steps UNet passes and C decodes, so the per-round cost is
  that arithmetic on measured numbers (the weights' values do not change the time).

Needs diffusers and transformers for the last two parts (skipped otherwise).

    scripts/cpu-slot .venv/bin/python benchmarks/ktl_server_cost.py --table docs/benchmarks/fedktl-server-cost.md
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


class _Ctx:
    def __init__(self, num_classes: int, input_shape=(3, 32, 32)):
        self.num_classes, self.input_shape, self.device, self.seed = num_classes, input_shape, "cpu", 0
        self.generator, self.trust_generator_pickle = None, False


def server_round(generator, num_classes: int, num_protos: int, epochs: int = 100, generate: bool = True) -> dict:
    """Time one FedKTL server round (alignment, then generation) with the algorithm's own code."""
    from fedforge.algorithms.fedktl import FedKTL, FedKTLParams

    algo = FedKTL.__new__(FedKTL)  # the algorithm with a given generator, without a federation around it
    algo.hp, algo.ctx = FedKTLParams.from_dict({"server_epochs": epochs}), _Ctx(num_classes)
    algo.generator_spec, algo._generator, algo.kind = "given", generator, getattr(generator, "kind", "builtin")
    algo.lam, algo.mu, algo.server_lr, algo.latent_dim, algo._etf = 1.0, 50.0, 0.01, generator.latent_dim, None
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(num_protos, num_classes, generator=g), dim=1)
    labels = torch.arange(num_protos) % num_classes
    server = algo.init_server()
    t0 = time.perf_counter()
    server, hist = algo.align(server, protos, labels, rnd=1)
    t1 = time.perf_counter()
    if generate:
        algo.generate(server["centroids"])
    t2 = time.perf_counter()
    return {"align_s": t1 - t0, "generate_s": t2 - t1, "mmd_first": hist["mmd"][0], "mmd_last": hist["mmd"][-1]}


class _LatentOnly:
    """A prior of a given dimension, to time the alignment at a generator's latent size without the generator."""

    kind = "stable-diffusion"

    def __init__(self, dim: int):
        self.latent_dim = dim

    def sample_prior(self, n, rng=None):
        from fedforge.generative import as_generator

        return torch.randn(n, self.latent_dim, generator=as_generator(rng))


def sd15_unet_and_vae_seconds() -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280),
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                cross_attention_dim=768, attention_head_dim=8).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512).eval()
    out = {"unet_params_M": sum(p.numel() for p in unet.parameters()) / 1e6,
           "vae_decoder_params_M": sum(p.numel() for p in vae.decoder.parameters()) / 1e6}
    with torch.no_grad():
        lat, text = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
        t = time.perf_counter()
        unet(lat, 10, encoder_hidden_states=text)
        out["unet_forward_batch2_s"] = time.perf_counter() - t
        t = time.perf_counter()
        vae.decode(torch.randn(1, 4, 64, 64))
        out["vae_decode_s"] = time.perf_counter() - t
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", default="docs/benchmarks/fedktl-server-cost.md")
    p.add_argument("--json", default="bench-runs/ktl-server-cost.json")
    p.add_argument("--skip-sd15", action="store_true", help="skip the SD 1.5-size timing (several GB of memory)")
    p.add_argument("--epochs", type=int, default=100, help="server epochs (the authors' value: 100)")
    args = p.parse_args(argv)
    from fedforge.generative import load_generator

    res: dict = {"threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    builtin = load_generator("builtin")
    server_round(builtin, 10, 10, 2)  # warm-up (first-call allocations are not per-round cost)
    res["builtin"] = {f"C{c}_P{n}": server_round(builtin, c, n, args.epochs) for c, n in ((50, 50), (50, 450), (100, 900))}
    res["sd_latent_alignment"] = {"C50_P50": server_round(_LatentOnly(16384), 50, 50, args.epochs, generate=False)}
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
        have_diffusers = True
    except ImportError:
        have_diffusers = False
    if have_diffusers:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "generative"))
        from test_generators import build_tiny_sd_pipeline

        with tempfile.TemporaryDirectory() as tmp:
            tiny = load_generator(f"diffusers:{build_tiny_sd_pipeline(Path(tmp) / 'pipe')}", steps=50, guidance=7.5)
            res["tiny_diffusers"] = {"C50_P50": server_round(tiny, 50, 50, args.epochs)}
        if not args.skip_sd15:
            res["sd15_random_weights"] = sd15_unet_and_vae_seconds()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    write_table(res, Path(args.table))
    print(json.dumps(res, indent=2))
    return 0


def write_table(res: dict, path: Path) -> None:
    f = lambda v: f"{v:.2f}"  # noqa: E731
    lines = ["# FedKTL: server seconds per round", "",
             "Measured by `benchmarks/ktl_server_cost.py` on this machine (2-core CPU, "
             f"{res['threads']} torch thread(s), inside `scripts/cpu-slot`). Command:", "",
             "```", "scripts/cpu-slot .venv/bin/python benchmarks/ktl_server_cost.py --table docs/benchmarks/fedktl-server-cost.md",
             "```", "", "Alignment = 100 server epochs (batch 100, Adam) of MMD² to the prior + λ·MSE to the class centroids over P "
             "uploaded prototypes of C classes; generation = one image per class from its latent centroid.", "",
             "| generator | C classes | P prototypes | alignment s | generation s | server s/round |", "|---|---|---|---|---|---|"]
    for name, label in (("builtin", "builtin (shipped GAN, 128-d latent, 32 px)"),
                        ("tiny_diffusers", "diffusers: tiny random SD-shaped pipeline (16 px, 4×8×8 latent, 50 steps, guidance 7.5)"),
                        ("sd_latent_alignment", "alignment only at SD 1.5's latent size (16,384)")):
        for key, r in res.get(name, {}).items():
            c, n = key[1:].split("_P")
            gen = f(r["generate_s"]) if name != "sd_latent_alignment" else "-"
            lines.append(f"| {label} | {c} | {n} | {f(r['align_s'])} | {gen} | {f(r['align_s'] + r['generate_s'])} |")
    sd = res.get("sd15_random_weights")
    if sd:
        steps, c = 50, 100
        per_round = c * steps * sd["unet_forward_batch2_s"] + c * sd["vae_decode_s"]
        lines += ["", "**Stable Diffusion 1.5 at its real size** (random weights: the values do not change the time). "
                  f"One UNet forward pass ({sd['unet_params_M']:.0f} M parameters) at 512 px with batch 2 (the two halves of "
                  f"classifier-free guidance) took {sd['unet_forward_batch2_s']:.1f} s and one VAE decode "
                  f"({sd['vae_decoder_params_M']:.0f} M decoder parameters) {sd['vae_decode_s']:.1f} s. "
                  f"One FedKTL round generates one image per class with {steps} steps, so for CIFAR-100 (C = {c}) the "
                  f"generation alone is {c}·{steps}·{sd['unet_forward_batch2_s']:.1f} + {c}·{sd['vae_decode_s']:.1f} s "
                  f"≈ {per_round / 3600:.1f} hours per round on this CPU (plus the alignment above at the 16,384-dim "
                  "latent). The paper ran it on GPUs; on a CPU the built-in generator is the practical back-end."]
    elif "tiny_diffusers" not in res:
        lines += ["", "diffusers was not installed, so the diffusion rows were skipped."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
