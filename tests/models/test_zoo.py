"""Model registry: feature extractor + head, sized from the input shape."""
from __future__ import annotations

import pytest
import torch

from fedforge.errors import ConfigError, UnknownNameError
from fedforge.models import MODELS, create_model, resolve_architectures

BASE = ["cnn", "mlp", "resnet18", "resnet34", "mobilenet_v2"]


@pytest.mark.parametrize("name", BASE)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_models_split_into_features_and_head(name, shape):
    m = create_model(name, shape, 10, seed=0).eval()
    x = torch.randn(2, *shape)
    z = m.features(x)
    assert z.shape == (2, m.feature_dim)
    assert torch.allclose(m.head(z), m(x))
    names = [n for n, _ in m.named_parameters()]
    assert all(n.startswith(("features.", "head.")) for n in names)
    assert any(n.startswith("head.") for n in names)


def test_cnn_matches_the_literature_sizes():
    # PFLlib's FedAvgCNN: 582,026 parameters on MNIST (dim 1024), 878,538 on CIFAR-10 (dim 1600)
    assert create_model("cnn", (1, 28, 28), 10).num_parameters() == 582026
    assert create_model("cnn", (3, 32, 32), 10).num_parameters() == 878538
    assert create_model("cnn", (3, 32, 32), 100).num_parameters() == 924708
    assert create_model("cnn", (1, 8, 8), 10).features(torch.randn(1, 1, 8, 8)).shape == (1, 512)


def test_seeded_init_is_reproducible_and_leaves_global_rng():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = create_model("cnn", (1, 28, 28), 10, seed=1)
    after = torch.rand(1)
    b = create_model("cnn", (1, 28, 28), 10, seed=1)
    c = create_model("cnn", (1, 28, 28), 10, seed=2)
    assert torch.equal(before, after)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_unknown_model_and_groups():
    with pytest.raises(UnknownNameError, match="did you mean: cnn"):
        create_model("cnnn", (1, 28, 28), 10)
    assert resolve_architectures("cnn", 3) == ["cnn"] * 3
    assert resolve_architectures("cnn,mlp", 5) == ["cnn", "mlp", "cnn", "mlp", "cnn"]
    assert resolve_architectures(["mlp", "cnn"], 2, assignment=[1, 1]) == ["cnn", "cnn"]
    with pytest.raises(ConfigError, match="unknown model 'resnt18'"):
        resolve_architectures("cnn,resnt18", 2)
    with pytest.raises(ConfigError, match="assignment"):
        resolve_architectures("cnn,mlp", 2, assignment=[0, 2])
    assert set(BASE) <= set(MODELS.names())
