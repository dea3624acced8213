"""Sensor, text and vector models: forward/backward and the feature split of every one, parity with the reference
implementations (FL-IoT's and PFLlib's HAR-CNN and text models, HtFLlib's sensor members), padding, and the groups."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fedforge.errors import ConfigError
from fedforge.models import GROUPS, MODELS, create_model, resolve_architectures
from fedforge.models.zoo import models_for
from tests.reference.htfllib_shim import reference_root

REFERENCE = reference_root()  # ../shared/reference-code, or $FEDFORGE_REFERENCE_CODE
VOCAB, LENGTH = 50, 16


def _inputs(modality: str, n: int = 4) -> tuple[tuple[int, ...], dict, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if modality == "series":
        return (3, 128), {}, torch.randn(n, 3, 128, generator=g)
    if modality == "vector":
        return (20,), {}, torch.randn(n, 20, generator=g)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    ids[0, 5:] = 0  # a short text, padded
    return (LENGTH,), {"vocab_size": VOCAB}, ids


NEW = sorted(set(models_for("series")) | set(models_for("tokens")) | set(models_for("vector")))


def test_new_models_are_registered():
    for name in ("harcnn", "cnn1d", "fasttext", "textcnn", "lstm", "bilstm", "transformer", "text_lr", "gru",
                 "mlp-1000-500-100"):
        assert name in NEW, name
    for g in ("htfe-sen-2", "htfe-sen-3", "htfe-sen-5", "htfe-sen-8", "htfe-txt-2", "htfe-txt-4", "htfe-txt-5-1",
              "htfe-txt-5-2", "htfe-txt-5-3", "htfe-txt-6"):
        assert g in GROUPS, g


@pytest.mark.parametrize("name", [n for n in NEW if not n.startswith("transformer-") or n == "transformer-h2-l2"])
def test_forward_backward_and_feature_split(name):
    takes = MODELS.entry(name).meta["inputs"]
    modality = next(m for m in ("tokens", "series", "vector") if m in takes)
    shape, kw, x = _inputs(modality)
    m = create_model(name, shape, 5, seed=0, **kw)
    assert all(k.startswith(("features.", "head.")) for k in m.state_dict())
    m.train()
    z = m.features(x)
    assert z.shape == (4, m.feature_dim)
    out = m.head(z)
    assert out.shape == (4, 5)
    nn.functional.cross_entropy(out, torch.arange(4) % 5).backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.head(m.features(x)))
    again = create_model(name, shape, 5, seed=0, **kw)  # reproducible initial weights
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), again.parameters()))


@pytest.mark.parametrize("name", ["fasttext", "text_lr", "lstm", "gru", "bilstm", "transformer"])
def test_text_features_ignore_padding(name):
    m = create_model(name, (LENGTH,), 3, seed=0, vocab_size=VOCAB).eval()
    _, _, ids = _inputs("tokens")
    longer = torch.cat([ids, torch.zeros(4, 8, dtype=torch.long)], dim=1)
    m2 = create_model(name, (LENGTH + 8,), 3, seed=0, vocab_size=VOCAB).eval()
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m.features(ids), m2.features(longer), rtol=1e-5, atol=1e-5)


def test_groups_share_one_feature_dimension():
    for g in [n for n in GROUPS.names() if n.startswith(("htfe-sen", "htfe-txt"))]:
        archs = resolve_architectures(g, len(GROUPS.get(g)))
        kw, shape = ({"vocab_size": VOCAB}, (LENGTH,)) if "txt" in g else ({}, (9, 128))
        dims = {a: create_model(a, shape, 6, seed=0, **kw).feature_dim for a in set(archs) if "l16" not in a}
        assert set(dims.values()) == {512}, (g, dims)


def test_modality_mismatch_is_one_sentence():
    with pytest.raises(ConfigError, match=r"model 'cnn' takes images .* series of shape \(9, 128\); models for them: .*harcnn"):
        create_model("cnn", (9, 128), 6)
    with pytest.raises(ConfigError, match="model 'harcnn' takes series"):
        create_model("harcnn", (LENGTH,), 6, vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="needs longer series"):
        create_model("harcnn", (9, 20), 6)
    with pytest.raises(ConfigError, match="at least 5 tokens"):
        create_model("textcnn", (3,), 2, vocab_size=VOCAB)


# -------------------------------------------------------------------------------------- reference parity
def _load(path: Path, name: str):
    if not path.is_file():
        pytest.skip(f"{path} is absent (the reference code lives in ../shared/reference-code)")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses and the like look the module up while it executes
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(name, None)
    return mod


def _copy_in_order(ref: nn.Module, ours: nn.Module) -> None:
    """Load the reference's parameters into ours, matched by order (the layers are the same, in the same order)."""
    theirs, mine = list(ref.parameters()), list(ours.parameters())
    assert [tuple(p.shape) for p in theirs] == [tuple(p.shape) for p in mine]
    with torch.no_grad():
        for a, b in zip(theirs, mine):
            b.copy_(a)


@pytest.mark.parametrize("source", ["fl-iot", "pfllib"])
def test_harcnn_is_the_reference_har_cnn(source):
    mod = _load(REFERENCE / source / "system" / "flcore" / "trainmodel" / "models.py", f"_ref_models_{source.replace('-', '_')}")
    ref = mod.HARCNN(9, dim_hidden=1664, num_classes=6, conv_kernel_size=(1, 9), pool_kernel_size=(1, 2)).eval()
    ours = create_model("harcnn", (9, 128), 6, seed=0).eval()
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters()) == 2_253_958
    _copy_in_order(ref, ours)
    x = torch.randn(5, 9, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x.unsqueeze(2)))  # HAR in PFLlib's layout: (N, 9, 1, 128)


def test_pamap2_harcnn_ends_at_the_reference_width():
    mod = _load(REFERENCE / "fl-iot" / "system" / "flcore" / "trainmodel" / "models.py", "_ref_models_fliot2")
    ref = mod.HARCNN(9, dim_hidden=3712, num_classes=12, conv_kernel_size=(1, 9), pool_kernel_size=(1, 2))
    assert ref(torch.zeros(2, 9, 3, 256)).shape == (2, 12)  # FL-IoT's PAMAP2 windows: 9 × 3 × 256
    ours = create_model("harcnn", (27, 256), 12, seed=0)
    assert ours.features[1].in_features == ref.fc[0].in_features == 3712


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_htfllib_sensor_member_features(stride):
    from tests.reference.htfllib_shim import import_isolated, require_htfllib

    mods = import_isolated(require_htfllib(), ["flcore.trainmodel.models"])
    ref = mods["flcore.trainmodel.models"].HARCNN(9, dim_hidden=1664, num_classes=6, stride=stride).eval()
    ref.fc = nn.AdaptiveAvgPool1d(512)  # HtFLlib's BaseHeadSplit: the fc block becomes the pooling to feature_dim
    ours = create_model(f"ht_harcnn-s{stride}", (9, 128), 6, seed=0).eval()
    _copy_in_order(ref, ours.features)
    x = torch.randn(3, 9, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours.features(x), ref(x.unsqueeze(2)))


def _pfllib_text():
    return _load(REFERENCE / "pfllib" / "system" / "flcore" / "trainmodel" / "models.py", "_ref_pfllib_text")


@pytest.mark.parametrize("name,build", [
    ("fasttext", lambda m: m.fastText(hidden_dim=32, vocab_size=VOCAB, num_classes=4)),
    ("lstm", lambda m: m.LSTMNet(hidden_dim=32, vocab_size=VOCAB, num_classes=4)),
    ("textcnn", lambda m: m.TextCNN(hidden_dim=32, max_len=LENGTH, vocab_size=VOCAB, num_classes=4)),
])
def test_pfllib_text_models_on_unpadded_texts(name, build):
    """Same weights and a text without padding → PFLlib's log-probabilities (its models end in log_softmax)."""
    ref = build(_pfllib_text()).eval()
    ours = create_model(name, (LENGTH,), 4, seed=0, vocab_size=VOCAB, feature_dim=32).eval()
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters())
    _copy_in_order(ref, ours)
    ids = torch.randint(1, VOCAB, (6, LENGTH), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(torch.log_softmax(ours(ids), 1), ref(ids), rtol=1e-5, atol=1e-5)


def test_pfllib_bilstm_and_transformer_shapes():
    path = REFERENCE / "pfllib" / "system" / "flcore" / "trainmodel"
    bil = _load(path / "bilstm.py", "_ref_bilstm").BiLSTM_TextClassification(
        input_size=VOCAB, hidden_size=32, output_size=4, num_layers=1, embedding_dropout=0, lstm_dropout=0,
        attention_dropout=0, embedding_length=32)
    ours = create_model("bilstm", (LENGTH,), 4, seed=0, vocab_size=VOCAB, feature_dim=32)
    assert [tuple(p.shape) for p in bil.parameters()] == [tuple(p.shape) for p in ours.parameters()]
    tr = _load(path / "transformer.py", "_ref_transformer").TransformerModel(
        ntoken=VOCAB, d_model=32, nhead=8, nlayers=2, num_classes=4, max_len=LENGTH).eval()
    ours = create_model("transformer", (LENGTH,), 4, seed=0, vocab_size=VOCAB, feature_dim=32).eval()
    rename = {"features.embedding.": "embedding.", "features.encoder.": "encoder.", "head.": "fc."}
    state = {}
    for k in ours.state_dict():
        src = next(v + k[len(p):] for p, v in rename.items() if k.startswith(p))
        state[k] = tr.state_dict()[src]
    ours.load_state_dict(state)
    torch.testing.assert_close(ours.features.positions.pe, tr.pos_encoder.pe)  # the same sinusoidal table
    ids = torch.randint(1, VOCAB, (5, LENGTH), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), tr(ids), rtol=1e-4, atol=1e-5)
