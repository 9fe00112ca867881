"""Analytic feature recovery from the first trainable linear layer of the silo's update.

For a linear layer ``y = W x + b`` the gradient of any loss is ``dW = sum_i d_i x_i^T`` and
``db = sum_i d_i`` over the inputs ``x_i`` of the step. When one input alone reaches row ``j`` (the
other inputs' ``d_ij`` are 0: their ReLU is off there) the row's ratio ``dW_j / db_j`` is that input
exactly; rows several inputs reach give affine mixtures of them.

**What the server sees is not the gradient.** A silo's reply is its parameters after AdamW steps. After
one step from a fresh optimizer, Adam moves each weight by ``-lr * g / (|g| + 1e-8)`` (plus the weight
decay ``-lr * wd * w``, which the server removes: it sent ``w`` and knows the round's ``lr``), so every
entry whose gradient is far above 1e-8 moves by ``+-lr``: its sign survives, its magnitude does not.
The ratio of a row then recovers the input's *support and sign pattern*, not its values, except where
the gradient's entries are small (``|g| <~ 1e-8``), where Adam is linear and the ratio is exact again.
Backbone features after ReLU6 are non-negative and sparse, so the support is itself a fingerprint.

Without a bias (the DP head's rotation) the rows carry no ratio; the layer's step is the sum of one
rank-one term per input, and the top right-singular vectors of the (sign-distorted) step span the
inputs: :func:`recover` returns them, each up to sign.

Entry point: :func:`recover` (observation -> candidate inputs of the layer, strongest first).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..metrics import unit
from ..victim import Observation


@dataclass
class Recovery:
    """Candidate inputs of the attacked layer, strongest first, and how they were found."""

    features: np.ndarray        # (m, d) candidates in the layer's input space
    support: np.ndarray         # (m,) how many rows agreed on each (1 for singular vectors)
    layer: str                  # the attacked parameter's name
    space: str                  # "features" (the backbone's) or "projected" (the DP head's basis)
    signed: bool = False        # candidates are known up to sign only
    labels: np.ndarray | None = None  # the classes recovered with them (supervised update matching), one an image
    mismatch: float | None = None     # update matching: 1 - cos of the simulated step at the candidates


def first_linear(obs: Observation) -> tuple[str, str | None]:
    """The first trainable linear layer's weight (and bias) names in the silo's reply (the head's, never a
    LoRA adapter's: in LoRA mode the head's first layer reads the adapted backbone's features)."""
    weights = [k for k, v in obs.sent.items() if k.endswith("weight") and v.ndim == 2 and "lora_" not in k]
    if not weights:
        raise ValueError("the reply holds no linear layer to attack")
    w = weights[0]
    b = w[: -len("weight")] + "bias"
    return w, (b if b in obs.sent else None)


def adam_direction(obs: Observation, name: str) -> torch.Tensor:
    """The optimizer's step on ``name``, weight decay removed and divided by the learning rate (the server
    knows both): ``g / (|g| + eps)`` after one Adam step; a sum of such terms after several."""
    lr, wd = obs.schedule.lr, obs.cfg.weight_decay
    return -(obs.delta(name) / lr + wd * obs.sent[name].double())


def _cluster(r: np.ndarray, weight: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy clustering of rows by cosine (rows reached by the same single input coincide)."""
    n = np.linalg.norm(r, axis=1)
    keep = n > 0
    r, weight = r[keep], weight[keep]
    rn = r / n[keep, None]
    order = np.argsort(-weight)
    free = np.ones(len(r), dtype=bool)
    centers, sizes = [], []
    for i in order:
        if not free[i]:
            continue
        members = free & (rn @ rn[i] >= threshold)
        members[i] = True
        free &= ~members
        w = weight[members]
        centers.append((r[members] * w[:, None]).sum(0) / w.sum())
        sizes.append(int(members.sum()))
    by = np.argsort(-np.asarray(sizes), kind="stable")
    return np.asarray(centers)[by], np.asarray(sizes)[by]


def recover(obs: Observation, *, max_candidates: int | None = None, threshold: float = 0.995,
            min_rel: float = 1e-3) -> Recovery:
    """Candidate inputs of the first linear layer from the silo's reply.

    With a bias: the ratios ``step_W[j] / step_b[j]`` of the rows whose bias moved (|step| above
    ``min_rel`` of the largest), clustered by cosine >= ``threshold``; the largest clusters first.
    Without one: the top right-singular vectors of the weight's step. ``max_candidates`` defaults to the
    inputs the reply says the step had: 2 views of each of its ``num_examples`` images."""
    w, b = first_linear(obs)
    m = max_candidates or 2 * int(obs.metrics.get("num_examples", 1))
    gw = adam_direction(obs, w).numpy()
    if b is None:
        _, s, vt = np.linalg.svd(gw, full_matrices=False)
        k = min(m, len(s))
        return Recovery(vt[:k], np.ones(k, dtype=int), w, "projected" if obs.cfg.hasher_kind == "dp" else "features",
                        signed=True)
    gb = adam_direction(obs, b).numpy()
    rows = np.abs(gb) > min_rel * np.abs(gb).max() if np.abs(gb).max() > 0 else np.zeros(len(gb), dtype=bool)
    if not rows.any():
        return Recovery(np.zeros((0, gw.shape[1])), np.zeros(0, dtype=int), w, "features")
    r = gw[rows] / gb[rows, None]
    centers, sizes = _cluster(r, np.abs(gb[rows]), threshold)
    return Recovery(centers[:m], sizes[:m], w, "features")


def pair_views(features: np.ndarray) -> np.ndarray:
    """The mean of each pair of candidates that are each other's most similar (the two views of one image
    are closer to each other than to other images): greedy maximal-cosine pairing; (m // 2, d)."""
    x = np.asarray(features, np.float64)
    if len(x) < 2:
        return np.zeros((0, x.shape[1] if x.ndim == 2 else 0))
    u = unit(x)
    c = u @ u.T
    np.fill_diagonal(c, -np.inf)
    free = np.ones(len(x), dtype=bool)
    out = []
    for flat in np.argsort(-c, axis=None):
        i, j = divmod(int(flat), len(x))
        if i < j and free[i] and free[j]:
            out.append((x[i] + x[j]) / 2)
            free[i] = free[j] = False
            if free.sum() < 2:
                break
    return np.asarray(out)
