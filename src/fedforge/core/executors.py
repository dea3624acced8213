"""Executors run a round's client tasks. Results never depend on the executor: each task seeds its own streams.

Bit-for-bit equality across executors and worker counts needs one more thing than per-task seeds: the same
number of torch threads for every task, because oneDNN's convolution kernels split their reductions by thread
and the last bits change with the split (measured: a client's MNIST update differs by up to 4e-8 between one and
two threads). Client work therefore always runs with ``threads`` intra-op threads (default 1), whichever executor
runs it; the main process keeps its own setting for server-side work. Pick the number of workers for speed and
leave ``threads`` alone unless you accept last-bit differences from runs with another ``threads``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import traceback
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from ..errors import ConfigError, FedforgeError
from ..registry import Registry
from .runtime import Task, Worker, WorkerSpec

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    import torch

log = logging.getLogger("fedforge")

EXECUTORS: Registry[type[Executor]] = Registry("executor", "choose sequential, process, ray or vectorized",
                                                  populate=("fedforge.core.vectorized",
                                                            "fedforge.integrations.ray",
                                                            "fedforge.integrations.flower"))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def task_threads(threads: int) -> int:
    """Torch intra-op threads for client work: ``threads``, or 1 when 0 (automatic)."""
    return int(threads) if threads and threads > 0 else 1


def worker_threads(threads: int) -> None:
    """Set a pool worker's torch threads: ``threads`` intra-op, one inter-op (where torch still allows it)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``n`` torch intra-op threads, then restore the previous setting."""
    import torch

    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            torch.set_num_threads(old)


# --------------------------------------------------------------------------------------- devices
def worker_devices(device: str, n_workers: int, visible: int, devices: Sequence[str] = ()) -> list[str]:
    """The device of each of a pool's ``n_workers`` workers: a pure function of its inputs.

    * ``devices`` given (``--devices cuda:0,cuda:2``): worker i gets ``devices[i mod len(devices)]``;
    * ``device`` is ``cuda`` with no index: worker i gets ``cuda:(i mod visible)``, so a pool spreads over every
      GPU this process sees;
    * otherwise (``cpu``, or one GPU named as ``cuda:N``): every worker gets ``device``.

    ``visible`` is the number of CUDA devices the process that will run the workers sees. A GPU that is not
    visible there is refused with a ConfigError. The server stays on the run's device whatever the placement, and
    results do not depend on it (every task seeds its own streams).
    """
    if n_workers < 1:
        raise ConfigError(f"a pool needs at least one worker, got {n_workers}.")
    wanted = [d.strip() for d in devices if str(d).strip()]
    for d in wanted or [device]:
        m = re.fullmatch(r"cuda(?::(\d+))?", d)
        if d != "cpu" and m is None:
            raise ConfigError(f"worker device '{d}' is neither 'cpu' nor 'cuda[:N]'; list GPUs as cuda:0,cuda:1.")
        if m is not None and visible < 1:
            raise ConfigError(f"worker device '{d}' asks for a GPU, but no CUDA device is visible to the workers; "
                              f"use --device cpu (or make the GPUs visible: CUDA_VISIBLE_DEVICES).")
        if m is not None and m.group(1) is not None and int(m.group(1)) >= visible:
            raise ConfigError(f"worker device '{d}' names GPU {m.group(1)}, but the workers see {visible} "
                              f"(cuda:0 to cuda:{visible - 1}); fix --devices.")
    if wanted:
        return [wanted[i % len(wanted)] for i in range(n_workers)]
    if device == "cuda":
        return [f"cuda:{i % visible}" for i in range(n_workers)]
    return [device] * n_workers


def visible_cuda_devices() -> int:
    """CUDA devices this process sees (0 without CUDA). Asked only for GPU runs, whose pools never fork."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def use_device(device: str | None) -> None:
    """Make a worker process's own GPU its current CUDA device (so that an unindexed ``cuda`` tensor lands there)."""
    if device and device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(int(device.split(":", 1)[1]))


def pool_devices(spec: WorkerSpec, n_workers: int, devices: Sequence[str] = ()) -> list[str]:
    """The placement of a pool of ``n_workers`` on this machine (:func:`worker_devices` with its visible GPUs)."""
    device = str(spec.device or spec.algorithm.ctx.device)
    gpu = device.startswith("cuda") or any(str(d).startswith("cuda") for d in devices)
    return worker_devices(device, n_workers, visible_cuda_devices() if gpu else 0, devices)


CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for reproducible results (CUDA >= 10.2)


def set_deterministic(on: bool) -> dict[str, Any]:
    """Switch deterministic kernels on (``--deterministic``) or off for this process; returns the previous settings
    for :func:`restore_deterministic`.

    On: ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an operation without a deterministic kernel
    warns, naming itself, instead of stopping the run), ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set
    (cuBLAS reads it when CUDA first uses it in the process, so this runs before the run or a worker touches the GPU),
    cuDNN deterministic with its autotuner (``benchmark``) off. Harmless on a CPU.
    """
    import torch

    prev = {"algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    if not on:
        return prev
    if prev["cublas"] is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            log.warning("--deterministic: CUDA was already in use in this process before CUBLAS_WORKSPACE_CONFIG could "
                        "be set, so cuBLAS may not be deterministic here; set CUBLAS_WORKSPACE_CONFIG=%s in the "
                        "environment before starting Python", CUBLAS_WORKSPACE)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return prev


def restore_deterministic(prev: dict[str, Any]) -> None:
    import torch

    torch.use_deterministic_algorithms(prev["algorithms"], warn_only=prev["warn_only"])
    torch.backends.cudnn.deterministic = prev["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = prev["cudnn_benchmark"]
    if prev["cublas"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = prev["cublas"]


@contextlib.contextmanager
def deterministic(on: bool) -> Iterator[None]:
    """Deterministic kernels for the body when ``on`` (see :func:`set_deterministic`), then the previous settings."""
    if not on:
        yield
        return
    prev = set_deterministic(True)
    try:
        yield
    finally:
        restore_deterministic(prev)


class Schedule:
    """The order in which a pool starts tasks: longest first, with a bounded look-ahead for streams.

    A list is sorted outright (the caller holds it anyway). Any other iterable is read lazily: a task is pulled
    only while it lies within ``4 × workers`` of the oldest result not yet handed back, and the longest pulled task
    starts next. That comes close to the sorted order (on PFLlib's MNIST split with 2 workers the slowest worker
    finishes within 0.3 % of an even split, against 6 % in plain order) while never holding more than a few
    client states or results, and a caller that stops handing out tasks is heard promptly.
    """

    def __init__(self, spec: WorkerSpec, tasks: Iterable[Task], workers: int):
        self.spec = spec
        self.look = 4 * max(1, workers)
        self.buf: list[tuple[int, Task]] = []
        self.pulled = 0
        if isinstance(tasks, (list, tuple)):
            order = sorted(range(len(tasks)), key=lambda i: -task_cost(spec, tasks[i]))
            self.source: Iterator[tuple[int, Task]] = ((i, tasks[i]) for i in order)
            self.window = False
        else:
            self.source = enumerate(tasks)
            self.window = True
        self.exhausted = False

    def next(self, oldest: int) -> tuple[int, Task] | None:
        """The next (index, task) to start, given the oldest index not yet handed back; None when there is none
        now (all done, or the window is full until ``oldest`` is handed back)."""
        if not self.window:
            return next(self.source, None)
        while not self.exhausted and len(self.buf) < self.look and self.pulled < oldest + self.look:
            item = next(self.source, None)
            if item is None:
                self.exhausted = True
                break
            self.pulled += 1
            self.buf.append(item)
        if not self.buf:
            return None
        j = max(range(len(self.buf)), key=lambda k: (task_cost(self.spec, self.buf[k][1]), -self.buf[k][0]))
        return self.buf.pop(j)


def schedule(spec: WorkerSpec, tasks: Iterable[Task], workers: int) -> Iterator[tuple[int, Task]]:
    """All (index, task) pairs in :class:`Schedule` order, as if every result were handed back at once."""
    sched = Schedule(spec, tasks, workers)
    while (item := sched.next(sched.pulled)) is not None:
        yield item


def dispatch(sched: Schedule, workers: int, submit: Callable[[int, tuple[int, Task]], Any],
             wait_any: Callable[[list[Any]], Iterable[Any]], collect: Callable[[Any, int, Task], Any],
             drain: Callable[[list[Any]], None]) -> Iterator[Any]:
    """The task loop of a pool of ``workers`` workers (process, ray): give each free worker the next task of
    ``sched``, wait for any to finish, and yield the results in task order.

    ``submit(w, (index, task))`` hands a task to worker ``w`` and returns a key for it; ``wait_any(keys)`` waits
    until at least one of them is done and returns those that are; ``collect(key, w, task)`` returns that task's
    result (or raises); ``drain(keys)`` waits, ignoring errors, for what is still in flight when the loop ends
    early, so that the next call starts clean.
    """
    free = list(range(workers))
    inflight: dict[Any, tuple[int, int, Task]] = {}  # key -> (worker, index, task)
    done: dict[int, Any] = {}
    nxt = 0
    try:
        while True:
            while free:
                item = sched.next(nxt)
                if item is None:
                    break
                w = free.pop(0)
                inflight[submit(w, item)] = (w, *item)
            if not inflight:
                break
            for key in wait_any(list(inflight)):
                w, idx, task = inflight.pop(key)
                free.append(w)
                done[idx] = collect(key, w, task)
            while nxt in done:
                yield done.pop(nxt)
                nxt += 1
    finally:
        if inflight:
            drain(list(inflight))
        release_memory()


_TRIM: Any = None


def release_memory() -> None:
    """Hand the heap memory that freed tensors leave behind back to the operating system (glibc's malloc_trim).

    glibc keeps freed blocks of a few MB in its heap for reuse; with long-lived client states interleaved with
    per-round transients (uploads, messages, evaluation copies) the heap fragments and RSS grows to about twice the
    live data (30 simulated rounds of 500 Ditto clients' CIFAR-CNN states, ``benchmarks/speed.py heap``: RSS grew
    by 3.6 GiB for 1.7 GiB of states, and by 1.7 GiB with a trim after each round). Executors call this after each
    batch of tasks; it costs milliseconds. A no-op where glibc is absent.
    """
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


def task_cost(spec: WorkerSpec, task: Task) -> int:
    """Rough cost of a task (its number of samples), for scheduling the longest tasks first."""
    ctx = spec.algorithm.ctx
    sizes = ctx.test_sizes if task.kind == "eval" else ctx.train_sizes
    try:
        return int(sizes[task.cid])
    except (IndexError, TypeError):
        return 0


class Executor(ABC):
    """Small interface: ``start`` once with the worker spec, ``map`` tasks (results in task order), ``close``.

    Subclasses implement ``imap`` (a lazy iterator of results in task order, which consumes ``tasks`` lazily where
    it can, so that evaluating 10,000 clients never holds 10,000 client states) or ``map``; each defaults to the
    other.
    """

    name = ""

    def __init__(self, workers: int = 0, threads: int = 0, **options: Any):
        if workers < 0 or threads < 0:
            raise ConfigError(f"workers and threads must be >= 0, got workers={workers}, threads={threads}.")
        self.workers = workers
        self.threads = threads
        self.options = options

    @abstractmethod
    def start(self, spec: WorkerSpec) -> None:
        raise NotImplementedError

    def map(self, tasks: Iterable[Task]) -> list[Any]:
        return list(self.imap(tasks))

    def imap(self, tasks: Iterable[Task]) -> Iterator[Any]:
        if type(self).map is Executor.map:
            raise NotImplementedError(f"{type(self).__name__} implements neither map nor imap")
        return iter(self.map(list(tasks)))

    def close(self) -> None:  # noqa: B027  (an optional hook: an executor without workers has nothing to close)
        pass

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@EXECUTORS.register("sequential", summary="one worker in this process, clients one after another (the default)")
class SequentialExecutor(Executor):
    """One worker in this process; clients one after another (the default)."""

    name = "sequential"

    def start(self, spec: WorkerSpec) -> None:
        self.worker = Worker(spec)

    def imap(self, tasks: Iterable[Task]) -> Iterator[Any]:
        n = task_threads(self.threads)
        try:
            for t in tasks:
                with torch_threads(n):
                    out = self.worker.run(t)
                yield out
        finally:
            release_memory()

    def map(self, tasks: Iterable[Task]) -> list[Any]:
        try:
            with torch_threads(task_threads(self.threads)):
                return [self.worker.run(t) for t in tasks]
        finally:
            release_memory()


# ------------------------------------------------------------------------------------- process pool
def shareable_spec(spec: WorkerSpec) -> tuple[WorkerSpec, torch.Tensor, torch.Tensor]:
    """(spec without the pooled arrays, x and y as torch tensors in shared memory): what a worker process needs.

    The pooled arrays are copied once into shared memory and reach every worker as a handle (torch.multiprocessing
    shares tensor storage between processes); the rest of the spec is small and pickled once per worker. The
    dataset object itself is then pointed at the shared copy (same values), so that the main process does not
    keep a second private copy of the pool.
    """
    import dataclasses

    import numpy as np
    import torch

    ds = spec.dataset
    x = torch.from_numpy(np.ascontiguousarray(ds.x)).share_memory_()  # type: ignore[no-untyped-call]
    y = torch.from_numpy(np.ascontiguousarray(ds.y)).share_memory_()  # type: ignore[no-untyped-call]
    try:
        ds.x, ds.y = x.numpy(), y.numpy()
    except (AttributeError, dataclasses.FrozenInstanceError):
        pass
    light = dataclasses.replace(ds, x=np.empty((0,) + tuple(ds.x.shape[1:]), dtype=ds.x.dtype), y=np.empty(0, dtype=ds.y.dtype))
    return dataclasses.replace(spec, dataset=light), x, y


def rebuild_spec(light: WorkerSpec, x: torch.Tensor, y: torch.Tensor) -> WorkerSpec:
    import dataclasses

    return dataclasses.replace(light, dataset=dataclasses.replace(light.dataset, x=x.numpy(), y=y.numpy()))


def describe_error(e: BaseException) -> tuple[BaseException | None, str]:
    """(the exception if it can travel between processes, its traceback as text)."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        pickle.loads(pickle.dumps(e))
        return e, tb
    except Exception:
        return None, tb


def raise_remote(exc: BaseException | None, tb: str, where: str) -> None:
    """Re-raise a worker's error in the main process: fedforge's own errors as they are, others with the traceback."""
    if isinstance(exc, FedforgeError):
        raise exc
    raise RuntimeError(f"{where} failed:\n{tb}") from exc


def _process_worker(conn: Connection, light: bytes | None, x: torch.Tensor | None, y: torch.Tensor | None,
                    threads: int, spec: WorkerSpec | None = None, inherited: tuple[Connection, ...] = (),
                    device: str | None = None) -> None:
    """Body of one worker process: build the Worker once, then run tasks until told to stop.

    ``spec`` is given as it is to a forked worker (which sees the parent's memory); other start methods get the
    pickled spec without its arrays (``light``) and the arrays in shared memory (``x``, ``y``). A forked worker
    closes its copies of the parent's ends of the pipes (``inherited``): otherwise its own pipe would never report
    the parent's death, and an orphaned worker would wait forever. ``device``: this worker's place in the pool
    (:func:`worker_devices`). Deterministic kernels (``spec.deterministic``) are switched on before the worker
    first touches a GPU.
    """
    import signal

    for c in inherited:
        c.close()

    # Ctrl-C reaches the whole terminal process group: the main process alone decides how to stop (it lets the
    # tasks in flight finish, writes a checkpoint, then stops the pool), so workers ignore SIGINT; a forked
    # worker also drops any SIGTERM handler it inherited, so that closing the pool can always terminate it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    worker_threads(threads)
    try:
        import dataclasses

        if spec is None:  # not forked: the pickled spec and the arrays in shared memory
            assert light is not None and x is not None and y is not None
            spec = rebuild_spec(pickle.loads(light), x, y)
        if device is not None:
            spec = dataclasses.replace(spec, device=device)
        set_deterministic(spec.deterministic)
        use_device(spec.device)
        worker = Worker(spec)
    except BaseException as e:  # report start-up failures instead of dying silently
        conn.send_bytes(pickle.dumps(("error", -1, *describe_error(e))))
        return
    conn.send_bytes(pickle.dumps(("ready", os.getpid())))
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if raw == b"stop":
            return
        idx, task = pickle.loads(raw)
        out: tuple[Any, ...]
        try:
            out = ("ok", idx, worker.run(task))
        except BaseException as e:
            out = ("error", idx, *describe_error(e))
        conn.send_bytes(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
        del out, task
        release_memory()


@EXECUTORS.register("process", summary="a local pool of worker processes (one per core, one torch thread each) sharing the data")
class ProcessExecutor(Executor):
    """A pool of ``workers`` local processes (default: one per usable core), each with ``threads`` torch threads
    (default 1), each holding one Worker built once from the spec. Every worker reads the pooled dataset in place
    (never a copy per worker); per task only the message and the client's state travel.

    Tasks go to whichever worker is free, longest first (by sample count), and results come back in task order.

    ``start_method``: on a CPU run workers are forked from the main process (where the platform can fork): they
    start at once and share, copy-on-write, everything the main process holds — torch's code, the pooled dataset —
    so the pool adds only what each worker writes (28 MB each on pfllib-mnist, `benchmarks/speed.py pool-memory`:
    summed PSS of the pool 521 MB with fork, 863 MB with the fork server). Each forked worker sets its
    own torch thread count before any work, as PyTorch's DataLoader workers do. GPU runs (CUDA cannot be forked)
    and platforms without fork start workers through a fork server that imported torch once, and send them the
    dataset once through shared memory.

    Devices: on a GPU run with ``--device cuda`` worker i uses ``cuda:(i mod G)`` of the G GPUs it sees, or the
    ``devices`` list round-robin (:func:`worker_devices`); the server stays on the run's device.
    """

    name = "process"

    def __init__(self, workers: int = 0, threads: int = 0, start_method: str | None = None,
                 devices: Sequence[str] = (), **options: Any):
        super().__init__(workers, threads, **options)
        self.start_method = start_method
        self.devices = list(devices or ())
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []

    def start(self, spec: WorkerSpec) -> None:
        import multiprocessing as mp

        import torch.multiprocessing  # noqa: F401  (registers the reductions that share tensor storage)

        self.spec = spec
        n = self.workers or usable_cores()
        methods = mp.get_all_start_methods()
        devices = pool_devices(spec, n, self.devices)
        gpu = any(d.startswith("cuda") for d in devices) or str(spec.algorithm.ctx.device).startswith("cuda")
        method = self.start_method or ("fork" if "fork" in methods and not gpu else
                                       "forkserver" if "forkserver" in methods else "spawn")
        if method not in methods:
            raise ConfigError(f"start method '{method}' is not available here; choose one of {', '.join(methods)}.")
        ctx = mp.get_context(method)
        threads = task_threads(self.threads)
        if method == "fork":
            args: tuple[Any, ...] = (None, None, None, threads, spec)
        else:
            if method == "forkserver":
                ctx.set_forkserver_preload(["torch", "fedforge.core.runtime"])
            light, x, y = shareable_spec(spec)
            try:
                blob = pickle.dumps(light, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:
                raise ConfigError(f"the process executor cannot send the algorithm to its workers ({e}); define "
                                  f"algorithms in an importable module, or use the sequential executor.") from None
            args = (blob, x, y, threads)
        try:
            for i in range(n):
                parent, child = ctx.Pipe(duplex=True)
                kwargs: dict[str, Any] = {"inherited": (*self._conns, parent)} if method == "fork" else {}
                kwargs["device"] = devices[i]
                # every concrete context has Process; typeshed types get_context(str) as the BaseContext, which lacks it
                p = ctx.Process(target=_process_worker, args=(child, *args), kwargs=kwargs,  # type: ignore[attr-defined]
                                daemon=True, name=f"fedforge-worker-{i}")
                p.start()
                child.close()
                self._procs.append(p)
                self._conns.append(parent)
            for i, _c in enumerate(self._conns):
                msg = self._recv(i, "starting")
                if msg[0] == "error":
                    raise_remote(msg[2], msg[3], f"process worker {i} (start-up)")
        except BaseException:
            self.close()
            raise
        log.debug("process executor: %d workers (%s), %d torch thread(s) each", n, method, threads)
        if gpu:
            log.info("process executor: %d workers on %s", n, ", ".join(
                f"{d}×{devices.count(d)}" for d in dict.fromkeys(devices)))

    def _recv(self, i: int, doing: str) -> Any:
        try:
            return pickle.loads(self._conns[i].recv_bytes())
        except (EOFError, OSError, ConnectionError):
            p = self._procs[i]
            p.join(timeout=5)
            raise RuntimeError(f"process worker {i} (pid {p.pid}) died with exit code {p.exitcode} while {doing}; "
                               f"if it ran out of memory, use fewer workers (--workers).") from None

    def imap(self, tasks: Iterable[Task]) -> Iterator[Any]:
        from multiprocessing.connection import wait

        if not self._conns:
            raise RuntimeError("the process executor was not started (call start(spec) first)")

        def submit(w: int, item: tuple[int, Task]) -> int:
            self._conns[w].send_bytes(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
            return w

        def wait_any(busy: list[int]) -> list[int]:
            by_conn: dict[Any, int] = {self._conns[w]: w for w in busy}  # wait() hands back the objects it got
            return [by_conn[c] for c in wait(list(by_conn))]

        def collect(w: int, _w: int, task: Task) -> Any:
            msg = self._recv(w, f"running client {task.cid}'s {task.kind} task")
            if msg[0] == "error":
                raise_remote(msg[2], msg[3], f"client {task.cid}'s {task.kind} task (round {task.round}) in process worker {w}")
            return msg[2]

        def drain(busy: list[int]) -> None:
            for w in busy:
                try:
                    if w < len(self._conns):
                        self._recv(w, "finishing")
                except Exception:
                    pass

        yield from dispatch(Schedule(self.spec, tasks, len(self._conns)), len(self._conns), submit, wait_any, collect,
                            drain)

    def close(self) -> None:
        for c in self._conns:
            try:
                c.send_bytes(b"stop")
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for c in self._conns:
            c.close()
        self._procs, self._conns = [], []


def make_executor(cfg: Any) -> Executor:
    """The executor a run config asks for (``executor``, ``workers``, ``threads`` and, for Ray, ``ray_address``)."""
    cls = EXECUTORS.get(cfg.executor)
    options: dict[str, Any] = {}
    if getattr(cfg, "ray_address", None):
        options["address"] = cfg.ray_address
    if getattr(cfg, "devices", None) and cls.name in ("process", "ray"):
        options["devices"] = list(cfg.devices)
    if getattr(cfg, "gpu_memory", None) is not None and cls.name == "vectorized":
        options["gpu_memory"] = cfg.gpu_memory
    return cls(workers=cfg.workers, threads=cfg.threads, **options)

