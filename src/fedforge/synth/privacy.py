"""Differential-privacy pieces of the client's selection: the exponential mechanism, the Gaussian mechanism's σ,
and the accountant that composes the per-iteration budget (PCEvolve's Algorithm 1).

Composition used (basic / sequential composition of pure and approximate DP, Dwork & Roth 2014, Thm 3.16):

* ``pcevolve``: each iteration spends ε; it is split evenly over the C classes (and over K prototypes per class),
  ε_c = ε / (K·C), because every class's utility depends on every class centre (the contrastive filter), so one
  private image can change all C selections. After T iterations: (T·ε, 0)-DP.
* ``pe``: each class's histogram is built from that class's private images only (disjoint data: parallel
  composition), so each histogram gets the whole per-iteration (ε, δ); after T iterations: (T·ε, T·δ)-DP by
  basic composition. The same T releases are also accounted for by a library accountant, Opacus's PRV accountant
  (Gopi, Lee & Wutschitz, NeurIPS 2021): T Gaussian mechanisms of noise multiplier σ/Δ (σ of the analytic Gaussian
  mechanism below, Δ = 1: one private image casts one vote), no subsampling, at the same total δ = T·δ. PRV rather than
  RDP because without subsampling its numerical composition is essentially exact, where RDP's conversion to (ε, δ)
  loses (RDP gives a larger ε than basic composition for a few iterations). Both values are valid upper bounds, so the
  run is (min of the two, T·δ)-DP; the summary reports the additive and the accountant's ε, and ``epsilon_total`` is
  the smaller. Without Opacus installed only the additive ε is reported.
* ``rf``: no privacy (ε = ∞). ``none``: the private images are never used (ε = 0).
* ``--epsilon inf`` turns the noise off; the summary then says that no privacy is claimed.
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.special import log_ndtr

from ..errors import ConfigError


def exponential_mechanism_probs(utility: np.ndarray, epsilon: float, sensitivity: float = 1.0) -> np.ndarray:
    """Selection probabilities ∝ exp(ε·u / (2Δ)) (McSherry & Talwar 2007); ε = ∞: uniform over the argmax set."""
    u = np.asarray(utility, dtype=np.float64)
    if u.ndim != 1 or len(u) == 0:
        raise ValueError("the exponential mechanism needs a non-empty vector of utilities")
    if math.isinf(epsilon):
        top = u == u.max()
        return top / top.sum()
    logits = epsilon * u / (2.0 * sensitivity)
    logits -= logits.max()
    p = np.exp(logits)
    return p / p.sum()


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """The smallest σ for which adding N(0, σ²) to an L2-sensitivity-Δ query is (ε, δ)-DP.

    The analytic Gaussian mechanism (Balle & Wang, ICML 2018, Thm 8): σ is the root of
    Φ(Δ/(2σ) − εσ/Δ) − e^ε·Φ(−Δ/(2σ) − εσ/Δ) = δ, found by bisection. It holds for every ε > 0, unlike the classical
    σ = Δ·√(2 ln(1.25/δ))/ε (valid only for ε < 1; used by the PE code of EvolveGen), and it is never larger, so PE
    gets no more noise here than in its reference code.
    """
    if math.isinf(epsilon):
        return 0.0
    if not (epsilon > 0 and 0 < delta < 1):
        raise ConfigError(f"the Gaussian mechanism needs ε > 0 and 0 < δ < 1, got ε={epsilon}, δ={delta}.")

    def excess(sigma: float) -> float:
        a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
        return math.exp(log_ndtr(a - b)) - math.exp(epsilon + log_ndtr(-a - b)) - delta

    lo, hi = 1e-6 * sensitivity, 1.0 * sensitivity
    while excess(hi) > 0:
        hi *= 2.0
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-12:
            break
    return hi


def classical_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Δ·√(2 ln(1.25/δ))/ε (Dwork & Roth 2014, Thm A.1; a valid bound only for ε < 1)."""
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


@dataclass
class PrivacyAccountant:
    """Tracks the budget spent by the client's selections under the composition stated in the module docstring."""

    selector: str
    epsilon_per_iteration: float
    num_classes: int
    prototypes: int = 1
    delta_per_iteration: float = 0.0
    iterations_spent: int = 0
    history: list[dict] = field(default_factory=list)
    _accounted: dict[int, float | None] = field(default_factory=dict, repr=False, compare=False)

    @property
    def private(self) -> bool:
        """Whether a finite (ε, δ) guarantee is claimed."""
        return self.selector in ("pcevolve", "pe") and not math.isinf(self.epsilon_per_iteration)

    @property
    def epsilon_per_class(self) -> float:
        if self.selector == "pcevolve":
            return self.epsilon_per_iteration / (self.num_classes * self.prototypes)
        return self.epsilon_per_iteration

    def per_iteration(self) -> tuple[float, float]:
        if self.selector == "none":
            return 0.0, 0.0
        if self.selector == "rf" or math.isinf(self.epsilon_per_iteration):
            return math.inf, 1.0 if self.selector == "rf" else 0.0
        return self.epsilon_per_iteration, (self.delta_per_iteration if self.selector == "pe" else 0.0)

    def spend(self) -> None:
        """Record one selection (one iteration)."""
        self.iterations_spent += 1
        eps, delta = self.spent()
        self.history.append({"iteration": self.iterations_spent, "epsilon": eps, "delta": delta,
                             "epsilon_additive": self.spent_additive()[0], "epsilon_accountant": self.spent_accountant()})

    def spent(self) -> tuple[float, float]:
        """(ε, δ) spent so far: the smaller of the additive and the accountant's ε (both hold), at the additive δ."""
        eps, delta = self.spent_additive()
        acc = self.spent_accountant()
        return (min(eps, acc) if acc is not None else eps), delta

    def spent_additive(self) -> tuple[float, float]:
        """(T·ε, T·δ): basic composition of the T iterations (the module docstring)."""
        e, d = self.per_iteration()
        t = self.iterations_spent
        if t == 0:
            return 0.0, 0.0
        return (e * t if not math.isinf(e) else math.inf), min(1.0, d * t)

    @property
    def accounted(self) -> bool:
        """Whether a library accountant applies: PE's Gaussian noise on, with Opacus installed."""
        return self.selector == "pe" and self.private and importlib.util.find_spec("opacus") is not None

    def spent_accountant(self) -> float | None:
        """ε of the T Gaussian releases by Opacus's PRV accountant at the additive δ (PE only; None where it does not
        apply or the additive δ reaches 1, which guarantees nothing)."""
        t = self.iterations_spent
        if not self.accounted:
            return None
        if t == 0:
            return 0.0
        if t not in self._accounted:
            delta = self.delta_per_iteration * t
            self._accounted[t] = None if delta >= 1 else pe_accountant_epsilon(
                gaussian_sigma(self.epsilon_per_iteration, self.delta_per_iteration), t, delta)
        return self._accounted[t]

    def summary(self) -> dict:
        e, d = self.per_iteration()
        eps, delta = self.spent()
        if self.selector == "none":
            note = "the private images were never used (iteration 0 only): nothing about them left the client"
            composition = "none"
        elif self.selector == "rf":
            note = "rf is a plain distance filter without noise: no differential privacy is claimed"
            composition = "none (non-private)"
        elif math.isinf(self.epsilon_per_iteration):
            note = "--epsilon inf: the noise is off, so no differential privacy is claimed"
            composition = "none (noise off)"
        elif self.selector == "pcevolve":
            note = (f"exponential mechanism: each iteration's ε = {e:g} split evenly over {self.num_classes} classes"
                    f"{f' and {self.prototypes} prototypes' if self.prototypes > 1 else ''} (ε_c = {self.epsilon_per_class:g}), "
                    f"sequential composition over {self.iterations_spent} iterations")
            composition = "sequential (classes and iterations)"
        else:
            acc = self.spent_accountant()
            note = (f"Gaussian mechanism on disjoint per-class vote histograms (parallel composition over classes), "
                    f"each iteration ({e:g}, {d:g})-DP, over {self.iterations_spent} iterations ε = "
                    f"{self.spent_additive()[0]:g} by basic composition"
                    + (f", {acc:.4g} by Opacus's PRV accountant (the smaller holds)" if acc is not None else
                       " (install fedforge[dp] for Opacus's PRV accountant)" if not self.accounted else ""))
            composition = "parallel over classes, sequential over iterations"
        return {"selector": self.selector, "private": self.private, "epsilon_per_iteration": e,
                "delta_per_iteration": d, "epsilon_per_class": self.epsilon_per_class if self.selector == "pcevolve" else None,
                "iterations": self.iterations_spent, "epsilon_total": eps, "delta_total": delta,
                "epsilon_additive": self.spent_additive()[0], "epsilon_accountant": self.spent_accountant(),
                "accountant": "prv (opacus)" if self.accounted else None,
                "composition": composition, "note": note}


def pe_accountant_epsilon(sigma: float, iterations: int, delta: float) -> float:
    """ε of ``iterations`` Gaussian mechanisms of noise multiplier ``sigma`` (sensitivity 1, no subsampling) at ``delta``,
    by Opacus's PRV accountant."""
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(float(sigma), 1.0, int(iterations))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))
