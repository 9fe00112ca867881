"""What a run's (ε, δ) allows any attacker, to draw beside what the lab's attacks achieve.

- **Reconstruction robustness** (Balle, Cherubin, Hayes, S&P 2022, Thm. 2; Hayes, Mahloujifar, Balle,
  NeurIPS 2023): a mechanism that is (ε, δ)-DP for neighbouring data sets that differ in one record
  is (η, κ·e^ε + δ)-ReRo: whatever the attacker does, its probability of success is at most
  ``κ e^ε + δ``, where κ is the success of the best data-independent guess under the prior. With a
  uniform prior over a silo's N images and success = "the victim is among the attacker's t guesses",
  κ = t / N. fedhash's accountant (Opacus, add/remove one image) gives ε for adding or removing an
  image; replacing the victim by another image is two such steps (group privacy): (2ε, (1 + e^ε) δ).
- A mechanism is (ε(δ'), δ')-DP for every δ' of its privacy profile, so the bound holds at each; the lab
  reports the smallest over a grid of δ' (:func:`rero_profile`, ε(δ') from fedhash's accountant on the
  silo's whole plan: every DP-SGD step of the run and its moments release).
"""
from __future__ import annotations

import math

import numpy as np


def replace_one(epsilon: float, delta: float) -> tuple[float, float]:
    """(ε, δ) for replacing one record, from (ε, δ) for adding or removing one (group privacy, k = 2)."""
    if math.isinf(epsilon):
        return math.inf, delta
    return 2 * epsilon, (1 + math.exp(epsilon)) * delta


def rero(epsilon: float, delta: float, kappa: float) -> float:
    """The ReRo bound ``min(1, κ e^ε' + δ')`` with (ε', δ') = :func:`replace_one` (ε, δ)."""
    e, d = replace_one(epsilon, delta)
    if math.isinf(e):
        return 1.0
    return float(min(1.0, kappa * math.exp(e) + d))


DELTAS = tuple(float(d) for d in np.logspace(-9, -1, 33))


def rero_profile(history, kappa: float, deltas=DELTAS) -> float:
    """min over δ' of :func:`rero` (ε(δ'), δ', κ), ε(δ') of the composition ``history`` ((noise, sample rate,
    steps) entries) by ``hashing.privacy.accountant.epsilon``."""
    from hashing.privacy import accountant

    return float(min(rero(accountant.epsilon(history, d), d, kappa) for d in deltas))
