"""Bad input ends in one clear sentence (a FedforgeError; exit code 2 in the CLI), never in another exception.

Property-based tests throw random and malformed configs at the config loader, and random or damaged bytes at the
dataset, partition and checkpoint loaders; example-based tests check the CLI's message and exit code for each kind.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis (pip install -e .[test])")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fedforge.algorithms import ALGORITHMS  # noqa: E402
from fedforge.cli import main as cli_main  # noqa: E402
from fedforge.config import RunConfig, build_config, load_yaml  # noqa: E402
from fedforge.core.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from fedforge.data.partition import Partition  # noqa: E402
from fedforge.data.pfllib import load_pickled_arrays  # noqa: E402
from fedforge.data.sources import read_cache  # noqa: E402
from fedforge.errors import ConfigError, FedforgeError  # noqa: E402

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
FIELDS = [f.name for f in dataclasses.fields(RunConfig)]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=6)
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=12), st.integers())


def _clear(fn, *args):
    """Call fn; a FedforgeError (one sentence) or a result is fine, anything else fails the test."""
    try:
        return fn(*args)
    except FedforgeError as e:
        msg = str(e)  # (it may quote the user's own text, newlines included, so only its form is checked)
        assert msg.strip() and "Traceback" not in msg, msg
        return e


# --------------------------------------------------------------------------------------------- configs
@PROPERTY
@given(st.dictionaries(keys, values, max_size=5))
def test_random_config_mappings_give_a_config_or_a_clear_error(mapping):
    out = _clear(build_config, mapping)
    if isinstance(out, RunConfig):  # a valid result is really valid
        assert out.validate() is out and out.rounds >= 0 and out.lr > 0


@PROPERTY
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_random_yaml_files_give_a_config_or_a_clear_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    _clear(lambda: build_config(load_yaml(path)))


@PROPERTY
@given(st.sampled_from(ALGORITHMS.names()), st.data())
def test_random_hyper_parameters_give_params_or_a_clear_error(name, data):
    cls = ALGORITHMS.get(name)
    names = [f.name for f in dataclasses.fields(cls.Params)] or ["x"]
    params = data.draw(st.dictionaries(st.one_of(st.sampled_from(names), st.text(max_size=8)), values, max_size=3))
    _clear(cls.Params.from_dict, params, name)


def test_config_messages_name_the_problem_and_the_fix():
    with pytest.raises(ConfigError, match=r"unknown config key 'round' \(did you mean: rounds"):
        build_config({"round": 3})
    with pytest.raises(ConfigError, match=r"rounds must be an int, got 'many'"):
        build_config({"rounds": "many"})
    with pytest.raises(ConfigError, match=r"fail_rate must be >= 0 and <= 1, got 1.5"):
        build_config({"fail_rate": 1.5})
    with pytest.raises(ConfigError, match=r"on_nan must be one of stop, skip, got 'skp' \(did you mean: skip"):
        build_config({"on_nan": "skp"})
    with pytest.raises(ConfigError, match=r"checkpoint_every must be >= 0"):
        build_config({"checkpoint_every": -1})
    with pytest.raises(ConfigError, match=r"device must be 'cpu' or 'cuda\[:N\]'"):
        build_config({"device": "cuda:x"})


# ------------------------------------------------------------------------------------ dataset files
dtypes = st.sampled_from([np.uint8, np.int64, np.float32, np.int8, np.bool_, np.uint16, np.complex64])
shapes = st.lists(st.integers(0, 4), max_size=5).map(tuple)
arrays = st.builds(lambda dt, sh, v: np.full(sh, v).astype(dt), dtypes, shapes, st.integers(-3, 300))
entries = st.dictionaries(st.sampled_from(["x", "y", "data", "meta", "train_0", "test_0", "z"]), arrays, max_size=4)


def _npz_bytes(d: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **d)
    return buf.getvalue()


LOADERS = [read_cache, Partition.load, load_pickled_arrays]


@PROPERTY
@given(st.binary(max_size=400))
def test_random_bytes_at_the_dataset_and_partition_loaders(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "f.npz"
    path.write_bytes(data)
    for load in LOADERS:
        out = _clear(load, path)
        assert isinstance(out, FedforgeError), f"{load.__name__} accepted random bytes"


@PROPERTY
@given(entries, st.integers(0, 100))
def test_malformed_and_truncated_npz_files(tmp_path_factory, arrays_, keep_percent):
    full = _npz_bytes(arrays_)
    folder = tmp_path_factory.mktemp("npz")
    for i, data in enumerate((full, full[: len(full) * keep_percent // 100])):
        path = folder / f"f{i}.npz"
        path.write_bytes(data)
        for load in LOADERS:
            out = _clear(load, path)
            if load is read_cache and not isinstance(out, FedforgeError):
                x, y = out  # accepted only when it really is in the cache format
                assert x.dtype == np.uint8 and x.ndim == 4 and y.dtype == np.int64 and len(x) == len(y) > 0


def _cli_error(args: list[str], capsys) -> str:
    rc = cli_main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("fedforge: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


RUN = ["run", "--rounds", "1", "--clients", "3", "--model", "mlp", "--no-progress"]


def test_cli_dataset_errors_are_one_sentence(tmp_path, capsys):
    x = np.zeros((30, 8, 8, 1), np.uint8)
    bad = tmp_path / "bad.npz"
    good = _npz_bytes({"x": x, "y": np.arange(30) % 3})
    bad.write_bytes(good[: len(good) // 2])
    assert "corrupt or truncated" in _cli_error([*RUN, "--dataset", f"npz:{bad}", "--out", str(tmp_path / "r1")], capsys)
    np.savez(bad, x=x.astype(np.float32), y=np.arange(30) % 3)
    assert "'x' must be uint8" in _cli_error([*RUN, "--dataset", f"npz:{bad}", "--out", str(tmp_path / "r2")], capsys)
    np.savez(bad, x=x[..., 0], y=np.arange(30) % 3)
    assert "(N, H, W, C)" in _cli_error([*RUN, "--dataset", f"npz:{bad}", "--out", str(tmp_path / "r3")], capsys)
    np.savez(bad, x=x, y=np.arange(30) - 1)
    assert "labels must be class indices" in _cli_error([*RUN, "--dataset", f"npz:{bad}", "--out", str(tmp_path / "r4")], capsys)
    np.savez(bad, x=x, y=(np.arange(30) % 3).astype(np.float32))
    assert "'y' must be a 1-D integer array" in _cli_error([*RUN, "--dataset", f"npz:{bad}", "--out", str(tmp_path / "r5")], capsys)
    np.save(tmp_path / "single.npy", x)
    assert "single array" in _cli_error([*RUN, "--dataset", f"npz:{tmp_path / 'single.npy'}", "--out", str(tmp_path / "r6")], capsys)
    # a cached named dataset with a label beyond its classes, or the wrong number of channels
    root = tmp_path / "root"
    root.mkdir()
    np.savez(root / "mnist.npz", x=np.zeros((30, 28, 28, 1), np.uint8), y=np.arange(30) % 11)
    assert "label 10 is out of range for 10 classes" in _cli_error(
        [*RUN, "--dataset", "mnist", "--data-root", str(root), "--out", str(tmp_path / "r7")], capsys)
    np.savez(root / "mnist.npz", x=np.zeros((30, 28, 28, 3), np.uint8), y=np.arange(30) % 10)
    assert "3-channel images, but mnist has 1" in _cli_error(
        [*RUN, "--dataset", "mnist", "--data-root", str(root), "--out", str(tmp_path / "r8")], capsys)


def test_cli_partition_file_errors_are_one_sentence(tmp_path, capsys):
    p = tmp_path / "partition.npz"
    p.write_bytes(b"PK\x03\x04 not really a zip")
    assert "corrupt or not a fedforge partition" in _cli_error([*RUN, "--partition-file", str(p), "--out", str(tmp_path / "a")], capsys)
    meta = np.frombuffer(json.dumps({"num_clients": 2, "seed": "x"}).encode(), np.uint8)
    np.savez(p, meta=meta, train_0=np.arange(5), test_0=np.arange(5, 8), train_1=np.arange(8, 12), test_1=np.arange(12, 14))
    assert "corrupt or not a fedforge partition" in _cli_error([*RUN, "--partition-file", str(p), "--out", str(tmp_path / "b")], capsys)
    meta = np.frombuffer(json.dumps({"num_clients": 1}).encode(), np.uint8)
    np.savez(p, meta=meta, train_0=np.arange(5), test_0=np.array([99999]))
    assert "refers to sample 99999" in _cli_error([*RUN, "--partition-file", str(p), "--out", str(tmp_path / "c")], capsys)
    np.savez(p, meta=meta, train_0=np.arange(5), test_0=np.arange(3, 6))
    assert "more than once" in _cli_error([*RUN, "--partition-file", str(p), "--out", str(tmp_path / "d")], capsys)


def test_cli_config_errors_are_one_sentence(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rounds: 2\nlocal_epoch: 3\n")
    assert "did you mean: local_epochs" in _cli_error(["run", "--config", str(cfg)], capsys)
    cfg.write_text("[" * 3000)
    assert "nests too deeply" in _cli_error(["run", "--config", str(cfg)], capsys)
    assert "lr must be > 0" in _cli_error([*RUN, "--lr", "-1"], capsys)
    assert "max_fail_fraction must be >= 0 and <= 1" in _cli_error([*RUN, "--max-fail-fraction", "2"], capsys)
    if not torch.cuda.is_available():
        assert "finds none on this machine; use --device cpu" in _cli_error([*RUN, "--device", "cuda"], capsys)


# ----------------------------------------------------------------------------------------- checkpoints
def _write(run: Path, data: bytes, manifest: bytes | None) -> None:
    folder = run / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "round-000001.safetensors").write_bytes(data)
    if manifest is None:  # a manifest that matches the bytes, so that the parser itself is exercised
        manifest = json.dumps({"format": "fedforge-checkpoint/1", "round": 1, "file": "round-000001.safetensors",
                               "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}).encode()
    (folder / "latest.json").write_bytes(manifest)


@PROPERTY
@given(st.binary(max_size=400), st.one_of(st.none(), st.binary(max_size=120)))
def test_random_bytes_at_the_checkpoint_loader(tmp_path_factory, data, manifest):
    run = tmp_path_factory.mktemp("ck")
    _write(run, data, manifest)
    out = _clear(load_checkpoint, run)
    assert isinstance(out, CheckpointError)


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> bytes:
    run = tmp_path_factory.mktemp("real")
    server = {"features.1.weight": torch.randn(4, 3), "head.bias": torch.zeros(2), "step": torch.tensor(3)}
    clients = {0: {"p": torch.ones(2, 2)}, 2: {}}
    save_checkpoint(run, 1, server, lambda: clients.items(), {"records": [{"round": 1, "global_acc": 0.5}], "totals": {}})
    return next((run / "checkpoints").glob("round-*.safetensors")).read_bytes()


@PROPERTY
@given(st.data())
def test_damaged_real_checkpoints(tmp_path_factory, real_checkpoint, data):
    """Truncation or a changed byte is caught by the checksum; even with a matching checksum (someone rewrote the
    manifest), the parser answers with a CheckpointError or a valid checkpoint, never another exception."""
    raw = bytearray(real_checkpoint)
    how = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    else:
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    run = tmp_path_factory.mktemp("dmg")
    stale = json.dumps({"format": "fedforge-checkpoint/1", "round": 1, "file": "round-000001.safetensors",
                        "bytes": len(real_checkpoint), "sha256": hashlib.sha256(real_checkpoint).hexdigest()}).encode()
    _write(run, bytes(raw), stale)
    assert isinstance(_clear(load_checkpoint, run), CheckpointError)  # the checksum catches every change
    _write(run, bytes(raw), None)
    out = _clear(load_checkpoint, run)
    if isinstance(out, Checkpoint):
        list(out.client_states())  # a checkpoint that parses must also yield its client states or a clear error
