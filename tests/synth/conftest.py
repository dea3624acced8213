"""Fixtures for the synth tests: a tiny PCA generator of 8×8 digits and a small encoder trained on digits."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fedforge.core.training import train_loop
from fedforge.data import load_dataset
from fedforge.generative.base import GENERATORS, Generator, as_generator
from fedforge.models import create_model
from fedforge.synth import encoder_from_model, save_checkpoint


class PCADigits(Generator):
    """A tiny real generator: digits' top principal components, z ~ N(0, I) scaled by each component's std."""

    resolution = 8
    channels = 1

    def __init__(self, latent_dim: int = 8, conditional: bool = False):
        x = load_dataset("digits").x.reshape(-1, 64).astype(np.float64)
        self.mean = x.mean(0)
        _, s, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.latent_dim = latent_dim
        self.scale = torch.tensor(s[:latent_dim] / np.sqrt(len(x)), dtype=torch.float32)
        self.basis = torch.tensor(vt[:latent_dim], dtype=torch.float32)
        self.conditional = conditional
        self.conditions: list[Any] = []

    def sample_prior(self, n, rng=None):
        return torch.randn(int(n), self.latent_dim, generator=as_generator(rng))

    def synthesize(self, latents, condition=None):
        z = self.check_latents(latents)
        self.conditions.append(condition)
        x = torch.as_tensor(self.mean, dtype=torch.float32) + (z * self.scale) @ self.basis
        return x.clamp(0, 255).round().to(torch.uint8).reshape(-1, 8, 8, 1).numpy()


class PCADigitsImg2Img(PCADigits):
    """The same, with image-to-image variation: project onto the components, vary there, render."""

    def __init__(self):
        super().__init__()
        self.img2img_calls: list[tuple[np.ndarray, float, Any]] = []

    def img2img(self, images, strength, condition=None, rng=None):
        self.img2img_calls.append((np.asarray(images).copy(), strength, condition))
        x = torch.as_tensor(np.asarray(images).reshape(len(images), 64), dtype=torch.float32)
        z = ((x - torch.as_tensor(self.mean, dtype=torch.float32)) @ self.basis.T) / self.scale
        return self.synthesize(self.vary(z, strength, rng), condition)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture
def pca_generator():
    return PCADigits()


@pytest.fixture
def pca_img2img():
    return PCADigitsImg2Img()


@pytest.fixture
def pca_conditional():
    return PCADigits(conditional=True)


@pytest.fixture(scope="session")
def digits_model(digits):
    """An mlp trained for a few epochs on all digits (its features are the encoder)."""
    model = create_model("mlp", digits.input_shape, 10, seed=0)
    mean, std = digits.mean[0], digits.std[0]
    x = (torch.from_numpy(digits.x).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    y = torch.from_numpy(digits.y)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        perm = torch.randperm(len(y), generator=gen)
        train_loop(model, ((x[perm[i:i + 32]], y[perm[i:i + 32]]) for i in range(0, len(y), 32)), 0.1)
    return model.eval()


@pytest.fixture
def digits_encoder(digits, digits_model):
    return encoder_from_model(digits_model, digits.input_shape, digits.mean, digits.std, name="digits-mlp")


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory, digits, digits_model):
    path = tmp_path_factory.mktemp("enc") / "digits-mlp"
    w, _ = save_checkpoint(path, digits_model, "mlp", digits.input_shape, 10, digits.mean, digits.std)
    return w


@pytest.fixture
def registered_pca():
    """The PCA generator under the spec ``test-pca`` (for CLI runs); removed afterwards."""
    GENERATORS.add("test-pca", lambda arg, **kw: PCADigits(), summary="tests only")
    yield "test-pca"
    GENERATORS._entries.pop("test-pca", None)
