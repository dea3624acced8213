"""The ``vectorized`` executor: many same-architecture clients trained at once with ``torch.func`` (for GPUs).

For a chunk of C clients of one architecture, the clients' weights are stacked into tensors with a leading client
dimension (as ``torch.func.stack_module_state`` does) and every local step is one call of
``vmap(grad_and_value(loss))`` over the clients, with the model run through ``functional_call``::

    W_c ← W_c − η · ∇ L_c(W_c; x_{c,s}, y_{c,s}, m_{c,s})      for all clients c at once, step s = 1..max_c S_c
    L_c = Σ_i m_{c,s,i} · CE(f(x_{c,s,i}; W_c), y_{c,s,i}) / Σ_i m_{c,s,i}

Each client's batches are the very batches the sequential executor would draw (the same per-task random
stream), so the result equals one-at-a-time training up to float rounding. Clients with fewer batches than the
longest in their chunk are masked out of the remaining steps (their weights stop changing); a client smaller
than one batch is padded and its padding masked (m = 0).

An algorithm opts in with ``Algorithm.vectorizable = True`` when its local update is exactly "start from
``vector_start(msg, state)``, plain SGD with cross-entropy on all parameters over ``rt.batches()``, then
``vector_finish(...)``" (FedAvg, Local). Anything else — another loss, gradient hooks, several models, BatchNorm
statistics (buffers cannot be updated per client inside ``vmap``) — runs one client at a time on the sequential
executor, with a one-line notice. Evaluation and fine-tuning tasks always run one at a time.

On CPUs this is slower than a loop (``vmap`` lowers the convolutions to grouped ones: a FedAvg round on
pfllib-MNIST took 3.1× the bare loop's time on this project's machine, docs/performance.md); use it on a GPU, where one client at a time leaves the device idle.
``workers`` sets how many clients are trained at once (default 100: memory grows with it).
"""
from __future__ import annotations

import logging
import random
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .executors import EXECUTORS, Executor, SequentialExecutor, release_memory, task_threads, torch_threads
from .messages import to_device
from .runtime import ClientRuntime, Task, Worker, WorkerSpec, task_seed
from .training import TrainStats

log = logging.getLogger("fedforge")

DEFAULT_CHUNK = 100


def why_not_vectorized(algo: Any, model: torch.nn.Module) -> str | None:
    """None when the vectorized executor can train this algorithm's clients of this model, else the reason."""
    if not getattr(algo, "vectorizable", False):
        return f"{algo.name}'s local update is not declared vectorizable (Algorithm.vectorizable)"
    cls = type(algo)
    decl = next(c for c in cls.__mro__ if "vectorizable" in c.__dict__)
    for attr in ("local_update", "loss", "init_client", "vector_start", "vector_finish"):
        if getattr(cls, attr, None) is not getattr(decl, attr, None):
            return (f"{algo.name} changes {attr} of {decl.__name__}, which declared the vectorizable update "
                    f"(set vectorizable again where it still holds)")
    ctx = algo.ctx
    if getattr(ctx, "optimizer", "sgd") != "sgd" or getattr(ctx, "weight_decay", 0.0) or getattr(ctx, "lr_decay", 1.0) != 1:
        return "the vectorized update is plain SGD at a fixed learning rate (--optimizer sgd, no weight decay or lr decay)"
    if getattr(algo, "loss", None) is not None:
        return f"{algo.name} trains with its own loss, which the vectorized update does not express"
    if any(True for _ in model.buffers()):
        return f"model {getattr(model, 'arch', '')} has buffers (BatchNorm statistics) that vmap cannot update per client"
    if any(isinstance(m, torch.nn.RNNBase) for m in model.modules()):
        return f"model {getattr(model, 'arch', '')} has recurrent layers (LSTM/GRU), which vmap cannot batch"
    return None


@EXECUTORS.register("vectorized", summary="many same-architecture clients at once with torch.func vmap (for GPUs)")
class VectorizedExecutor(Executor):
    """Train tasks of vectorizable algorithms in chunks of ``workers`` clients (default 100) with ``torch.func``;
    everything else one at a time, as the sequential executor does."""

    name = "vectorized"

    def __init__(self, workers: int = 0, threads: int = 0, **options: Any):
        super().__init__(workers, threads, **options)
        self.chunk = workers or DEFAULT_CHUNK
        self._told: set[str] = set()

    def start(self, spec: WorkerSpec) -> None:
        self.seq = SequentialExecutor(threads=self.threads)
        self.seq.start(spec)
        self.worker = self.seq.worker
        self.algo = spec.algorithm
        self._fns: dict[str, Any] = {}
        for arch in self.algo.ctx.arch_set:
            self._reason(arch)

    def _reason(self, arch: str) -> str | None:
        reason = why_not_vectorized(self.algo, self.worker.model(arch))
        if reason and reason not in self._told:
            self._told.add(reason)
            log.warning("vectorized executor: %s; training those clients one at a time instead.", reason)
        return reason

    # ---------------------------------------------------------------------------------------- running
    def imap(self, tasks: Iterable[Task]) -> Iterator[Any]:
        try:
            yield from self._imap(tasks)
        finally:
            release_memory()

    def _imap(self, tasks: Iterable[Task]) -> Iterator[Any]:
        buf: list[Task] = []
        for t in tasks:
            if t.kind == "train":
                buf.append(t)
                if len(buf) >= self.chunk * 4:
                    yield from self._train(buf)
                    buf = []
                continue
            if buf:
                yield from self._train(buf)
                buf = []
            yield from self.seq.imap([t])
        if buf:
            yield from self._train(buf)

    def _train(self, tasks: list[Task]) -> list[Any]:
        out: list[Any] = [None] * len(tasks)
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(tasks):
            groups.setdefault(self.algo.ctx.arch(t.cid), []).append(i)
        for arch, idx in groups.items():
            if self._reason(arch):
                for i, r in zip(idx, self.seq.map([tasks[i] for i in idx])):
                    out[i] = r
                continue
            fed, bs, ep = self.worker.fed, self.algo.ctx.batch_size, self.algo.ctx.local_epochs
            idx.sort(key=lambda i: -fed.num_batches(tasks[i].cid, bs, ep))  # similar lengths share a chunk
            for s in range(0, len(idx), self.chunk):
                part = idx[s : s + self.chunk]
                with torch_threads(task_threads(self.threads)):
                    for i, r in zip(part, self._train_chunk(arch, [tasks[i] for i in part])):
                        out[i] = r
        return out

    def _grad_fn(self, arch: str):
        fn = self._fns.get(arch)
        if fn is None:
            from torch.func import functional_call, grad_and_value, vmap

            model = self.worker.model(arch)

            def loss(params, x, y, m):
                logits = functional_call(model, params, (x,))
                ce = F.cross_entropy(logits.float(), y, reduction="none")
                return (ce * m).sum() / m.sum().clamp(min=1.0)

            fn = vmap(grad_and_value(loss), randomness="different")
            self._fns[arch] = fn
        return fn

    def _train_chunk(self, arch: str, tasks: list[Task]) -> list[Any]:
        algo, worker = self.algo, self.worker
        model = worker.model(arch)
        model.train()
        names = [n for n, _ in model.named_parameters()]
        rts, msgs, states, starts = [], [], [], []
        for t in tasks:  # the same set-up as Worker.run, task by task (seeds, initial state)
            seed = task_seed(algo.ctx.seed, t.round, t.cid, t.kind)
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (2**32))
            rt = ClientRuntime(worker, t.cid, t.round, seed)
            msg = to_device(t.message, worker.device)
            state = to_device(t.state, worker.device) if t.state is not None else algo.init_client(rt)
            start = algo.vector_start(msg, state)
            missing = [n for n in names if n not in start]
            if missing:
                raise KeyError(f"{algo.name}.vector_start gave no '{missing[0]}' for client {t.cid}")
            rts.append(rt)
            msgs.append(msg)
            states.append(state)
            starts.append(start)
        dev = worker.device
        params = {n: torch.stack([s[n].to(dev, torch.float32) for s in starts]) for n in names}
        del starts
        fed, bs = worker.fed, algo.ctx.batch_size
        steps = [fed.num_batches(rt.cid, rt.batch_size, rt.local_epochs) for rt in rts]
        batches = [iter(rt.batches()) for rt in rts]
        c = len(tasks)
        loss_sum = torch.zeros(c, dtype=torch.float64)
        samples = [0] * c
        shape = (bs,) + tuple(fed.input_shape)
        grad_fn = self._grad_fn(arch)
        lr = float(algo.ctx.lr)
        for s in range(max(steps, default=0)):
            active = [i for i in range(c) if s < steps[i]]
            xs, ys, ms, ns = [], [], [], []
            for i in active:
                x, y = next(batches[i])
                n = int(y.shape[0])
                samples[i] += n
                ns.append(n)
                if n < bs:  # a client smaller than one batch: pad and mask
                    x = torch.cat([x, x.new_zeros((bs - n,) + tuple(x.shape[1:]))])
                    y = torch.cat([y, y.new_zeros(bs - n)])
                m = torch.zeros(bs, device=dev)
                m[:n] = 1.0
                xs.append(x)
                ys.append(y)
                ms.append(m)
            x = torch.stack(xs)
            if x.shape[2:] != shape[1:]:
                raise RuntimeError(f"unexpected batch shape {tuple(x.shape)}")
            y, m = torch.stack(ys), torch.stack(ms)
            whole = len(active) == c
            sel = None if whole else torch.tensor(active, device=dev)
            p = params if whole else {k: v.index_select(0, sel) for k, v in params.items()}
            with rts[0].autocast():
                grads, losses = grad_fn(p, x, y, m)
            with torch.no_grad():
                if whole:
                    torch._foreach_add_([params[k] for k in names], [grads[k] for k in names], alpha=-lr)
                else:
                    for k in names:
                        params[k].index_copy_(0, sel, p[k] - lr * grads[k])
                loss_sum[torch.tensor(active)] += losses.detach().double().cpu() * torch.tensor(ns, dtype=torch.float64)
        out = []
        for i, (t, rt) in enumerate(zip(tasks, rts)):
            weights = {n: params[n][i].clone() for n in names}
            stats = TrainStats(float(loss_sum[i] / samples[i]) if samples[i] else 0.0, samples[i], steps[i])
            upd = algo.vector_finish(rt, msgs[i], states[i], weights, stats)
            upd.cid = t.cid
            out.append(Worker.finish(upd))
        return out
