"""The stronger server: a crafted global model that turns the silo's AdamW step back into a gradient
and makes single inputs own rows of the first layer ("trap weights").

Two changes to the model it sends, both in the arrays a silo loads without question:

1. **Adam's ε trap.** The final BatchNorm's running variance (a server-set buffer) is set very large
   (``var``, default 1e7). The head's logits are then ``beta`` plus a tiny data-dependent part, and every
   gradient upstream shrinks by ``1/sqrt(var)``, far below Adam's ``eps = 1e-8``, where Adam's first step
   ``lr * g / (|g| + eps)`` is linear in ``g``: the update is the gradient again, up to a known factor.
   (Batch Renormalization, which silos train with, normalises by these running statistics.)
2. **Trap rows.** Each row of the first linear layer is a random unit direction ``w_j`` with the bias
   ``-w_j . c_j``, where ``c_j`` puts the row's threshold at the ``1 - p`` quantile of ``w_j . x`` over
   the server's own auxiliary features (data like the silos'): a row fires for a fraction ``p`` of inputs,
   so many rows are reached by exactly one input of a small batch, and their ratio ``dW_j / db_j`` is that
   input (:func:`simulations.leakage.attacks.analytic.recover`).

Entry point: :func:`craft` (global model, auxiliary features -> the crafted model to send). It applies to
the ``probe`` head and to the LoRA model's head (a ReLU first layer and a BatchNorm the server sets; in
LoRA mode the auxiliary features are the sent backbone's, and the rows then return the adapted backbone's
features of the views); the DP head has neither.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from hashing.hashers import Hasher


def _head(model: Hasher):
    """The module the trap crafts: the probe head itself, or the LoRA model's head."""
    return model.head if getattr(model, "kind", "") == "lora" else model


def applies(model: Hasher) -> bool:
    head = _head(model)
    net = getattr(head, "net", None)
    return (getattr(head, "kind", "") == "probe" and net is not None and isinstance(net[0], torch.nn.Linear)
            and net[0].bias is not None and hasattr(head.norm, "running_var"))


def craft(model: Hasher, aux: np.ndarray, *, p: float = 0.1, var: float = 1e7, scale: float = 0.05,
          seed: int = 0) -> Hasher:
    """The crafted model (a copy): trap rows from ``aux`` (n, d) features at firing rate ``p``, the final
    BatchNorm's running variance ``var`` and its shift random (so the logits are not all 0)."""
    if not applies(model):
        raise ValueError(f"the trap needs the probe head's ReLU first layer and BatchNorm; this is a {model.kind!r} head")
    if not 0 < p < 1:
        raise ValueError(f"firing rate p={p} must lie in (0, 1)")
    out = copy.deepcopy(model)
    head = _head(out)
    rng = np.random.default_rng(seed)
    lin = head.net[0]
    rows, d = lin.weight.shape
    w = rng.standard_normal((rows, d))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    thresholds = np.quantile(np.asarray(aux, np.float64) @ w.T, 1 - p, axis=0)
    k = head.norm.running_var.shape[0]
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w * scale))
        lin.bias.copy_(torch.from_numpy(-thresholds * scale))
        head.norm.running_var.fill_(var)
        head.norm.bias.copy_(torch.from_numpy(rng.standard_normal(k)))
    return out
