"""Generator back-ends: sample → synthesize → vary, shapes, dtypes, reproducibility, and their refusals."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from fedforge.generative import GENERATORS, GeneratorError, load_generator
from fedforge.generative.builtin import GeneratorNet, default_asset_dir, load_builtin, save_builtin
from fedforge.generative.images import convert_channels, fit_to_input, image_grid, resize_images
from tests.support.tiny_stylegan import write_stylegan_pickle


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
    if hasattr(g, "classes"):  # class-conditional built-in (v2): a fresh noise part, each latent keeps its class part
        fresh = g.vary(z, 1.0, 1)
        assert torch.equal(fresh[:, : g.z_dim], torch.randn(n, g.z_dim, generator=torch.Generator().manual_seed(1)))
        assert torch.equal(fresh[:, g.z_dim:], z[:, g.z_dim:])
    else:
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
    assert (g.latent_dim, g.resolution, g.channels) == (256, 32, 3)
    cfg = json.loads((default_asset_dir() / "generator.json").read_text())
    assert cfg["architecture"] == "cgan" and cfg["classes"] == list(range(50)) and cfg["dataset"] == "cifar100[0-49]"
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
def test_diffusers_back_end(tiny_sd):
    """Text to image through ``diffusers:DIR``: a save_pretrained folder loaded with local files only."""
    assert (tiny_sd / "model_index.json").is_file()
    g = load_generator(f"diffusers:{tiny_sd}", steps=2, guidance=2.0, prompt="a cat")
    assert g.latent_dim == 4 * 8 * 8 and g.resolution == 16 and g.kind == "stable-diffusion" and g.conditional
    imgs = check_interface(g, n=2)  # shape, uint8, same latents → same images, vary
    z = g.sample_prior(2, 7)
    assert not np.array_equal(imgs, g.synthesize(g.sample_prior(2, 8))), "other latents, other images"
    assert not np.array_equal(imgs, g.synthesize(z, "a dog")), "the prompt conditions the images"
    assert np.array_equal(g.synthesize(z, "a dog"), g.synthesize(z, "a dog"))
    with pytest.raises(GeneratorError, match="model_index.json"):
        load_generator(f"diffusers:{tiny_sd.parent}")
    with pytest.raises(GeneratorError, match="no option 'truncation'"):
        load_generator(f"diffusers:{tiny_sd}", truncation=0.7)


def autoencoder_round_trip(g, images: np.ndarray) -> np.ndarray:
    """The images as the pipeline's VAE reproduces them, decode(encode(x)): what img2img tends to as strength → 0
    (a trained SD VAE reproduces its input; the tiny random one does not, so the tests compare with this)."""
    vae = g.pipe.vae
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        out = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((out.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()


def test_diffusers_img2img_variation(tiny_sd):
    """PCEvolve's variation (``img2img(images, strength, condition, rng)``): diffusers' img2img pipeline on the same
    components; weak strength stays at the input, strong strength moves away; deterministic given rng."""
    g = load_generator(f"diffusers:{tiny_sd}", steps=10, guidance=2.0, prompt="a cat")
    x = g.synthesize(g.sample_prior(2, 3))
    ref = autoencoder_round_trip(g, x)
    apart = np.abs(ref - ref[::-1]).mean()  # how far the two images are from each other
    assert apart > 10
    weak, strong = g.img2img(x, 0.1, None, 1), g.img2img(x, 0.8, None, 1)  # 1 and 8 of 10 denoising steps
    assert weak.shape == strong.shape == x.shape and weak.dtype == strong.dtype == np.uint8
    d_weak, d_strong = np.abs(weak - ref).mean(), np.abs(strong - ref).mean()
    assert d_weak < 0.2 * apart, f"strength 0.1 stays close to the input ({d_weak:.1f} vs {apart:.1f} between images)"
    assert d_strong > 0.5 * apart and d_strong > 3 * d_weak, f"strength 0.8 moves away ({d_strong:.1f} vs {d_weak:.1f})"
    # deterministic given rng, whatever the batch size; another rng or another prompt gives other images
    g.batch_size = 1
    assert np.array_equal(g.img2img(x, 0.8, None, 1), strong)
    assert not np.array_equal(g.img2img(x, 0.8, None, 2), strong)
    assert not np.array_equal(g.img2img(x, 0.8, "a dog", 1), strong)
    # a strength too weak for one of the 10 steps gets a longer schedule that runs one step (20 steps at 0.05)
    assert (g.img2img_steps(0.05), g.img2img_steps(0.1), g.img2img_steps(0.8)) == (20, 10, 10)
    assert np.abs(g.img2img(x, 0.05, None, 1) - ref).mean() < 0.2 * apart
    # strength 0, or below one of the scheduler's 1000 training timesteps, gives the images back
    assert np.array_equal(g.img2img(x, 0.0, None, 1), x) and np.array_equal(g.img2img(x, 0.0005, None, 1), x)
    # any size and gray inputs are fitted to the generator's resolution first (PCEvolve varies the candidates it made)
    gray = np.ascontiguousarray(x[:, ::2, ::2, :1])
    assert g.img2img(gray, 0.1, None, 1).shape == (2, 16, 16, 3)
    with pytest.raises(GeneratorError, match=r"strength must lie in \[0, 1\]"):
        g.img2img(x, 1.5, None, 1)
    with pytest.raises(GeneratorError, match="uint8 NHWC"):
        g.img2img(x.astype(np.float32), 0.5, None, 1)


def test_diffusers_missing_extra_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # as if the extra were not installed
    with pytest.raises(GeneratorError, match=r'pip install "fedforge\[diffusers\]"'):
        load_generator(f"diffusers:{tmp_path}")
