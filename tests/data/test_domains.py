"""Feature shift (--partition domains): the transforms, the partition, the folder layout of domains, per-domain
accuracy in metrics.jsonl, and bad input."""
from __future__ import annotations

import functools
import io
import json

import numpy as np
import pytest
from PIL import Image

from fedforge.cli import main as cli_main
from fedforge.config import build_config
from fedforge.core.simulation import Simulation, build_partition
from fedforge.data import Partition, load_dataset
from fedforge.data.domains import (
    CORRUPTIONS,
    apply_domains,
    domain_groups,
    make_domain_partition,
    parse_domains,
    transform_images,
)
from fedforge.errors import ConfigError, DataError, PartitionError
from tests.conftest import require_data

DIGITS = load_dataset("digits")


def _cifar(n: int = 128) -> np.ndarray:
    """The first ``n`` CIFAR-100 images (natural 32×32 colour images, the kind CIFAR-10-C corrupts)."""
    return _cifar_head()[:n]


@functools.cache
def _cifar_head() -> np.ndarray:
    with np.load(require_data("cifar100.npz")) as f:
        return f["x"][:128].copy()


def _one(spec: str):
    (d,) = parse_domains(spec)
    return d


# ------------------------------------------------------------------------------------------- transforms
def test_rotation_by_multiples_of_90_is_np_rot90_and_360_is_identity():
    x, idx = DIGITS.x[:50], np.arange(50)
    for k in (1, 2, 3):
        assert np.array_equal(transform_images(x, idx, _one(f"rotate:{90 * k}"), 0), np.rot90(x, k=k, axes=(1, 2)))
    assert np.array_equal(transform_images(x, idx, _one("rotate:360"), 0), x)
    assert np.array_equal(transform_images(x, idx, _one("rotate:-90"), 0), np.rot90(x, k=3, axes=(1, 2)))


def test_rotation_by_other_angles_is_pillows_bilinear_rotation():
    x, idx = DIGITS.x[:20], np.arange(20)
    y = transform_images(x, idx, _one("rotate:30"), 0)
    ref = np.stack([np.asarray(Image.fromarray(a[..., 0]).rotate(30, resample=Image.BILINEAR, fillcolor=0))
                    for a in x])[..., None]
    assert np.array_equal(y, ref)
    assert not np.array_equal(y, x)


def test_colour_styles():
    x = _cifar(16)
    idx = np.arange(16)
    assert np.array_equal(transform_images(x, idx, _one("colour:invert"), 0), 255 - x)
    gray = transform_images(x, idx, _one("colour:gray"), 0)
    luma = np.asarray([np.asarray(Image.fromarray(a).convert("L")) for a in x]).astype(int)
    assert np.abs(gray[..., 0].astype(int) - luma).max() <= 1  # Pillow's L conversion, up to its rounding
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    red = transform_images(x, idx, _one("colour:red"), 0)
    assert (red[..., 1:] == 0).all() and np.array_equal(red[..., 0], gray[..., 0])
    assert np.array_equal(transform_images(x, idx, _one("colour:original"), 0), x)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_severities_move_images_further_away(name):
    """CIFAR-10-C's severities 1..5: the mean distance from the clean images grows with each level."""
    x = _cifar()
    idx = np.arange(len(x))
    dist = []
    for s in range(1, 6):
        y = transform_images(x, idx, _one(f"corrupt:{name}:{s}"), 3)
        assert y.dtype == np.uint8 and y.shape == x.shape
        dist.append(np.abs(y.astype(np.float64) - x).mean())
    assert dist[0] > 0 and all(b > a for a, b in zip(dist, dist[1:])), dist


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruptions_are_pure_functions_of_sample_domain_and_seed(name):
    x = _cifar(24)
    idx = np.arange(100, 124)
    d = _one(f"corrupt:{name}:4")
    a = transform_images(x, idx, d, 7)
    assert np.array_equal(a, transform_images(x, idx, d, 7))
    pick = [9, 2, 17]  # a sample's result does not depend on the others in its block, nor on their order
    assert np.array_equal(a[pick], transform_images(x[pick], idx[pick], d, 7))
    if "noise" in name:
        assert not np.array_equal(a, transform_images(x, idx, d, 8))  # the seed draws other noise
        assert not np.array_equal(a[:1], transform_images(x[:1], idx[1:2], d, 7))  # and so does the sample index


def test_jpeg_is_a_pillow_round_trip_at_the_severitys_quality():
    x = _cifar(8)
    for s, quality in enumerate(CORRUPTIONS["jpeg"][1], start=1):
        y = transform_images(x, np.arange(8), _one(f"corrupt:jpeg:{s}"), 0)
        for a, b in zip(x, y):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=quality)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), b)


def test_gaussian_noise_has_cifar_c_sigma():
    """A flat mid-gray image: the added noise has the severity's standard deviation (0.08 at 3) in [0, 1] units."""
    x = np.full((64, 32, 32, 3), 128, dtype=np.uint8)
    y = transform_images(x, np.arange(64), _one("corrupt:gaussian_noise:3"), 0)
    sd = (y.astype(np.float64) - 128).std() / 255
    assert abs(sd - 0.08) < 0.002


def test_spec_syntax_and_names():
    doms = parse_domains("rotate:0,15;colour:invert,#ff8800;corrupt:clean,gaussian_blur:2,jpeg_compression:5")
    assert [d.name for d in doms] == ["rot0", "rot15", "invert", "ff8800", "clean", "blur_s2", "jpeg_s5"]
    for bad in ("rotate:", "spin:0,90", "corrupt:blur", "corrupt:blur:6", "corrupt:fog:1", "colour:mauve",
                "rotate:0,0", "folder;rotate:0", "rotate:x"):
        with pytest.raises(ConfigError, match="--domains"):
            parse_domains(bad)


# -------------------------------------------------------------------------------------------- partition
def test_domains_are_dealt_round_robin_and_each_client_holds_its_domains_samples():
    part = make_domain_partition(DIGITS, "rotate:0,90,180", 7, seed=3)
    assert part.domains == ["rot0", "rot90", "rot180", "rot0", "rot90", "rot180", "rot0"]
    assert domain_groups(part) == {"rot0": [0, 3, 6], "rot90": [1, 4], "rot180": [2, 5]}
    idx = np.concatenate(part.train + part.test)
    assert len(idx) == len(np.unique(idx)) == len(DIGITS.y)  # every sample once
    # the pool is split among the domains stratified by class: each domain holds about a third of every class
    for cids in domain_groups(part).values():
        held = np.concatenate([np.concatenate([part.train[c], part.test[c]]) for c in cids])
        share = np.bincount(DIGITS.y[held], minlength=10) / np.bincount(DIGITS.y, minlength=10)
        assert np.all(np.abs(share - 1 / 3) < 0.01)
    k = make_domain_partition(DIGITS, "rotate:0,90,180", 7, seed=3, clients_per_domain=2)
    assert k.num_clients == 6 and k.domains == ["rot0", "rot90", "rot180"] * 2


def test_label_skew_within_each_domain():
    iid = make_domain_partition(DIGITS, "rotate:0,90", 8, seed=0)
    skew = make_domain_partition(DIGITS, "rotate:0,90", 8, seed=0, within="dirichlet", alpha=0.1, min_samples=20)
    held = lambda p: [(np.bincount(DIGITS.y[np.concatenate([a, b])], minlength=10) > 0).sum()  # noqa: E731
                      for a, b in zip(p.train, p.test)]
    assert min(held(iid)) == 10 and max(held(skew)) < 10
    assert skew.params["within"] == "dirichlet" and skew.params["alpha"] == 0.1


def test_domain_partition_round_trips_through_partition_npz_and_remakes_the_same_images(tmp_path):
    part = make_domain_partition(DIGITS, "corrupt:gaussian_noise:5,clean", 4, seed=11)
    part.save(tmp_path / "partition.npz")
    back = Partition.load(tmp_path / "partition.npz")
    assert back.domains == part.domains and back.params == part.params and back.seed == 11
    a, b = apply_domains(DIGITS, part), apply_domains(DIGITS, back)
    assert np.array_equal(a.x, b.x)
    assert a.x.shape == DIGITS.x.shape and not np.shares_memory(a.x, DIGITS.x)  # the same size as the pool, a copy
    noisy = np.concatenate([part.train[0], part.test[0]])  # client 0: gaussian_noise_s5; client 1: clean
    clean = np.concatenate([part.train[1], part.test[1]])
    assert not np.array_equal(a.x[noisy], DIGITS.x[noisy]) and np.array_equal(a.x[clean], DIGITS.x[clean])
    stats = part.stats(DIGITS.y, 10)
    assert stats["domains"]["client_domains"] == part.domains
    assert stats["domains"]["clients_per_domain"] == {"gaussian_noise_s5": [0, 2], "clean": [1, 3]}


def test_a_tint_on_gray_data_makes_the_pool_rgb():
    part = make_domain_partition(DIGITS, "colour:original,green", 2, seed=0)
    ds = apply_domains(DIGITS, part)
    assert ds.x.shape == (*DIGITS.x.shape[:3], 3) and ds.input_shape[0] == 3 and len(ds.mean) == 3
    green = np.concatenate([part.train[1], part.test[1]])
    assert (ds.x[green][..., [0, 2]] == 0).all() and np.array_equal(ds.x[green][..., 1:2], DIGITS.x[green])


def test_run_uses_and_saves_the_domains(tmp_path):
    cfg = build_config(overrides=dict(dataset="digits", partition="domains", domains="rotate:0,180", clients=4,
                                      rounds=1, model="mlp", out=str(tmp_path / "run")))
    res = Simulation(cfg, run_dir=tmp_path / "run", progress=False).run()
    stats = json.loads((res.path / "partition_stats.json").read_text())
    assert stats["domains"]["client_domains"] == ["rot0", "rot180", "rot0", "rot180"]
    assert (res.path / "partition.png").stat().st_size > 0
    assert Partition.load(res.path).domains == stats["domains"]["client_domains"]
    # another run re-using the partition sees the same images
    again = build_config(overrides=dict(dataset="digits", partition_file=str(res.path), rounds=0, model="mlp"))
    assert np.array_equal(Simulation(again, run_dir=False, progress=False).ds.x,
                          Simulation(cfg, run_dir=False, progress=False).ds.x)


# ------------------------------------------------------------------------------------- folder of domains
def _write_domains(root, domains=("photo", "sketch", "cartoon"), classes=("cat", "dog"), per=6, empty=()):
    rng = np.random.default_rng(0)
    for d in domains:
        for c in classes:
            folder = root / d / c
            folder.mkdir(parents=True)
            if d in empty:
                continue
            for i in range(per):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_folder_of_domains_gives_each_client_one_domain(tmp_path):
    root = _write_domains(tmp_path / "pacs")
    ds = load_dataset(f"folder:{root}")
    assert ds.domain_names == ["cartoon", "photo", "sketch"] and ds.class_names == ["cat", "dog"]
    assert np.bincount(ds.domain).tolist() == [12, 12, 12]
    cfg = build_config(overrides=dict(dataset=f"folder:{root}", partition="domains", clients_per_domain=2,
                                      min_samples=2))
    part = build_partition(cfg, ds)
    assert part.num_clients == 6 and part.domains == ["cartoon", "photo", "sketch"] * 2
    for c, name in enumerate(part.domains):
        idx = np.concatenate([part.train[c], part.test[c]])
        assert (ds.domain[idx] == ds.domain_names.index(name)).all()
    assert apply_domains(ds, part) is ds  # the images are the domains' own


def test_folder_of_domains_runs_with_per_domain_accuracy(tmp_path, capsys):
    root = _write_domains(tmp_path / "pacs")
    out = tmp_path / "run"
    rc = cli_main(["run", "--dataset", f"folder:{root}", "--partition", "domains", "--clients", "3", "--rounds", "1",
                   "--model", "mlp", "--min-samples", "2", "--batch-size", "4", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {k for k in rec if "_acc_domain/" in k} == {f"global_acc_domain/{d}" for d in ("cartoon", "photo", "sketch")}


def test_a_domain_folder_without_images_is_one_sentence_and_exit_2(tmp_path, capsys):
    root = _write_domains(tmp_path / "pacs", empty=("sketch",))
    with pytest.raises(DataError, match="domain folder .*sketch holds no images"):
        load_dataset(f"folder:{root}")
    rc = cli_main(["run", "--dataset", f"folder:{root}", "--partition", "domains", "--clients", "3", "--rounds", "1",
                   "--model", "mlp", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("fedforge: error:")]
    assert len(lines) == 1 and "sketch holds no images" in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("args, expect", [
    (["--partition", "domains", "--domains", "rotate:0,x"], "rotation 'x' is not a number"),
    (["--partition", "domains"], "--partition domains needs --domains"),
    (["--domains", "rotate:0,90"], "--domains belongs to --partition domains"),
    (["--partition", "domains", "--domains", "folder"], "--domains folder takes the domains of a folder"),
    (["--partition", "domains", "--domains", "rotate:0,90,180,270", "--clients", "3"], "4 domains need at least"),
    (["--partition", "domains", "--domains", "rotate:0,90", "--domain-label-skew", "domains"], "not a label partitioner"),
])
def test_bad_domain_options_are_one_sentence_and_exit_2(tmp_path, capsys, args, expect):
    rc = cli_main(["run", "--dataset", "digits", "--rounds", "1", "--model", "mlp", "--no-progress",
                   "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("fedforge: error:")]
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in err, err


def test_partition_errors_name_the_domain():
    with pytest.raises(PartitionError, match="domain rot0 .*classes per client"):
        make_domain_partition(DIGITS, "rotate:0,90", 4, seed=0, within="pathological", classes_per_client=11)


# ------------------------------------------------------------------------------------ per-domain accuracy
@pytest.mark.parametrize("algorithm", ["fedavg", "ditto"])
def test_per_domain_accuracy_pools_to_the_overall_accuracy(tmp_path, algorithm):
    cfg = build_config(overrides=dict(algorithm=algorithm, dataset="digits", partition="domains",
                                      domains="rotate:0,90;colour:invert", clients=6, rounds=2, model="mlp",
                                      lr=0.05, batch_size=16))
    sim = Simulation(cfg, run_dir=tmp_path / "run", progress=False)
    res = sim.run()
    groups = domain_groups(sim.partition)
    n = {d: sum(len(sim.partition.test[c]) for c in cids) for d, cids in groups.items()}
    lines = [json.loads(line) for line in (res.path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    views = ["global"] + (["personalized"] if algorithm == "ditto" else [])
    for rec in lines:
        for v in views:
            accs = {d: rec[f"{v}_acc_domain/{d}"] for d in groups}
            assert set(accs) == {"rot0", "rot90", "invert"}
            pooled = sum(accs[d] * n[d] for d in groups) / sum(n.values())
            assert pooled == pytest.approx(rec[f"{v}_acc"], abs=1e-12)
    assert len({round(lines[-1][f"global_acc_domain/{d}"], 6) for d in groups}) > 1  # the domains differ
