"""Generator back-ends: sample → synthesize → vary, shapes, dtypes, reproducibility, and their refusals."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedforge.generative import GENERATORS, GeneratorError, load_generator
from fedforge.generative.builtin import GeneratorNet, default_asset_dir, load_builtin, save_builtin
from fedforge.generative.images import convert_channels, fit_to_input, image_grid, resize_images


def check_interface(g, n: int = 3) -> np.ndarray:
    """The contract every back-end keeps."""
    z = g.sample_prior(n, 7)
    assert z.shape == (n, g.latent_dim) and z.dtype == torch.float32
    assert torch.equal(z, g.sample_prior(n, 7)), "same seed, same prior sample"
    assert not torch.equal(z, g.sample_prior(n, 8)), "another seed, another sample"
    imgs = g.synthesize(z)
    assert isinstance(imgs, np.ndarray) and imgs.dtype == np.uint8
    assert imgs.shape == (n, g.resolution, g.resolution, g.channels)
    assert np.array_equal(imgs, g.synthesize(z)), "synthesis is deterministic"
    assert imgs.std() > 0, "images are not constant"
    # vary: 0 keeps the latents, 1 is a fresh prior sample, in between stays closer to the original than a fresh one
    assert torch.equal(g.vary(z, 0.0, 1), z)
    assert torch.equal(g.vary(z, 1.0, 1), g.sample_prior(n, 1))
    near = g.vary(z, 0.2, 1)
    assert near.shape == z.shape
    assert (near - z).norm() < (g.sample_prior(n, 1) - z).norm()
    with pytest.raises(GeneratorError, match=rf"shape \(n, {g.latent_dim}\)"):
        g.synthesize(torch.zeros(n, g.latent_dim + 1))
    with pytest.raises(GeneratorError, match="strength"):
        g.vary(z, 1.5)
    return imgs


def test_registry_lists_the_three_back_ends():
    assert {"builtin", "diffusers", "stylegan"} <= set(GENERATORS.names())


# ------------------------------------------------------------------------------------------------ builtin
def test_shipped_builtin_generator_loads_and_synthesizes():
    assert (default_asset_dir() / "generator.safetensors").is_file(), "the built-in generator ships with the package"
    size = (default_asset_dir() / "generator.safetensors").stat().st_size
    assert size <= 20 * 2**20
    g = load_generator("builtin")
    assert (g.latent_dim, g.resolution, g.channels) == (128, 32, 3)
    cfg = json.loads((default_asset_dir() / "generator.json").read_text())
    assert cfg["class_subset"] == "0-49" and cfg["dataset"].startswith("cifar100")
    imgs = check_interface(g, n=4)
    # a trained generator makes different images from different latents
    assert np.abs(imgs[0].astype(int) - imgs[1].astype(int)).mean() > 1.0


def test_builtin_round_trip_and_bad_files(tmp_path):
    torch.manual_seed(0)
    net = GeneratorNet(latent_dim=16, resolution=8, channels=1, base_channels=8)
    save_builtin(net, {"latent_dim": 16, "resolution": 8, "channels": 1, "base_channels": 8}, tmp_path / "g", half=False)
    g = load_generator(f"builtin:{tmp_path / 'g'}")
    z = torch.randn(2, 16)
    with torch.no_grad():
        ref = ((net.eval()(z) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(g.synthesize(z), ref), "the saved weights reproduce the network exactly"
    check_interface(g)
    # missing, corrupt, mismatched
    with pytest.raises(GeneratorError, match="missing.*fedforge generator train"):
        load_generator(f"builtin:{tmp_path / 'nowhere'}")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "generator.json").write_text((tmp_path / "g" / "generator.json").read_text())
    (bad / "generator.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(GeneratorError, match="corrupt"):
        load_builtin(str(bad))
    cfg = json.loads((tmp_path / "g" / "generator.json").read_text())
    (bad / "generator.json").write_text(json.dumps({**cfg, "base_channels": 16}))
    (bad / "generator.safetensors").write_bytes((tmp_path / "g" / "generator.safetensors").read_bytes())
    with pytest.raises(GeneratorError, match="does not match"):
        load_builtin(str(bad))
    (bad / "generator.json").write_text("{not json")
    with pytest.raises(GeneratorError, match="not a valid"):
        load_builtin(str(bad))
    with pytest.raises(GeneratorError, match="no option 'prompt'"):
        load_generator(f"builtin:{tmp_path / 'g'}", prompt="a cat")


def test_unknown_back_end_names_the_choices():
    from fedforge.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean: stylegan"):
        load_generator("stylegam:x.pkl")


# ------------------------------------------------------------------------------------------ image helpers
def test_fit_to_input_resizes_and_converts_channels():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 64, 48, 3), dtype=np.uint8)
    out = fit_to_input(rgb, (1, 28, 28))
    assert out.shape == (5, 28, 28, 1) and out.dtype == np.uint8
    # a flat colour stays that colour through resizing, and gray is its BT.601 luma
    flat = np.zeros((1, 64, 64, 3), np.uint8)
    flat[..., 0] = 200
    assert np.all(resize_images(flat, 8, 8) == flat[:, :8, :8])
    assert np.all(convert_channels(flat, 1) == round(0.299 * 200))
    assert fit_to_input(np.zeros((2, 8, 8, 1), np.uint8), (3, 32, 32)).shape == (2, 32, 32, 3)
    grid = image_grid(rgb[:, :8, :8], ncol=2, pad=1)
    assert grid.shape == (3 * 9 + 1, 2 * 9 + 1, 3)
    assert np.array_equal(grid[1:9, 1:9], rgb[0, :8, :8])
    with pytest.raises(GeneratorError, match="uint8"):
        fit_to_input(rgb.astype(np.float32), (3, 8, 8))


# ------------------------------------------------------------------------------------------------ stylegan
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


@pytest.mark.parametrize("c_dim", [0, 5], ids=["unconditional", "class-conditional"])
def test_stylegan_pickle_back_end(tmp_path, c_dim):
    pkl = write_stylegan_pickle(tmp_path / "net.pkl", c_dim)
    g = load_generator(f"stylegan:{pkl}", trust_pickle=True)
    assert (g.latent_dim, g.resolution, g.channels) == (10, 16, 3)
    assert g.kind == ("stylegan-xl" if c_dim else "stylegan")
    check_interface(g)
    # the latent is a W vector: synthesis sees it repeated num_ws times
    w = g.sample_prior(2, 0)
    with torch.no_grad():
        direct = g.G.synthesis(w.unsqueeze(1).repeat(1, 3, 1))
    assert np.array_equal(g.synthesize(w), ((direct + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())


def test_stylegan_pickle_refused_without_trust(tmp_path):
    pkl = write_stylegan_pickle(tmp_path / "net.pkl")
    with pytest.raises(GeneratorError, match="--trust-generator-pickle"):
        load_generator(f"stylegan:{pkl}")
    # an NVlabs pickle whose support code is missing: name dnnlib/torch_utils and the fix
    nv = tmp_path / "nvlabs.pkl"
    nv.write_bytes(b"\x80\x02ctorch_utils.persistence\n_reconstruct_persistent_obj\n)R.")
    with pytest.raises(GeneratorError, match="dnnlib and torch_utils"):
        load_generator(f"stylegan:{nv}", trust_pickle=True)
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"this is not a pickle at all")
    with pytest.raises(GeneratorError, match="corrupt"):
        load_generator(f"stylegan:{junk}", trust_pickle=True)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"D": 1}))
    with pytest.raises(GeneratorError, match="no 'G_ema'"):
        load_generator(f"stylegan:{other}", trust_pickle=True)
    with pytest.raises(GeneratorError, match="does not exist"):
        load_generator(f"stylegan:{tmp_path / 'absent.pkl'}", trust_pickle=True)


# ------------------------------------------------------------------------------------------------ diffusers
def build_tiny_sd_pipeline(path: Path) -> Path:
    """A randomly initialised Stable-Diffusion-shaped pipeline built from configs (nothing is downloaded)."""
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
    text = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok_dir = path.parent / "tokenizer-files"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    pytest.importorskip("diffusers", reason="diffusers is not installed (optional extra: pip install \"fedforge[diffusers]\")")
    pytest.importorskip("transformers", reason="transformers is not installed (optional extra: pip install \"fedforge[diffusers]\")")
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


def test_diffusers_back_end(tiny_sd):
    g = load_generator(f"diffusers:{tiny_sd}", steps=2, guidance=2.0, prompt="a cat")
    assert g.latent_dim == 4 * 8 * 8 and g.resolution == 16 and g.kind == "stable-diffusion"
    imgs = check_interface(g, n=2)
    assert not np.array_equal(imgs, g.synthesize(g.sample_prior(2, 7), "a dog")), "the prompt conditions the images"
    with pytest.raises(GeneratorError, match="model_index.json"):
        load_generator(f"diffusers:{tiny_sd.parent}")


def test_diffusers_missing_extra_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # as if the extra were not installed
    with pytest.raises(GeneratorError, match=r'pip install "fedforge\[diffusers\]"'):
        load_generator(f"diffusers:{tmp_path}")
