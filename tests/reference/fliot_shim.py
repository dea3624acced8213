"""Drive FL-IoT's own client and server classes in-process beside fedforge's hooks (step equivalence).

FL-IoT (``$FEDFORGE_REFERENCE_CODE/fl-iot/system``, by default ``../shared/reference-code/fl-iot/system``) is the
oracle: this module imports and runs it and copies none of its code. It uses the techniques of ``pfllib_shim.py`` and
``htfllib_shim.py`` (and their helpers):

* FL-IoT's ``flcore``/``utils`` are imported with :func:`htfllib_shim.import_isolated` (PFLlib's and HtFLlib's packages
  of the same names are set aside and restored), so all three live in one pytest process. Its ``utils/privacy.py``
  imports opacus < 1.0 (``PrivacyEngine(model, ...)``, ``opacus.dp_model_inspector``), which current opacus lacks; the
  import sees stand-ins that raise if called (every case runs with ``privacy`` off, FL-IoT's default). Its other
  imports are real: ``h5py`` (``serverbase``), ``ujson`` (``data_utils``), ``sklearn`` (``clientbase``) and
  imbalanced-learn's ``SMOTE`` (``clienthome``); a missing one skips the test with the package to install.
* ``args``: the defaults of every ``parser.add_argument`` of FL-IoT's ``main.py``, on the CPU, then the case's settings.
* The model: FL-IoT's ``HARCNN`` for (C, L) series fed as (C, 1, L), wrapped in ``LocalModel(base, predictor)`` exactly
  when ``main.py`` wraps it for that ``-algo`` (read from ``main.py``), holding fedforge's ``harcnn`` initial weights
  (paired entry by entry in registration order, shapes checked: :func:`htfllib_shim.pair_entries`).
* Data: FL-IoT's ``read_client_data`` patched to fedforge's client samples; each client's training loader replaced by
  an :class:`pfllib_shim.EpochFeeder` that yields exactly the batches fedforge trained on, epoch by epoch
  (:class:`pfllib_shim.BatchRecorder`), reshaped to (B, C, 1, L).
* :class:`Harness` runs one round on both sides (FL-IoT's ``send_models``, ``client.train()``, ``receive_models``,
  ``aggregate_parameters``, the steps of its ``server.train()`` loop) and returns what to compare.

:func:`series_federation` makes the small sensor-like set the cases run on (``tests/data/test_modalities.py``'s
``make_series``, split into clients with chosen class counts), so CI needs no real HAR data.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pytest
import torch
import torch.nn as nn

import fedforge.algorithms  # noqa: F401  (registers the algorithms)
from fedforge.core.algorithm import ALGORITHMS, Update
from fedforge.core.context import Context
from fedforge.core.messages import model_entries
from fedforge.core.runtime import Task, Worker, WorkerSpec
from fedforge.data import Dataset, Partition, from_client_split
from tests.data.test_modalities import make_series
from tests.reference.htfllib_shim import import_isolated, load_pairs, main_defaults, pair_entries
from tests.reference.pfllib_shim import ATOL, RTOL, BatchRecorder, EpochFeeder, assert_same, quiet, reference_root

__all__ = ["ATOL", "RTOL", "Harness", "assert_same", "fliot_args", "fliot_model", "fliot_module", "fliot_system",
           "require_fliot", "series_federation", "wraps_model"]

SERVER_MODULES = {
    "FedAvg": "flcore.servers.serveravg.FedAvg", "FedProx": "flcore.servers.serverprox.FedProx",
    "FedPer": "flcore.servers.serverper.FedPer", "APFL": "flcore.servers.serverapfl.APFL",
    "Local": "flcore.servers.serverlocal.Local", "FedAvg-FT": "flcore.servers.serveravg_ft.FedAvg",
    "FedProx-FT": "flcore.servers.serverprox_ft.FedProx", "FedHome": "flcore.servers.serverhome.FedHome",
    "FedPrune": "flcore.servers.serverprune.FedPrune",
}
BASE_MODULES = ("flcore.clients.clientbase", "flcore.servers.serverbase", "flcore.trainmodel.models",
                "utils.data_utils")
REQUIRED = {"h5py": "FL-IoT's serverbase imports h5py; pip install h5py",
            "ujson": "FL-IoT's utils/data_utils imports ujson; pip install ujson",
            "sklearn": "FL-IoT's clientbase imports scikit-learn; pip install scikit-learn",
            "imblearn": "FL-IoT's FedHome client imports imbalanced-learn's SMOTE; pip install imbalanced-learn"}


# ------------------------------------------------------------------------------------------ locating FL-IoT
def fliot_system() -> Path:
    return reference_root() / "fl-iot" / "system"


def require_fliot() -> Path:
    """FL-IoT's ``system`` folder; skips the test with the reason when it (or a package it imports) is absent."""
    root = fliot_system()
    if not (root / "main.py").is_file() or not (root / "flcore" / "clients" / "clientbase.py").is_file():
        pytest.skip(f"FL-IoT is not at {root} (set FEDFORGE_REFERENCE_CODE to the folder holding fl-iot/system)")
    for mod, why in REQUIRED.items():
        if importlib.util.find_spec(mod) is None:
            pytest.skip(why)
    return root


@contextlib.contextmanager
def _opacus_stand_ins():
    """FL-IoT's utils/privacy.py imports opacus < 1.0 at module level; it is only used with ``-dp True``."""

    def unused(*args, **kwargs):
        raise RuntimeError("FL-IoT's differential privacy (opacus < 1.0) is not available in these tests")

    top = types.ModuleType("opacus")
    top.PrivacyEngine = unused
    inspector = types.ModuleType("opacus.dp_model_inspector")
    inspector.DPModelInspector = unused
    top.dp_model_inspector = inspector
    saved = {k: sys.modules.get(k) for k in ("opacus", "opacus.dp_model_inspector")}
    sys.modules.update({"opacus": top, "opacus.dp_model_inspector": inspector})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


_MODULES: dict[str, Any] | None = None


def fliot_modules() -> dict[str, Any]:
    """FL-IoT's modules by dotted name (imported once per process, isolated from other ``flcore``/``utils``)."""
    global _MODULES
    if _MODULES is None:
        root = require_fliot()
        names = [*BASE_MODULES, *(v.rsplit(".", 1)[0] for v in SERVER_MODULES.values())]
        with _opacus_stand_ins(), quiet():
            _MODULES = import_isolated(root, names)
    return _MODULES


def fliot_module(name: str):
    return fliot_modules()[name]


def fliot_server_class(algorithm: str):
    module, cls = SERVER_MODULES[algorithm].rsplit(".", 1)
    return getattr(fliot_module(module), cls)


# ------------------------------------------------------------------------------------------------ args
def fliot_args(**overrides: Any) -> types.SimpleNamespace:
    """FL-IoT's ``args``: ``main.py``'s defaults, on the CPU, then ``overrides`` (which must name its options)."""
    args = types.SimpleNamespace(**main_defaults(require_fliot()))
    args.device = "cpu"
    for k, v in overrides.items():
        if not hasattr(args, k) and k not in ("model", "predictor"):
            raise AttributeError(f"FL-IoT's main.py has no option '{k}'")
        setattr(args, k, v)
    return args


def wraps_model(algorithm: str) -> bool:
    """Whether FL-IoT's ``main.py`` wraps the model in ``LocalModel(base, predictor)`` for ``-algo algorithm``."""
    tree = ast.parse((require_fliot() / "main.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
                ast.unparse(node.test.left) == "args.algorithm" and \
                isinstance(node.test.comparators[0], ast.Constant) and node.test.comparators[0].value == algorithm:
            return any(isinstance(n, ast.Name) and n.id == "LocalModel" for b in node.body for n in ast.walk(b))
    raise KeyError(f"FL-IoT's main.py has no algorithm '{algorithm}'")


# ----------------------------------------------------------------------------------------------- model
def fliot_model(algorithm: str, input_shape: tuple[int, int], num_classes: int,
                ff_state: dict[str, torch.Tensor]) -> tuple[nn.Module, list[tuple[str, str]]]:
    """FL-IoT's ``HARCNN`` for series (C, L) as ``main.py`` builds it for ``-algo algorithm``, holding fedforge's
    ``harcnn`` weights ``ff_state``; returns it and the (fedforge name, FL-IoT name) pairs."""
    models = fliot_module("flcore.trainmodel.models")
    c, length = input_shape
    width = ((length - 8) // 2 - 8) // 2  # two (conv 1×9, pool 1×2 stride 2) blocks
    model = models.HARCNN(c, dim_hidden=64 * width, num_classes=num_classes, conv_kernel_size=(1, 9),
                          pool_kernel_size=(1, 2))
    if wraps_model(algorithm):  # main.py: args.predictor = model.fc; model.fc = Identity; LocalModel(model, predictor)
        predictor = copy.deepcopy(model.fc)
        model.fc = nn.Identity()
        model = models.LocalModel(model, predictor)
    pairs = pair_entries(ff_state, model.state_dict())
    load_pairs(model, ff_state, pairs)
    return model, pairs


def to_fliot(x: torch.Tensor) -> torch.Tensor:
    """fedforge's series batch (B, C, L) as FL-IoT's HARCNN reads it, (B, C, 1, L)."""
    return x.unsqueeze(2).contiguous()


# ------------------------------------------------------------------------------------------------ data
def series_federation(train_counts: Sequence[Sequence[int]], test_per_class: int = 3, channels: int = 3,
                      length: int = 64, seed: int = 0) -> tuple[Dataset, Partition]:
    """A small sensor-like federation: client i holds ``train_counts[i][c]`` training windows of class c (and
    ``test_per_class`` test windows of each class it trains on), drawn from ``make_series`` (class c: a sine of
    frequency c+1 on every channel, random phase, noise); per-channel standardised, as ``pfllib:`` HAR arrives."""
    k = len(train_counts[0])
    need = [sum(tc[c] for tc in train_counts) + test_per_class * len(train_counts) for c in range(k)]
    x, y = make_series(n=k * max(need), c=channels, length=length, k=k, seed=seed)
    free = {c: list(np.flatnonzero(y == c)) for c in range(k)}
    split = []
    for tc in train_counts:
        train = [free[c].pop(0) for c in range(k) for _ in range(tc[c])]
        test = [free[c].pop(0) for c in range(k) if tc[c] for _ in range(test_per_class)]
        split.append((np.asarray(train, np.int64), np.asarray(test, np.int64)))
    mean = x.mean(axis=(0, 2), dtype=np.float64)
    std = x.std(axis=(0, 2), dtype=np.float64)
    ds = Dataset("series-test", x, y, k, tuple(float(v) for v in mean), tuple(float(v) for v in std),
                 client_split=split, modality="series")
    return ds, from_client_split(split, y, scheme="natural")


# --------------------------------------------------------------------------------------------- harness
Views = dict[str, torch.Tensor]


@dataclass
class RoundResult:
    clients: dict[int, tuple[Views, Views]]  # cid → (FL-IoT view, fedforge view) after the local update
    server: tuple[Views, Views]  # after aggregation
    updates: dict[int, Update]
    batches: dict[int, list] = field(default_factory=dict)


class Harness:
    """A small series federation run by FL-IoT's classes and by fedforge's hooks from the same weights and batches.

    ``fl_args`` are FL-IoT's options (``mu``, ``alpha``, ``topk``, ``global_rounds``...); ``lr``, ``batch_size`` and
    ``local_epochs`` go to both sides (FL-IoT's ``-lr``, ``-lbs``, ``-ls``)."""

    def __init__(self, name: str, fl_algorithm: str, data: tuple[Dataset, Partition], ff_params: dict | None = None,
                 fl_args: dict | None = None, lr: float = 0.01, batch_size: int = 10, local_epochs: int = 1,
                 rounds: int = 2, seed: int = 0):
        self.ds, self.part = data
        n = self.part.num_clients
        self.ctx = Context(num_clients=n, num_classes=self.ds.num_classes, input_shape=self.ds.input_shape,
                           archs=("harcnn",) * n, seed=seed, rounds=rounds, lr=lr, batch_size=batch_size,
                           local_epochs=local_epochs, train_sizes=tuple(len(a) for a in self.part.train),
                           test_sizes=tuple(len(a) for a in self.part.test))
        self.algo = ALGORITHMS.get(name).create(ff_params or {}, self.ctx)
        self.worker = Worker(WorkerSpec(self.ds, self.part, self.algo))
        self.fed = self.worker.fed
        self.recorder = BatchRecorder(self.fed)
        self.server = self.algo.init_server()
        self.states: dict[int, dict | None] = {i: None for i in range(n)}
        self.init_weights = {k: v.detach().clone() for k, v in self.worker.initial_params("harcnn").items()}

        self.fl_algorithm = fl_algorithm
        model, self.pairs = fliot_model(fl_algorithm, self.ds.input_shape, self.ds.num_classes, self.init_weights)
        base = dict(dataset="series-test", num_classes=self.ds.num_classes, num_clients=n, join_ratio=1.0,
                    local_learning_rate=lr, batch_size=batch_size, local_steps=local_epochs, global_rounds=rounds,
                    algorithm=fl_algorithm, model=model)
        self.args = fliot_args(**(base | (fl_args or {})))
        if wraps_model(fl_algorithm):
            self.args.predictor = model.predictor
        self.feeders = {i: EpochFeeder() for i in range(n)}
        with self.client_data(), quiet():
            self.fl = fliot_server_class(fl_algorithm)(self.args, 0)
        for c in self.fl.clients:
            c.load_train_data = self.feeders[c.id].loader

    # ---- FL-IoT's reader, patched to this federation's samples (x as (C, 1, L))
    def samples(self, cid: int, train: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = (self.fed.train_idx if train else self.fed.test_idx)[cid]
        x, y = self.fed.inputs(idx)
        return [(a, b) for a, b in zip(to_fliot(x), y)]

    @contextlib.contextmanager
    def client_data(self):
        def read_client_data(dataset, idx, is_train=True):
            return self.samples(idx, is_train)

        mods = [m for m in fliot_modules().values() if hasattr(m, "read_client_data")]
        saved = [(m, m.read_client_data) for m in mods]
        for m in mods:
            m.read_client_data = read_client_data
        try:
            yield
        finally:
            for m, fn in saved:
                m.read_client_data = fn

    def feed(self, cid: int, epochs: list) -> None:
        """Hand client ``cid``'s FL-IoT loader these fedforge epochs (reshaped for HARCNN), in order."""
        self.feeders[cid].put([[(to_fliot(x), y) for x, y in ep] for ep in epochs])

    def client(self, cid: int):
        return next(c for c in self.fl.clients if c.id == cid)

    # ---- views under fedforge's names
    def fl_view(self, module: nn.Module) -> Views:
        """An FL-IoT model (or a part of it, e.g. FedPer's ``base``) under fedforge's names."""
        names = dict((b, a) for a, b in self.pairs)
        p = self._prefix(module)
        return {names[p + k]: v.detach().clone() for k, v in module.state_dict().items()}

    def _prefix(self, module: nn.Module) -> str:
        """'' for a whole model, 'base.' or 'predictor.' for that part of a ``LocalModel`` alone."""
        names = {b for _, b in self.pairs}
        return next(p for p in ("", "base.", "predictor.") if all(p + k in names for k in module.state_dict()))

    def load_fl(self, module: nn.Module, ff: dict[str, torch.Tensor]) -> None:
        """Copy fedforge-named weights into an FL-IoT model or part (entries of ``ff`` the module lacks are skipped)."""
        p = self._prefix(module)
        own = module.state_dict()
        load_pairs(module, ff, [(a, b[len(p):]) for a, b in self.pairs if a in ff and b.startswith(p) and b[len(p):] in own])

    # ---- one round
    def ff_round(self, rnd: int) -> tuple[dict[int, Update], dict[int, list]]:
        updates, batches = {}, {}
        for cid in range(self.ctx.num_clients):
            msg = self.algo.broadcast(self.server, cid, rnd)
            res = self.worker.run(Task("train", cid, rnd, msg, self.states[cid]))
            if not isinstance(res, Update):
                raise AssertionError(f"fedforge's local update of client {cid} failed: {res.traceback or res.error}")
            updates[cid] = res
            self.states[cid] = res.state
            batches[cid] = self.recorder.take()
        return updates, batches

    def ff_aggregate(self, updates: dict[int, Update], rnd: int) -> dict:
        self.server = self.algo.aggregate(self.server, list(updates.values()), rnd)
        return self.server

    def fl_train(self, batches: dict[int, list], send: bool = True,
                 train: Callable[[Any], None] | None = None) -> None:
        """FL-IoT's round up to the aggregation: send the global model, each client trains on fedforge's batches."""
        with self.client_data(), quiet():
            self.fl.selected_clients = list(self.fl.clients)
            if send:
                self.fl.send_models()
            for c in self.fl.selected_clients:
                self.feed(c.id, batches[c.id])
                (train or (lambda cl: cl.train()))(c)
                assert self.feeders[c.id].drained, \
                    f"FL-IoT's client {c.id} trained on fewer epochs than fedforge ({len(self.feeders[c.id].queue)} left)"

    def fl_aggregate(self) -> None:
        with quiet():
            self.fl.receive_models()
            self.fl.aggregate_parameters()

    def round(self, rnd: int, fl_client_view: Callable | None = None) -> RoundResult:
        """fedforge's round ``rnd`` and FL-IoT's corresponding steps, every client taking part; the FL-IoT client
        view defaults to its whole model, the fedforge one to the upload's model entries."""
        updates, batches = self.ff_round(rnd)
        self.fl_train(batches)
        clients = {c.id: ((fl_client_view or (lambda cl: self.fl_view(cl.model)))(c), model_entries(updates[c.id].upload))
                   for c in self.fl.clients}
        self.fl_aggregate()
        self.ff_aggregate(updates, rnd)
        return RoundResult(clients, (self.fl_view(self.fl.global_model), model_entries(self.server)), updates, batches)

    def sync(self) -> None:
        """Give FL-IoT's server fedforge's server weights, bit for bit (after they were found equal to tolerance), so
        the next round starts both from identical weights (see ``pfllib_shim.Harness.sync``)."""
        self.load_fl(self.fl.global_model, model_entries(self.server))

    # ---- the stage after the last round
    def ff_finetune(self, cid: int, msg: dict | None = None) -> dict:
        """fedforge's ``finetune`` task of client ``cid`` (on the final global model, or on ``msg``)."""
        rnd = self.ctx.rounds + 1
        msg = self.algo.eval_message(self.server, cid) if msg is None else msg
        return self.worker.run(Task("finetune", cid, rnd, msg, self.states[cid]))
