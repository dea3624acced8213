"""--deterministic: deterministic kernels for the run (and its worker processes), exact resume, no trace left behind.

On a GPU the option makes kernels reproducible (docs/reliability.md); here, on the CPU, it must be accepted and
harmless: a deterministic run resumes bit for bit, the flag reaches fresh worker processes, and the process's own
settings are restored after the run.
"""
from __future__ import annotations

import os

import pytest
import torch

from fedforge.config import build_config
from fedforge.core.executors import CUBLAS_WORKSPACE, Executor, ProcessExecutor, deterministic
from fedforge.core.runtime import Task, WorkerSpec
from fedforge.core.simulation import SessionHooks, Simulation
from tests.support.probes import DeviceProbe
from tests.support.resume import stop_and_resume

BASE = dict(dataset="digits", model="cnn", clients=3, rounds=3, threads=1, lr=0.05, seed=4, deterministic=True,
            checkpoint_every=0)


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


def _settings():
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_option_is_part_of_the_run_identity():
    assert build_config().deterministic is False
    assert build_config(overrides={"deterministic": True}).identity()["deterministic"] is True
    assert "deterministic" not in build_config().identity()  # runs made before the option resume as they were


def test_the_context_sets_and_restores_the_process_settings():
    before = _settings()
    with deterministic(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (CUBLAS_WORKSPACE, before[3])
    assert _settings() == before
    with deterministic(False):
        assert _settings() == before


def test_deterministic_run_resumes_bit_for_bit(tmp_path):
    before = _settings()
    full = Simulation(build_config(overrides=BASE), run_dir=False, progress=False).run()
    assert _settings() == before  # the run switched deterministic kernels off again when it ended
    run = tmp_path / "stopped"
    res = stop_and_resume(BASE, run)
    assert _strip(res.records) == _strip(full.records)
    assert full.server.keys() == res.server.keys()
    assert all(torch.equal(full.server[k], res.server[k]) for k in full.server)
    assert _settings() == before


class _SpecRecorder(Executor):
    """Runs tasks with the executor it wraps and keeps the worker spec the session started it with."""

    def __init__(self, inner: Executor):
        super().__init__()
        self.inner, self.specs = inner, []

    def start(self, spec: WorkerSpec) -> None:
        self.specs.append(spec)
        self.inner.start(spec)

    def imap(self, tasks):
        return self.inner.imap(tasks)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("on", [True, False])
def test_the_flag_reaches_fresh_worker_processes(on):
    """The session puts the option into the worker spec, and a worker process started from scratch (fork server: it
    inherits nothing of this process's settings) switches deterministic kernels on from it before any work."""
    recorders = []
    hooks = SessionHooks(wrap_executor=lambda ex, _: recorders.append(_SpecRecorder(ex)) or recorders[-1])
    cfg = build_config(overrides=dict(BASE, rounds=1, deterministic=on, executor="process", workers=1))
    Simulation(cfg, run_dir=False, progress=False, hooks=hooks).run()
    spec = recorders[0].specs[0]
    assert spec.deterministic is on

    probe = WorkerSpec(spec.dataset, spec.partition, DeviceProbe.create({}, spec.algorithm.ctx),
                       deterministic=spec.deterministic)
    server = probe.algorithm.init_server()
    with ProcessExecutor(workers=1, start_method="forkserver") as ex:
        ex.start(probe)
        (upd,) = ex.map([Task("train", 0, 1, server, None)])
    assert int(upd.state["probe/pid"]) != os.getpid()
    assert bool(upd.state["probe/deterministic"]) is on
    if on:
        assert bool(upd.state["probe/cublas"])
    assert not torch.are_deterministic_algorithms_enabled()  # this process was left as it was
