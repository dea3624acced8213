"""Executors run a round's client tasks. Results never depend on the executor: each task seeds its own streams."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable

from ..registry import Registry
from .runtime import Task, Worker, WorkerSpec

EXECUTORS: Registry[type["Executor"]] = Registry("executor", "choose sequential, process, ray or vectorized")


class Executor(ABC):
    """Small interface: ``start`` once with the worker spec, ``map`` tasks (results in task order), ``close``."""

    name = ""

    def __init__(self, workers: int = 0, threads: int = 0, **options: Any):
        self.workers = workers
        self.threads = threads
        self.options = options

    @abstractmethod
    def start(self, spec: WorkerSpec) -> None: ...

    @abstractmethod
    def map(self, tasks: Iterable[Task]) -> list[Any]: ...

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@EXECUTORS.register("sequential")
class SequentialExecutor(Executor):
    """One worker in this process; clients one after another (the default)."""

    name = "sequential"

    def start(self, spec: WorkerSpec) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self.worker = Worker(spec)

    def map(self, tasks: Iterable[Task]) -> list[Any]:
        return [self.worker.run(t) for t in tasks]
