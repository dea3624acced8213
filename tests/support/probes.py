"""An algorithm that reports, in the client state it returns, how the worker process that ran it was set up.

It is deliberately not registered (a registered one would join the registry-driven contract tests); tests build it
with ``DeviceProbe.create({}, ctx)`` and hand it to an executor in a :class:`~fedforge.core.runtime.WorkerSpec`. It
lives in an importable module so that fork-server and spawned workers can unpickle it.
"""
from __future__ import annotations

import os

import torch

from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.algorithm import Update
from fedforge.core.executors import CUBLAS_WORKSPACE


class DeviceProbe(FedAvg):
    """FedAvg whose client state records the worker's process id, whether deterministic kernels are on, whether
    ``CUBLAS_WORKSPACE_CONFIG`` holds the deterministic setting, and the index of the device the hooks ran on
    (-1: the CPU)."""

    def local_update(self, rt, msg, state) -> Update:
        upd = super().local_update(rt, msg, state)
        upd.state = {
            "probe/pid": torch.tensor(os.getpid()),
            "probe/deterministic": torch.tensor(torch.are_deterministic_algorithms_enabled()),
            "probe/cublas": torch.tensor(os.environ.get("CUBLAS_WORKSPACE_CONFIG") == CUBLAS_WORKSPACE),
            "probe/device": torch.tensor(-1 if rt.device.type == "cpu" else int(rt.device.index or 0)),
        }
        return upd
