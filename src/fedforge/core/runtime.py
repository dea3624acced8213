"""The worker side: one model instance per architecture, loaded in place for each client's task."""
from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Mapping, Sequence, overload

import numpy as np
import torch

from ..data import Dataset, Federation, Partition
from ..models import FedModel
from .algorithm import Algorithm, EvalResult, Update
from .context import Context, derive_seed
from .dp import give_steps, take_steps
from .faults import ClientFailure, run_guarded
from .messages import Message, State, to_device
from .training import EvalCounts, GradHook, LossFn, Optimizer, TrainStats, eval_loop, train_loop
from .unseen import run_new_client

TASK_KINDS = {"train": 1, "eval": 2, "finetune": 3, "new_client": 4}
OPTIM = "optim/"  # client-state prefix of the local optimiser's state
CPU = torch.device("cpu")


@dataclass
class Task:
    """One unit of client work: ``kind`` is train, eval or finetune."""

    kind: str
    cid: int
    round: int
    message: Message
    state: State | None


@dataclass
class WorkerSpec:
    """Everything a worker needs, sent once when it starts."""

    dataset: Dataset
    partition: Partition
    algorithm: Algorithm
    augment: bool = False
    threads: int = 0
    device: str | None = None  # this worker's device for client hooks (a pool's placement); None: the run's device
    deterministic: bool = False  # deterministic kernels (--deterministic), set up by the process the worker runs in


def task_seed(seed: int, rnd: int, cid: int, kind: str) -> int:
    return derive_seed(seed, rnd, cid, TASK_KINDS.get(kind, 9))


class Worker:
    """Holds the federation, the algorithm, and a model per architecture; runs tasks."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.algo = spec.algorithm
        self.ctx: Context = spec.algorithm.ctx
        self.device = torch.device(spec.device or self.ctx.device)
        self.fed = Federation(spec.dataset, spec.partition, self.device, spec.augment)
        self._models: dict[tuple[str, str], FedModel] = {}
        self._inits: dict[str, State] = {}

    def model(self, arch: str, tag: str = "") -> FedModel:
        """The worker's instance of ``arch`` (``tag`` gives further independent instances, e.g. a frozen copy)."""
        key = (arch, tag)
        m = self._models.get(key)
        if m is None:
            m = self.ctx.build_model(arch).to(self.device)
            if any(p.dim() == 4 for p in m.parameters()):
                m = m.to(memory_format=torch.channels_last)
            self._models[key] = m
        return m

    def initial_params(self, arch: str) -> State:
        if arch not in self._inits:
            self._inits[arch] = {k: v.detach().clone() for k, v in self.ctx.build_model(arch).to(self.device).state_dict().items()}
        return self._inits[arch]

    def run(self, task: Task) -> Update | EvalResult | State | ClientFailure:
        """Run one task. The device contract: the task's message and state arrive on the CPU and are handed to the
        algorithm's hooks on this worker's device; uploads and states go back on the CPU. A train task that raises
        becomes a :class:`~fedforge.core.faults.ClientFailure` value, so that the round goes on without it."""
        if task.kind == "train":
            return run_guarded(task.round, task.cid, lambda: self._run(task))
        return self._run(task)

    def _run(self, task: Task) -> Update | EvalResult | State:
        seed = task_seed(self.ctx.seed, task.round, task.cid, task.kind)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2**32))
        rt = ClientRuntime(self, task.cid, task.round, seed)
        msg = to_device(task.message, self.device)
        if task.kind == "new_client":  # a client kept out of training: no state, the global model fine-tuned
            return run_new_client(rt, msg)
        state = to_device(task.state, self.device) if task.state is not None else self.algo.init_client(rt)
        state = rt.take_optimizer_state(state)
        if task.kind == "train":
            upd = self.algo.local_update(rt, msg, state)
            upd.cid = task.cid
            upd.state = rt.give_optimizer_state(upd.state if upd.state is not None else state)
            return self.finish(upd)
        if task.kind == "eval":
            return EvalResult(task.cid, self.algo.evaluate(rt, msg, state))
        if task.kind == "finetune":
            return to_device(rt.give_optimizer_state(self.algo.finetune(rt, msg, state)), CPU)
        raise ValueError(f"unknown task kind {task.kind}")

    @staticmethod
    def finish(upd: Update) -> Update:
        """An update as it leaves the worker: upload and state on the CPU."""
        upd.upload = to_device(upd.upload, CPU)
        upd.state = to_device(upd.state, CPU)
        return upd


class ClientRuntime:
    """What a client's code sees during one task: its data, a model loaded in place, its random streams."""

    def __init__(self, worker: Worker, cid: int, rnd: int, seed: int):
        self.worker = worker
        self.cid = cid
        self.round = rnd
        self.seed = seed
        self.ctx = worker.ctx
        self.fed = worker.fed
        self.device = worker.device
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.arch = self.ctx.arch(cid)
        self.lr = self.ctx.lr * self.ctx.lr_decay ** max(0, rnd - 1)  # per-round decay (1: none)
        self.optimizer = Optimizer(self.ctx.optimizer, self.ctx.momentum, self.ctx.weight_decay)
        self._opt_states: dict[int, dict[int, dict[str, torch.Tensor]]] = {}  # rt.train call → its optimiser state
        self._calls = 0
        self._dp_steps = 0  # DP-SGD steps this client has taken (--dp-epsilon; its state's dp/steps)
        self._dp_noise: torch.Generator | None = None
        self.batch_size = self.ctx.batch_size
        self.local_epochs = self.ctx.local_epochs

    # ------------------------------------------------------------------------------------------ model
    @property
    def model(self) -> FedModel:
        return self.worker.model(self.arch)

    def aux_model(self, tag: str, arch: str | None = None) -> FedModel:
        """A further model instance of this worker (e.g. a frozen global copy for MOON or FedCP)."""
        return self.worker.model(arch or self.arch, tag)

    def initial_params(self, arch: str | None = None) -> State:
        """Deterministic initial weights of an architecture (the same for every client of it)."""
        return {k: v.clone() for k, v in self.worker.initial_params(arch or self.arch).items()}

    @staticmethod
    def load_into(model: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors into a model's parameters and buffers in place (names must exist)."""
        if not params:
            return
        own = dict(model.state_dict(keep_vars=True))
        with torch.no_grad():
            for k, v in params.items():
                t = own.get(k)
                if t is None:
                    raise KeyError(f"'{k}' is not a weight of {type(model).__name__} ({getattr(model, 'arch', '')})")
                t.copy_(v)

    def load(self, params: Mapping[str, torch.Tensor], model: torch.nn.Module | None = None) -> None:
        self.load_into(model if model is not None else self.model, params)

    def model_state(self, model: torch.nn.Module | None = None, prefixes: Sequence[str] | None = None,
                    exclude: Sequence[str] = ()) -> State:
        """Detached copies of the model's weights (parameters and buffers), optionally filtered by name prefix."""
        m = model if model is not None else self.model
        out = {}
        for k, v in m.state_dict().items():
            if prefixes is not None and not any(k.startswith(p) for p in prefixes):
                continue
            if any(k.startswith(p) for p in exclude):
                continue
            out[k] = v.detach().clone()
        return out

    # ------------------------------------------------------------------------------------------- data
    @property
    def num_train(self) -> int:
        return self.fed.num_train(self.cid)

    @property
    def num_test(self) -> int:
        return self.fed.num_test(self.cid)

    def class_counts(self, part: str = "train") -> torch.Tensor:
        return self.fed.class_counts(self.cid, part)

    def batches(self, epochs: int | None = None, fraction: float = 1.0, batch_size: int | None = None,
                generator: torch.Generator | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled training batches (``local_epochs`` passes by default) from this task's random stream."""
        return self.fed.train_batches(self.cid, batch_size or self.batch_size, generator or self.gen,
                                      epochs=self.local_epochs if epochs is None else epochs, fraction=fraction)

    def eval_batches(self, part: str = "test") -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return self.fed.test_batches(self.cid, self.ctx.eval_batch_size, part)

    # ---------------------------------------------------------------------------------------- compute
    def autocast(self) -> ContextManager[Any]:
        if self.ctx.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train(self, loss_fn: LossFn | None = None, params: Sequence[torch.Tensor] | None = None,
              epochs: int | None = None, lr: float | Sequence[float] | None = None,
              grad_hook: GradHook | None = None, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
              max_grad_norm: float | None = None, model: torch.nn.Module | None = None) -> TrainStats:
        """The shared local SGD loop over this client's data (see :func:`fedforge.core.training.train_loop`)."""
        m = model if model is not None else self.model
        call, self._calls = self._calls, self._calls + 1
        dp = None
        if self.ctx.dp is not None:  # --dp-epsilon: every step is a DP-SGD step (core/dp.py); noise from the task's seed
            if self._dp_noise is None:
                self._dp_noise = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, "dp"))
            dp = self.ctx.dp.sgd(self.cid, self._dp_noise)
        stats = train_loop(m, batches if batches is not None else self.batches(epochs), self.lr if lr is None else lr,
                           params=params, loss_fn=loss_fn, grad_hook=grad_hook, max_grad_norm=max_grad_norm,
                           autocast=self.autocast, optimizer=self.optimizer,
                           opt_state=None if self.optimizer.plain else self._opt_states.setdefault(call, {}), dp=dp)
        self._dp_steps += stats.steps if dp is not None else 0
        return stats

    # ------------------------------------------------------------------------------------- optimiser state
    # A stateful local optimiser (momentum, Adam) keeps its state in the client's state under ``optim/<call>/<i>/<slot>``
    # (call: the n-th ``rt.train`` of the task, so that two models trained in one task, e.g. Ditto's, keep separate
    # states; i: the parameter's position). The worker takes those entries out before the algorithm sees the state
    # and puts the new ones back after it, so algorithms know nothing of them and checkpoints hold them.
    def take_optimizer_state(self, state: State) -> State:
        state, self._dp_steps = take_steps(state) if self.ctx.dp is not None else (state, 0)  # dp/steps likewise
        if self.optimizer.plain or not any(k.startswith(OPTIM) for k in state):
            return state
        for k, v in state.items():
            if k.startswith(OPTIM):
                call, i, slot = k[len(OPTIM):].split("/", 2)
                self._opt_states.setdefault(int(call), {}).setdefault(int(i), {})[slot] = v
        return {k: v for k, v in state.items() if not k.startswith(OPTIM)}

    @overload
    def give_optimizer_state(self, state: State) -> State: ...
    @overload
    def give_optimizer_state(self, state: None) -> None: ...
    @overload
    def give_optimizer_state(self, state: State | None) -> State | None: ...
    def give_optimizer_state(self, state: State | None) -> State | None:
        if self.ctx.dp is not None and state is not None:
            state = give_steps(state, self._dp_steps)
        if self.optimizer.plain or state is None:
            return state
        out = {k: v for k, v in state.items() if not k.startswith(OPTIM)}
        for call, per_param in self._opt_states.items():
            for i, slots in per_param.items():
                out |= {f"{OPTIM}{call}/{i}/{slot}": v for slot, v in slots.items()}
        return out

    def evaluate(self, predict: Callable[[torch.Tensor], torch.Tensor] | None = None, part: str = "test",
                 model: torch.nn.Module | None = None) -> EvalCounts:
        m = model if model is not None else self.model
        m.eval()
        absent = self.class_counts("train") == 0
        mask = None if bool(absent.all()) else absent  # a client without training data: nothing to call off-class
        return eval_loop(predict or m, self.eval_batches(part), autocast=self.autocast, absent=mask,
                         num_classes=self.ctx.num_classes)


