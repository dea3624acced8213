"""Partial sharing, written once: a model is split into entries that are exchanged and entries that stay local.

FedPer (share the body), LG-FedAvg (share the head), FedRep (share the body, head first), FedBABU (share the
body, head frozen), FedBN (share all but the normalisation layers) and FedRoD (share the generic model, keep a
personal head) all differ only in *which* state-dict entries cross the network and in how a client trains.
:class:`PartialSharing` does the rest: the server holds the shared entries and averages them (sample-weighted,
as in FedAvg), a client's state holds the entries it keeps (parameters **and** buffers, e.g. BatchNorm running
statistics), and the upload is exactly the shared entries, so ``bytes_up`` measures what the method sends.

Subclasses implement :meth:`PartialSharing.shares` (or :meth:`PartialSharing.select_shared`) and, where training differs
from plain local SGD, :meth:`PartialSharing.phases` (the SGD passes of an :class:`~fedforge.core.objective.Objective`,
e.g. which parameters each trains) and :meth:`PartialSharing.extra_state`. The local update is then one objective,
run one client at a time or by the vectorized executor. This module starts with ``_``, so it is not registered as an
algorithm.
"""
from __future__ import annotations

from functools import reduce
from typing import TYPE_CHECKING

import torch.nn as nn

from ..core.algorithm import Algorithm, Update
from ..core.messages import Message, State, model_entries
from ..core.objective import MAIN, Objective, Phase, plain_loss
from ..core.training import TrainStats
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..core.runtime import ClientRuntime

_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t for t in (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)


def norm_entries(model: nn.Module) -> frozenset[str]:
    """State-dict names (weights, biases, running statistics, step counters) of every normalisation layer."""
    names: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _NORM_TYPES):
            prefix = f"{mod_name}." if mod_name else ""
            names.update(prefix + k for k in mod.state_dict())
    return frozenset(names)


class PartialSharing(Algorithm):
    """FedAvg over the entries that :meth:`shares` selects; every other entry is the client's own state."""

    personalized = True
    has_global = False

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self._shared: dict[str, frozenset[str]] = {}
        shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        for arch in ctx.arch_set:
            model = ctx.build_model(arch)
            sd = model.state_dict()
            self._shared[arch] = frozenset(self.select_shared(model))
            shapes[arch] = {k: tuple(sd[k].shape) for k in self._shared[arch]}
            if not self._shared[arch]:
                raise ConfigError(f"{self.name} shares no weight of the {arch} model, so clients would never "
                                  f"communicate; use a model whose state-dict names start with 'features.' and 'head.'.")
        first = ctx.arch_set[0]
        for arch in ctx.arch_set[1:]:
            if shapes[arch] != shapes[first]:
                diff = sorted(set(shapes[arch].items()) ^ set(shapes[first].items()))
                raise ConfigError(
                    f"{self.name} exchanges {', '.join(sorted(shapes[first]))[:120]}, but the {arch} and {first} models "
                    f"disagree on them (e.g. {diff[0][0]}); give every architecture the same feature dimension "
                    f"and number of classes.")

    # ------------------------------------------------------------------------------------ what is shared
    def shares(self, name: str) -> bool:
        """Whether state-dict entry ``name`` is exchanged with the server (by name: ``features.``/``head.``)."""
        raise NotImplementedError

    def select_shared(self, model: nn.Module) -> set[str]:
        """The exchanged entries of ``model`` (override when the choice depends on layer types, as in FedBN)."""
        return {k for k in model.state_dict() if self.shares(k)}

    def shared_keys(self, arch: str | None = None) -> frozenset[str]:
        return self._shared[arch or self.ctx.archs[0]]

    def split(self, params: State, arch: str) -> tuple[State, State]:
        """(shared, kept) parts of a model's state."""
        keys = self._shared[arch]
        return ({k: v for k, v in params.items() if k in keys}, {k: v for k, v in params.items() if k not in keys})

    # -------------------------------------------------------------------------------------- server side
    def init_server(self) -> State:
        shared, _ = self.split(super().init_server(), self.ctx.archs[0])
        return shared

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        keys = self.shared_keys()
        return {k: v for k, v in server.items() if k in keys}

    # -------------------------------------------------------------------------------------- client side
    def init_client(self, rt: ClientRuntime) -> State:
        _, kept = self.split(rt.initial_params(), rt.arch)
        return {**kept, **self.init_extra(rt)}

    def init_extra(self, rt: ClientRuntime) -> State:
        """Further personal entries (names with a ``/``) a client starts with, e.g. FedRoD's personal head."""
        return {}

    def phases(self, rt: ClientRuntime) -> tuple[Phase, ...]:
        """The SGD passes of local training (default: one, every parameter, cross-entropy or :meth:`loss`)."""
        return (Phase(loss=plain_loss(self.loss)),)

    def extra_state(self, rt: ClientRuntime, weights: dict[str, State]) -> State:
        """Further personal entries to keep (names with a ``/``), given the trained weights of each model."""
        return {}

    def vector_objective(self, rt: ClientRuntime, msg: Message, state: State) -> Objective:
        """Start from the client's own entries completed (or overridden) by the received shared ones; train in
        :meth:`phases`; upload the shared entries and keep the rest (and :meth:`extra_state`)."""
        return Objective(start={MAIN: {**model_entries(state), **model_entries(msg)}}, phases=self.phases(rt),
                         finish=self.finish)

    def finish(self, rt: ClientRuntime, weights: dict[str, State], stats: list[TrainStats]) -> Update:
        shared, kept = self.split(weights[MAIN], rt.arch)
        return Update(shared, {**kept, **self.extra_state(rt, weights)}, rt.num_train,
                      reduce(TrainStats.merge, stats).as_dict())

    def personal_params(self, msg: Message, state: State) -> Message:
        """The client's model: the received shared entries completed (or overridden) by its own entries."""
        return {**model_entries(msg), **model_entries(state)}

