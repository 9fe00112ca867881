"""Statistics that silos pool exactly: the hash head's BatchNorm and the global class prototypes
(what a hasher with ``pooling = "activations"`` needs from the server every round).

Under non-IID data, averaging each silo's BatchNorm running mean and variance is
not the statistic of the union. Each silo instead reports, for the pre-BatchNorm
activations h of its training views under the *current global* head, the count,
the sum and the sum of squares (float64); the pooled mean and (unbiased) variance
follow exactly. The same reply carries, per class, the number of images and the
sum of their view-averaged h: since the BatchNorm output z is affine in h per bit,
the pooled class means of z (the supervised CroVCA prototypes) follow exactly too.

These sums are computed from private data: under differential privacy the DP head replaces them by
one accounted release (:mod:`hashing.privacy.release`). No Flower here: the server and the clients
call these functions.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from ..errors import CodeLengthError, DataError
from ..hashers import FeatureHead, Hasher

STAT_KEYS = ("count", "sum", "sumsq", "class_count", "class_sum")


def head_stats(coder: FeatureHead, features: np.ndarray, labels: np.ndarray | None = None,
               num_classes: int = 0, batch_size: int = 4096) -> dict[str, np.ndarray]:
    """Sufficient statistics of one silo for the pooled BatchNorm and prototypes.

    ``features``: (n, V, d) training views, or (n, d). Returns float64 arrays:
    ``count`` (1,) = n*V, ``sum``/``sumsq`` (K,) over all views, ``class_count``
    (C,) images per class and ``class_sum`` (C, K) sums of the view-averaged h
    (C = ``num_classes``; 0 gives empty arrays, e.g. unsupervised).
    """
    f = features if features.ndim == 3 else features[:, None, :]
    n, v, d = f.shape
    if d != coder.in_dim:
        raise CodeLengthError(f"features are {d}-d but the head expects {coder.in_dim}-d; use the same backbone")
    h = coder.encode_features(f.reshape(n * v, d), batch_size, pre_norm=True)  # batch_size activations per block
    return activation_stats(h.reshape(n, v, coder.bits), labels, num_classes)


def activation_stats(h: np.ndarray, labels: np.ndarray | None = None, num_classes: int = 0) -> dict[str, np.ndarray]:
    """:func:`head_stats` of pre-BatchNorm activations already computed: ``h`` (n, V, K) or (n, K)."""
    h = np.asarray(h, dtype=np.float64)
    h = h if h.ndim == 3 else h[:, None, :]
    n, v, k = h.shape
    c = int(num_classes) if labels is not None else 0
    cc = np.zeros(c, np.float64)
    cs = np.zeros((c, k), np.float64)
    if c:
        lab = np.asarray(labels)
        if len(lab) != n:
            raise DataError(f"{len(lab)} labels for {n} images; give one label row per image")
        if lab.ndim == 1 and len(lab) and (lab.min() < 0 or lab.max() >= c):
            raise DataError(f"class ids must lie in 0..{c - 1}, got {lab.min()}..{lab.max()}; "
                            "every silo must use the same class list")
        if lab.ndim == 2 and lab.shape[1] != c:
            raise DataError(f"multi-hot labels have {lab.shape[1]} classes, expected {c}; use the same class list")
        if n:
            onehot = np.eye(c)[lab] if lab.ndim == 1 else (lab > 0).astype(np.float64)
            cc = onehot.sum(0)
            cs = onehot.T @ h.mean(1)
    return {"count": np.array([n * v], np.float64), "sum": h.sum((0, 1)), "sumsq": (h * h).sum((0, 1)),
            "class_count": cc, "class_sum": cs}


def pool(stats: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Sum the silos' statistics key by key (shapes must agree)."""
    stats = list(stats)
    if not stats:
        raise DataError("no silo reported statistics; at least one silo must answer")
    out = {}
    for key in STAT_KEYS:
        arrs = [np.asarray(s[key], np.float64) for s in stats]
        if any(a.shape != arrs[0].shape for a in arrs):
            raise CodeLengthError(f"silos report {key} of different shapes {[a.shape for a in arrs]}; "
                                  "every silo must run the same head and class list")
        out[key] = np.sum(arrs, axis=0)
    return out


def pooled_moments(pooled: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and unbiased variance (PyTorch's running_var convention) of the union."""
    n = float(pooled["count"][0])
    if n < 2:
        raise DataError(f"pooled BatchNorm statistics need at least 2 samples, got {n:.0f}")
    mean = pooled["sum"] / n
    var = (pooled["sumsq"] - n * mean * mean) / (n - 1)
    return mean, np.maximum(var, 0.0)


def set_bn_stats(hasher: Hasher, mean: np.ndarray, var: np.ndarray) -> None:
    """Write pooled statistics into the hasher's final BatchNorm."""
    bn = hasher.norm
    with torch.no_grad():
        bn.running_mean.copy_(torch.as_tensor(mean, dtype=bn.running_mean.dtype))
        bn.running_var.copy_(torch.as_tensor(var, dtype=bn.running_var.dtype))


def global_prototypes(hasher: Hasher, pooled: Mapping[str, np.ndarray]) -> np.ndarray:
    """(C, K) class means of the logits z over the union, under the hasher's final BatchNorm
    (set the pooled statistics first). Classes no silo holds get NaN rows."""
    bn = hasher.norm
    cc = pooled["class_count"]
    if cc.size == 0:
        return np.zeros((0, hasher.bits), np.float32)
    hbar = pooled["class_sum"] / np.maximum(cc, 1.0)[:, None]
    mean = bn.running_mean.double().numpy()
    std = np.sqrt(bn.running_var.double().numpy() + bn.eps)
    z = (hbar - mean) / std * bn.weight.detach().double().numpy() + bn.bias.detach().double().numpy()
    z[cc <= 0] = np.nan
    return z.astype(np.float32)
