"""Several GPUs: where the process and Ray pools put their workers (``worker_devices``, a pure function of the run's
device, the pool's size, the number of GPUs visible and ``--devices``), and that a pool hands each worker its place.
No GPU is needed: the placement is computed for any number of visible devices."""
from __future__ import annotations

import pytest
import torch

import fedforge
from fedforge.core.executors import ProcessExecutor, make_executor, pool_devices, worker_devices
from fedforge.core.runtime import Task, Worker, WorkerSpec
from fedforge.core.simulation import Simulation
from fedforge.errors import ConfigError
from tests.support.probes import DeviceProbe


def test_bare_cuda_spreads_workers_over_every_visible_gpu():
    assert worker_devices("cuda", 5, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices("cuda", 3, 8) == ["cuda:0", "cuda:1", "cuda:2"]
    assert worker_devices("cuda", 4, 1) == ["cuda:0"] * 4


def test_a_named_gpu_or_the_cpu_keeps_every_worker_there():
    assert worker_devices("cuda:1", 3, 2) == ["cuda:1"] * 3
    assert worker_devices("cpu", 2, 0) == ["cpu", "cpu"]
    assert worker_devices("cpu", 2, 4) == ["cpu", "cpu"]  # a CPU run stays on the CPU whatever the machine has


def test_a_devices_list_is_taken_round_robin():
    assert worker_devices("cuda", 5, 4, ["cuda:3", "cuda:1"]) == ["cuda:3", "cuda:1", "cuda:3", "cuda:1", "cuda:3"]
    assert worker_devices("cuda:0", 2, 2, ["cuda:1"]) == ["cuda:1", "cuda:1"]  # the server stays on cuda:0
    assert worker_devices("cpu", 3, 0, ["cpu"]) == ["cpu"] * 3


@pytest.mark.parametrize("device,n,visible,devices,message", [
    ("cuda", 2, 0, (), "no CUDA device is visible"),
    ("cuda:2", 1, 2, (), "names GPU 2, but the workers see 2"),
    ("cuda", 2, 2, ["cuda:0", "cuda:5"], "names GPU 5"),
    ("cpu", 2, 0, ["cuda:0"], "no CUDA device is visible"),
    ("cpu", 2, 0, ["tpu:0"], "neither 'cpu' nor 'cuda"),
    ("cuda", 0, 2, (), "at least one worker"),
])
def test_impossible_placements_are_refused(device, n, visible, devices, message):
    with pytest.raises(ConfigError, match=message):
        worker_devices(device, n, visible, devices)


def test_devices_option():
    cfg = fedforge.build_config(overrides={"devices": "cuda:0, cuda:1"})
    assert cfg.devices == ["cuda:0", "cuda:1"]
    assert "devices" not in cfg.identity()  # where workers run does not change results
    assert make_executor(fedforge.build_config(overrides={"executor": "process", "devices": ["cpu"]})).devices == ["cpu"]
    assert make_executor(fedforge.build_config(overrides={"executor": "sequential", "devices": ["cpu"]})).name == "sequential"
    for bad in ("cuda", "gpu1", "cuda:x"):
        with pytest.raises(ConfigError, match="devices lists the workers' devices as cpu or cuda:N"):
            fedforge.build_config(overrides={"devices": bad})


def _probe_spec(**kw) -> WorkerSpec:
    sim = Simulation(fedforge.build_config(overrides=dict(dataset="digits", clients=3, rounds=0, model="mlp")),
                     run_dir=False, progress=False)
    return WorkerSpec(sim.ds, sim.partition, DeviceProbe.create({}, sim.ctx), **kw)


def test_a_worker_uses_its_placement_and_the_pool_places_each_worker():
    spec = _probe_spec()
    assert Worker(spec).device == torch.device("cpu")  # no placement: the run's device
    assert pool_devices(spec, 3) == ["cpu"] * 3
    server = spec.algorithm.init_server()
    with ProcessExecutor(workers=2, devices=["cpu"]) as ex:
        ex.start(spec)
        out = ex.map([Task("train", c, 1, server, None) for c in range(3)])
    assert {int(u.state["probe/device"]) for u in out} == {-1}
    assert len({int(u.state["probe/pid"]) for u in out}) == 2  # both workers ran tasks
