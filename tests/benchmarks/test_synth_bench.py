"""benchmarks/synth_bench.py end to end at a tiny setting (T = 2, N = 4, one seed, two selectors) against a
class-conditional generator trained for a few steps (``--generator builtin:DIR``): the private and test images come
from the held-out split only, rows carry their generator, a rerun skips finished rows, and --write-doc keeps the
version-1 rows in their own section. No timings are asserted."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require_data

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_synth", REPO / "benchmarks" / "synth_bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cifar():
    from fedforge.data import load_dataset

    root = require_data("cifar100.npz").parent
    return root, load_dataset("cifar100", root)


@pytest.fixture(scope="module")
def tiny_gen(cifar, tmp_path_factory):
    """A conditional generator of all 100 classes (so the task's prompts select its classes), 4 training steps on 2
    non-held-out images per class."""
    from fedforge.generative.cgan import train_cgan
    from fedforge.generative.split import generator_positions

    _, ds = cifar
    pos = generator_positions(ds.y)
    pos = np.concatenate([pos[ds.y[pos] == c][:2] for c in range(100)])
    out = tmp_path_factory.mktemp("gen") / "tiny-cgan"
    train_cgan(ds.x[pos], ds.y[pos], list(range(100)), out, steps=4, checkpoint_every=4, batch_size=16, z_dim=8,
               embed_dim=8, width=8, d_width=8, class_names=ds.class_names, progress=False)
    return out


def test_held_out_task_uses_only_held_out_images(bench, cifar):
    from fedforge.generative.split import generator_positions, held_out_positions

    root, full = cifar
    ds, pos = bench.held_out_task(str(root))
    assert ds.num_classes == 10 and np.bincount(ds.y).tolist() == [200] * 10
    assert set(pos.tolist()) <= set(held_out_positions(full.y).tolist())
    assert not set(pos.tolist()) & set(generator_positions(full.y).tolist())  # no generator v2 trains on them
    np.testing.assert_array_equal(ds.y, full.y[pos] - 50)
    np.testing.assert_array_equal(ds.x, full.x[pos])
    assert ds.class_names[0] == "mouse" and ds.meta["class_subset"] == [50, 59]


def test_tiny_benchmark_end_to_end(bench, cifar, tiny_gen, tmp_path, capsys):
    root, _ = cifar
    res = tmp_path / "res"
    res.mkdir()
    v1_rows = bench.read_rows(bench.DOCS / "results.jsonl")[:1]  # a committed version-1 row, if any
    (res / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in v1_rows))
    spec = f"builtin:{tiny_gen}"
    argv = ["--data-root", str(root), "--generator", spec, "--runs", str(tmp_path / "runs"), "--results-dir", str(res),
            "--iterations", "2", "--per-class", "4", "--seeds", "0", "--selectors", "none", "pcevolve",
            "--eval-every", "1"]
    bench.main(argv)
    rows = [r for r in bench.read_rows(res / "results.jsonl") if r.get("generator")]
    assert [(r["selector"], r["name"]) for r in rows] == [("none", "main-dir-tiny-cgan-none-eps0.2-s0"),
                                                          ("pcevolve", "main-dir-tiny-cgan-pcevolve-eps0.2-s0")]
    for r in rows:
        assert r["generator"] == spec and r["generator_version"] == 2 and not r["generator_committed"]
        assert r["data"] == "held-out" and r["private_images"] == 100 and r["test_images"] == 1900
        assert r["prompt_classes"] == list(range(50, 60))  # "A photo image of mouse" → the generator's class 50
        assert all(0.0 <= r[k] <= 1.0 for k in ("syn_acc", "mix_acc", "real_acc"))
    assert rows[0]["real_acc"] == rows[1]["real_acc"]  # the same private images under one seed
    assert rows[1]["iterations"] == 2 and [p["iteration"] for p in rows[1]["curve"]] == [0, 1, 2]
    grids = sorted(p.name for p in (res / "dir-tiny-cgan").glob("*.png"))
    assert grids == ["main-none-eps0.2-iteration-000.png", "main-pcevolve-eps0.2-iteration-000.png",
                     "main-pcevolve-eps0.2-iteration-002.png"]

    capsys.readouterr()
    bench.main(argv)  # resumable: both rows are finished
    assert capsys.readouterr().out.count("skip main-dir-tiny-cgan-") == 2
    assert len(bench.read_rows(res / "results.jsonl")) == len(v1_rows) + 2

    doc = tmp_path / "synth.md"
    bench.main(["--write-doc", "--results-dir", str(res), "--doc", str(doc)])
    text = doc.read_text()
    assert f"## `{spec}` (a generator folder" in text
    assert "PCEvolve" in text and "`none` on `syn`" in text and "`none` on `mix`" in text
    assert "`mix` with pcevolve" in text and "the private images alone" in text
    assert "![main-pcevolve-eps0.2-iteration-002](res/dir-tiny-cgan/main-pcevolve-eps0.2-iteration-002.png)" in text
    assert "1900 test images (held out)" in text and "the prompts select 10 of the task's 10 classes" in text
    if v1_rows:  # the version-1 rows keep their own section, after the v2 ones
        assert text.index(f"## {bench.V1_LABEL}") > text.index(f"## `{spec}`")
        v1_part = text[text.index(f"## {bench.V1_LABEL}"):]
        assert "| private images only (`real`) | – | – | 1 |" in v1_part and spec not in v1_part

    # a row of other weights for the same generator stops a resume with a clear message
    with (res / "results.jsonl").open("a") as f:
        f.write(json.dumps({**rows[0], "name": "main-x", "generator_sha256": "0" * 16}) + "\n")
    with pytest.raises(SystemExit, match="rows of other weights"):
        bench.main(argv)


def test_missing_shipped_generator_is_one_clear_error(bench, monkeypatch):
    import fedforge.generative.builtin as builtin

    monkeypatch.setattr(builtin, "C100_ASSET", "no-such-generator")
    with pytest.raises(SystemExit, match="builtin-c100 generator is not in .*no-such-generator.*--variant builtin-c100"):
        bench.shipped_generator("builtin-c100")
    with pytest.raises(SystemExit, match="--generator takes"):
        bench.shipped_generator("diffusers:x")


def test_version_1_weights_are_refused(bench, tiny_gen, tmp_path):
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "generator.safetensors").write_bytes((tiny_gen / "generator.safetensors").read_bytes())
    cfg = json.loads((tiny_gen / "generator.json").read_text())
    cfg.pop("architecture")
    (v1 / "generator.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="unconditional GAN of version 1"):
        bench.shipped_generator(f"builtin:{v1}")
