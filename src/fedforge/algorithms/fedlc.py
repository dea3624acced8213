"""FedLC — Zhang, Li, Li, Xu, Wu, Ding & Wu, "Federated Learning with Label Distribution Skew via Logits
Calibration", ICML 2022.

Each client calibrates its logits by a class-wise margin that grows as the class gets rarer, before the softmax
cross-entropy, so that the local update does not drag the shared classifier towards the local label distribution:

    L_k(w) = − log [ exp(z_y − τ · n_{k,y}^{−1/4}) / Σ_c exp(z_c − τ · n_{k,c}^{−1/4}) ],   z = f_w(x),

where n_{k,c} is the number of training samples of class c on client k. A class the client does not hold has
n_{k,c} = 0, an infinite margin: its logit drops out of the softmax. The server averages as FedAvg,
w^{t+1} = Σ_k (n_k / n) · w_k, and the global model predicts with the raw logits. With τ = 0 FedLC is FedAvg,
step for step. τ = 1 is the paper's default (and PFLlib's ``-tau 1.0``).

``counts`` chooses whose label counts set the margins: ``local`` (the paper: the client's own n_{k,c}) or
``global`` (PFLlib's ``serverlc.py``: the counts summed over all clients, so every client uses the same margins).
``global`` reads the other clients' label counts from the simulated federation, which a real deployment would have
to collect; it is there to reproduce PFLlib (which counts the labels of a shuffled pass that drops the last
incomplete batch; here every training sample counts).

Deliberate differences from PFLlib: the default margins are the client's own (see above); a class that nobody
holds would give PFLlib an infinite margin and, with τ = 0, a NaN (0·∞); here it is left out of the softmax when
τ > 0 and untouched when τ = 0. With ``counts=global`` (and PFLlib counting every sample) two rounds equal
PFLlib's (``tests/reference/test_pfllib_step.py``, ``test_step_equivalence[fedlc]``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import model_entries
from ..core.params import HyperParams, hp


@dataclass(frozen=True)
class FedLCParams(HyperParams):
    tau: float = hp(1.0, "scale τ of the calibration margin τ·n_c^(−1/4) subtracted from each logit (0 gives FedAvg)", ge=0)
    counts: str = hp("local", "label counts n_c behind the margins: the client's own (paper) or summed over all clients (PFLlib)",
                     choices=("local", "global"))


def calibration(counts: torch.Tensor, tau: float) -> torch.Tensor:
    """The margins τ · n_c^(−1/4) per class (float32, on the counts' device); +inf for classes with n_c = 0 when τ > 0,
    0 everywhere when τ = 0."""
    n = counts.float()
    if tau == 0:
        return torch.zeros_like(n)
    return torch.where(n > 0, tau * n.clamp(min=1).pow(-0.25), torch.full_like(n, float("inf")))


def calibrated_cross_entropy(logits: torch.Tensor, y: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits − margins`` (an infinite margin removes that class from the softmax)."""
    return F.cross_entropy(logits - margins.to(logits.dtype), y)


@register_algorithm("fedlc", summary="FedLC (Zhang et al., ICML 2022): FedAvg with logits calibrated by τ·n_c^(−1/4) in the local loss")
class FedLC(Algorithm):
    paper = "Zhang, Li, Li, Xu, Wu, Ding & Wu, Federated Learning with Label Distribution Skew via Logits Calibration, ICML 2022"
    Params = FedLCParams

    def label_counts(self, rt) -> torch.Tensor:
        if self.hp.counts == "local":
            return rt.class_counts()
        return sum(rt.fed.class_counts(c) for c in range(self.ctx.num_clients))

    def local_update(self, rt, msg, state) -> Update:
        margins = calibration(self.label_counts(rt), self.hp.tau).to(rt.device)

        def loss_fn(model, x, y):
            return calibrated_cross_entropy(model(x), y, margins)

        rt.load(model_entries(msg))
        stats = rt.train(loss_fn=loss_fn)
        return Update(rt.model_state(), state, rt.num_train, stats.as_dict())
