"""The hash head under sample-level differential privacy (the ``dp`` kind of :mod:`hashing.hashers`).

Why a different head. Opacus clips per-sample gradients, which bounds one image's influence only if
the loss is a sum of per-image terms. Published CroVCA is not: its BatchNorm normalises each sample
with the batch's statistics, and its coding-rate term is a logdet over the whole batch, so changing one
image changes every other image's "per-sample" gradient (``tests/test_dp.py`` shows it). Under
sample-level DP fedhash trains :class:`DPHashCoder`:

    x  ->  x / ||x||  ->  (x - c) @ P  ->  A u  ->  (h - 0) / s  =  z,        code = 1[z > 0]

* ``c``, ``P`` (d x p) and ``s`` are frozen buffers. ``c`` and ``P`` (the top-p principal axes) come
  from the feature mean and covariance that every silo releases once, through the Gaussian mechanism,
  before training (:mod:`hashing.privacy.release`); ``s`` (the scale of each bit) follows from the
  same released covariance and the current ``A`` (:func:`restandardize`: post-processing).
* ``A`` (K x p) is the only trainable tensor. It starts as ITQ's rotation fitted on samples drawn from
  the released moments (:func:`hashing.privacy.release.init_dp_head`), where the DP-ITQ baseline ends.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..codes import check_bits
from ..errors import ConfigError
from ..hashers import FeatureHead, register


class Project(nn.Module):
    """Frozen: L2-normalise each feature row, subtract ``center``, project on ``basis`` (d x p).
    ``basis_cov`` (p x p) is the released covariance in that basis, kept for the objective."""

    federated_buffers = True  # exchanged as server-set buffers although the module has no trainable parameter

    def __init__(self, d: int, p: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(d))
        self.register_buffer("basis", torch.eye(d, p))
        self.register_buffer("basis_cov", torch.eye(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x, dim=-1) - self.center) @ self.basis


class Standardize(nn.Module):
    """Frozen per-bit standardisation ``(h - running_mean) / sqrt(running_var + eps)``: the same
    buffers (names, meaning) as BatchNorm in eval mode, but never computed from a batch."""

    federated_buffers = True
    renorm = False  # the flag Hasher.renorm sets; a frozen standardisation has nothing to renormalise

    def __init__(self, k: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(k))
        self.register_buffer("running_var", torch.ones(k))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h - self.running_mean) / torch.sqrt(self.running_var + self.eps)


class DPHashCoder(FeatureHead):
    """The hash head under sample-level DP (see the module docstring); its statistics are released
    once (``pooling = "moments"``), never pooled per round."""

    kind = "dp"
    pooling = "moments"
    variant = "dp-linear"

    def __init__(self, in_dim: int, bits: int, dims: int = 256):
        super().__init__()
        self.bits = check_bits(bits)
        self.in_dim = int(in_dim)
        if not self.bits <= int(dims) <= self.in_dim:
            raise ConfigError(f"dp-dims = {dims} must lie between the code length ({self.bits}) and the feature "
                              f"dimension ({self.in_dim}); set dp-dims in that range")
        self.hidden = int(dims)
        lin = nn.Linear(self.hidden, self.bits, bias=False)
        with torch.no_grad():
            lin.weight.zero_()
            lin.weight[:, : self.bits] = torch.eye(self.bits)
        self.net = nn.Sequential(Project(self.in_dim, self.hidden), lin, Standardize(self.bits))

    @property
    def rotation(self) -> nn.Parameter:
        return self.net[1].weight

    def architecture(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "variant": self.variant, "dims": self.hidden}

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, bits={self.bits}, variant={self.variant!r}, dims={self.hidden}"


@register("dp")
def _dp(*, feature_dim: int, bits: int, dims: int = 256) -> DPHashCoder:
    return DPHashCoder(feature_dim, bits, dims)


def code_covariance(head: DPHashCoder) -> torch.Tensor:
    """(K, K) covariance of the pre-standardisation activations under the released covariance."""
    a = head.rotation.detach().double()
    return a @ head.net[0].basis_cov.double() @ a.T


def restandardize(head: DPHashCoder) -> None:
    """Set each bit's scale from the released covariance and the current rotation (post-processing).
    The mean is 0: the projection is centred on the released mean."""
    var = torch.diagonal(code_covariance(head)).clamp_min(1e-12)
    with torch.no_grad():
        head.norm.running_mean.zero_()
        head.norm.running_var.copy_(var.to(head.norm.running_var.dtype))


def offending_modules(model: nn.Module) -> list[str]:
    """'name (Type)' of every module Opacus cannot clip per sample (BatchNorm, LSTM, ...)."""
    from opacus.validators import ModuleValidator

    validators = ModuleValidator.VALIDATORS
    out = []
    for name, m in model.named_modules():
        # Opacus looks validators up by exact type; walk the MRO so subclasses (BatchRenorm1d) are caught too
        check = next((validators[t] for t in type(m).__mro__ if t in validators), None)
        if check is not None and check(m):
            out.append(f"{name or '<root>'} ({type(m).__name__})")
    return out


def check_per_sample(model: nn.Module) -> None:
    """Refuse a model with a module that couples the samples of a batch (per-sample clipping breaks)."""
    bad = offending_modules(model)
    if bad:
        raise ConfigError(f"module {bad[0]} mixes the samples of a batch, so per-sample clipping does not bound one "
                          "image's influence; train under DP with the DP head (dp = \"sample\" builds it)")
