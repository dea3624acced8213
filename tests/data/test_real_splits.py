"""Real natural splits (HAR, PAMAP2) and a real text set (AG News), where a copy is at hand.

Where the data are looked for (the same rule as docs/modalities.md): ``$FEDFORGE_DATA/<name>`` first, then
``<repository>/.data/<name>`` (the git-ignored folder beside the code). Nothing is downloaded; a test skips with the
reason when its folder is absent or incomplete.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fedforge.data import load_dataset

REPO = Path(__file__).resolve().parents[2]

# FL-IoT's README (the output of its generate_har.py / generate_pamap2.py): samples per client, train then test
HAR_TRAIN = [260, 226, 255, 237, 226, 243, 231, 210, 216, 220, 237, 240, 245, 242, 246, 274, 276, 273, 270, 265, 306,
             240, 279, 285, 306, 294, 282, 286, 258, 287]
HAR_TEST = [87, 76, 86, 80, 76, 82, 77, 71, 72, 74, 79, 80, 82, 81, 82, 92, 92, 91, 90, 89, 102, 81, 93, 96, 103, 98, 94,
            96, 86, 96]
PAMAP2_TRAIN = [1449, 1523, 1011, 1341, 1581, 1449, 1348, 1520, 36]
PAMAP2_TEST = [483, 508, 337, 447, 527, 483, 450, 507, 12]


def natural_split(name: str) -> Path:
    """``$FEDFORGE_DATA/<name>`` or ``<repo>/.data/<name>`` when it is a whole PFLlib-layout folder; skip otherwise."""
    places = [Path(os.environ["FEDFORGE_DATA"]) / name] if os.environ.get("FEDFORGE_DATA") else []
    places.append(REPO / ".data" / name)
    for base in places:
        cfg = base / "config.json"
        if not cfg.is_file():
            continue
        n = json.loads(cfg.read_text())["num_clients"]
        missing = [f"{part}/{i}.npz" for part in ("train", "test") for i in range(n) if not (base / part / f"{i}.npz").is_file()]
        if missing:
            pytest.skip(f"{name} at {base} is incomplete ({len(missing)} client files missing, e.g. {missing[0]}); "
                        f"public snapshots of TsingZ0/HtFL-OnDevice lack its client files of 4 MiB and more")
        return base
    pytest.skip(f"{name} is not at {' or '.join(map(str, places))} (a PFLlib-layout folder: config.json, train/, test/); "
                f"see docs/modalities.md for how to obtain it")


def test_har_is_thirty_subjects_with_six_activities():
    ds = load_dataset(f"pfllib:{natural_split('HAR')}")
    assert ds.modality == "series" and ds.input_shape == (9, 128) and ds.num_classes == 6
    assert len(ds.client_split) == 30 and len(ds) == 10_299
    assert [len(tr) for tr, _ in ds.client_split] == HAR_TRAIN and [len(te) for _, te in ds.client_split] == HAR_TEST
    # UCI HAR's activity totals: walking, upstairs, downstairs, sitting, standing, laying
    assert np.bincount(ds.y).tolist() == [1722, 1544, 1406, 1777, 1906, 1944]
    assert ds.mean == (0.0,) * 9 and ds.std == (1.0,) * 9  # fed as stored, as PFLlib does
    assert float(ds.x.min()) < -1.0 < 1.0 < float(ds.x.max())  # raw accelerometer/gyroscope values, not [-1, 1] images


def test_pamap2_is_nine_subjects_with_twelve_activities():
    ds = load_dataset(f"pfllib:{natural_split('PAMAP2')}")
    assert ds.modality == "series" and ds.input_shape == (27, 256) and ds.num_classes == 12
    assert len(ds.client_split) == 9 and len(ds) == 15_012
    assert [len(tr) for tr, _ in ds.client_split] == PAMAP2_TRAIN and [len(te) for _, te in ds.client_split] == PAMAP2_TEST
    last = ds.y[np.concatenate(ds.client_split[8])]
    assert set(last.tolist()) == {0}  # subject 109 performed one activity only


def test_agnews_test_split_converted():
    places = ([Path(os.environ["FEDFORGE_DATA"]) / "agnews"] if os.environ.get("FEDFORGE_DATA") else []) + [REPO / ".data" / "agnews"]
    path = next((p / "agnews-test.npz" for p in places if (p / "agnews-test.npz").is_file()), None)
    if path is None:
        pytest.skip("agnews-test.npz is not in $FEDFORGE_DATA/agnews or .data/agnews; make it with "
                    "scripts/make_agnews.py from AG News's test.csv (docs/modalities.md)")
    ds = load_dataset(f"npz:{path}")
    assert ds.modality == "tokens" and ds.input_shape == (200,) and len(ds) == 7_600
    assert np.bincount(ds.y).tolist() == [1_900] * 4
    assert (ds.x[:, 0] == 1).all()  # every text starts with <cls>
    assert 2 < ds.vocab_size <= 32_000 and int(ds.x.max()) < ds.vocab_size
