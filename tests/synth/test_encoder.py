"""Encoders: fedforge checkpoints, run directories, the shipped built-in one, torchvision's cache rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedforge.errors import ConfigError
from fedforge.synth import load_encoder, save_checkpoint
from fedforge.synth.encoder import ASSETS, BUILTIN_STEM


def test_checkpoint_round_trip(tmp_path, digits, digits_model):
    w, cfg = save_checkpoint(tmp_path / "m", digits_model, "mlp", digits.input_shape, 10, digits.mean, digits.std)
    enc = load_encoder(f"checkpoint:{w}")
    x = digits.x[:7]
    expected = digits_model.features((torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - digits.mean[0]) / digits.std[0])
    assert torch.allclose(enc.embed(x), expected, atol=1e-5)
    assert load_encoder(str(w)).feature_dim == enc.feature_dim == 200
    cfg.unlink()
    with pytest.raises(ConfigError, match="has no m.json beside it"):
        load_encoder(f"checkpoint:{w}")


def test_run_directory_global_model(tmp_path, digits):
    import fedforge

    out = tmp_path / "run"
    res = fedforge.run(algorithm="fedavg", dataset="digits", model="mlp", rounds=1, clients=2, run_dir=str(out))
    enc = load_encoder(f"run:{out}")
    z = enc.embed(digits.x[:5])
    assert z.shape == (5, 200)
    from fedforge.models import create_model

    m = create_model("mlp", digits.input_shape, 10)
    m.load_state_dict({k: v for k, v in res.server.items() if k.startswith(("features.", "head."))})
    x = (torch.from_numpy(digits.x[:5]).permute(0, 3, 1, 2).float() / 255 - digits.mean[0]) / digits.std[0]
    assert torch.allclose(z, m.features(x), atol=1e-5)
    with pytest.raises(ConfigError, match="not a fedforge run directory"):
        load_encoder(f"run:{tmp_path}")


def test_builtin_encoder_is_shipped_and_fits_cifar():
    if not (ASSETS / f"{BUILTIN_STEM}.safetensors").is_file():
        pytest.skip("the built-in encoder weights are not in this checkout (benchmarks/synth_encoder.py builds them)")
    enc = load_encoder("builtin")
    assert enc.input_shape == (3, 32, 32) and enc.meta["trained_on"].startswith("cifar100 classes 0-49")
    rng = np.random.default_rng(0)
    z = enc.embed(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    assert z.shape == (4, enc.feature_dim) and torch.isfinite(z).all()
    with pytest.raises(ConfigError, match="expects 3x32x32"):
        enc.check_images((2, 28, 28, 1))


def test_torchvision_weights_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="not in the local torch cache"):
        load_encoder("torchvision:resnet18")
    with pytest.raises(ConfigError, match="unknown encoder"):
        load_encoder("resnet18")
