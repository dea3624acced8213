"""Contract tests driven by the registry: every registered algorithm runs, gives finite metrics, repeats itself.

They run on ``$FEDFORGE_TEST_DEVICE`` (default ``cpu``): ``FEDFORGE_TEST_DEVICE=cuda pytest tests/test_contract.py``
runs every registered algorithm on a GPU.
"""
from __future__ import annotations

import math

import pytest

import fedforge
from fedforge.algorithms import ALGORITHMS
from tests.conftest import TEST_DEVICE, short_loops

TINY = dict(dataset="digits", clients=4, rounds=2, lr=0.05, batch_size=32, partition="dirichlet", alpha=0.5,
            device=TEST_DEVICE)


def _accs(res):
    return [(r["global_acc"], r["personalized_acc"], r["loss"]) for r in res.records]


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_every_algorithm_runs_twice_identically(name):
    cls = ALGORITHMS.get(name)
    a = fedforge.run(algorithm=name, run_dir=False, params=short_loops(cls), **TINY)
    b = fedforge.run(algorithm=name, run_dir=False, params=short_loops(cls), **TINY)
    last = a.records[-1]
    if cls.has_global:
        assert last["global_acc"] is not None and math.isfinite(last["global_acc"])
    if cls.personalized:
        assert last["personalized_acc"] is not None and math.isfinite(last["personalized_acc"])
    assert last["global_acc"] is not None or last["personalized_acc"] is not None
    assert last["loss"] is None or math.isfinite(last["loss"])
    assert _accs(a) == _accs(b)


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_every_algorithm_documents_itself(name):
    cls = ALGORITHMS.get(name)
    assert cls.__doc__ or __import__(cls.__module__, fromlist=["x"]).__doc__, f"{name} has no docstring citing its paper"
    for fname, _default, help_ in cls.Params.describe():
        assert help_, f"{name}.{fname} has no one-line meaning"
