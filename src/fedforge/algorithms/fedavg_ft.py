"""FedAvg-FT — FedAvg, then on-device fine-tuning: Wang, Mathews, Kiddon, Eichner, Beaufays & Ramage, "Federated
Evaluation of On-device Personalization", arXiv:1910.10252, 2019 (as FL-IoT names and runs it).

The federation is FedAvg's, unchanged; after the last round every client personalises the final global model w by
τ epochs of plain SGD on its own training data and is judged with that model:

    rounds:     w_k ← w − η Σ ∇F_k(w_k; ξ)  (E local epochs),   w ← Σ_k (n_k / n) · w_k
    after them: v_k ← w,  v_k ← v_k − η ∇F_k(v_k; ξ)  for τ epochs  (``finetune_epochs``)

The engine records that evaluation with ``"stage": "finetune"``; during federation both views are the global model.
``finetune_epochs = 0`` is FedAvg (the fine-tuned model is the global one).

Defaults: the paper personalises a production language model and gives no epoch count for other tasks. FL-IoT
(``serveravg_ft.py``) fine-tunes in passes of its ``-ls`` (20) local epochs, evaluating on the test split after each
pass, until 50 passes bring no gain, and reports the best test accuracy seen; fedforge runs a fixed τ, 20 by default
(one FL-IoT pass), and never selects on the test split. FL-IoT also starts fine-tuning from each client's model after
its last local update (the final aggregate is never sent back); fedforge starts from the final global model, as the
paper does (``tests/reference/test_fliot_step.py`` shows both).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.algorithm import register_algorithm
from ..core.messages import State, model_entries
from ..core.params import HyperParams, hp
from .fedavg import FedAvg
from .mechanics import proximal_grad_hook


@dataclass(frozen=True)
class FedAvgFTParams(HyperParams):
    finetune_epochs: int = hp(20, "epochs each client fine-tunes the final global model on its own data (FL-IoT's "
                                  "pass of -ls 20 epochs; 0 gives FedAvg)", ge=0)


def fine_tune(rt, msg, epochs: int, mu: float = 0.0, loss=None) -> State:
    """``epochs`` of local SGD on every parameter from the received global model, with the proximal pull
    mu·(v − w) toward it when ``mu`` > 0 (FedProx-FT); returns the fine-tuned model's weights."""
    rt.load(model_entries(msg))
    if epochs > 0:
        params = [p for p in rt.model.parameters() if p.requires_grad]
        hook = proximal_grad_hook([p.detach().clone() for p in params], mu) if mu > 0 else None
        rt.train(loss_fn=loss, params=params, epochs=epochs, grad_hook=hook)
    return rt.model_state()


@register_algorithm("fedavg_ft", summary="FedAvg-FT (FL-IoT; Wang et al., 2019): FedAvg, then each client fine-tunes "
                                         "the global model on its own data")
class FedAvgFT(FedAvg):
    paper = ("Wang, Mathews, Kiddon, Eichner, Beaufays & Ramage, Federated Evaluation of On-device Personalization, "
             "arXiv:1910.10252, 2019")
    Params = FedAvgFTParams
    family = "IoT"
    personalized = True  # judged with the fine-tuned model (the global one until fine-tuning)
    has_global = True
    has_finetune = True

    def finetune(self, rt, msg, state):
        return fine_tune(rt, msg, self.hp.finetune_epochs, loss=self.loss)
