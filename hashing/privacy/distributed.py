"""Distributed client-level DP (``dp = "client"`` under ``secagg = true``): each silo clips its own update and
adds its share of the Gaussian noise, so the securely aggregated sum carries the calibrated noise and the
server, which sees only that sum, never holds an update without it.

With m silos in a sum, silo i sends ``clip(u_i) + N(0, (z C)^2 / m)``: the m shares add up to noise of std
``z C`` on the sum, the noise Flower's central wrapper adds (std ``z C / m`` on the mean). If only m' < m
silos contribute (the others dropped out), the sum carries ``m' / m`` of the variance: the round is a
Gaussian mechanism of multiplier ``z sqrt(m' / m)`` (:func:`effective_multiplier`), which the server's
ledger accounts. The noise comes from the operating system's entropy (``secrets``), never from a seed the
server knows.
"""
from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

import numpy as np

from .release import MOMENT_SENSITIVITY, add_noise


def secret_rng() -> np.random.Generator:
    """A generator seeded from the operating system's entropy: noise the server cannot regenerate."""
    return np.random.default_rng(secrets.randbits(128))


def clip_and_share(update: Mapping[str, np.ndarray], clip: float, noise_multiplier: float, silos: int,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The update (arrays, as one vector) clipped to L2 norm ``clip``, plus this silo's share of the noise."""
    norm = math.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update.values()))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip / math.sqrt(silos)
    return {k: np.asarray(u, np.float64) * factor + rng.normal(0.0, std, np.shape(u)) for k, u in update.items()}


def moments_share(means: Mapping[str, np.ndarray], noise_multiplier: float, silos: int,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A silo's exact feature means (count 1) plus its share of the moments release's noise (sensitivity
    ``MOMENT_SENSITIVITY``: one silo's means of unit rows)."""
    std = noise_multiplier * MOMENT_SENSITIVITY / math.sqrt(silos)
    s1, s2 = add_noise(np.asarray(means["sum"], np.float64), np.asarray(means["outer"], np.float64), std, rng)
    return {"count": np.asarray(means["count"], np.float64), "sum": s1, "outer": s2}


def effective_multiplier(noise_multiplier: float, contributors: int, silos: int) -> float:
    """The noise multiplier a sum of ``contributors`` of ``silos`` shares carries."""
    return float(noise_multiplier) * math.sqrt(contributors / silos)
