"""The hash head: features (n, d) -> logits z (n, K); codes are 1[z > 0].

Two sizes, as CroVCA's public code has them:

* ``small``: Linear(d, d) -> ReLU -> Linear(d, K) -> BatchNorm1d(K)
* ``large``: Linear(d, h) -> GELU -> Linear(h, h) -> GELU -> Linear(h, K) -> BatchNorm1d(K),
  h = max(2d, 2048) unless given.

Weights are trunc-normal(std 0.02), biases zero. All layers live in one
``nn.Sequential`` called ``net``, so parameter names (``net.0.weight``, ...,
``net.<last>.running_mean``) are stable across sites: federation exchanges them by name.
"""
from __future__ import annotations

import torch
from torch import nn

from .codes import check_bits
from .errors import ConfigError

VARIANTS = ("small", "large")


class HashCoder(nn.Module):
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
        self.net = nn.Sequential(*layers, nn.BatchNorm1d(k))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits z (the BatchNorm output), shape (n, bits)."""
        return self.net(x)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, bits={self.bits}, variant={self.variant!r}, hidden={self.hidden}"
