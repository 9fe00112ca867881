"""The DP objective: CroVCA as a sum of per-image terms, so that clipping one image's gradient bounds
its influence (DP-SGD's premise), and the training loop's objective built on it.

    loss_i = mean over ordered view pairs (a, b), a != b, and bits of BCE(z_a, 1[z_b > 0])
             - lam * mean over views of 1/2 log(1 + alpha * zh^T M zh),   zh = z / ||z||,

``M`` = :func:`reference_precision` (the codes' correlation under the released covariance, frozen for
the round), ``alpha = K / eps``: each view's marginal coding-rate gain against that reference.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrainingError
from ..loss import bit_balance
from .head import DPHashCoder, code_covariance


def reference_precision(head: DPHashCoder, eps: float) -> torch.Tensor:
    """(I + Corr / eps)^-1, Corr the codes' correlation matrix under the released covariance."""
    cov = code_covariance(head)
    s = torch.sqrt(torch.diagonal(cov).clamp_min(1e-12))
    corr = cov / (s[:, None] * s[None, :])
    return torch.linalg.inv(torch.eye(len(s), dtype=cov.dtype) + corr / eps).float()


class DPCroVCALoss(nn.Module):
    """Per-image CroVCA for DP-SGD. ``input``: (B, V, K) logits of V >= 2 views of B images.

    loss_i = mean over ordered view pairs (a, b), a != b, and bits of BCE(z_a, 1[z_b > 0])
             - lam * mean over views of 1/2 log(1 + alpha * zh^T M zh),   zh = z / ||z||,

    ``M`` = :func:`reference_precision` (frozen for the round), ``alpha = K / eps``. Each term reads
    only image i's logits, so clipping its gradient bounds its influence. ``reduction`` is the
    attribute Opacus's ghost clipping sets to ``"none"`` to get the (B,) per-image losses."""

    def __init__(self, precision: torch.Tensor, lam: float = 0.1, eps: float = 0.05, reduction: str = "mean"):
        super().__init__()
        self.register_buffer("precision", precision)
        self.lam, self.eps, self.reduction = float(lam), float(eps), reduction

    def per_image(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.ndim != 3 or z.shape[1] < 2:
            raise TrainingError(f"the DP objective needs (images, views >= 2, bits) logits, got {tuple(z.shape)}")
        b, v, k = z.shape
        t = (z > 0).to(z.dtype).detach()
        align = z.new_zeros(b)
        for i in range(v):
            for j in range(v):
                if i != j:
                    align = align + F.binary_cross_entropy_with_logits(z[:, i], t[:, j], reduction="none").mean(1)
        align = align / (v * (v - 1))
        zh = F.normalize(z, dim=-1)
        gain = 0.5 * torch.log1p((k / self.eps) * ((zh @ self.precision) * zh).sum(-1))  # (B, V)
        return align, gain.mean(1)

    def forward(self, z: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        align, gain = self.per_image(z)
        loss = align - self.lam * gain
        if self.reduction == "none":
            return loss
        return loss.sum() if self.reduction == "sum" else loss.mean()


class PerImageCroVCA:
    """The training loop's objective under DP-SGD (:func:`hashing.train.train`): both views of each image
    through the model in one pass, ``(B, 2, d) -> (B, 2, K)``, so that Opacus sees one sample per image,
    and :class:`DPCroVCALoss` on them. ``criterion`` is what Opacus's ghost clipping wraps."""

    def __init__(self, head: DPHashCoder, *, lam: float, eps: float):
        self.criterion = DPCroVCALoss(reference_precision(head, eps), lam=lam, eps=eps)

    def __call__(self, model: nn.Module, xa: torch.Tensor, xb: torch.Tensor, idx: np.ndarray,
                 step: int) -> tuple[torch.Tensor, float, dict[str, float]]:
        z = model(torch.stack([xa, xb], 1))
        loss = self.criterion(z, torch.zeros(len(idx)))
        per_sample = getattr(loss, "loss_per_sample", None)  # ghost clipping's loss object
        value = float(per_sample.detach().mean()) if per_sample is not None else float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"the DP loss became {value} at step {step}; lower lr or dp-clip")
        return loss, value, {"bit_balance": bit_balance(z.unbind(1))}
