"""Shared test fixtures: the dataset cache of ../shared/data (or $FEDFORGE_DATA), skipping when a file is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
