"""Shared test fixtures: the dataset cache of ../shared/data (or $FEDFORGE_DATA), skipping when a file is absent."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The device on which the registry-driven contract suites (test_contract.py, test_checkpoint_contract.py) run every
# algorithm: `FEDFORGE_TEST_DEVICE=cuda pytest tests/test_contract.py` checks them all on a GPU; the CPU by default.
TEST_DEVICE = os.environ.get("FEDFORGE_TEST_DEVICE", "cpu")

# Loops whose length does not matter for the contract suites (server-side training, fine-tuning after the last round,
# warm-up passes), kept short there so that every algorithm stays fast; the paper defaults are longer.
SHORT_LOOPS = {"server_epochs": 2, "server_steps": 2, "max_init_epochs": 2, "gen_steps": 2, "finetune_epochs": 2,
               "personal_epochs": 2, "warmup_rounds": 2}


def short_loops(algorithm: type) -> dict[str, int]:
    """Hyper-parameters of ``algorithm`` (a registered class) that :data:`SHORT_LOOPS` shortens (only where the
    default is longer, within the field's lower bound)."""
    fields = {f.name: f for f in dataclasses.fields(algorithm.Params)}
    out = {}
    for k, v in SHORT_LOOPS.items():
        f = fields.get(k)
        if f is not None and isinstance(f.default, int) and f.default > v:
            out[k] = max(v, f.metadata.get("ge", v))
    return out


def shared_data_root() -> Path:
    env = os.environ.get("FEDFORGE_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


def require_data(name: str) -> Path:
    """Path of a file or folder in the dataset cache; skips the test with a clear reason when it is absent."""
    p = shared_data_root() / name
    if not p.exists():
        pytest.skip(f"{name} is not in the dataset cache {p.parent} (set FEDFORGE_DATA to a folder that has it)")
    return p


@pytest.fixture
def data_root() -> Path:
    return shared_data_root()


def pytest_configure(config):
    """On a machine that is already busy (load above the core count), one torch thread per test process wastes far
    less time in spinning OpenMP barriers than the default. Results stay deterministic within the session."""
    try:
        busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        busy = False
    if busy:
        import torch

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
