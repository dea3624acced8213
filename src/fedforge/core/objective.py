"""Local updates as pure objectives: one definition serves the sequential loop and the vectorized executor.

Most local updates are "from these starting weights, run SGD on this loss, in one or more phases, then build the
Update from the trained weights". An algorithm states such an update as an :class:`Objective`
(:meth:`~fedforge.core.algorithm.Algorithm.vector_objective`)::

    Objective(start={"model": weights},                     # the models the client trains, and where they start
              phases=(Phase(loss=..., train=..., grad=...),),  # SGD passes, in order
              extras={"anchor/features.0.weight": t, ...},   # per-client tensors the losses read (from msg/state)
              frozen={"global": weights},                    # models the losses run but never train (MOON)
              finish=lambda rt, weights, stats: Update(...)) # the Update from the trained weights

A phase's loss is a pure function ``loss(m, x, y, ex) -> scalar`` of the trained model ``m`` (``m(x)``,
``m.features(x)``, ``m.head(z)``), the batch, and the extras ``ex`` (``ex["name"]``, ``ex.under("anchor")``,
``ex.model("global")`` for another model, run the same way). A phase's gradient function
``grad(params, grads, ex) -> grads`` (dicts by parameter name) changes the gradients before the step (FedProx's
proximal pull, SCAFFOLD's correction). Both are called in two ways, which is the point of the design:

* sequentially, by :func:`run_objective` (the default ``local_update``): ``m`` is the worker's model, every other
  model is a worker model instance loaded with its weights, and each phase is one call of ``rt.train`` — the one
  SGD loop, :func:`fedforge.core.training.train_loop`;
* vectorized, by the ``vectorized`` executor (:mod:`fedforge.core.vectorized`): ``m`` is a
  :class:`FunctionalModel` over one client's slice of weights stacked for many clients, and the loss runs under
  ``torch.func.vmap(grad_and_value(...))``.

So a loss must be vmappable: no Python branches on tensor values (``bool(t)``, ``.item()``), no boolean-mask
indexing (use per-sample weights instead), no in-place updates of inputs. Callables in a :class:`Phase` should be
module-level functions or bound methods (not closures made per client): the vectorized executor batches clients
whose phases compare equal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .messages import State
from .training import GradHook, LossFn, TrainStats

if TYPE_CHECKING:
    from .algorithm import Update
    from .runtime import ClientRuntime

MAIN = "model"  # name of the client's (main) model in Objective.start

Tensors = dict[str, torch.Tensor]
Loss = Callable[[Any, torch.Tensor, torch.Tensor, "Extras"], torch.Tensor]  # (m, x, y, ex) -> scalar
GradFn = Callable[[Tensors, Tensors, "Extras"], Tensors]  # (params, grads, ex) -> grads, by parameter name
Finish = Callable[["ClientRuntime", dict[str, State], list[TrainStats]], "Update"]  # (rt, weights, stats) -> Update


@dataclass(frozen=True)
class Phase:
    """One pass of local SGD.

    ``model``: which model of :attr:`Objective.start` is trained and handed to the loss as ``m``.
    ``train``: which of its parameters are updated, by name (None: all); the others stay as they are.
    ``also``: other models of ``start`` trained jointly, ``((name, filter), ...)``; the loss reaches them through
    ``ex.model(name)`` and a gradient function sees their parameters as ``"<name>/<parameter>"``.
    ``loss``: ``(m, x, y, ex) -> scalar`` (None: cross-entropy of ``m(x)``).
    ``grad``: ``(params, grads, ex) -> grads`` applied to each step's gradients (None: none).
    ``epochs``: passes over the client's data (None: the run's local epochs).
    ``replay``: draw the batch order again from the task's seed, i.e. the very batches of the task's first pass
    (Ditto's personal model) instead of continuing the task's random stream.
    ``on_features``: only the head is trained and the body is frozen: the loss gets ``z = m.features(x)`` (computed
    without gradient) instead of ``x``, and the features may be computed once per phase where that is exact
    (no augmentation, no batch-dependent or random layers). ``loss`` None then means cross-entropy of ``m.head(z)``.
    """

    model: str = MAIN
    loss: Loss | None = None
    train: Callable[[str], bool] | None = None
    also: tuple[tuple[str, Callable[[str], bool] | None], ...] = ()
    grad: GradFn | None = None
    epochs: int | None = None
    replay: bool = False
    on_features: bool = False


@dataclass
class Objective:
    """A local update as data: see the module docstring."""

    start: dict[str, State]
    phases: tuple[Phase, ...]
    finish: Finish
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    frozen: dict[str, State] = field(default_factory=dict)


@dataclass(frozen=True)
class PlainLoss:
    """A three-argument loss ``fn(model, x, y)`` (``Algorithm.loss``) as a phase loss (equal when ``fn`` is)."""

    fn: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]

    def __call__(self, m: Any, x: torch.Tensor, y: torch.Tensor, ex: Extras) -> torch.Tensor:
        return self.fn(m, x, y)


def plain_loss(fn: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor] | None) -> Loss | None:
    return None if fn is None else PlainLoss(fn)


class Extras:
    """What a loss or gradient function reads besides the batch: named tensors and other models."""

    __slots__ = ("tensors", "models")

    def __init__(self, tensors: Mapping[str, torch.Tensor], models: Mapping[str, Any] | None = None):
        self.tensors = tensors
        self.models = models if models is not None else {}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def under(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors named ``prefix/...``, the prefix removed."""
        p = prefix + "/"
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    def model(self, name: str) -> Any:
        """Another model of the objective (frozen, or trained jointly): callable, with ``features`` and ``head``."""
        return self.models[name]


def _strip(params: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


class FunctionalModel:
    """A :class:`~fedforge.models.FedModel` run with given tensors in place of its own
    (``torch.func.functional_call``): ``m(x)``, ``m.features(x)``, ``m.head(z)``; other attributes are the module's."""

    def __init__(self, module: nn.Module, params: Mapping[str, torch.Tensor]):
        self._module = module
        self._params = dict(params)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(self._module, self._params, (x,))
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        body = self._module.get_submodule("features")
        out: torch.Tensor = torch.func.functional_call(body, _strip(self._params, "features."), (x,))
        return out

    def head(self, z: torch.Tensor) -> torch.Tensor:
        head = self._module.get_submodule("head")
        out: torch.Tensor = torch.func.functional_call(head, _strip(self._params, "head."), (z,))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def head_cross_entropy(m: Any, z: torch.Tensor, y: torch.Tensor, ex: Extras) -> torch.Tensor:
    """Cross-entropy of the head on features (the default loss of an ``on_features`` phase)."""
    return F.cross_entropy(m.head(z), y)


# ----------------------------------------------------------------------------------- frozen features
def batch_independent(model: nn.Module) -> bool:
    """Whether ``model``'s training-mode forward treats each sample alone and without randomness
    (no batch normalisation, dropout or stochastic depth), so features can be computed once and reused."""
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
            return False
        if "StochasticDepth" in type(m).__name__:
            return False
    return True


def frozen_feature_batches(rt: ClientRuntime, model: nn.Module | None = None, epochs: int | None = None,
                           chunk: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Training batches ``(model.features(x), y)`` for head-only epochs while the body is frozen.

    The features of the client's training samples are computed once (under ``no_grad``, in chunks) and the
    batches are then cut from them in exactly the order that ``rt.batches(epochs)`` would yield, drawing the
    same numbers from the task's random stream, so a head trained on them follows the same path as one trained
    through the frozen body, up to float rounding, at the cost of one forward pass instead of one per epoch.
    Returns None when that would not be exact (augmentation on, or a body whose forward depends on the batch
    or on randomness); the caller then trains through the body.
    """
    m = model if model is not None else rt.model
    fed = rt.fed
    if fed.augment or not batch_independent(m):
        return None
    idx = fed.train_indices(rt.cid)
    m.train()
    body = m.get_submodule("features")
    with torch.no_grad(), rt.autocast():
        z = torch.cat([body(fed.inputs(idx[s:s + chunk])[0]) for s in range(0, idx.numel(), chunk)]) \
            if idx.numel() else torch.zeros(0, device=idx.device)
    y = fed.y[idx]
    z = z.float()
    n_epochs = rt.local_epochs if epochs is None else epochs
    return [(z[pos], y[pos]) for pos in fed.train_positions(idx.numel(), rt.batch_size, rt.gen, n_epochs)]


# ------------------------------------------------------------------------------------- sequential
def _filtered(model: nn.Module, keep: Callable[[str], bool] | None) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and (keep is None or keep(n))]


def run_objective(rt: ClientRuntime, obj: Objective) -> Update:
    """Run an objective one client at a time: each phase is one ``rt.train`` call on the worker's model."""
    weights = {name: dict(w) for name, w in obj.start.items()}
    others: dict[str, nn.Module] = {}
    for name, w in obj.frozen.items():
        m = rt.aux_model(f"objective/frozen/{name}")
        rt.load(w, m)
        m.eval()
        others[name] = m
    ex = Extras(obj.extras, others)
    loaded: str | None = None  # the trained model that rt.model currently holds
    cotrained: set[str] = set()
    stats: list[TrainStats] = []
    for ph in obj.phases:
        if loaded != ph.model:
            if loaded is not None:
                weights[loaded] = rt.model_state()
            rt.load(weights[ph.model])
            loaded = ph.model
        named = _filtered(rt.model, ph.train)
        for other, keep in ph.also:
            if other not in others:
                m = rt.aux_model(f"objective/{other}")
                rt.load(weights[other], m)
                others[other] = m
                cotrained.add(other)
            named += [(f"{other}/{n}", p) for n, p in _filtered(others[other], keep)]
        names, params = [n for n, _ in named], [p for _, p in named]
        hook = None if ph.grad is None else _grad_hook(ph.grad, names, ex)
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None
        loss_fn: LossFn | None
        if ph.on_features:
            loss = ph.loss or head_cross_entropy
            batches = frozen_feature_batches(rt, epochs=ph.epochs)
            if batches is not None:
                loss_fn = _bind(loss, ex)
            else:
                loss_fn = _through_frozen_body(loss, ex)
        else:
            loss_fn = None if ph.loss is None else _bind(ph.loss, ex)
            if ph.replay:
                replay = torch.Generator(device=rt.gen.device).manual_seed(rt.seed)  # rt.gen's stream, where it draws
                batches = rt.batches(ph.epochs, generator=replay)
        stats.append(rt.train(loss_fn=loss_fn, params=params, epochs=ph.epochs, grad_hook=hook, batches=batches))
    if loaded is not None:
        weights[loaded] = rt.model_state()
    for name in cotrained:
        weights[name] = rt.model_state(others[name])
    return obj.finish(rt, weights, stats)


def _bind(loss: Loss, ex: Extras) -> LossFn:
    return lambda model, x, y: loss(model, x, y, ex)


def _through_frozen_body(loss: Loss, ex: Extras) -> LossFn:
    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = model.get_submodule("features")(x)
        return loss(model, z, y, ex)

    return loss_fn


def _grad_hook(fn: GradFn, names: list[str], ex: Extras) -> GradHook:
    def hook(params: Sequence[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        out = fn(dict(zip(names, params)), dict(zip(names, grads)), ex)
        return [out[n] for n in names]

    return hook


def check_start(obj: Objective, model: nn.Module, who: str) -> None:
    """Every model an objective trains or runs must give every weight of the architecture."""
    need = list(model.state_dict().keys())
    for kind, sets in (("start", obj.start), ("frozen", obj.frozen)):
        for name, w in sets.items():
            if any(name == other for ph in obj.phases for other, _ in ph.also):
                continue  # a jointly trained part (e.g. a personal head) needs only the entries it uses
            missing = [k for k in need if k not in w]
            if missing:
                raise KeyError(f"{who}'s objective gives no '{missing[0]}' for its {kind} model '{name}'")
