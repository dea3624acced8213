"""Drive PFLlib's own client and server classes in-process, beside fedforge's algorithm hooks (step equivalence).

PFLlib (``$FEDFORGE_REFERENCE_CODE/pfllib/system``, by default ``../shared/reference-code/pfllib/system``) is the
oracle: this module imports and runs it, it copies none of its code. What it provides:

* :func:`pfllib` / :func:`import_pfllib` — PFLlib importable (``flcore``, ``utils`` from its ``system`` folder), or
  the test skipped with the reason. Of PFLlib's optional imports only ``h5py`` (``serverbase`` imports it at module
  level) is needed; ``cvxpy`` only by FedPAC's case (its server imports it; skipped without it), and ``calmsize``
  (``main.py``'s memory reporter) is never imported here.
* :func:`pfllib_args` — an ``args`` namespace with every default of PFLlib's ``main.py`` (read from its argparse
  calls), plus the harness's settings (CPU, the federation's size, the model).
* :func:`pfllib_cnn` — PFLlib's ``FedAvgCNN``, wrapped in ``BaseHeadSplit`` exactly when ``main.py`` wraps it for
  that algorithm (read from ``main.py``), with fedforge's initial weights loaded through the one name mapping
  :data:`CNN_NAMES` (checked by shapes and parameter order in :func:`check_same_cnn`).
* :class:`Harness` — one tiny federation run by both codes: PFLlib's server and clients (their data reader patched
  to fedforge's client data; every client's training loader replaced by a feeder that yields exactly the batches
  fedforge used, epoch by epoch, in fedforge's order) and fedforge's ``Algorithm`` hooks through a real
  ``Worker``/``ClientRuntime``. :meth:`Harness.round` runs one round on both sides and returns what to compare.

Adding an algorithm: write an :class:`AlgoSpec` (fedforge name and hyper-parameters, PFLlib server class and
``args``, and, where the default model-weights view does not fit, the views that name comparable tensors on each
side) in ``tests/reference/pfllib_specs.py`` and add it to ``SPECS``; the parametrized test runs it with
:func:`step_equivalence`. docs/faithfulness.md lists what each algorithm aligns and why.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import importlib
import io
import os
import sys
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

import fedforge.algorithms  # noqa: F401  (registers the algorithms)
from fedforge.core.algorithm import ALGORITHMS, Update
from fedforge.core.context import Context
from fedforge.core.messages import model_entries
from fedforge.core.runtime import Task, Worker, WorkerSpec
from fedforge.data import Dataset, Partition, load_dataset, make_partition

REPO = Path(__file__).resolve().parents[2]

# Float32 tolerance of every comparison. rtol 1e-5 is the project's bar for "the same update". atol: weights are
# O(1e-2..1e-1), and the two codes round differently (fedforge convolves channels-last tensors, its weighted average
# uses a fused multiply-add, some methods compute a term in another order), which leaves differences of ~1e-8 after
# a round's steps (measured on every algorithm of pfllib_specs.py; round 1 is mostly bit for bit); 1e-6 admits
# those where an element sits near zero and a relative bound means nothing, and is 1e3-1e4 times smaller than one
# SGD step at lr 0.005 moves a weight, so a missing or extra term cannot hide in it.
RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------------------------------- locating PFLlib
def reference_root() -> Path:
    env = os.environ.get("FEDFORGE_REFERENCE_CODE")
    return Path(env).expanduser() if env else REPO.parent / "shared" / "reference-code"


def pfllib() -> Path:
    """PFLlib's ``system`` folder, on ``sys.path``; skips the test (with the reason) when it cannot be used."""
    system = reference_root() / "pfllib" / "system"
    if not (system / "flcore" / "servers" / "serverbase.py").is_file():
        pytest.skip(f"PFLlib's code is not at {system} (set FEDFORGE_REFERENCE_CODE to the reference-code folder)")
    pytest.importorskip("h5py", reason="PFLlib's serverbase imports h5py at module level; install h5py")
    s = str(system)
    if s not in sys.path:
        sys.path.insert(0, s)
    for top in ("utils", "flcore"):
        mod = sys.modules.get(top)
        where = getattr(mod, "__path__", None)
        if mod is not None and not any(str(p).startswith(s) for p in (where or [])):
            pytest.fail(f"another package named '{top}' ({where}) is imported; PFLlib's own is needed here")
    return system


def import_pfllib(module: str):
    """Import a PFLlib module by its name under ``system`` (e.g. ``flcore.servers.serveravg``), quietly."""
    pfllib()
    with quiet():
        return importlib.import_module(module)


@contextlib.contextmanager
def quiet():
    """PFLlib prints every step; keep the test output readable."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ---------------------------------------------------------------------------------------------- args
def _main_py() -> ast.Module:
    return ast.parse((pfllib() / "main.py").read_text())


def main_defaults() -> dict[str, Any]:
    """Every ``parser.add_argument`` default of PFLlib's ``main.py``, by destination name."""
    out = {}
    for node in ast.walk(_main_py()):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags = [a.value for a in node.args if isinstance(a, ast.Constant)]
            kw = {k.arg: k.value for k in node.keywords}
            dest = next(f[2:] for f in flags if f.startswith("--"))
            out[dest] = ast.literal_eval(kw["default"]) if "default" in kw else None
    return out


def splits_model(algorithm: str) -> bool:
    """Whether PFLlib's ``main.py`` wraps the model in ``BaseHeadSplit`` for ``-algo algorithm``."""
    for node in ast.walk(_main_py()):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
                ast.unparse(node.test.left) == "args.algorithm" and \
                isinstance(node.test.comparators[0], ast.Constant) and node.test.comparators[0].value == algorithm:
            return any(isinstance(n, ast.Name) and n.id == "BaseHeadSplit" for b in node.body for n in ast.walk(b))
    raise KeyError(f"PFLlib's main.py has no algorithm '{algorithm}'")


def pfllib_args(**overrides) -> SimpleNamespace:
    """PFLlib's ``args``: ``main.py``'s defaults, on the CPU, then ``overrides``."""
    args = SimpleNamespace(**main_defaults())
    args.device = "cpu"
    for k, v in overrides.items():
        if not hasattr(args, k) and k not in ("model", "head"):
            raise AttributeError(f"PFLlib's main.py has no option '{k}'")
        setattr(args, k, v)
    return args


# --------------------------------------------------------------------------------------------- model
# PFLlib FedAvgCNN parameter prefix → fedforge ``cnn`` prefix (the one mapping; BaseHeadSplit adds ``base.``).
CNN_NAMES = {"conv1.0.": "features.0.", "conv2.0.": "features.3.", "fc1.0.": "features.7.", "fc.": "head."}


def ff_name(pf_name: str) -> str:
    """fedforge's name of a PFLlib FedAvgCNN entry (plain, ``BaseHeadSplit``-wrapped, or its ``head`` alone)."""
    name = pf_name[len("base."):] if pf_name.startswith("base.") else pf_name
    if pf_name.startswith("head."):
        return pf_name
    for pf, ff in CNN_NAMES.items():
        if name.startswith(pf):
            return ff + name[len(pf):]
    raise KeyError(f"no fedforge name for PFLlib entry '{pf_name}'")


def pf_params(module: nn.Module, part: str = "model") -> dict[str, torch.Tensor]:
    """A PFLlib module's parameters under fedforge's names: ``part`` is ``model`` (plain or split FedAvgCNN),
    ``base`` (its body alone, e.g. FedPer's uploads) or ``head`` (the classifier alone)."""
    out = {}
    for n, p in module.named_parameters():
        name = "head." + n if part == "head" else ff_name(n)
        out[name] = p.detach().clone()
    return out


def load_pf(module: nn.Module, ff_state: dict[str, torch.Tensor], part: str = "model") -> None:
    """Copy fedforge-named weights into a PFLlib module (every parameter of the module must be given)."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            name = "head." + n if part == "head" else ff_name(n)
            p.copy_(ff_state[name])


def pfllib_cnn(algorithm: str, ff_state: dict[str, torch.Tensor], num_classes: int = 10) -> nn.Module:
    """PFLlib's model for ``-m CNN -data MNIST -algo algorithm`` as ``main.py`` builds it, holding ``ff_state``."""
    models = import_pfllib("flcore.trainmodel.models")
    model = models.FedAvgCNN(in_features=1, num_classes=num_classes, dim=1024)
    if splits_model(algorithm):
        head = copy.deepcopy(model.fc)
        model.fc = nn.Identity()
        model = models.BaseHeadSplit(model, head)
    load_pf(model, ff_state)
    return model


def check_same_cnn(pf_model: nn.Module, ff_model: nn.Module, x: torch.Tensor) -> None:
    """PFLlib's FedAvgCNN and fedforge's ``cnn`` are one architecture: the mapped parameter names come in the same
    order with the same shapes, and with the same weights both give the same logits."""
    pf = [(ff_name(n), tuple(p.shape)) for n, p in pf_model.named_parameters()]
    ff = [(n, tuple(p.shape)) for n, p in ff_model.named_parameters()]
    assert pf == ff, f"PFLlib's FedAvgCNN {pf} differs from fedforge's cnn {ff}"
    assert [n for n, _ in ff_model.named_buffers()] == [n for n, _ in pf_model.named_buffers()] == []
    with torch.no_grad():
        torch.testing.assert_close(pf_model(x.contiguous()), ff_model(x), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------- data
def tiny_mnist(n: int = 200, clients: int = 3, seed: int = 0, alpha: float = 0.3) -> tuple[Dataset, Partition]:
    """The first ``n`` MNIST samples over ``clients`` clients (Dirichlet ``alpha``, 75/25 split; client sizes that
    are not multiples of the batch, so drop_last acts), normalised as PFLlib's files are (mean 0.5, std 0.5)."""
    from tests.conftest import require_data

    root = require_data("mnist.npz").parent
    full = load_dataset("mnist", root)
    ds = replace(full, x=full.x[:n], y=full.y[:n], mean=(0.5,), std=(0.5,), name=f"mnist[:{n}]")
    part = make_partition(ds.y, 10, "dirichlet", clients, seed, alpha=alpha, min_samples=30)
    return ds, part


class BatchRecorder:
    """Records the training batches a fedforge ``Federation`` hands out, grouped by epoch, in order.

    Every batch fedforge trains on comes from ``Federation.train_positions`` (through ``train_batches``, or directly
    where a method computes features once, e.g. ``mechanics.frozen_feature_batches``), after ``train_indices`` named
    the client's samples; the recorder wraps those two on the instance and keeps ``(x, y)`` of each batch.
    """

    def __init__(self, fed):
        self.fed = fed
        self.epochs: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self._idx: torch.Tensor | None = None
        orig_indices, orig_positions = fed.train_indices, fed.train_positions

        def train_indices(cid, subset=None):
            self._idx = orig_indices(cid, subset)
            return self._idx

        def train_positions(n, batch_size, generator, epochs=1, fraction=1.0, drop_last=True):
            idx = self._idx
            assert idx is not None and idx.numel() == n, "train_positions without its client's train_indices"
            m = max(1, int(round(n * fraction))) if fraction < 1.0 else n
            per = m // batch_size if (drop_last and m > batch_size) else -(-m // batch_size)
            count = 0
            for pos in orig_positions(n, batch_size, generator, epochs, fraction, drop_last):
                if count % per == 0:
                    self.epochs.append([])
                self.epochs[-1].append(tuple(t.detach().clone() for t in fed.inputs(idx[pos])))
                count += 1
                yield pos

        fed.train_indices, fed.train_positions = train_indices, train_positions

    def take(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        out, self.epochs = self.epochs, []
        return out


class EpochFeeder:
    """Stands in for a PFLlib client's training DataLoader: each pass over it (``for x, y in loader``) yields the
    next recorded fedforge epoch. ``drained`` tells whether PFLlib used exactly the epochs fedforge did."""

    def __init__(self, epochs=()):
        self.queue: deque = deque(epochs)
        self.last: list | None = None

    def put(self, epochs) -> None:
        self.queue.extend(epochs)

    def loader(self, batch_size=None, *args, **kwargs) -> _Loader:
        return _Loader(self)

    @property
    def drained(self) -> bool:
        return not self.queue


class _Loader:
    def __init__(self, feeder: EpochFeeder):
        self.feeder = feeder

    def __iter__(self):
        if not self.feeder.queue:
            raise AssertionError("PFLlib's client asked for more training epochs than fedforge trained")
        epoch = self.feeder.queue.popleft()
        self.feeder.last = epoch
        return iter([(x.clone(), y.clone()) for x, y in epoch])

    def __len__(self) -> int:
        epoch = self.feeder.last if self.feeder.last is not None else self.feeder.queue[0]
        return len(epoch)


# --------------------------------------------------------------------------------------------- harness
Views = dict[str, torch.Tensor]


@dataclass
class AlgoSpec:
    """One algorithm on both codes. Views name comparable tensors in fedforge's names.

    ``pf_client_view(h, client)`` / ``ff_client_view(h, update)``: what a client holds after its local update
    (default: the trained model: PFLlib's ``client.model``, fedforge's upload model entries).
    ``pf_server_view(h, server)`` / ``ff_server_view(h, state)``: the server after aggregation (default: PFLlib's
    ``global_model``, fedforge's model entries).
    ``pf_train(h, client, rnd)``: PFLlib's local update (default ``client.train()``).
    ``pf_aggregate(h, server, rnd)``: default ``receive_models()`` + ``aggregate_parameters()``.
    ``pf_setup(h)``: after both sides are built (e.g. to align a PFLlib quirk that the spec documents);
    ``pf_pre_build(h)``: before PFLlib's server is constructed (for servers whose constructor trains clients).
    ``pf_sync(h, server, ff_state)``: once a round's server views agreed, copy fedforge's server state into PFLlib's
    server (default: fedforge's model weights into ``global_model``, which holds ``pf_part``), so that each round
    starts from identical weights (see :meth:`Harness.sync`).
    """

    name: str  # fedforge algorithm
    pf_algorithm: str  # PFLlib's -algo name (decides BaseHeadSplit, as main.py does)
    pf_server: str  # "module.Class" under flcore.servers
    ff_params: dict = field(default_factory=dict)
    pf_args: dict = field(default_factory=dict)
    rounds: int = 2
    model: str = "cnn"
    pf_client_view: Callable[[Harness, Any], Views] | None = None
    ff_client_view: Callable[[Harness, Update], Views] | None = None
    pf_server_view: Callable[[Harness, Any], Views] | None = None
    ff_server_view: Callable[[Harness, dict], Views] | None = None
    pf_send: Callable[[Harness, Any, int], None] | None = None
    pf_train: Callable[[Harness, Any, int], None] | None = None
    pf_aggregate: Callable[[Harness, Any, int], None] | None = None
    pf_setup: Callable[[Harness], None] | None = None
    pf_pre_build: Callable[[Harness], None] | None = None  # before PFLlib's server is constructed
    pf_model: Callable[[Harness], nn.Module] | None = None  # PFLlib's model, if not main.py's FedAvgCNN
    pf_part: str = "model"  # what PFLlib's server.global_model holds after aggregation: model, base or head
    pf_sync: Callable[[Harness, Any, dict], None] | None = None
    ctx: dict = field(default_factory=dict)  # Context overrides (lr, batch_size, local_epochs)


@dataclass
class RoundResult:
    clients: dict[int, tuple[Views, Views]]  # cid → (PFLlib view, fedforge view) after the local update
    server: tuple[Views, Views]  # after aggregation
    updates: dict[int, Update]


class Harness:
    """A tiny federation run by PFLlib's classes and by fedforge's hooks from identical weights and batches."""

    def __init__(self, spec: AlgoSpec, ds: Dataset, part: Partition, seed: int = 0):
        self.spec = spec
        self.ds, self.part = ds, part
        n = part.num_clients
        hp = dict(lr=0.005, batch_size=10, local_epochs=1) | spec.ctx  # PFLlib's -lr, -lbs, -ls
        self.ctx = Context(num_clients=n, num_classes=ds.num_classes, input_shape=ds.input_shape,
                           archs=(spec.model,) * n, seed=seed, rounds=spec.rounds, **hp,
                           train_sizes=tuple(len(a) for a in part.train), test_sizes=tuple(len(a) for a in part.test))
        self.algo = ALGORITHMS.get(spec.name).create(spec.ff_params, self.ctx)
        self.worker = Worker(WorkerSpec(ds, part, self.algo))
        self.fed = self.worker.fed
        self.recorder = BatchRecorder(self.fed)
        self.server = self.algo.init_server()
        self.states: dict[int, dict | None] = {i: None for i in range(n)}
        self.init_weights = {k: v.detach().clone() for k, v in self.worker.initial_params(spec.model).items()}

        # ---- PFLlib, with the same weights and data
        module, cls = spec.pf_server.rsplit(".", 1)
        server_cls = getattr(import_pfllib(f"flcore.servers.{module}"), cls)
        self.pf_model = spec.pf_model(self) if spec.pf_model else pfllib_cnn(spec.pf_algorithm, self.init_weights,
                                                                             ds.num_classes)
        base = dict(dataset="MNIST", num_classes=ds.num_classes, num_clients=n, join_ratio=1.0,
                    local_learning_rate=hp["lr"], batch_size=hp["batch_size"], local_epochs=hp["local_epochs"],
                    global_rounds=spec.rounds, algorithm=spec.pf_algorithm, model=self.pf_model)
        self.args = pfllib_args(**(base | spec.pf_args))
        if splits_model(spec.pf_algorithm):
            self.args.head = self.pf_model.head
        self.restore: list[tuple[Any, str, Any]] = []  # (object, attribute, value) a spec patched; see close()
        self.draws: dict[int, deque] = {i: deque() for i in range(n)}  # random draws fedforge made, to inject
        self.current_cid: int | None = None  # the client whose fedforge task is running
        self.feeders = {i: EpochFeeder() for i in range(n)}
        if spec.pf_pre_build:  # e.g. a server whose constructor already trains its clients (FedDBE's warm-up)
            spec.pf_pre_build(self)
        with self._pfllib_data(), quiet():
            self.pf = server_cls(self.args, 0)
        for c in self.pf.clients:
            c.load_train_data = self.feeders[c.id].loader
        if spec.pf_setup:
            spec.pf_setup(self)

    def sync(self) -> None:
        """Give PFLlib's server fedforge's server state, bit for bit, once the two were found equal to tolerance.

        The two aggregates differ in the last bit (fedforge's weighted average adds ``w·x`` with one fused
        multiply-add, PFLlib multiplies, then adds); left alone, such a difference can, through a max-pool or ReLU
        tie, move single weights by a whole SGD step a few rounds later. Syncing makes every round a step-equivalence
        check from identical starting weights, as the first one is."""
        with quiet():
            (self.spec.pf_sync or _default_sync)(self, self.pf, self.server)

    def patch(self, obj: Any, attr: str, value: Any) -> None:
        """Set ``obj.attr`` for this harness's lifetime (undone by :meth:`close`)."""
        self.restore.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def close(self) -> None:
        """Undo what a spec patched in PFLlib's modules."""
        while self.restore:
            obj, attr, value = self.restore.pop()
            setattr(obj, attr, value)

    # ---- PFLlib's reader, patched to this federation's client data
    def client_data(self, cid: int, train: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = (self.fed.train_idx if train else self.fed.test_idx)[cid]
        x, y = self.fed.inputs(idx)
        return [(a.contiguous(), b) for a, b in zip(x, y)]

    @contextlib.contextmanager
    def _pfllib_data(self):
        def read_client_data(dataset, idx, is_train=True, few_shot=0):
            return self.client_data(idx, is_train)

        patched = []
        for name, mod in list(sys.modules.items()):
            if (name.startswith("flcore.") or name.startswith("utils.")) and hasattr(mod, "read_client_data"):
                patched.append((mod, mod.read_client_data))
                mod.read_client_data = read_client_data
        try:
            yield
        finally:
            for mod, fn in patched:
                mod.read_client_data = fn

    # ---- one round on both sides
    def ff_round(self, rnd: int) -> tuple[dict[int, Update], dict[int, list]]:
        updates, batches = {}, {}
        for cid in range(self.ctx.num_clients):
            self.current_cid = cid
            msg = self.algo.broadcast(self.server, cid, rnd)
            res = self.worker.run(Task("train", cid, rnd, msg, self.states[cid]))
            if not isinstance(res, Update):  # a ClientFailure: surface the error
                raise AssertionError(f"fedforge's local update of client {cid} failed: {res.traceback or res.error}")
            updates[cid] = res
            self.states[cid] = res.state
            batches[cid] = self.recorder.take()
        return updates, batches

    def round(self, rnd: int) -> RoundResult:
        """fedforge round ``rnd`` (1-based) and PFLlib's round ``rnd - 1``, every client taking part."""
        s = self.spec
        updates, batches = self.ff_round(rnd)
        # what this round's PFLlib hooks may read (a pf_send may take a client's first epochs, e.g. FedALA's ALA data)
        self.updates, self.batches = updates, batches
        clients = {}
        with self._pfllib_data(), quiet():
            self.pf.selected_clients = list(self.pf.clients)
            self.pf.current_num_join_clients = len(self.pf.clients)
            (s.pf_send or (lambda h, srv, r: srv.send_models()))(self, self.pf, rnd)
            for c in self.pf.selected_clients:
                self.feeders[c.id].put(batches[c.id])
                (s.pf_train or (lambda h, cl, r: cl.train()))(self, c, rnd)
                assert self.feeders[c.id].drained, \
                    f"PFLlib's client {c.id} trained on fewer epochs than fedforge ({len(self.feeders[c.id].queue)} left)"
                pf_view = (s.pf_client_view or (lambda h, cl: pf_params(cl.model)))(self, c)
                ff_view = (s.ff_client_view or (lambda h, u: model_entries(u.upload)))(self, updates[c.id])
                clients[c.id] = (pf_view, ff_view)
            with uploads_in_client_order():
                (s.pf_aggregate or _default_aggregate)(self, self.pf, rnd)
        self.server = self.algo.aggregate(self.server, list(updates.values()), rnd)
        pf_srv = (s.pf_server_view or (lambda h, srv: pf_params(srv.global_model, s.pf_part)))(self, self.pf)
        ff_srv = (s.ff_server_view or (lambda h, st: model_entries(st)))(self, self.server)
        return RoundResult(clients, (pf_srv, ff_srv), updates)


@contextlib.contextmanager
def uploads_in_client_order():
    """PFLlib's receive_models draws the upload order with ``random.sample(selected, k)``; with every client
    reporting (no drop rate) that is only a permutation, which changes nothing but the order in which the server
    sums the models. Both codes then sum in client order, so that their aggregates agree to the last bit rather
    than to float rounding (which, through a max-pool or ReLU tie, can move single weights by one SGD step)."""
    import random

    orig = random.sample

    def sample(population, k, *a, **kw):
        pop = list(population)
        return pop if k == len(pop) and not a and not kw else orig(population, k, *a, **kw)

    random.sample = sample
    try:
        yield
    finally:
        random.sample = orig


def _default_sync(h: Harness, server, ff_state: dict) -> None:
    load_pf(server.global_model, model_entries(ff_state), h.spec.pf_part)


def _default_aggregate(h: Harness, server, rnd: int) -> None:
    server.receive_models()
    server.aggregate_parameters()


# ------------------------------------------------------------------------------------------ comparing
def assert_same(pf: Views, ff: Views, what: str) -> None:
    """Same names; every tensor equal to :data:`RTOL`/:data:`ATOL`."""
    assert sorted(pf) == sorted(ff), f"{what}: PFLlib has {sorted(set(pf) - set(ff))}, fedforge {sorted(set(ff) - set(pf))}"
    for k in ff:
        torch.testing.assert_close(pf[k].float(), ff[k].float(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m, k=k: f"{what}, {k}: {m}")


def max_abs_diff(pf: Views, ff: Views) -> float:
    return max(float((pf[k].float() - ff[k].float()).abs().max()) for k in ff)


def step_equivalence(spec: AlgoSpec, data: tuple[Dataset, Partition]) -> list[RoundResult]:
    """Run ``spec.rounds`` rounds on both codes and assert that every client view and the server view agree in
    every round; returns the round results (for further, algorithm-specific checks)."""
    h = Harness(spec, *data)
    out = []
    try:
        for rnd in range(1, spec.rounds + 1):
            r = h.round(rnd)
            for cid, (pf, ff) in r.clients.items():
                assert_same(pf, ff, f"{spec.name}, round {rnd}, client {cid} after its local update")
            assert_same(*r.server, f"{spec.name}, round {rnd}, server after aggregation")
            h.sync()
            out.append(r)
    finally:
        h.close()
    return out

