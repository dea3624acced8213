"""The ``vectorized`` executor: many same-architecture clients trained and evaluated at once with ``torch.func``.

**Training.** An algorithm that declares ``vectorizable = True`` states its local update as an
:class:`~fedforge.core.objective.Objective` (:meth:`Algorithm.vector_objective`): starting weights, SGD phases with
pure losses of ``(m, x, y, ex)`` and gradient functions, per-client tensors (``extras``) and frozen models taken from
the message and state, and a ``finish`` that builds the Update. The sequential executors run the very same objective
one client at a time through ``rt.train`` (:func:`~fedforge.core.objective.run_objective`). Here, for a chunk of
clients of one architecture whose phases compare equal, the weights are stacked with a leading client dimension
and each local step is one call of ``vmap(grad_and_value(loss))`` over the clients, the model run through
``functional_call``::

    W_c ← W_c − η · g(∇ L(W_c; x_{c,s}, y_{c,s}, ex_c), ex_c)      for all clients c at once, step s = 1..max_c S_c

Only the parameters a phase trains are differentiated; a tensor that every client of the chunk shares (the global
model a FedProx anchor or MOON's positive model comes from) is passed once, not stacked (``in_dims=None``).

Batches: each client's batch order is drawn from its own task stream exactly as the sequential executor draws it
(:meth:`Federation.train_positions`), so the result equals one-at-a-time training up to float rounding. The
positions of a phase are drawn for every client before its first step and stacked into one index tensor on the
device; each step then gathers the chunk's batch with one indexing op. Clients are sorted by their number of
samples, so the clients still training at step s are a prefix of the chunk (slices, not masks); a client's batch
size is ``min(n, batch_size)``, and clients with different batch sizes go to different vmapped groups (so every
loss keeps its batch mean). With ``--augment`` each client's batches come from its own iterator (the crops are drawn
from the task's stream batch by batch), stacked per step. The step loop never waits for the device: losses are
summed on the device and read once per chunk. ``on_features`` phases (FedRep's head epochs) compute every client's
features of its training data once, vmapped, where that is exact.

**Evaluation.** Where an algorithm's evaluation is "load weights, run the model" (``evaluate`` and ``predict`` not
overridden: the global view with ``global_params(msg)``, the personalized view with ``personal_params(msg,
state)``), a chunk of clients' test sets is padded to the longest and run in one vmapped forward pass per block of
samples; accuracy, loss, the label-skew diagnostics, the confusion matrix and the micro-averaged AUC are counted on
the device for every client at once (:func:`batched_eval_counts`), equal to :meth:`ClientRuntime.evaluate`'s up to
float rounding.

**Memory.** ``workers`` caps the clients per chunk (default 100); ``--gpu-memory GB`` sizes chunks from an estimate
of one client's memory and, on a GPU, from each finished chunk's measured peak (:mod:`fedforge.core.memory`).

**Falls back** to one client at a time (the sequential executor, with a one-line notice): algorithms not declared
vectorizable, or whose subclass changed the update; optimisers other than plain SGD (momentum, Adam, weight decay);
models with buffers (BatchNorm statistics, which ``vmap`` cannot update per client) or dropout (its draws would
differ from the sequential path's); other evaluations; fine-tuning and new-client tasks. On CPUs this is slower than
a loop (``vmap`` lowers the convolutions to grouped ones); it is meant for GPUs.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .algorithm import Algorithm, EvalResult, Update
from .executors import EXECUTORS, Executor, SequentialExecutor, release_memory, task_threads, torch_threads
from .faults import ClientFailure, run_guarded
from .memory import ChunkSizer, activation_elements, per_client_bytes
from .messages import State
from .objective import (
    Extras,
    FunctionalModel,
    Objective,
    Phase,
    Tensors,
    batch_independent,
    check_start,
    head_cross_entropy,
)
from .runtime import ClientRuntime, Task, WorkerSpec, task_seed
from .training import EvalCounts, TrainStats

log = logging.getLogger("fedforge")

DEFAULT_CHUNK = 100
CPU = torch.device("cpu")

# hooks that only the server or the evaluation use: a subclass may change them without touching the local update
_NOT_UPDATE = frozenset({"init_server", "broadcast", "eval_message", "aggregate", "server_metrics", "artifacts",
                         "evaluate", "predict", "global_params", "personal_params", "finetune", "create"})


# ------------------------------------------------------------------------------------------- eligibility
def _changed_update_hooks(cls: type, decl: type) -> list[str]:
    """Client-side methods that a subclass of ``decl`` (the class that declared ``vectorizable``) overrides."""
    out = []
    for k in cls.__mro__:
        if k is decl:
            break
        for name, value in vars(k).items():
            if name.startswith("__") or name in _NOT_UPDATE or name in out:
                continue
            if (callable(value) or isinstance(value, (staticmethod, classmethod))) and hasattr(decl, name) \
                    and name != "Params":
                out.append(name)
            elif name == "loss":
                out.append(name)
    return out


def _model_reason(model: nn.Module) -> str | None:
    if any(True for _ in model.buffers()):
        return f"model {getattr(model, 'arch', '')} has buffers (BatchNorm statistics) that vmap cannot update per client"
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            return f"model {getattr(model, 'arch', '')} has recurrent layers (LSTM/GRU), which vmap cannot batch"
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"model {getattr(model, 'arch', '')} has dropout, whose draws per client would differ from the sequential path's"
        if "StochasticDepth" in type(m).__name__:
            return f"model {getattr(model, 'arch', '')} has stochastic depth, whose draws would differ from the sequential path's"
    return None


def vectorizable_class(cls: type) -> str | None:
    """None when an algorithm class's local update is a declared objective, else the reason."""
    name = getattr(cls, "name", cls.__name__)
    if not getattr(cls, "vectorizable", False):
        return f"{name}'s local update is not declared vectorizable (Algorithm.vectorizable)"
    decl = next(c for c in cls.__mro__ if "vectorizable" in c.__dict__)
    changed = _changed_update_hooks(cls, decl)
    if changed:
        return (f"{name} changes {changed[0]} of {decl.__name__}, which declared the vectorizable update "
                f"(set vectorizable again where it still holds)")
    return None


def why_not_vectorized(algo: Any, model: torch.nn.Module) -> str | None:
    """None when the vectorized executor can train this algorithm's clients of this model, else the reason."""
    reason = vectorizable_class(type(algo))
    if reason:
        return reason
    ctx = algo.ctx
    if getattr(ctx, "optimizer", "sgd") != "sgd" or getattr(ctx, "weight_decay", 0.0):
        return "the vectorized update is plain SGD (--optimizer sgd, no weight decay)"
    return _model_reason(model)


def why_not_vector_eval(algo: Any, model: torch.nn.Module) -> str | None:
    """None when the vectorized executor can evaluate this algorithm's clients of this model, else the reason."""
    cls = type(algo)
    for attr in ("evaluate", "predict"):
        if getattr(cls, attr) is not getattr(Algorithm, attr):
            return f"{algo.name} evaluates with its own {attr}"
    for m in model.modules():
        if "StochasticDepth" in type(m).__name__:
            return f"model {getattr(model, 'arch', '')} has stochastic depth"
        if isinstance(m, nn.RNNBase):
            return f"model {getattr(model, 'arch', '')} has recurrent layers (LSTM/GRU), which vmap cannot batch"
    return None


# ------------------------------------------------------------------------------------------ helpers
def _stack(tensors: list[torch.Tensor], like: torch.Tensor | None = None) -> torch.Tensor:
    """The clients' tensors stacked on a leading dimension; each client's slice in the memory format of ``like``
    (the worker model's entry: channels-last convolution weights), so that the vmapped convolutions run on the layout
    the sequential path runs on (where a near-tie of a max-pool or ReLU is decided by the last bit, the layout decides
    which way it goes)."""
    if like is not None and like.dim() == 4 and tensors[0].dim() == 4 \
            and like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        o, i, h, w = tensors[0].shape
        out = torch.empty((len(tensors), o, h, w, i), dtype=tensors[0].dtype, device=tensors[0].device)
        out = out.permute(0, 1, 4, 2, 3)
        for k, t in enumerate(tensors):
            out[k].copy_(t)
        return out
    return torch.stack(tensors)


def _batched(tensors: list[torch.Tensor], like: torch.Tensor | None = None) -> tuple[torch.Tensor, int | None]:
    """One tensor for a chunk: shared (``in_dims`` None) when every client holds the very same tensor, else stacked."""
    first = tensors[0]
    if all(t is first for t in tensors):
        if like is not None and first.dim() == 4 and like.dim() == 4 and not like.is_contiguous() \
                and like.is_contiguous(memory_format=torch.channels_last):
            return first.contiguous(memory_format=torch.channels_last), None
        return first, None
    return _stack(tensors, like), 0


def _key(model: str, entry: str) -> str:
    return f"{model}|{entry}"


def _split_key(key: str) -> tuple[str, str]:
    model, entry = key.split("|", 1)
    return model, entry


def _shapes(d: dict[str, torch.Tensor]) -> tuple[Any, ...]:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in d.items())


def _to_host(updates: list[Any], device: torch.device, own: set[int]) -> None:
    """Uploads and states on the CPU, each tensor with storage of its own: one device-to-host copy per dtype for the
    whole chunk (not one per tensor), then a copy per tensor on the host. ``own``: ids of tensors that several clients
    share (they are copied too)."""
    items: list[tuple[dict[str, torch.Tensor], str, torch.Tensor]] = []
    for u in updates:
        for d in (u.upload, u.state):
            if d is None:
                continue
            for k, t in d.items():
                items.append((d, k, t))
    on_dev = [(d, k, t) for d, k, t in items if t.device != CPU]
    by_dtype: dict[torch.dtype, list[tuple[dict[str, torch.Tensor], str, torch.Tensor]]] = {}
    for it in on_dev:
        by_dtype.setdefault(it[2].dtype, []).append(it)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for _, _, t in group]).cpu()
        pos = 0
        for d, k, t in group:
            n = t.numel()
            d[k] = flat[pos:pos + n].view(t.shape).clone()
            pos += n
    for d, k, t in items:
        if t.device == CPU and (t._base is not None or id(t) in own):
            d[k] = t.detach().clone()


@dataclass
class _Client:
    """A train task made ready: its runtime, the message and state on the device, its objective."""

    index: int
    task: Task
    rt: ClientRuntime
    obj: Objective
    n: int


@dataclass
class _EvalClient:
    index: int
    task: Task
    rt: ClientRuntime
    views: dict[str, dict[str, torch.Tensor]]  # view name → the weights it loads
    n: int


# --------------------------------------------------------------------------------------- evaluation
def batched_micro_auc(probs: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per client, the micro-averaged one-vs-rest ROC-AUC of its valid rows (scikit-learn's ``roc_auc_score(onehot,
    probs, average='micro')``, as :func:`fedforge.core.training.micro_auc`), for (C, N, K) scores at once: the
    Mann-Whitney statistic of the flattened scores with ties counted as halves. NaN where a client has no row."""
    c, n, k = probs.shape
    if n == 0 or k < 2:
        return torch.full((c,), float("nan"), dtype=torch.float64, device=probs.device)
    scores = probs.double().masked_fill(~valid.unsqueeze(2), float("inf")).reshape(c, n * k)
    pos = (F.one_hot(y.clamp(min=0), k).bool() & valid.unsqueeze(2)).reshape(c, n * k)
    vals, order = scores.sort(dim=1)
    m = n * k
    idx = torch.arange(m, device=probs.device).expand(c, m)
    first = torch.ones_like(vals, dtype=torch.bool)
    first[:, 1:] = vals[:, 1:] != vals[:, :-1]
    last = torch.ones_like(vals, dtype=torch.bool)
    last[:, :-1] = first[:, 1:]
    start = torch.where(first, idx, torch.zeros_like(idx)).cummax(dim=1).values
    end = torch.where(last, idx, torch.full_like(idx, m - 1)).flip(1).cummin(dim=1).values.flip(1)
    rank = (start + end).double() / 2 + 1  # average 1-based rank among the tied scores
    p = pos.gather(1, order)
    n_pos = valid.sum(1).double()  # one positive per valid row
    n_neg = n_pos * (k - 1)
    u = (rank * p).sum(1) - n_pos * (n_pos + 1) / 2
    return torch.where(n_pos > 0, u / (n_pos * n_neg).clamp(min=1), torch.full_like(u, float("nan")))


def batched_eval_counts(logits: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, absent: torch.Tensor | None,
                        num_classes: int) -> list[EvalCounts]:
    """:class:`EvalCounts` of C clients from their (C, N, K) scores, labels and valid rows (a client's test set
    padded to N), as :func:`fedforge.core.training.eval_loop` counts one client's, computed on the device for every
    client at once and read to the host once. ``absent``: (C, K) classes each client holds no training sample of."""
    c, n, k = logits.shape
    logits = logits.float()
    pred = logits.argmax(2)
    v = valid
    ints = [((pred == y) & v).sum(1), v.sum(1)]
    ce = F.cross_entropy(logits.reshape(-1, k), y.reshape(-1).clamp(min=0), reduction="none").view(c, n)
    loss = (ce.double() * v).sum(1)
    per_class = k == num_classes
    conf = auc = None
    if per_class and absent is not None:
        counted = ~absent.all(1)  # a client without training data has nothing to call off-class
        own = logits.masked_fill(absent.unsqueeze(1), float("-inf")).argmax(2)
        ints += [(absent.gather(1, pred) & v).sum(1) * counted, ((own == y) & v).sum(1) * counted, v.sum(1) * counted]
    else:
        zero = torch.zeros_like(ints[1])
        ints += [zero, zero, zero]
    if per_class:
        probs = logits.softmax(2)
        cell = (torch.arange(c, device=y.device).view(c, 1) * (k * k) + y.clamp(min=0) * k + probs.argmax(2))
        conf = torch.bincount(cell[v], minlength=c * k * k).view(c, k, k)
        auc = batched_micro_auc(probs, y, v)
    host_ints = torch.stack(ints, 1).cpu().numpy()
    host_loss = loss.cpu().numpy()
    host_conf = conf.cpu().numpy() if conf is not None else None
    host_auc = auc.cpu().numpy() if auc is not None else None
    out = []
    for i in range(c):
        correct, total, off, own_c, own_t = (int(x) for x in host_ints[i])
        e = EvalCounts(correct, total, float(host_loss[i]), off, own_c, own_t)
        if host_conf is not None and total > 0:
            e.confusion = host_conf[i].astype(np.int64)
            e.auc = float(host_auc[i]) if host_auc is not None else float("nan")
        out.append(e)
    return out


# ----------------------------------------------------------------------------------------- executor
@EXECUTORS.register("vectorized", summary="many same-architecture clients at once with torch.func vmap (for GPUs)")
class VectorizedExecutor(Executor):
    """Train and evaluate clients in chunks (``workers`` at most, default 100; ``gpu_memory`` GB sizes them) with
    ``torch.func``; everything else one at a time, as the sequential executor does."""

    name = "vectorized"

    def __init__(self, workers: int = 0, threads: int = 0, gpu_memory: float | None = None, **options: Any):
        super().__init__(workers, threads, **options)
        self.cap = workers or None
        self.gpu_memory = gpu_memory
        self._told: set[str] = set()

    def start(self, spec: WorkerSpec) -> None:
        self._memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.seq = SequentialExecutor(threads=self.threads)
        self.seq.start(spec)
        self.worker = self.seq.worker
        self.algo = spec.algorithm
        self.device = self.worker.device
        self.sizer = ChunkSizer(self.gpu_memory, self.device, self.cap, DEFAULT_CHUNK)
        self._train_reason: dict[str, str | None] = {}
        self._eval_reason: dict[str, str | None] = {}
        self._absent: dict[int, torch.Tensor] = {}
        for arch in self.algo.ctx.arch_set:
            self._reason(arch, "train")

    def _reason(self, arch: str, kind: str) -> str | None:
        cache = self._train_reason if kind == "train" else self._eval_reason
        if arch not in cache:
            model = self.worker.model(arch)
            cache[arch] = why_not_vectorized(self.algo, model) if kind == "train" else why_not_vector_eval(self.algo, model)
            reason = cache[arch]
            if reason and reason not in self._told:
                self._told.add(reason)
                what = "training" if kind == "train" else "evaluating"
                log.warning("vectorized executor: %s; %s those clients one at a time instead.", reason, what)
        return cache[arch]

    # ---------------------------------------------------------------------------------------- running
    def imap(self, tasks: Iterable[Task]) -> Iterator[Any]:
        try:
            with torch_threads(task_threads(self.threads)):
                yield from self._imap(tasks)
        finally:
            release_memory()

    def _imap(self, tasks: Iterable[Task]) -> Iterator[Any]:
        buf: list[Task] = []
        kind: str | None = None
        limit = (self.cap or DEFAULT_CHUNK) * 4  # evaluation streams: a few chunks of states at a time
        for t in tasks:
            k = t.kind if t.kind in ("train", "eval") else None
            if buf and (k != kind or (kind == "eval" and len(buf) >= limit)):
                yield from self._flush(kind, buf)
                buf = []
            if k is None:
                yield from self.seq.imap([t])
                continue
            kind = k
            buf.append(t)
        if buf:
            yield from self._flush(kind, buf)

    def _flush(self, kind: str | None, tasks: list[Task]) -> list[Any]:
        self._memo = {}
        try:
            return self._train(tasks) if kind == "train" else self._evaluate(tasks)
        finally:
            self._memo = {}

    def _to_dev(self, d: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """A message or state on the device; a CPU tensor that several tasks share (the broadcast global model) is
        copied once, so the clients of a chunk share it there too."""
        if d is None:
            return None
        out = {}
        for k, t in d.items():
            if t.device == self.device:
                out[k] = t
                continue
            hit = self._memo.get(id(t))
            if hit is None or hit[0] is not t:
                hit = (t, t.to(self.device))
                self._memo[id(t)] = hit
            out[k] = hit[1]
        return out

    def _runtime(self, t: Task) -> tuple[ClientRuntime, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The set-up of :meth:`Worker.run`: seeds, runtime, message and state on the device."""
        seed = task_seed(self.algo.ctx.seed, t.round, t.cid, t.kind)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2**32))
        rt = ClientRuntime(self.worker, t.cid, t.round, seed)
        msg = self._to_dev(t.message) or {}
        state = self._to_dev(t.state)
        if state is None:
            state = self.algo.init_client(rt)
        return rt, msg, rt.take_optimizer_state(state)

    # --------------------------------------------------------------------------------------- training
    def _train(self, tasks: list[Task]) -> list[Any]:
        out: list[Any] = [None] * len(tasks)
        by_arch: dict[str, list[int]] = {}
        for i, t in enumerate(tasks):
            by_arch.setdefault(self.algo.ctx.arch(t.cid), []).append(i)
        for arch, idx in by_arch.items():
            if self._reason(arch, "train"):
                for i, r in zip(idx, self.seq.map([tasks[i] for i in idx])):
                    out[i] = r
                continue
            fed = self.worker.fed
            idx.sort(key=lambda i: -fed.num_train(tasks[i].cid))  # similar sizes share a chunk
            pos = 0
            while pos < len(idx):
                chunk: list[_Client] = []
                size = None
                base = self.sizer.begin()
                while pos < len(idx) and (size is None or len(chunk) < size):
                    i = idx[pos]
                    pos += 1
                    c = run_guarded(tasks[i].round, tasks[i].cid, partial(self._prepare, i, tasks[i]))
                    if isinstance(c, ClientFailure):
                        out[i] = c
                        continue
                    chunk.append(c)
                    if size is None:
                        size = self.sizer.size(("train", arch), self._train_estimate(arch, c))
                for i, r in self._train_chunk(arch, chunk):
                    out[i] = r
                self.sizer.observe(("train", arch), len(chunk), base)
        return out

    def _prepare(self, i: int, t: Task) -> _Client:
        rt, msg, state = self._runtime(t)
        obj = self.algo.vector_objective(rt, msg, state)
        check_start(obj, self.worker.model(rt.arch), self.algo.name)
        return _Client(i, t, rt, obj, rt.num_train)

    def _train_estimate(self, arch: str, c: _Client) -> int:
        model = self.worker.model(arch)
        fed = self.worker.fed
        p = sum(t.numel() for t in model.state_dict().values())
        acts = self._activations(model, c.rt.cid)
        b = max(1, min(c.n, c.rt.batch_size))
        sample = int(np.prod(fed.input_shape))
        feats = 4 * c.n * getattr(model, "feature_dim", 0) if any(ph.on_features for ph in c.obj.phases) else 0
        return per_client_bytes(p, len(c.obj.start) + len(c.obj.frozen), acts, b, sample, feats)

    def _activations(self, model: nn.Module, cid: int | None) -> int:
        """Activation elements per sample of ``model`` (measured once on two samples of the federation)."""
        fed = self.worker.fed
        idx = next((fed.train_idx[c][:2] for c in ([cid] if cid is not None else range(fed.num_clients))
                    if fed.num_train(c)), None)
        if idx is None:
            return 1
        return activation_elements(model, fed.inputs(idx)[0])

    def _signature(self, c: _Client) -> tuple[Any, ...]:
        obj = c.obj
        b = min(c.n, c.rt.batch_size)
        return (b, float(c.rt.lr), c.rt.local_epochs, obj.phases,
                tuple((n, _shapes(w)) for n, w in obj.start.items()),
                tuple((n, _shapes(w)) for n, w in obj.frozen.items()), _shapes(obj.extras))

    def _train_chunk(self, arch: str, chunk: list[_Client]) -> list[tuple[int, Any]]:
        groups: dict[tuple[Any, ...], list[_Client]] = {}
        for c in chunk:
            groups.setdefault(self._signature(c), []).append(c)
        results: list[tuple[int, Any]] = []
        for sig, members in groups.items():
            results += self._train_group(arch, members, sig[0])
        return results

    def _train_group(self, arch: str, clients: list[_Client], b: int) -> list[tuple[int, Any]]:
        """Train clients whose objectives have the same structure; they are sorted by size (largest first)."""
        worker, fed = self.worker, self.worker.fed
        model = worker.model(arch)
        model.train()
        dev = self.device
        obj0 = clients[0].obj
        C = len(clients)
        param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        trained: dict[str, set[str]] = {name: set() for name in obj0.start}
        for ph in obj0.phases:
            trained[ph.model] |= {n for n in param_names if ph.train is None or ph.train(n)}
            for other, keep in ph.also:
                trained[other] |= {n for n in param_names if (keep is None or keep(n)) and n in obj0.start[other]}
        # the clients' weights (trained entries stacked; the rest shared where every client holds the same tensor)
        W: dict[str, torch.Tensor] = {}
        dims: dict[str, int | None] = {}
        own: set[int] = set()
        like = model.state_dict()
        for name, entries in obj0.start.items():
            for entry in entries:
                ts = [c.obj.start[name][entry] for c in clients]
                key = _key(name, entry)
                if entry in trained[name]:
                    W[key], dims[key] = _stack([t.detach() for t in ts], like.get(entry)), 0
                else:
                    W[key], dims[key] = _batched(ts, like.get(entry))
                    if dims[key] is None:
                        own.add(id(W[key]))
        for name, entries in obj0.frozen.items():
            for entry in entries:
                W[_key(name, entry)], dims[_key(name, entry)] = _batched(
                    [c.obj.frozen[name][entry] for c in clients], like.get(entry))
        ex: dict[str, torch.Tensor] = {}
        ex_dims: dict[str, int | None] = {}
        for name in obj0.extras:
            ex[name], ex_dims[name] = _batched([c.obj.extras[name] for c in clients])
        lr = float(clients[0].rt.lr)
        loss_sum = torch.zeros(len(obj0.phases), C, dtype=torch.float64, device=dev)
        steps_of: list[list[int]] = []
        exact_features = not fed.augment and batch_independent(model)
        for pi, ph in enumerate(obj0.phases):
            epochs = ph.epochs if ph.epochs is not None else clients[0].rt.local_epochs
            steps = [fed.num_batches(c.rt.cid, c.rt.batch_size, epochs) for c in clients]
            steps_of.append(steps)
            if not max(steps, default=0):
                continue
            cached = ph.on_features and exact_features
            batches = self._batches(clients, ph, epochs, b, cached)
            feats = self._features(model, clients, W, dims, ph.model) if cached else None
            tkeys = [_key(ph.model, n) for n in param_names if n in trained[ph.model] and (ph.train is None or ph.train(n))]
            for other, keep in ph.also:
                tkeys += [_key(other, n) for n in param_names
                          if (keep is None or keep(n)) and _key(other, n) in W]
            fixed = [k for k in W if k not in tkeys]
            step = self._step_fn(model, ph, cached, {k: dims[k] for k in fixed}, ex_dims)
            gstep = self._grad_fn(ph, ex_dims) if ph.grad is not None else None
            rt0 = clients[0].rt
            for s in range(max(steps)):
                k = sum(1 for n in steps if n > s)  # the clients still training: a prefix (sorted by size)
                x, y = batches(s, k) if feats is None else self._feature_batch(feats, batches(s, k)[0], s, k)
                tr = {key: W[key][:k] for key in tkeys}
                fx = {key: (W[key][:k] if dims[key] == 0 else W[key]) for key in fixed}
                exk = {key: (v[:k] if ex_dims[key] == 0 else v) for key, v in ex.items()}
                with rt0.autocast():
                    grads, losses = step(tr, fx, x, y, exk)
                if gstep is not None:
                    grads = gstep(tr, grads, exk)
                with torch.no_grad():
                    torch._foreach_add_([tr[key] for key in tkeys], [grads[key] for key in tkeys], alpha=-lr)
                    loss_sum[pi, :k] += losses.detach().double() * b
        sums = loss_sum.cpu()  # the one read of the chunk's losses
        updates: list[tuple[int, Any]] = []
        for i, c in enumerate(clients):
            stats = []
            for pi in range(len(obj0.phases)):
                n_steps = steps_of[pi][i]
                samples = n_steps * b
                stats.append(TrainStats(float(sums[pi, i] / samples) if samples else 0.0, samples, n_steps))
            weights: dict[str, State] = {name: {} for name in obj0.start}
            for key, t in W.items():
                name, entry = _split_key(key)
                if name in weights:
                    weights[name][entry] = t[i] if dims[key] == 0 else t
            upd = run_guarded(c.task.round, c.task.cid, partial(self._finish, c, weights, stats))
            updates.append((c.index, upd))
        _to_host([u for _, u in updates if isinstance(u, Update)], dev, own)
        return updates

    def _finish(self, c: _Client, weights: dict[str, State], stats: list[TrainStats]) -> Update:
        upd = c.obj.finish(c.rt, weights, stats)
        upd.cid = c.task.cid
        upd.state = c.rt.give_optimizer_state(upd.state)
        return upd

    def _batches(self, clients: list[_Client], ph: Phase, epochs: int, b: int,
                 cached: bool) -> Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """The phase's batches, drawn for every client exactly as its sequential run draws them: a function
        (step s, first k clients) → their stacked batches ((k, b, ...) inputs, (k, b) labels). Without augmentation
        (or for cached features) the positions of the whole phase are drawn now and gathered per step with one
        indexing op; with augmentation each client's batches come from its own iterator, step by step."""
        fed = self.worker.fed
        gens = []
        for c in clients:
            rt = c.rt
            gens.append(torch.Generator(device=rt.gen.device).manual_seed(rt.seed) if ph.replay else rt.gen)
        if fed.augment and not cached:
            its = [iter(c.rt.batches(epochs, generator=g)) for c, g in zip(clients, gens)]

            def augmented(s: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
                pairs = [next(its[i]) for i in range(k)]
                return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])

            return augmented
        per_client = []
        steps = 0
        for c, g in zip(clients, gens):
            pos = list(fed.train_positions(c.n, c.rt.batch_size, g, epochs))
            per_client.append(pos)
            steps = max(steps, len(pos))
        table = torch.zeros(len(clients), steps, b, dtype=torch.long, device=self.device)
        for i, (c, pos) in enumerate(zip(clients, per_client)):
            if pos:
                rows = torch.stack(pos).to(self.device)
                table[i, : len(pos)] = rows if cached else fed.train_indices(c.rt.cid)[rows]
        if cached:  # positions within each client's training data (rows of its cached features)
            return lambda s, k: (table[:k, s], table[:k, s])

        def gathered(s: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = table[:k, s].reshape(-1)
            x, y = fed.inputs(idx)
            return x.reshape(k, b, *x.shape[1:]), y.reshape(k, b)

        return gathered

    def _features(self, model: nn.Module, clients: list[_Client], W: dict[str, torch.Tensor],
                  dims: dict[str, int | None], name: str, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, N, d) features of every client's training samples under its current body (an ``on_features`` phase,
        as :func:`~fedforge.core.objective.frozen_feature_batches` computes them for one client), and (C, N) labels."""
        fed = self.worker.fed
        C = len(clients)
        N = max(c.n for c in clients)
        idx = torch.zeros(C, N, dtype=torch.long, device=self.device)
        for i, c in enumerate(clients):
            ti = fed.train_indices(c.rt.cid)
            idx[i, : ti.numel()] = ti
        keys = [k for k in W if _split_key(k)[0] == name]
        params = {_split_key(k)[1]: W[k] for k in keys}
        pdims = {_split_key(k)[1]: dims[k] for k in keys}

        def body(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return FunctionalModel(model, p).features(x)

        fn = torch.func.vmap(body, in_dims=(pdims, 0), randomness="different")
        out = []
        with torch.no_grad(), clients[0].rt.autocast():
            for s in range(0, N, block):
                part = idx[:, s:s + block]
                x, _ = fed.inputs(part.reshape(-1))
                out.append(fn(params, x.reshape(C, part.shape[1], *x.shape[1:])).float())
        return torch.cat(out, 1), fed.y[idx]

    @staticmethod
    def _feature_batch(feats: tuple[torch.Tensor, torch.Tensor], pos: torch.Tensor, s: int,
                       k: int) -> tuple[torch.Tensor, torch.Tensor]:
        z, labels = feats
        rows = torch.arange(k, device=z.device).unsqueeze(1)
        return z[rows, pos], labels[rows, pos]

    def _step_fn(self, model: nn.Module, ph: Phase, cached: bool, fixed_dims: dict[str, int | None],
                 ex_dims: dict[str, int | None]) -> Callable[..., Any]:
        from torch.func import grad_and_value, vmap

        main = ph.model

        def loss_of(tr: Tensors, fx: Tensors, x: torch.Tensor, y: torch.Tensor, ex: Tensors) -> torch.Tensor:
            params: dict[str, dict[str, torch.Tensor]] = {}
            for key, t in list(fx.items()) + list(tr.items()):
                name, entry = _split_key(key)
                params.setdefault(name, {})[entry] = t
            m = FunctionalModel(model, params.pop(main))
            e = Extras(ex, {name: FunctionalModel(model, p) for name, p in params.items()})
            if ph.on_features:
                if cached:
                    z = x
                else:
                    with torch.no_grad():
                        z = m.features(x)
                return (ph.loss or head_cross_entropy)(m, z, y, e)
            if ph.loss is None:
                return F.cross_entropy(m(x), y)
            return ph.loss(m, x, y, e)

        return vmap(grad_and_value(loss_of), in_dims=(0, fixed_dims, 0, 0, ex_dims), randomness="different")

    def _grad_fn(self, ph: Phase, ex_dims: dict[str, int | None]) -> Callable[..., Any]:
        from torch.func import vmap

        assert ph.grad is not None
        fn = ph.grad

        def shown(key: str) -> str:  # the names a gradient function sees (as in the sequential path)
            name, entry = _split_key(key)
            return entry if name == ph.model else f"{name}/{entry}"

        def apply(tr: Tensors, grads: Tensors, ex: Tensors) -> Tensors:
            out = fn({shown(k): v for k, v in tr.items()}, {shown(k): v for k, v in grads.items()}, Extras(ex))
            return {k: out[shown(k)] for k in tr}

        return vmap(apply, in_dims=(0, 0, ex_dims))

    # ------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, tasks: list[Task]) -> list[Any]:
        out: list[Any] = [None] * len(tasks)
        by_arch: dict[str, list[int]] = {}
        for i, t in enumerate(tasks):
            by_arch.setdefault(self.algo.ctx.arch(t.cid), []).append(i)
        for arch, idx in by_arch.items():
            if self._reason(arch, "eval"):
                for i, r in zip(idx, self.seq.map([tasks[i] for i in idx])):
                    out[i] = r
                continue
            fed = self.worker.fed
            idx.sort(key=lambda i: -fed.num_test(tasks[i].cid))
            pos = 0
            while pos < len(idx):
                base = self.sizer.begin()
                size = self.sizer.size(("eval", arch), self._eval_estimate(arch, fed.num_test(tasks[idx[pos]].cid)))
                part = idx[pos:pos + size]
                pos += size
                ready: list[_EvalClient] = []
                for i in part:
                    c = self._prepare_eval(i, tasks[i])
                    if c is None:
                        out[i] = self.seq.map([tasks[i]])[0]
                    else:
                        ready.append(c)
                for i, r in self._eval_chunk(arch, ready):
                    out[i] = r
                self.sizer.observe(("eval", arch), len(part), base)
        return out

    def _eval_estimate(self, arch: str, n: int) -> int:
        model = self.worker.model(arch)
        p = sum(t.numel() for t in model.state_dict().values())
        acts = self._activations(model, None)
        block = max(1, min(n, int(self.algo.ctx.eval_batch_size)))
        classes = int(self.algo.ctx.num_classes)
        return int(4 * p * 2 + 4 * acts * block * 2 + 8 * block * classes * 6)

    def _prepare_eval(self, i: int, t: Task) -> _EvalClient | None:
        rt, msg, state = self._runtime(t)
        algo = self.algo
        need = list(rt.model.state_dict().keys())
        views: dict[str, dict[str, torch.Tensor]] = {}
        if algo.has_global:
            views["global"] = algo.global_params(msg)
        if algo.personalized:
            views["personalized"] = algo.personal_params(msg, state)
        for w in views.values():
            if any(k not in w for k in need):  # a view that leaves weights to whatever the model held: one at a time
                return None
        return _EvalClient(i, t, rt, {v: {k: w[k] for k in need} for v, w in views.items()}, rt.num_test)

    def _absent_classes(self, cid: int) -> torch.Tensor:
        """The classes client ``cid`` holds no training sample of (as :meth:`ClientRuntime.evaluate` finds them),
        computed once per client (a bincount on a GPU waits for the device)."""
        out = self._absent.get(cid)
        if out is None:
            out = self._absent[cid] = self.worker.fed.class_counts(cid, "train") == 0
        return out

    def _eval_chunk(self, arch: str, clients: list[_EvalClient]) -> list[tuple[int, Any]]:
        if not clients:
            return []
        fed = self.worker.fed
        model = self.worker.model(arch)
        model.eval()
        C = len(clients)
        N = max(c.n for c in clients)
        idx = torch.zeros(C, N, dtype=torch.long, device=self.device)
        valid = torch.zeros(C, N, dtype=torch.bool, device=self.device)
        for i, c in enumerate(clients):
            ti = fed.test_idx[c.rt.cid]
            idx[i, : ti.numel()] = ti
            valid[i, : ti.numel()] = True
        y = fed.y[idx]
        absent = torch.stack([self._absent_classes(c.rt.cid) for c in clients])
        block = max(1, self.algo.ctx.eval_batch_size)
        results: list[dict[str, EvalCounts]] = [{} for _ in clients]
        like = model.state_dict()
        for v, first in clients[0].views.items():
            params: dict[str, torch.Tensor] = {}
            pdims: dict[str, int | None] = {}
            for k in first:
                params[k], pdims[k] = _batched([c.views[v][k] for c in clients], like.get(k))

            def run(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
                return FunctionalModel(model, p)(x)

            fn = torch.func.vmap(run, in_dims=(pdims, 0))
            parts = []
            with torch.no_grad(), clients[0].rt.autocast():
                for s in range(0, N, block):
                    piece = idx[:, s:s + block]
                    x, _ = fed.inputs(piece.reshape(-1))
                    parts.append(fn(params, x.reshape(C, piece.shape[1], *x.shape[1:])).float())
            logits = torch.cat(parts, 1) if parts else torch.zeros(C, 0, self.algo.ctx.num_classes, device=self.device)
            for i, e in enumerate(batched_eval_counts(logits, y, valid, absent, self.algo.ctx.num_classes)):
                results[i][v] = e
        return [(c.index, EvalResult(c.task.cid, results[i])) for i, c in enumerate(clients)]
