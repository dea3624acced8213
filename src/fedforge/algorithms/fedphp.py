"""FedPHP — Li, Zhan, Shao, Li & Song, "FedPHP: Federated Personalization with Inherited Private Models",
ECML PKDD 2021.

Every client keeps an inherited private model (HPM) v_k, a temporal ensemble of the models it trained, and uses it
to supervise the next round's training of the downloaded global model w^t:

    w_k ← SGD from w^t on   (1 − λ) · CE(h(f_w(x)), y) + λ · MMD²(f_w(x), f_{v_k}(x))     (v_k frozen)
    v_k ← μ_t · v_k + (1 − μ_t) · w_k,      μ_t = μ · (t − 1) / (T − 1)   (t = 1 … T: grows from 0 to μ)
    server: w^{t+1} = Σ_k (n_k / n) · w_k

MMD² uses RBF kernels exp(−‖a − b‖² / (2a)), a ∈ {10, 15, 20, 50}, on the feature vectors (PFLlib's kernel, shared
with FedCP). A client is judged with its HPM (the personalized model, as in the authors' code) and with the global
model. v_k starts from the initial weights, like w⁰. With λ = 0 and μ = 0 the global model is FedAvg's step for
step and the HPM is the client's last locally trained model.

Defaults: λ = 0.1 with the MMD transfer and μ = 0.9, the authors' settings (``train_dir.py``'s ``reg_lamb`` 0.1
for "MMD", ``generate_mu``'s 0.9 cap). PFLlib's defaults (``-mu 0``, ``-lam 1``) make the HPM a copy of the
trained model and multiply the cross-entropy by 1 − λ = 0, so the model learns from the MMD term alone (issue
#102); they are not used here.

Deliberate differences from PFLlib (``clientphp.py``): the personalized view is the HPM (PFLlib evaluates the
locally trained model of the round's clients and the global model of the others); μ_t counts rounds, as PFLlib
does (PFLlib's μ·R/gr over its rounds R = 0 … gr; the authors count the client's own participations against the
expected number and cap μ at 0.9); the HPM update covers every floating
state entry (PFLlib: parameters only). With PFLlib's ``-gr`` = T − 1 two rounds (trained models and HPMs) equal
PFLlib's (``tests/reference/test_pfllib_step.py``, ``test_step_equivalence[fedphp]``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, under, with_prefix
from ..core.params import HyperParams, hp
from .fedcp import MMD_BANDWIDTHS
from .mechanics import mix_params, mmd_rbf

HPM = "hpm"


@dataclass(frozen=True)
class FedPHPParams(HyperParams):
    lam: float = hp(0.1, "weight λ of the MMD transfer from the HPM; the cross-entropy gets 1 − λ (0: FedAvg's loss)", ge=0, le=1)
    mu: float = hp(0.9, "HPM momentum μ of the last round; round t of T uses μ·(t−1)/(T−1) (0: the HPM is the last trained model)", ge=0, le=1)


def hpm_momentum(mu: float, rnd: int, rounds: int) -> float:
    """μ_t = μ · (t − 1) / (T − 1) for round t = 1 … T (0 in a one-round run)."""
    return mu * (rnd - 1) / max(rounds - 1, 1)


@register_algorithm("fedphp", summary="FedPHP (Li et al., ECML PKDD 2021): inherited private model (moving average) guides local training by MMD")
class FedPHP(Algorithm):
    paper = "Li, Zhan, Shao, Li & Song, FedPHP: Federated Personalization with Inherited Private Models, ECML PKDD 2021"
    Params = FedPHPParams
    personalized = True
    has_global = True

    def init_client(self, rt) -> State:
        return with_prefix(rt.initial_params(), HPM)

    def local_update(self, rt, msg: Message, state: State) -> Update:
        lam = self.hp.lam
        hpm = under(state, HPM)
        loss_fn = None
        if lam > 0:
            teacher = rt.aux_model("fedphp/hpm")
            rt.load(hpm, teacher)
            teacher.requires_grad_(False)
            teacher.train()

            def loss_fn(model, x, y):
                z = model.features(x)
                with torch.no_grad():
                    zp = teacher.features(x)
                return (1.0 - lam) * F.cross_entropy(model.head(z), y) + lam * mmd_rbf(z, zp, MMD_BANDWIDTHS)

        rt.load(model_entries(msg))
        stats = rt.train(loss_fn=loss_fn)
        trained = rt.model_state()
        m = hpm_momentum(self.hp.mu, rt.round, self.ctx.rounds)
        new_hpm = mix_params([hpm, trained], [m, 1.0 - m]) if m > 0 else trained
        return Update(trained, with_prefix(new_hpm, HPM), rt.num_train, {**stats.as_dict(), "hpm_momentum": m})

    def personal_params(self, msg: Message, state: State) -> Message:
        return under(state, HPM)
