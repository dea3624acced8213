"""FedBABU — Oh, Kim & Yun, "FedBABU: Toward Enhanced Representation for Federated Image Classification", ICLR 2022.

The head h⁰ is fixed at its random initialisation for the whole federation (identical on every client and never
sent); only the body is trained and averaged:

    φ_k ← φ_k − η ∇_φ ℓ_k(h⁰ ∘ φ_k)  (local epochs),   φ ← Σ_k (n_k / n) · φ_k.

After the last round every client fine-tunes the whole model (body and head) for τ_f epochs on its own data
(``finetune_epochs``, 5 in the paper's evaluation; PFLlib uses 10) and is judged with that personal model; the
engine records that evaluation with ``"stage": "finetune"``. During federation the global model (φ, h⁰) is
judged for both views, since nothing is personal before fine-tuning.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.algorithm import Algorithm, register_algorithm
from ..core.messages import model_entries
from ..core.objective import Phase, plain_loss
from ..core.params import HyperParams, hp
from ._partial import PartialSharing
from .mechanics import is_body, train_head


@dataclass(frozen=True)
class FedBABUParams(HyperParams):
    finetune_epochs: int = hp(5, "epochs each client fine-tunes after the last round (paper's tau_f)", ge=1)
    finetune_part: str = hp("full", "what fine-tuning updates: the full model (paper) or the head only",
                            choices=("full", "head"))


@register_algorithm("fedbabu", summary="FedBABU (Oh et al., ICLR 2022): frozen random head, body aggregated, fine-tune at the end")
class FedBABU(PartialSharing):
    paper = "Oh, Kim & Yun, FedBABU: Toward Enhanced Representation for Federated Image Classification, ICLR 2022"
    Params = FedBABUParams
    has_global = True
    has_finetune = True

    def shares(self, name: str) -> bool:
        return is_body(name)

    def init_server(self):
        # the whole initial model: the body is averaged each round, the frozen head is only used to evaluate
        return Algorithm.init_server(self)

    def eval_message(self, server, cid):
        return model_entries(server)

    vectorizable = True  # one SGD pass on the body (the head stays h⁰): the vectorized executor can batch clients

    def phases(self, rt):
        return (Phase(loss=plain_loss(self.loss), train=is_body),)

    def finetune(self, rt, msg, state):
        rt.load(model_entries(msg))
        if self.hp.finetune_part == "head":
            train_head(rt, self.hp.finetune_epochs)  # body frozen: on features computed once where exact
        else:
            rt.train(loss_fn=self.loss, params=list(rt.model.parameters()), epochs=self.hp.finetune_epochs)
        return rt.model_state()
