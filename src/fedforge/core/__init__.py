"""The engine: algorithm contract, messages, client runtime, executors, state store and the round loop."""
from .algorithm import ALGORITHMS, Algorithm, EvalResult, Update, register_algorithm
from .context import Context, derive_seed
from .executors import EXECUTORS, Executor, SequentialExecutor
from .messages import Message, State, nbytes, numel, weighted_average
from .params import HyperParams, hp
from .runtime import ClientRuntime, Task, Worker, WorkerSpec
from .store import STORES, MemoryStore, StateStore
from .training import EvalCounts, TrainStats, eval_loop, train_loop

__all__ = ["ALGORITHMS", "Algorithm", "ClientRuntime", "Context", "EXECUTORS", "EvalCounts", "EvalResult", "Executor",
           "HyperParams", "MemoryStore", "Message", "STORES", "SequentialExecutor", "State", "StateStore", "Task",
           "TrainStats", "Update", "Worker", "WorkerSpec", "derive_seed", "eval_loop", "hp", "nbytes", "numel",
           "register_algorithm", "train_loop", "weighted_average"]
