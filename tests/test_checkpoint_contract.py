"""Registry-driven: every registered algorithm survives a checkpoint round trip bit for bit.

For each algorithm: 3 uninterrupted rounds with a checkpoint after every round. While round 3 is being recorded, a
copy of the run directory is taken: it holds the checkpoint of round 2 and a metrics log that runs ahead of it, as
a run killed at that moment would. A fresh Simulation (fresh algorithm object, fresh workers) resumes the copy for
the last round; its metrics, server state and every client's state must equal the uninterrupted run's, bit for bit.
Both runs use ``$FEDFORGE_TEST_DEVICE`` (default ``cpu``; ``cuda`` checks the round trip of every algorithm on a GPU).
An algorithm that keeps state in Python attributes between rounds (instead of the server state dict or the client
states) fails here. The stop-on-request path (SIGINT/SIGTERM) is covered in test_resume.py.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from fedforge.algorithms import ALGORITHMS
from fedforge.config import build_config
from fedforge.core.checkpoint import load_checkpoint, save_checkpoint
from fedforge.core.simulation import Simulation, resume_config
from fedforge.core.store import MemoryStore
from fedforge.errors import ConfigError
from fedforge.generative.base import GeneratorError
from tests.conftest import TEST_DEVICE, short_loops


def _timing(key: str) -> bool:
    """Wall-clock measurements (seconds, eval_seconds, server_seconds, metrics/align_seconds, ...) differ run to run."""
    return key.endswith("seconds")


# Small and fast, but with client sampling (join_ratio < 1) so that some clients sit out a round and their states
# must survive the checkpoint unchanged.
BASE = dict(dataset="digits", model="mlp", clients=4, join_ratio=0.75, rounds=3, batch_size=16, lr=0.05,
            eval_every=1, checkpoint_every=1, seed=3, threads=1, device=TEST_DEVICE)




def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not _timing(k)} for r in records]


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), f"{what}: keys differ"
    for k in (k for k in a if not _timing(k)):
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: tensor '{k}' differs after resume"


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_checkpoint_round_trip(name, tmp_path):
    cfg = dict(BASE, algorithm=name, params=short_loops(ALGORITHMS.get(name)))
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"

    def snapshot(rec: dict) -> None:
        if rec["round"] == 3 and rec.get("stage", "train") == "train":
            shutil.copytree(full_dir, part_dir)

    try:
        try:
            sim = Simulation(build_config(overrides=cfg), run_dir=full_dir, progress=False, on_record=snapshot)
        except ConfigError:  # an algorithm that needs a convolutional model (e.g. FedMRL's adjustable small model)
            cfg["model"] = "cnn"
            shutil.rmtree(full_dir, ignore_errors=True)
            sim = Simulation(build_config(overrides=cfg), run_dir=full_dir, progress=False, on_record=snapshot)
    except GeneratorError as e:  # e.g. FedKTL without its pretrained generator asset
        pytest.skip(f"{name} needs a generator that is not available here: {e}")
    full = sim.run()
    assert (part_dir / "checkpoints" / "round-000002.safetensors").is_file()
    resumed = Simulation(resume_config(part_dir), resume=part_dir, progress=False).run()

    assert _strip(resumed.records) == _strip(full.records)
    _assert_same_state(full.server, resumed.server, f"{name} server state")
    assert full.store.cids() == resumed.store.cids()
    for cid in full.store.cids():
        _assert_same_state(full.store.get(cid), resumed.store.get(cid), f"{name} client {cid} state")


class _ReorderingStore(MemoryStore):
    """A store that hands out each state's keys in a different order on every read (as the disk store's safetensors
    files do): a checkpoint must not depend on that order."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def get(self, cid):
        s = super().get(cid)
        self.reads += 1
        if s is None:
            return None
        keys = list(s)
        keys = keys[self.reads % max(1, len(keys)):] + keys[: self.reads % max(1, len(keys))]
        return {k: s[k] for k in reversed(keys)} if self.reads % 2 else {k: s[k] for k in keys}


def test_checkpoint_file_round_trip_all_dtypes_empty_states_and_reordered_keys(tmp_path):
    server = {"w": torch.randn(3, 4), "step": torch.tensor(7), "bf": torch.randn(5).bfloat16(), "mask": torch.tensor([True, False]),
              "empty": torch.zeros(0), "t": torch.randn(4, 3).t(), "i8": torch.arange(-3, 3, dtype=torch.int8)}
    store = _ReorderingStore()
    store.put(0, {})
    for cid in (1, 4, 9):
        store.put(cid, {f"k{j}": torch.full((j + 1,), float(cid * 10 + j)) for j in range(5)})
    store.put(12, {})
    path = save_checkpoint(tmp_path, 5, server, store.items, {"records": [{"round": 5, "acc": 0.25}], "totals": {}})
    assert path.name == "round-000005.safetensors"
    ck = load_checkpoint(tmp_path)
    assert ck.round == 5 and ck.info["records"] == [{"round": 5, "acc": 0.25}]
    _assert_same_state(server, ck.server, "server")
    got = dict(ck.client_states())
    assert sorted(got) == [0, 1, 4, 9, 12] and got[0] == {} and got[12] == {}
    for cid in (1, 4, 9):
        _assert_same_state(MemoryStore.get(store, cid), got[cid], f"client {cid}")
