"""Executors give the same results: sequential, process (1 and 2 workers) and Ray bit for bit, vectorized within
float tolerance; plus the pieces that make that true (fixed torch threads per task, lazy task streams)."""
from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

import fedforge
import fedforge.algorithms  # noqa: F401  (registers fedavg, local, ...)
from fedforge.core import EXECUTORS, Task
from fedforge.core.algorithm import ALGORITHMS, register_algorithm
from fedforge.core.executors import ProcessExecutor, SequentialExecutor, make_executor, schedule, task_threads
from fedforge.core.runtime import WorkerSpec
from fedforge.core.simulation import Simulation
from fedforge.errors import ConfigError, UnknownNameError

COMMON = dict(algorithm="fedavg", dataset="digits", clients=6, rounds=2, model="cnn", seed=5, join_ratio=0.67)
METRICS = ("global_acc", "global_loss", "loss", "bytes_up", "bytes_down")


def run(**kw):
    return fedforge.run(run_dir=False, **{**COMMON, **kw})


def metrics(res):
    return [tuple(r.get(k) for k in METRICS) for r in res.records]


def assert_identical(a, b):
    assert metrics(a) == metrics(b)
    assert a.server.keys() == b.server.keys()
    for k in a.server:
        assert torch.equal(a.server[k], b.server[k]), k


@pytest.fixture(scope="module")
def baseline():
    return run()


@pytest.mark.parametrize("workers", [1, 2])
def test_process_pool_is_bit_identical(baseline, workers):
    assert_identical(baseline, run(executor="process", workers=workers))


def test_fork_server_pool_is_bit_identical(baseline):
    """The start method of GPU runs (and of platforms without fork): dataset through shared memory."""
    cfg = fedforge.build_config(overrides=COMMON)
    res = Simulation(cfg, run_dir=False, progress=False, executor=ProcessExecutor(workers=2, start_method="forkserver")).run()
    assert_identical(baseline, res)


def test_results_do_not_depend_on_the_main_thread_count(baseline):
    """Client work runs with a fixed torch thread count, whatever the caller's setting."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if old == 1 else 1)
        other = run()
    finally:
        torch.set_num_threads(old)
    assert torch.get_num_threads() == old
    assert_identical(baseline, other)


def test_thread_count_is_restored_and_defaults_to_one():
    assert task_threads(0) == 1 and task_threads(3) == 3
    sim = Simulation(fedforge.build_config(overrides=dict(COMMON, rounds=0)), run_dir=False, progress=False)
    ex = SequentialExecutor()
    ex.start(WorkerSpec(sim.ds, sim.partition, sim.algo))
    seen = []
    orig = ex.worker.run
    ex.worker.run = lambda t: (seen.append(torch.get_num_threads()), orig(t))[1]
    before = torch.get_num_threads()
    ex.map([Task("eval", 0, 0, sim.algo.init_server(), None)])
    assert seen == [1] and torch.get_num_threads() == before


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'fedforge[ray]')")
def test_ray_local_cluster_is_bit_identical(baseline):
    import ray

    assert not ray.is_initialized()
    res = run(executor="ray", workers=2)
    assert not ray.is_initialized(), "the executor must shut down the local cluster it started"
    assert_identical(baseline, res)


def test_ray_missing_gives_an_install_hint(monkeypatch):
    import sys

    from fedforge.integrations.ray import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees when Ray is not installed
    with pytest.raises(ConfigError, match=r"pip install 'fedforge\[ray\]'"):
        import_ray()


def test_vectorized_matches_sequential_within_tolerance(baseline):
    vec = run(executor="vectorized")
    for a, b in zip(baseline.records, vec.records):
        assert a["global_acc"] == pytest.approx(b["global_acc"], abs=0.02)
        assert a["global_loss"] == pytest.approx(b["global_loss"], rel=1e-4)
        if a["loss"] is not None:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for k in baseline.server:
        torch.testing.assert_close(vec.server[k], baseline.server[k], rtol=1e-4, atol=1e-5)


def test_vectorized_local_keeps_personal_models():
    """`local` starts each client from its own state: the vectorized path must read and write that state."""
    kw = dict(algorithm="local", model="mlp", rounds=2, join_ratio=1.0, batch_size=16)
    seq, vec = run(**kw), run(executor="vectorized", workers=4, **kw)
    assert seq.store.cids() == vec.store.cids() == list(range(6))
    for cid, state in seq.store.items():
        for k, v in state.items():
            torch.testing.assert_close(vec.store.get(cid)[k], v, rtol=1e-4, atol=1e-5)
    assert [r["personalized_acc"] for r in seq.records] == pytest.approx([r["personalized_acc"] for r in vec.records], abs=0.02)


def test_vectorized_pads_clients_smaller_than_a_batch(baseline):
    """Batch 200 is larger than some clients' data: their single short batch is padded and masked."""
    seq, vec = run(batch_size=200, rounds=1), run(batch_size=200, rounds=1, executor="vectorized")
    for k in seq.server:
        torch.testing.assert_close(vec.server[k], seq.server[k], rtol=1e-4, atol=1e-5)


class _WithOwnLoss(ALGORITHMS.get("fedavg")):
    """FedAvg with a label-smoothed loss, without declaring the changed update vectorizable again."""

    @staticmethod
    def loss(model, x, y):
        return torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)


def test_vectorized_falls_back_with_one_notice(caplog):
    if "test-own-loss" not in ALGORITHMS:
        register_algorithm("test-own-loss")(_WithOwnLoss)
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        vec = run(algorithm="test-own-loss", executor="vectorized")
    notices = [r.getMessage() for r in caplog.records if "vectorized executor" in r.getMessage()]
    assert len(notices) == 1 and "changes loss of FedAvg" in notices[0] and "one at a time" in notices[0]
    seq = run(algorithm="test-own-loss")
    for k in seq.server:  # the training fallback is the sequential executor itself
        assert torch.equal(seq.server[k], vec.server[k]), k
    for a, b in zip(metrics(seq), metrics(vec)):  # (the evaluation is still vectorized: equal up to float rounding)
        assert [x is None for x in a] == [x is None for x in b]
        assert [x for x in a if x is not None] == pytest.approx([x for x in b if x is not None], rel=1e-5)


def test_subclass_that_changes_the_update_is_not_vectorized():
    from fedforge.core.vectorized import why_not_vectorized

    fedavg = ALGORITHMS.get("fedavg")

    class Changed(fedavg):
        def local_update(self, rt, msg, state):  # e.g. a proximal term
            return super().local_update(rt, msg, state)

    sim = Simulation(fedforge.build_config(overrides=dict(COMMON, rounds=0)), run_dir=False, progress=False)
    model = sim.ctx.build_model()
    assert why_not_vectorized(sim.algo, model) is None
    reason = why_not_vectorized(Changed(sim.algo.hp, sim.ctx), model)
    assert reason and "changes local_update" in reason


def test_process_pool_streams_tasks_lazily():
    """Tasks given as a generator are pulled a few at a time (so evaluation never holds every client's state)."""
    sim = Simulation(fedforge.build_config(overrides=dict(COMMON, clients=10, rounds=0)), run_dir=False, progress=False)
    server = sim.algo.init_server()
    pulled = []

    def tasks():
        for i in range(40):
            pulled.append(i)
            yield Task("eval", i % 10, 0, server, None)

    ex = ProcessExecutor(workers=2)
    ex.start(WorkerSpec(sim.ds, sim.partition, sim.algo))
    try:
        it = ex.imap(tasks())
        first = next(it)
        assert len(pulled) <= 4 * 2 + 2
        rest = list(it)
    finally:
        ex.close()
    seq = SequentialExecutor()
    seq.start(WorkerSpec(sim.ds, sim.partition, sim.algo))
    expect = seq.map([Task("eval", i % 10, 0, server, None) for i in range(40)])
    got = [first] + rest
    assert [r.cid for r in got] == [r.cid for r in expect]
    assert [(r.counts["global"].correct, r.counts["global"].loss_sum) for r in got] == \
           [(r.counts["global"].correct, r.counts["global"].loss_sum) for r in expect]


def test_schedule_starts_the_longest_first():
    sim = Simulation(fedforge.build_config(overrides=dict(COMMON, rounds=0)), run_dir=False, progress=False)
    spec = WorkerSpec(sim.ds, sim.partition, sim.algo)
    tasks = [Task("train", c, 1, {}, None) for c in range(6)]
    sizes = sim.ctx.train_sizes
    order = [i for i, _ in schedule(spec, tasks, 2)]
    assert [sizes[i] for i in order] == sorted(sizes, reverse=True)
    assert sorted(i for i, _ in schedule(spec, iter(tasks), 1)) == list(range(6))


def test_process_worker_errors_reach_the_caller():
    """A failing evaluation stops the run with the worker's error and traceback; a failing local update comes back as a
    ClientFailure value carrying the worker's traceback (the round goes on without it); the pool keeps working."""
    from fedforge.core.faults import ClientFailure

    sim = Simulation(fedforge.build_config(overrides=dict(COMMON, rounds=0)), run_dir=False, progress=False)
    ex = ProcessExecutor(workers=1)
    ex.start(WorkerSpec(sim.ds, sim.partition, sim.algo))
    try:
        bad = {"features.9.weight": torch.zeros(1)}  # no such weight: loading it fails in the worker
        with pytest.raises(RuntimeError, match="client 2's eval task .* in process worker 0 failed"):
            ex.map([Task("eval", 2, 1, bad, None)])
        (failed,) = ex.map([Task("train", 2, 1, bad, None)])
        assert isinstance(failed, ClientFailure) and failed.kind == "error" and "features.9.weight" in failed.error
        assert "load" in failed.traceback
        ok = ex.map([Task("eval", 1, 0, sim.algo.init_server(), None)])  # the pool still works afterwards
        assert ok[0].cid == 1
    finally:
        ex.close()
    assert not ex._procs


def test_unknown_executor_and_bad_sizes():
    with pytest.raises(UnknownNameError, match="process"):
        make_executor(fedforge.build_config(overrides={"executor": "proces"}))
    with pytest.raises(ConfigError, match="workers must be >= 0"):
        fedforge.build_config(overrides={"workers": -1})
    assert {"sequential", "process", "ray", "vectorized"} <= set(EXECUTORS.names())


def test_vectorized_honours_injected_failures():
    """Clients drawn to fail take the worker's guarded path; the others are trained together."""
    seq, vec = run(fail_rate=0.3), run(fail_rate=0.3, executor="vectorized")
    assert seq.summary["failed_updates"] == vec.summary["failed_updates"] > 0
    assert [r["clients"] for r in seq.records] == [r["clients"] for r in vec.records]
    for k in seq.server:
        torch.testing.assert_close(vec.server[k], seq.server[k], rtol=1e-4, atol=1e-5)
