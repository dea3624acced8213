"""Privacy accounting and the Gaussian mechanism's calibration."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from fedforge.errors import ConfigError
from fedforge.synth import PrivacyAccountant, exponential_mechanism_probs, gaussian_sigma
from fedforge.synth.privacy import classical_gaussian_sigma


def test_pcevolve_budget_split_over_classes_and_composed_over_iterations():
    acc = PrivacyAccountant("pcevolve", 0.2, num_classes=10)
    assert acc.epsilon_per_class == pytest.approx(0.02)
    for _ in range(20):
        acc.spend()
    eps, delta = acc.spent()
    assert eps == pytest.approx(4.0) and delta == 0
    s = acc.summary()
    assert s["private"] and s["epsilon_total"] == pytest.approx(4.0) and s["iterations"] == 20
    assert PrivacyAccountant("pcevolve", 0.2, 10, prototypes=2).epsilon_per_class == pytest.approx(0.01)


def test_pe_budget_parallel_over_classes():
    acc = PrivacyAccountant("pe", 0.5, num_classes=10, delta_per_iteration=0.01)
    assert acc.epsilon_per_class == 0.5
    for _ in range(3):
        acc.spend()
    assert acc.spent_additive() == (pytest.approx(1.5), pytest.approx(0.03))
    assert acc.spent()[1] == pytest.approx(0.03)
    assert "parallel" in acc.summary()["composition"]


def test_pe_reports_the_additive_and_opacus_prv_epsilon_and_claims_the_smaller():
    pytest.importorskip("opacus", reason="the accountant is Opacus's (pip install 'fedforge[dp]')")
    from opacus.accountants import PRVAccountant

    acc = PrivacyAccountant("pe", 0.5, num_classes=10, delta_per_iteration=0.01)
    for _ in range(8):
        acc.spend()
    prv = PRVAccountant()  # Opacus directly: 8 Gaussian mechanisms of the analytic σ, no subsampling, δ = 8 · 0.01
    prv.history = [(gaussian_sigma(0.5, 0.01), 1.0, 8)]
    want = prv.get_epsilon(delta=0.08)
    s = acc.summary()
    assert s["epsilon_additive"] == pytest.approx(4.0) and s["delta_total"] == pytest.approx(0.08)
    assert s["epsilon_accountant"] == pytest.approx(want, rel=1e-9) and s["accountant"] == "prv (opacus)"
    assert s["epsilon_accountant"] < s["epsilon_additive"]  # composing Gaussians beats adding their ε over 8 rounds
    assert s["epsilon_total"] == s["epsilon_accountant"] and "PRV" in s["note"]
    assert [h["epsilon_additive"] for h in acc.history] == pytest.approx([0.5 * t for t in range(1, 9)])
    one = PrivacyAccountant("pe", 1.0, num_classes=2, delta_per_iteration=1e-3)
    one.spend()  # one release: the analytic Gaussian's ε is exact, PRV's numerical bound is a little above it
    assert one.summary()["epsilon_accountant"] >= 1.0 and one.spent()[0] == pytest.approx(1.0)
    assert PrivacyAccountant("pcevolve", 0.2, 10).summary()["epsilon_accountant"] is None  # exponential mechanism


def test_infinite_epsilon_and_non_private_selectors():
    acc = PrivacyAccountant("pcevolve", math.inf, 4)
    acc.spend()
    assert math.isinf(acc.spent()[0]) and not acc.private and "noise is off" in acc.summary()["note"]
    rf = PrivacyAccountant("rf", 1.0, 4)
    rf.spend()
    assert math.isinf(rf.spent()[0]) and not rf.private
    none = PrivacyAccountant("none", 1.0, 4)
    assert none.spent() == (0.0, 0.0)


def test_analytic_gaussian_sigma_is_tight_and_below_the_classical_one():
    for eps, delta in ((0.2, 0.01), (1.0, 1e-5), (4.0, 1e-3)):
        s = gaussian_sigma(eps, delta)

        def lhs(sig):
            a, b = 1 / (2 * sig), eps * sig
            return norm.cdf(a - b) - math.exp(eps) * norm.cdf(-a - b)

        assert lhs(s) <= delta * (1 + 1e-6)  # (ε, δ)-DP holds at σ
        assert lhs(s * 0.99) > delta  # and σ is the smallest that does
        if eps < 1:
            assert s <= classical_gaussian_sigma(eps, delta)
    assert gaussian_sigma(math.inf, 0.01) == 0.0
    with pytest.raises(ConfigError):
        gaussian_sigma(0.0, 0.01)


def test_exponential_mechanism_probabilities():
    p = exponential_mechanism_probs(np.array([0.0, 1.0]), 2.0)
    assert p[1] / p[0] == pytest.approx(math.e)
    assert exponential_mechanism_probs(np.array([0.3, 0.3, 0.1]), math.inf).tolist() == [0.5, 0.5, 0.0]
