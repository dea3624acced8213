"""Local — no federation: every client trains its own model on its own data and nothing is exchanged.

The baseline that personalized methods must beat (PFLlib's "Local"): each client starts from the same
initial weights and keeps training its model across rounds; it is evaluated on its own test split.
"""
from __future__ import annotations

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries
from ..core.objective import MAIN, Objective, Phase


@register_algorithm("local", summary="Local training only (no communication): the personalized baseline")
class Local(Algorithm):
    paper = "baseline: each client trains alone"
    personalized = True
    has_global = False
    heterogeneous = True

    def init_server(self) -> State:
        return {}

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return {}

    def init_client(self, rt) -> State:
        return rt.initial_params()

    # plain cross-entropy SGD from the client's own model: the vectorized executor can batch clients
    vectorizable = True

    def vector_objective(self, rt, msg: Message, state: State) -> Objective:
        return Objective(start={MAIN: model_entries(state)}, phases=(Phase(),),
                         finish=lambda rt, w, stats: Update({}, w[MAIN], rt.num_train, stats[0].as_dict()))

    def personal_params(self, msg: Message, state: State) -> Message:
        return model_entries(state)
