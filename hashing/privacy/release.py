"""The one accounted release of feature moments that the DP head starts from, and what follows from it.

Each silo releases, once before training, the sum and the sum of outer products of its row-normalised
training features through the Gaussian mechanism (L2 sensitivity sqrt(2) for adding or removing one
image). The pooled mean and covariance give the DP head's frozen projection and its starting rotation
(DP-ITQ): post-processing, no further access to private data.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from ..config import Config
from ..errors import ConfigError, DataError
from .accountant import DPPlan, silo_plan
from .head import DPHashCoder, restandardize

MOMENT_SENSITIVITY = math.sqrt(2.0)  # ||[x, vec(x x^T)]|| for ||x|| = 1: add/remove one image


def row_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise DataError(f"features must be (n, d), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.isfinite(x).all() or (norms <= 0).any():
        raise DataError("features hold NaN/inf or all-zero rows; re-extract them (fedhash caches them per backbone)")
    return x / norms


def add_noise(s1: np.ndarray, s2: np.ndarray, std: float, rng: np.random.Generator, *,
              matrix_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian noise of ``std`` on a sum ``s1`` (d,) and a symmetric sum of outer products ``s2`` (d, d):
    one draw per distinct entry, so the matrix stays symmetric.

    ``matrix_first`` draws the matrix's noise before the vector's: the order the server's client-level
    release has always used (its recorded figures depend on the draws), the silos' own the other."""
    d = len(s1)
    if matrix_first:
        e = np.triu(rng.normal(0.0, std, (d, d)))
        s1 = s1 + rng.normal(0.0, std, d)
    else:
        s1 = s1 + rng.normal(0.0, std, d)
        e = np.triu(rng.normal(0.0, std, (d, d)))
    return s1, s2 + e + np.triu(e, 1).T


def release_moments(x: np.ndarray, noise_multiplier: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Sum and sum of outer products of the row-normalised features ``x`` (n, d), each with Gaussian
    noise of std ``noise_multiplier * sqrt(2)`` (the L2 sensitivity of the pair to adding or removing
    one image). ``count`` is released as is: the silo's size is public, as in DP-SGD's sample rate."""
    if noise_multiplier < 0:
        raise ConfigError(f"moments noise multiplier {noise_multiplier} must be >= 0")
    xn = row_normalise(x)
    n, d = xn.shape
    std = float(noise_multiplier) * MOMENT_SENSITIVITY
    s1 = xn.sum(0)
    s2 = xn.T @ xn
    if std > 0:
        s1, s2 = add_noise(s1, s2, std, rng)
    return {"count": np.array([n], np.float64), "sum": s1, "outer": s2}


def _noise_rng(seed: int, silo_fingerprint: str, what: str) -> np.random.Generator:
    """The release's noise: seeded by the run's seed and the silo, so a simulated scenario is reproducible
    (Opacus runs with secure_mode off likewise; README, "Differential privacy")."""
    h = hashlib.sha256(f"{seed}/{silo_fingerprint}/{what}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def silo_release(cfg: Config, x: np.ndarray, silo_fingerprint: str,
                 silo: str = "the silo") -> tuple[dict[str, np.ndarray], DPPlan | None]:
    """A silo's feature moments for the DP head, once, before training (its clean training features ``x``).

    Sample-level DP: the sums with the Gaussian noise of the silo's plan (accounted with its DP-SGD).
    Client-level DP: the exact means (count 1); the server adds the noise to their sum
    (:func:`server_release`), the privacy unit being the silo."""
    rng = _noise_rng(cfg.seed, silo_fingerprint, "moments")
    if cfg.dp == "sample":
        p = silo_plan(cfg, len(x), silo)
        return release_moments(x, p.moments_noise, rng), p
    m = release_moments(x, 0.0, rng)
    n = float(m["count"][0])
    return {"count": np.array([1.0]), "sum": m["sum"] / n, "outer": m["outer"] / n}, None


def server_release(means: list[Mapping[str, np.ndarray]], noise_multiplier: float,
                   seed: int) -> dict[str, np.ndarray]:
    """Client-level DP: the sum of the silos' means (count 1 each; ``means`` may hold them one by one or
    already summed), noised once for the whole federation (one silo's means move the sums by at most the
    sensitivity)."""
    rng = np.random.default_rng([seed, 7])
    s1, s2 = add_noise(sum(r["sum"] for r in means), sum(r["outer"] for r in means),
                       noise_multiplier * MOMENT_SENSITIVITY, rng, matrix_first=True)
    return {"count": np.array([float(sum(float(r["count"][0]) for r in means))]), "sum": s1, "outer": s2}


def pooled_moments(released: Iterable[Mapping[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, covariance, count) of the union from the silos' released moments."""
    released = list(released)
    if not released:
        raise DataError("no silo released its feature moments; at least one silo must answer")
    n = float(sum(float(r["count"][0]) for r in released))
    if n < 2:
        raise DataError(f"the silos hold {n:.0f} images in all; DP training needs at least 2")
    mean = sum(np.asarray(r["sum"], np.float64) for r in released) / n
    outer = sum(np.asarray(r["outer"], np.float64) for r in released) / n
    cov = outer - np.outer(mean, mean)
    return mean, (cov + cov.T) / 2, int(n)


def spectral_edge(w: np.ndarray) -> float:
    """The release noise's spectral edge, read from a released covariance's eigenvalues ``w``: the noise is
    a symmetric Gaussian matrix, whose spectrum reaches as far below 0 as above, and an exact covariance has
    no negative eigenvalue, so the most negative one is the edge (0 for exact moments)."""
    return max(0.0, -float(np.min(w)))


def tail_replaced(cov: np.ndarray, dims: int, axes: int) -> bool:
    """Whether :func:`principal_basis` replaces PCA's tail for this released covariance: its first tail
    eigenvalue (the ``axes+1``-th) lies above twice the release noise's spectral edge, so the noise has
    left that tail as PCA's."""
    w = np.sort(np.linalg.eigvalsh(cov))[::-1]
    return bool(axes < min(dims, len(w)) and w[axes] > 2.0 * spectral_edge(w))


def principal_basis(cov: np.ndarray, dims: int, axes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(basis d x dims, its released covariance dims x dims): PCA's top ``dims`` axes of ``cov``, or, where
    the release left PCA's tail as it is (:func:`tail_replaced`), the top ``axes`` principal axes completed
    by ``dims - axes`` random orthonormal directions of their complement (``axes >= dims``: plain PCA).

    Why (BENCHMARKS.md, "The noise-helps mystery"; ``benchmarks/dp_itq_noise.py``): past the first few
    components, which hold the differences between the broad categories, PCA picks the directions of the
    largest *within*-category variance, the worst for retrieval (their Fisher ratio is below a random
    direction's). Noise on the covariance mixes those components: PCA of a covariance plus symmetric
    Gaussian noise keeps a component of eigenvalue θ with squared overlap 1 - (edge / 2θ)² (spiked Wigner)
    and dissolves the weaker ones into random-looking directions of the rest. That was why a noisier release
    gave a better head. Where the tail is still PCA's (its first eigenvalue above twice the edge: overlap
    above 0.94), it is replaced by random directions on purpose; where the noise has mixed it, PCA of the
    release is kept, since its mixtures keep some of the components' signal. The random directions depend
    on the release only through the kept axes (post-processing) and on ``seed``."""
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1]
    w, v = w[order], v[:, order]
    replace = axes < dims and w[axes] > 2.0 * spectral_edge(w)
    w = np.clip(w, 0.0, None)
    if not replace:
        return np.ascontiguousarray(v[:, :dims]), np.diag(w[:dims])
    rest = v[:, axes:] @ np.random.default_rng([int(seed), 17]).standard_normal((v.shape[1] - axes, dims - axes))
    basis = np.linalg.qr(np.concatenate([v[:, :axes], rest], axis=1))[0]
    root = np.sqrt(w)[:, None] * (v.T @ basis)  # the released covariance's PSD part in the basis: root.T @ root
    return np.ascontiguousarray(basis), root.T @ root


def dp_itq(mean: np.ndarray, cov: np.ndarray, bits: int, dims: int, seed: int = 0, axes: int | None = None,
           samples: int = 20000, iterations: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA plus ITQ from released moments: (basis d x dims, its covariance dims x dims, rotation bits x bits).

    The basis is :func:`principal_basis` (``axes`` kept principal axes, the rest random directions; None:
    plain PCA). The rotation is ITQ's (FAISS ``ITQMatrix``) fitted on ``samples`` Gaussian draws with the
    released covariance of the basis's first ``bits`` columns: post-processing of the release, no private
    data."""
    import faiss

    from ..baselines import faiss_threads

    basis, basis_cov = principal_basis(cov, dims, dims if axes is None else int(axes), seed)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((samples, bits))
    if not np.count_nonzero(basis_cov - np.diag(np.diag(basis_cov))):  # PCA: the draws it has always used
        y = z * np.sqrt(np.maximum(np.diag(basis_cov)[:bits], 1e-12))
    else:
        lam, u = np.linalg.eigh(basis_cov[:bits, :bits])
        y = (z * np.sqrt(np.maximum(lam, 1e-12))) @ u.T
    with faiss_threads():
        itq = faiss.ITQMatrix(bits)
        itq.max_iter = iterations
        itq.seed = int(seed)
        itq.train(np.ascontiguousarray(y, np.float32))
    rot = faiss.vector_to_array(itq.A).reshape(bits, bits).astype(np.float64)
    return basis, basis_cov, rot


def init_dp_head(head: DPHashCoder, mean: np.ndarray, cov: np.ndarray, seed: int = 0,
                 axes: int | None = None) -> None:
    """Set the DP head's frozen buffers and start its rotation at DP-ITQ's, from released moments
    (``axes``: kept principal axes, :func:`principal_basis`; None: plain PCA)."""
    basis, basis_cov, rot = dp_itq(mean, cov, head.bits, head.hidden, seed, axes)
    proj = head.net[0]
    with torch.no_grad():
        proj.center.copy_(torch.as_tensor(mean, dtype=proj.center.dtype))
        proj.basis.copy_(torch.as_tensor(basis, dtype=proj.basis.dtype))
        proj.basis_cov.copy_(torch.as_tensor(basis_cov, dtype=proj.basis_cov.dtype))
        head.rotation.zero_()
        head.rotation[:, : head.bits] = torch.as_tensor(rot, dtype=head.rotation.dtype)
    restandardize(head)
