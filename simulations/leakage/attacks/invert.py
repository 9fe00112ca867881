"""Image inversion through the frozen backbone: from recovered features to pixels (Mahendran & Vedaldi
2015; the image step of Inverting Gradients), with a total-variation prior.

The server holds the same backbone and weights as the silos (the federation's model identity names
them). It optimises an image ``x`` in [0, 1] (a sigmoid of free pixels, started at the mean of its own
auxiliary images) so that the backbone's features of ``x``, normalised as the silos normalise their images
(``hashing.views.normalise`` with the backbone's mean and std), point the way the recovered features do:
``1 - cos(backbone(x), f) + tv * TV(x)``. Fashion-MNIST's images are grey, so the image is one channel
copied to three, as the silos' loader does.

Entry point: :func:`invert` (features (m, d) -> images (m, S, S) in [0, 1]). timm's fused attention has no
double backward on CPU: :func:`invert` switches it off (``timm.layers.set_fused_attn(False)``) for ViTs.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hashing.backbones import data_config
from hashing.views import normalise


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert(backbone: torch.nn.Module, features: np.ndarray, size: int, *, channels: int = 1,
           iterations: int = 200, lr: float = 0.1, tv: float = 0.5, seed: int = 0,
           start: np.ndarray | None = None) -> np.ndarray:
    """Images (m, size, size) (``channels`` 1) or (m, size, size, 3) whose backbone features match ``features``;
    ``start``: the image to start from (the server's prior, e.g. the mean of its auxiliary images), else grey."""
    try:
        from timm.layers import set_fused_attn

        set_fused_attn(False)
    except ImportError:  # pragma: no cover - timm always has it
        pass
    cfg = data_config(backbone)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    target = torch.from_numpy(np.asarray(features, np.float32))
    g = torch.Generator().manual_seed(int(seed))
    free = 0.01 * torch.randn((len(target), channels, size, size), generator=g)
    if start is not None:
        s0 = torch.from_numpy(np.asarray(start, np.float32)).clamp(0.02, 0.98)
        s0 = s0[None] if s0.ndim == 2 else s0.permute(2, 0, 1)
        free = free + torch.logit(s0)
    free = free.requires_grad_(True)
    opt = torch.optim.Adam([free], lr=lr)
    for _ in range(iterations):
        x = torch.sigmoid(free)
        f = backbone(normalise(x, cfg["mean"], cfg["std"]))
        loss = (1 - F.cosine_similarity(f, target, dim=1)).mean() + tv * total_variation(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.sigmoid(free).detach()
    return x[:, 0].numpy() if channels == 1 else x.permute(0, 2, 3, 1).numpy()


def psnr_ssim(recovered: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) and SSIM of two images in [0, 1], (H, W) or (H, W, 3): scikit-image's metrics (``recovered``
    is scored against ``true``)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = np.clip(np.asarray(recovered, np.float64), 0, 1), np.clip(np.asarray(true, np.float64), 0, 1)
    return (float(peak_signal_noise_ratio(b, a, data_range=1.0)),
            float(structural_similarity(b, a, data_range=1.0, channel_axis=-1 if a.ndim == 3 else None)))
