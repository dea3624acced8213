"""The algorithm contract: an algorithm states only what differs from FedAvg.

Server side (main process): ``init_server``, ``broadcast``, ``aggregate``, ``server_metrics``.
Client side (any worker, given a :class:`~fedforge.core.runtime.ClientRuntime`): ``init_client``,
``local_update``, ``evaluate`` and, for methods that fine-tune after federation, ``finetune``.
All state is explicit: the server state and each client's state are flat dicts of tensors, kept by the
engine (client state in a state store), never in live per-client objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, TypeVar

import torch

from ..errors import ConfigError
from ..registry import Registry
from .context import Context
from .messages import Message, State, detach_clone, model_entries, weighted_average
from .objective import MAIN, Objective, Phase, plain_loss, run_objective
from .params import HyperParams
from .training import EvalCounts

if TYPE_CHECKING:
    from .runtime import ClientRuntime

ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm", "see `fedforge list algorithms`",
                                                    populate="fedforge.algorithms")


@dataclass
class Update:
    """What one client's local update returns: the upload (counted), its new state (kept locally) and metrics."""

    upload: Message
    state: State | None
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)
    cid: int = -1


@dataclass
class EvalResult:
    cid: int
    counts: dict[str, EvalCounts]  # "global" and/or "personalized" (and any extra views)
    metrics: dict[str, float] = field(default_factory=dict)


# families, in the order listings show them: (key, title)
FAMILIES: tuple[tuple[str, str], ...] = (
    ("tFL", "Traditional FL (one global model)"),
    ("pFL", "Personalized FL (each client judged with its own model)"),
    ("HtFL", "Heterogeneous-model FL (clients may own different architectures)"),
    ("generator", "Generator-assisted FL (a pretrained generator on the server lends knowledge)"),
    ("IoT", "FL for IoT devices (FL-IoT)"),
)


def family_of(cls: type[Algorithm]) -> str:
    """An algorithm's family: its explicit ``family``, else from its flags (heterogeneous → HtFL, personalized → pFL,
    else tFL)."""
    if cls.family:
        return cls.family
    return "HtFL" if cls.heterogeneous else "pFL" if cls.personalized else "tFL"


_A = TypeVar("_A", bound="Algorithm")


def register_algorithm(name: str, **meta: Any) -> Callable[[type[_A]], type[_A]]:
    """Class decorator: register an Algorithm subclass under ``name``."""

    def deco(cls: type[_A]) -> type[_A]:
        cls.name = name
        ALGORITHMS.add(name, cls, **meta)
        return cls

    return deco


class Algorithm:
    """FedAvg's behaviour by default; subclasses override the hooks that differ."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Params: ClassVar[type[HyperParams]] = HyperParams
    personalized: ClassVar[bool] = False  # each client is judged with its own model
    has_global: ClassVar[bool] = True  # there is a global model to judge each client with
    heterogeneous: ClassVar[bool] = False  # works when clients own different architectures
    has_finetune: ClassVar[bool] = False  # runs ``finetune`` on every client after the last round
    family: ClassVar[str] = ""  # one of FAMILIES' keys; "" derives it from the flags above (see family_of)

    def __init__(self, hp: HyperParams, ctx: Context):
        self.hp = hp
        self.ctx = ctx
        if not ctx.homogeneous and not self.heterogeneous:
            raise ConfigError(
                f"{self.name} exchanges whole models, so every client needs the same architecture; "
                f"use a single model, or a heterogeneous-model algorithm (see `fedforge list algorithms`).")

    @classmethod
    def create(cls, params: dict[str, Any] | None, ctx: Context) -> Algorithm:
        return cls(cls.Params.from_dict(params, owner=cls.name), ctx)

    # ----------------------------------------------------------------------------------- server side
    def init_server(self) -> State:
        """Initial server state: the global model's weights (all of ``state_dict``, buffers included)."""
        model = self.ctx.build_model()
        return detach_clone(model.state_dict())

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        """The message client ``cid`` receives at the start of round ``rnd``: by default the global model."""
        return model_entries(server)

    def eval_message(self, server: State, cid: int) -> Message:
        """The message a client is evaluated with (by default what it would receive next round)."""
        return self.broadcast(server, cid, -1)

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        """Sample-weighted average of the uploaded tensors, written over the server state."""
        if not updates:
            return server
        avg = weighted_average([u.upload for u in updates], [u.weight for u in updates])
        return {**server, **avg}

    def server_metrics(self, server: State) -> dict[str, float]:
        """Extra scalars recorded with each evaluation (e.g. a server-side loss)."""
        return {}

    def artifacts(self, server: State) -> dict[str, Any]:
        """Images to keep with each evaluation, name → uint8 HWC array (the engine writes
        ``artifacts/<name>_round<r>.png`` into the run directory; e.g. a generator's samples)."""
        return {}

    # ----------------------------------------------------------------------------------- client side
    def init_client(self, rt: ClientRuntime) -> State:
        """A client's state before it first takes part (default: none)."""
        return {}

    def local_update(self, rt: ClientRuntime, msg: Message, state: State) -> Update:
        """Run :meth:`vector_objective` one client at a time (by default: load the received weights, train on local
        data with :meth:`loss`, upload the whole model)."""
        return run_objective(rt, self.vector_objective(rt, msg, state))

    loss = None  # a LossFn (model, x, y) -> loss; None means cross-entropy

    # Opt-in for the vectorized executor (core/vectorized.py): set True in the class whose ``local_update`` is
    # :func:`~fedforge.core.objective.run_objective` of its ``vector_objective`` and whose losses are vmappable; the
    # executor then trains many clients at once with torch.func. A subclass that changes the update must set it again.
    vectorizable: ClassVar[bool] = False

    def vector_objective(self, rt: ClientRuntime, msg: Message, state: State) -> Objective:
        """The local update as an :class:`~fedforge.core.objective.Objective` (pure losses over phases), which both
        the sequential loop (:meth:`local_update`) and the vectorized executor run. Default: FedAvg's update, SGD on
        :meth:`loss` (cross-entropy) from the received model, uploading the trained model."""
        return Objective(start={MAIN: model_entries(msg)}, phases=(Phase(loss=plain_loss(self.loss)),),
                         finish=lambda rt, weights, stats: Update(weights[MAIN], state, rt.num_train, stats[0].as_dict()))

    def global_params(self, msg: Message) -> Message:
        return model_entries(msg)

    def personal_params(self, msg: Message, state: State) -> Message:
        """Weights of the client's personal model (personalized methods override or keep them in state)."""
        return {**model_entries(msg), **model_entries(state)}

    def predict(self, rt: ClientRuntime, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = rt.model(x)
        return out

    def evaluate(self, rt: ClientRuntime, msg: Message, state: State) -> dict[str, EvalCounts]:
        out: dict[str, EvalCounts] = {}
        if self.has_global:
            rt.load(self.global_params(msg))
            out["global"] = rt.evaluate(lambda x: self.predict(rt, x))
        if self.personalized:
            rt.load(self.personal_params(msg, state))
            out["personalized"] = rt.evaluate(lambda x: self.predict(rt, x))
        return out

    def finetune(self, rt: ClientRuntime, msg: Message, state: State) -> State:
        """After the last round (``has_finetune``): adapt the client's model and return its new state."""
        return state
