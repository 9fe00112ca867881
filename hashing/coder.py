"""The hash head: features (n, d) -> logits z (n, K); codes are 1[z > 0].

Two sizes, as CroVCA's public code has them:

* ``small``: Linear(d, d) -> ReLU -> Linear(d, K) -> BatchNorm1d(K)
* ``large``: Linear(d, h) -> GELU -> Linear(h, h) -> GELU -> Linear(h, K) -> BatchNorm1d(K),
  h = max(2d, 2048) unless given.

Weights are trunc-normal(std 0.02), biases zero. All layers live in one
``nn.Sequential`` called ``net``, so parameter names (``net.0.weight``, ...,
``net.<last>.running_mean``) are stable across sites: federation exchanges them by name.

The last layer is a :class:`BatchRenorm1d`: a ``BatchNorm1d`` (same state dict, same
behaviour) that can train with Batch Renormalization against its running statistics.
Federated clients use that: the running statistics they receive are the exact pooled
statistics of all silos, and a silo's batch holds only its own data.

``HashCoder`` is the ``probe`` kind of :mod:`hashing.hashers` (and the head of the ``lora`` kind).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .codes import check_bits
from .errors import ConfigError, TrainingError
from .hashers import FeatureHead, register

VARIANTS = ("small", "large")


class BatchRenorm1d(nn.BatchNorm1d):
    """BatchNorm1d that, while ``renorm`` is on and in training mode, normalises with
    Batch Renormalization (Ioffe, 2017) against its running statistics, which it then
    leaves unchanged:

        z = gamma * ((h - mu_B) / s_B * r + d) + beta,   r = sg(s_B / s_R),  d = sg((mu_B - mu_R) / s_R)

    The forward value is the running statistics' normalisation, ``(h - mu_R) / s_R``, the
    one the model is scored with; the gradient flows through the batch statistics as in
    BatchNorm, which keeps the scale of the logits in check. When the batch looks like the
    reference (r = 1, d = 0) this is plain BatchNorm. A federated silo trains with the
    pooled statistics of all silos as the reference, so a batch drawn from one silo is
    normalised as the union would be, not centred on its own mean: the bits need not split
    every silo's data in half.
    """

    renorm: bool = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.renorm):
            return super().forward(h)
        if h.ndim != 2 or h.shape[0] < 2:
            raise TrainingError(f"Batch Renormalization needs a (batch >= 2, features) input, got {tuple(h.shape)}; "
                                "train on at least 2 images per batch")
        mu_b = h.mean(0)
        s_b = torch.sqrt(h.var(0, unbiased=False) + self.eps)
        s_r = torch.sqrt(self.running_var + self.eps)
        r = (s_b / s_r).detach()
        d = ((mu_b - self.running_mean) / s_r).detach()
        x = (h - mu_b) / s_b * r + d
        return x * self.weight + self.bias if self.affine else x


class HashCoder(FeatureHead):
    """CroVCA's hash head on backbone features (the ``probe`` kind of hash function)."""

    kind = "probe"

    def __init__(self, in_dim: int, bits: int, variant: str = "small", hidden: int | None = None):
        super().__init__()
        self.bits = check_bits(bits)
        self.in_dim = int(in_dim)
        if self.in_dim <= 0:
            raise ConfigError(f"feature dimension {in_dim} must be positive; pass the backbone's feature size")
        if variant not in VARIANTS:
            raise ConfigError(f"unknown hash head variant {variant!r}; use 'small' or 'large'")
        self.variant = variant
        d, k = self.in_dim, self.bits
        if variant == "small":
            if hidden is not None and int(hidden) != d:
                raise ConfigError("the small hash head has hidden size = feature dimension; drop 'hidden' or use variant='large'")
            self.hidden = d
            layers = [nn.Linear(d, d), nn.ReLU(), nn.Linear(d, k)]
        else:
            h = int(hidden) if hidden is not None else max(2 * d, 2048)
            if h <= 0:
                raise ConfigError(f"hidden size {hidden} must be positive")
            self.hidden = h
            layers = [nn.Linear(d, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, k)]
        self.net = nn.Sequential(*layers, BatchRenorm1d(k))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def architecture(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "variant": self.variant, "hidden": self.hidden}

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, bits={self.bits}, variant={self.variant!r}, hidden={self.hidden}"


@register("probe")
def _probe(*, feature_dim: int, bits: int, variant: str = "small", hidden: int | None = None) -> HashCoder:
    return HashCoder(feature_dim, bits, variant, hidden)
