"""The ``ray`` executor: the same client tasks on a Ray cluster (a local one by default, or ``ray_address``).

Optional extra: ``pip install 'fedforge[ray]'``. Ray is imported only when this executor starts.

The worker spec (pooled dataset, partition, algorithm) is put into Ray's object store once; each actor (one per
CPU, ``threads`` torch threads each, default 1) builds its Worker from it, reading the dataset's arrays in place
from shared memory. Tasks go to whichever actor is free, longest first, and results come back in task order, so a
given seed gives the same numbers as the sequential and process executors, bit for bit.

GPUs: with ``--device cuda`` actor i places itself on ``cuda:(i mod G)`` of the G GPUs its node shows it, or on the
``devices`` list round-robin (the same rule as the process pool, :func:`fedforge.core.executors.worker_devices`).
The actors ask Ray for no GPU resource, and recent Ray versions then leave every GPU of the node visible to them
(ray-project/ray#54868; older versions hide GPUs from such actors, and an actor then says that it sees no GPU).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Iterator

from ..core.executors import (
    EXECUTORS,
    Executor,
    Schedule,
    describe_error,
    dispatch,
    pool_devices,
    raise_remote,
    release_memory,
    set_deterministic,
    task_threads,
    usable_cores,
    use_device,
    worker_threads,
)
from ..core.runtime import Task, WorkerSpec
from ..errors import ConfigError

log = logging.getLogger("fedforge")

INSTALL_HINT = "the ray executor needs Ray: pip install 'fedforge[ray]' (or pip install ray), or use --executor process."


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


class _RayWorker:
    """Actor body: one Worker built once from the spec in the object store."""

    def __init__(self, spec: WorkerSpec, threads: int, index: int = 0, n_workers: int = 1, devices: tuple = ()):
        import dataclasses
        import warnings

        from ..core.runtime import Worker

        worker_threads(threads)
        device = pool_devices(spec, n_workers, devices)[index]  # placed with the GPUs this actor's node shows it
        spec = dataclasses.replace(spec, device=device)
        set_deterministic(spec.deterministic)
        use_device(device)
        with warnings.catch_warnings():  # the object store hands out read-only arrays; they are only read
            warnings.filterwarnings("ignore", message=".*not writable.*")
            self.worker = Worker(spec)

    def ready(self) -> int:
        return os.getpid()

    def run(self, task: Task):
        try:
            return ("ok", self.worker.run(task))
        except BaseException as e:
            return ("error", *describe_error(e))
        finally:
            release_memory()


@EXECUTORS.register("ray", summary="the same tasks on a Ray cluster (local by default, or ray_address); extra fedforge[ray]")
class RayExecutor(Executor):
    """Client tasks on Ray actors: ``workers`` actors (default: the cluster's CPUs), ``threads`` torch threads each.

    ``address``: a cluster to join (``"auto"``, ``"ray://host:10001"``, ...); by default ``$RAY_ADDRESS`` if set,
    else a local cluster that this executor starts and shuts down. A Ray session that is already initialised is
    used as it is and left running.
    """

    name = "ray"

    def __init__(self, workers: int = 0, threads: int = 0, address: str | None = None, devices: tuple | list = (),
                 **options: Any):
        super().__init__(workers, threads, **options)
        self.address = address
        self.devices = tuple(devices or ())
        self._started = False
        self.actors: list = []

    def start(self, spec: WorkerSpec) -> None:
        ray = import_ray()
        self.spec = spec
        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS")
            kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=self.workers or usable_cores(), **kwargs)
            self._started = True
        n = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor = ray.remote(num_cpus=1)(_RayWorker)
        ref = ray.put(spec)
        threads = task_threads(self.threads)
        try:
            self.actors = [actor.remote(ref, threads, i, n, self.devices) for i in range(n)]
            ray.get([a.ready.remote() for a in self.actors])
        except Exception as e:
            self.close()
            cause = getattr(e, "cause", None)
            raise RuntimeError(f"the ray executor could not start its {n} workers: {cause or e}") from None
        log.debug("ray executor: %d actors, %d torch thread(s) each", n, threads)

    def imap(self, tasks: Iterable[Task]) -> Iterator[Any]:
        ray = import_ray()
        if not self.actors:
            raise RuntimeError("the ray executor was not started (call start(spec) first)")

        def submit(a: int, item: tuple[int, Task]) -> Any:
            return self.actors[a].run.remote(item[1])  # an object ref

        def wait_any(refs: list) -> list:
            return ray.wait(refs, num_returns=1)[0]

        def collect(ref: Any, a: int, task: Task) -> Any:
            try:
                msg = ray.get(ref)
            except Exception as e:  # the actor died (killed, out of memory, node lost)
                raise RuntimeError(f"ray worker {a} died while running client {task.cid}'s {task.kind} task "
                                   f"({type(e).__name__}); if it ran out of memory, use fewer workers.") from None
            if msg[0] == "error":
                raise_remote(msg[1], msg[2], f"client {task.cid}'s {task.kind} task (round {task.round}) on ray worker {a}")
            return msg[1]

        def drain(refs: list) -> None:
            try:
                ray.wait(refs, num_returns=len(refs))
            except Exception:
                pass

        yield from dispatch(Schedule(self.spec, tasks, len(self.actors)), len(self.actors), submit, wait_any, collect,
                            drain)

    def close(self) -> None:
        try:
            import ray
        except ImportError:
            return
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors = []
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False
