"""The baselines a DP-trained hash must beat at the same ε per silo: LSH and DP-ITQ, each spending the
whole budget of every silo on its one release."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..codes import logits_to_codes
from .accountant import gaussian_noise_for
from .release import dp_itq, pooled_moments, release_moments, row_normalise


@dataclass
class LinearCodes:
    """sign(R P^T (x / ||x|| - c)): the DP baselines' hash function on raw features."""

    center: np.ndarray
    projection: np.ndarray  # (d, bits)

    @property
    def bits(self) -> int:
        return self.projection.shape[1]

    def encode(self, x: np.ndarray) -> np.ndarray:
        return logits_to_codes((row_normalise(x) - self.center) @ self.projection)


def dp_itq_baseline(silo_features: Sequence[np.ndarray], bits: int, target_epsilon: float, delta: float,
                    seed: int = 0, axes: int | None = None) -> tuple[LinearCodes, float]:
    """DP-ITQ: every silo releases its feature moments once through the Gaussian mechanism with the whole
    budget ε (each silo's own guarantee), the sums are pooled, and PCA plus ITQ is fitted on samples
    drawn from them (post-processing; ``axes``: kept principal axes, ``release.principal_basis``). Returns the
    hash and the noise multiplier used."""
    sigma = gaussian_noise_for(target_epsilon, delta)
    rng = np.random.default_rng([seed, 11])
    released = [release_moments(x, sigma, rng) for x in silo_features]
    mean, cov, _ = pooled_moments(released)
    basis, _, rot = dp_itq(mean, cov, bits, bits, seed, axes)
    return LinearCodes(mean, basis @ rot.T), sigma


def dp_lsh_baseline(silo_features: Sequence[np.ndarray], bits: int, target_epsilon: float, delta: float,
                    seed: int = 0) -> tuple[LinearCodes, float]:
    """LSH: a random orthonormal projection (data-independent), centred on the feature mean released
    through the Gaussian mechanism (sensitivity 1 for unit rows) with the whole budget ε."""
    sigma = gaussian_noise_for(target_epsilon, delta)
    rng = np.random.default_rng([seed, 13])
    d = np.asarray(silo_features[0]).shape[1]
    total = sum(row_normalise(x).sum(0) + rng.normal(0.0, sigma, d) for x in silo_features)
    n = sum(len(x) for x in silo_features)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, bits)))
    return LinearCodes(total / n, q), sigma
