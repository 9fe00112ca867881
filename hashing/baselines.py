"""Unsupervised hashing baselines on fixed float features, built on FAISS transforms.

Each baseline is a small fitted object with ``.bits`` and ``.encode(x)`` ->
packed uint8 codes ``(n, bits/8)`` in the fedhash convention (bit k in byte
k // 8 at position k % 8, see :mod:`hashing.codes`), bit = 1 where the
projection is > 0.  Build one with :func:`fit_baseline`.

* ``lsh``: centre with the training mean, project with a random orthonormal
  matrix (``faiss.RandomRotationMatrix`` seeded with ``seed``, the transform
  ``faiss.IndexLSH(d, bits, rotate_data=True, train_thresholds=False)`` uses
  internally), keep the sign.  Encoding goes through ``IndexLSH.sa_encode``,
  whose bit layout is ours (LSB first, 1 where value >= 0).  IndexLSH itself
  does not centre and always seeds its rotation with 5; we centre first (else
  every bit of non-negative features such as post-ReLU activations tends to
  be 1) and re-seed the rotation.  When ``bits > d`` the rows are not all
  orthogonal (FAISS builds a d_out x d_out rotation and keeps d_in columns).
* ``pca``: ``faiss.PCAMatrix(d, bits)`` (it centres with the training mean),
  sign of the top-``bits`` principal components.
* ``itq``: standard ITQ (Gong & Lazebnik 2011): centre, PCA to ``bits`` dims,
  then ``faiss.ITQMatrix`` (50 iterations of the orthogonal Procrustes
  rotation, random start seeded with ``seed``), sign.  Not
  ``faiss.ITQTransform``: that one also L2-normalises every centred vector
  before PCA and applies PCA without its bias, which departs from the paper;
  it is kept here as ``itq_faiss`` for comparison.

FAISS work here runs with one OpenMP thread (:func:`faiss_threads`): the
matrices are small, so threads only add spin-wait overhead (100x slower fits
on a busy 2-core machine), and one thread keeps the iterative ITQ fit
bit-for-bit reproducible, since BLAS reductions with different thread counts
round differently and ITQ amplifies that into different local optima.

The float-feature ceiling is not a code: use
:func:`hashing.metrics.float_retrieval_metrics` (cosine distance).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Iterator

import faiss
import numpy as np

from . import codes as _codes
from .errors import CodeLengthError, ConfigError, DataError

BASELINES = ("lsh", "pca", "itq", "itq_faiss")
ITQ_ITERATIONS = 50
FAISS_THREADS = 1


@contextlib.contextmanager
def faiss_threads(n: int = FAISS_THREADS) -> Iterator[None]:
    """Run the block with ``n`` FAISS OpenMP threads, restoring the previous count after."""
    prev = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(prev)


def _single_threaded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with faiss_threads():
            return fn(*args, **kwargs)

    return wrapper


def _feats(x: np.ndarray, d: int | None = None, what: str = "features") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"{what} must be a 2-D (n, d) array, got shape {x.shape}")
    if x.dtype.kind not in "fiub":
        raise DataError(f"{what} must be numeric, got {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if d is not None and x.shape[1] != d:
        raise DataError(f"{what} have {x.shape[1]} dimensions, the baseline was fitted on {d}")
    if not np.isfinite(x).all():
        raise DataError(f"{what} contain NaN or inf; clean the features before hashing")
    return x


def _matrix(vt: faiss.LinearTransform) -> np.ndarray:
    return faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in)


@dataclass
class Baseline:
    """A fitted baseline: ``encode(x)`` -> packed codes; ``project(x)`` -> real values."""

    name: str
    bits: int
    dim: int
    seed: int
    mean: np.ndarray = field(repr=False)

    def project(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, x: np.ndarray) -> np.ndarray:
        return _codes.pack(self.project(x) > 0)


@dataclass
class LSH(Baseline):
    index: faiss.IndexLSH = field(repr=False, default=None)

    def project(self, x: np.ndarray) -> np.ndarray:
        xc = np.ascontiguousarray(_feats(x, self.dim) - self.mean)
        with faiss_threads():
            return self.index.rrot.apply(xc)

    def encode(self, x: np.ndarray) -> np.ndarray:
        xc = np.ascontiguousarray(_feats(x, self.dim) - self.mean)
        with faiss_threads():
            return np.ascontiguousarray(self.index.sa_encode(xc))

    @property
    def projection(self) -> np.ndarray:
        """(bits, d) matrix W: bit k = 1[(x - mean) . W[k] >= 0]."""
        return _matrix(self.index.rrot)


@dataclass
class Linear(Baseline):
    """Sign of ``W (x - mean)``; W is (bits, d)."""

    W: np.ndarray = field(repr=False, default=None)

    def project(self, x: np.ndarray) -> np.ndarray:
        return (_feats(x, self.dim) - self.mean) @ self.W.T


@dataclass
class FaissTransform(Baseline):
    transform: faiss.VectorTransform = field(repr=False, default=None)

    def project(self, x: np.ndarray) -> np.ndarray:
        x = _feats(x, self.dim)
        with faiss_threads():
            return self.transform.apply(x)


def _check(train: np.ndarray, bits: int, need_bits_le_d: bool) -> np.ndarray:
    x = _feats(train, what="training features")
    _codes.check_bits(bits)
    n, d = x.shape
    if need_bits_le_d and bits > d:
        raise CodeLengthError(f"{bits} bits need at least {bits} feature dimensions, got {d}; use fewer bits")
    if n < 2 or (need_bits_le_d and n < bits):
        raise DataError(f"{n} training vectors are too few to fit {bits} bits; pass at least {max(bits, 2)}")
    return x


@_single_threaded
def fit_lsh(train: np.ndarray, bits: int, seed: int = 0) -> LSH:
    x = _check(train, bits, need_bits_le_d=False)
    d = x.shape[1]
    index = faiss.IndexLSH(d, bits, True, False)  # rotate_data=True, train_thresholds=False
    index.rrot.init(int(seed) & 0x7FFFFFFF)  # IndexLSH seeds its rotation with 5; make it ours
    return LSH("lsh", bits, d, int(seed), x.mean(axis=0), index=index)


def _pca(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, W) with W (bits, d) the top principal directions (rows)."""
    pca = faiss.PCAMatrix(x.shape[1], bits)
    pca.train(x)
    mean = faiss.vector_to_array(pca.mean).astype(np.float32)
    return mean, _matrix(pca).copy()


@_single_threaded
def fit_pca(train: np.ndarray, bits: int, seed: int = 0) -> Linear:
    x = _check(train, bits, need_bits_le_d=True)
    mean, W = _pca(x, bits)
    return Linear("pca", bits, x.shape[1], int(seed), mean, W=W)


@_single_threaded
def fit_itq(train: np.ndarray, bits: int, seed: int = 0, iterations: int = ITQ_ITERATIONS) -> Linear:
    x = _check(train, bits, need_bits_le_d=True)
    mean, P = _pca(x, bits)
    v = np.ascontiguousarray((x - mean) @ P.T, dtype=np.float32)
    itq = faiss.ITQMatrix(bits)
    itq.seed = int(seed) & 0x7FFFFFFF
    itq.max_iter = int(iterations)
    itq.train(v)
    R = _matrix(itq)  # applied as v @ R.T
    return Linear("itq", bits, x.shape[1], int(seed), mean, W=(R @ P).astype(np.float32))


@_single_threaded
def fit_itq_faiss(train: np.ndarray, bits: int, seed: int = 0) -> FaissTransform:
    """``faiss.ITQTransform`` as is (centre + L2-normalise + PCA without bias + ITQ)."""
    x = _check(train, bits, need_bits_le_d=True)
    t = faiss.ITQTransform(x.shape[1], bits, True)
    t.itq.seed = int(seed) & 0x7FFFFFFF
    t.train(x)
    mean = faiss.vector_to_array(t.mean).astype(np.float32)
    return FaissTransform("itq_faiss", bits, x.shape[1], int(seed), mean, transform=t)


_FITTERS = {"lsh": fit_lsh, "pca": fit_pca, "itq": fit_itq, "itq_faiss": fit_itq_faiss}


def fit_baseline(name: str, train_feats: np.ndarray, bits: int, seed: int = 0) -> Baseline:
    """Fit baseline ``name`` (one of :data:`BASELINES`) on ``train_feats`` (n, d)."""
    key = str(name).lower()
    if key not in _FITTERS:
        raise ConfigError(f"unknown baseline {name!r}; use one of {', '.join(BASELINES)}")
    return _FITTERS[key](train_feats, int(bits), int(seed))


def quantization_loss(v: np.ndarray) -> float:
    """||sign(V) - V||_F^2 (ITQ's objective) for projected data V (n, bits)."""
    v = np.asarray(v, dtype=np.float64)
    return float(((np.where(v > 0, 1.0, -1.0) - v) ** 2).sum())
