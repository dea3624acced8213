"""A tiny Stable-Diffusion-shaped diffusers pipeline with random weights, built from configs (nothing downloaded).

Used by the diffusers back-end tests (tests/generative) and the synth run through it (tests/synth). The components
are those of SD 1.5 at a toy size: a UNet2DConditionModel on 4×8×8 latents, an AutoencoderKL (f = 2, 16 px images),
a CLIP text encoder with a CLIPTokenizer whose vocabulary (the 26 letters) and empty merges are written locally, and
a DDIM scheduler with SD's beta schedule. Two settings make the random VAE behave like a trained one where the
img2img tests look: its posterior's log-variance is set to −30 (SD's encoder is nearly deterministic too), and its
``scaling_factor`` is 1 / std of the latents of random images (how SD's 0.18215 was chosen: unit-variance latents).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def build_tiny_sd_pipeline(path: Path) -> Path:
    """Write the tiny pipeline with ``save_pretrained`` to ``path`` (a folder with model_index.json)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    with torch.no_grad():
        vae.quant_conv.weight[4:] = 0.0  # the log-variance half of the posterior's moments
        vae.quant_conv.bias[4:] = -30.0
        probe = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        vae.register_to_config(scaling_factor=float(1.0 / vae.encode(probe).latent_dist.mean.std()))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=32, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok_dir = path.parent / "tokenizer-files"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=32)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """The folder of the tiny pipeline (skips when the diffusers extra is not installed)."""
    hint = 'is not installed (optional extra: pip install "fedforge[diffusers]")'
    pytest.importorskip("diffusers", reason=f"diffusers {hint}")
    pytest.importorskip("transformers", reason=f"transformers {hint}")
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")
