"""HtFL model groups: every member maps images to the common 512-d feature space; groups resolve per client."""
from __future__ import annotations

import pytest
import torch

import fedforge.algorithms  # noqa: F401  (registers the algorithms)
from fedforge.cli import main
from fedforge.config import build_config
from fedforge.core.simulation import Simulation
from fedforge.errors import ConfigError
from fedforge.models import GROUPS, MODELS, create_model, resolve_architectures
from fedforge.models.hetero import FEATURE_DIM

NAMED = ["htfe-img-2", "htfe-img-3", "htfe-img-4", "htfe-img-5", "htfe-img-8", "htfe-img-9", "htm-img-10",
         "htfe-img-8-htc-img-4"]
MEMBERS = sorted({a for g in NAMED for a in GROUPS.get(g)})


def test_named_groups_are_registered_with_htfllib_membership():
    assert set(NAMED) <= set(GROUPS.names())
    assert GROUPS.get("htfe-img-4") == ["cnn", "ht_googlenet", "ht_mobilenet_v2", "ht_resnet18"]
    assert len(GROUPS.get("htfe-img-8")) == 8 and len(GROUPS.get("htfe-img-9")) == 9
    assert GROUPS.get("htm-img-10") == GROUPS.get("htfe-img-8") + ["ht_vit_b_16", "ht_vit_b_32"]
    assert len(set(GROUPS.get("htfe-img-8-htc-img-4"))) == 8
    for g in NAMED:
        assert all(a in MODELS for a in GROUPS.get(g))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["28x28x1", "32x32x3"])
@pytest.mark.parametrize("arch", MEMBERS)
def test_every_group_member_gives_common_features(arch, shape):
    model = create_model(arch, shape, 10, seed=0).eval()
    assert model.feature_dim == FEATURE_DIM
    with torch.no_grad():
        z = model.features(torch.randn(2, *shape))
        logits = model.head(z)
    assert z.shape == (2, FEATURE_DIM) and logits.shape == (2, 10)
    assert torch.isfinite(z).all() and torch.isfinite(logits).all()
    assert all(k.startswith(("features.", "head.")) for k in model.state_dict())


def test_htc_group_has_heterogeneous_heads():
    heads = {tuple(tuple(p.shape) for p in create_model(a, (1, 8, 8), 10, seed=0).head.parameters())
             for a in ["cnn", "ht_resnet18-h128", "ht_mobilenet_v2-h256"]}
    assert len(heads) == 3  # linear, 512→128→C, 512→256→C


def test_group_members_keep_the_imagenet_stem_standalone_resnets_the_small_one():
    member = create_model("ht_resnet50", (3, 32, 32), 10, seed=0)
    alone = create_model("resnet50", (3, 32, 32), 10, seed=0)
    conv_m, conv_a = member.features.body[0], alone.features.body[0]
    assert (conv_m.kernel_size, conv_m.stride) == ((7, 7), (2, 2))
    assert (conv_a.kernel_size, conv_a.stride) == ((3, 3), (1, 1))
    assert member.feature_dim == 512 and alone.feature_dim == 2048
    with torch.no_grad():
        assert alone.eval().features(torch.randn(2, 3, 32, 32)).shape == (2, 2048)


def test_standalone_vit_runs_at_the_input_resolution():
    vit = create_model("vit_b_32", (1, 28, 28), 10, seed=0).eval()
    with torch.no_grad():
        assert vit.features(torch.randn(2, 1, 28, 28)).shape == (2, 768)


def test_resolve_group_modulo_and_explicit_assignment():
    archs = resolve_architectures("htfe-img-4", 6)
    assert archs == ["cnn", "ht_googlenet", "ht_mobilenet_v2", "ht_resnet18", "cnn", "ht_googlenet"]
    assert resolve_architectures("htfe-img-2", 3, [1, 1, 0]) == ["ht_resnet18", "ht_resnet18", "cnn"]
    with pytest.raises(ConfigError, match="assignment"):
        resolve_architectures("htfe-img-2", 3, [0, 2, 0])
    with pytest.raises(ConfigError, match="assignment"):
        resolve_architectures("htfe-img-2", 3, [0, 1])


def test_model_assignment_config_reaches_the_federation():
    cfg = build_config(overrides=dict(dataset="digits", clients=4, rounds=0, model="cnn,ht_resnet4",
                                      model_assignment="1,1,0,1", algorithm="local"))
    sim = Simulation(cfg, run_dir=False, progress=False)
    assert sim.ctx.archs == ("ht_resnet4", "ht_resnet4", "cnn", "ht_resnet4")
    with pytest.raises(ConfigError, match="model_assignment"):
        build_config(overrides=dict(model_assignment="0,x"))
    as_list = build_config(overrides=dict(model=["cnn", "ht_resnet4"]))  # a group as a YAML list of names
    assert resolve_architectures(as_list.model, 3) == ["cnn", "ht_resnet4", "cnn"]


def test_list_models_shows_the_groups(capsys):
    assert main(["list", "models", "ht*"]) == 0
    out = capsys.readouterr().out
    assert "htfe-img-4" in out and "group: cnn, ht_googlenet, ht_mobilenet_v2, ht_resnet18" in out
    assert "ht_resnet152" in out
