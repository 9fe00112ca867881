"""Views of an image: the clean view for indexing and queries, augmented views for training, and
the whole-image transforms a simulated silo's domain applies (:func:`invert`, :func:`gaussian_blur`).

Augmentations follow the public CroVCA recipe: RandomResizedCrop (scale 0.4-1,
ratio 3/4-4/3), horizontal flip, colour jitter (p .8), grayscale (p .2),
Gaussian blur (p .1), solarize (p .1). They are applied to a whole batch at
once with per-sample random parameters: torchvision's per-image v2 pipeline
runs at about 250 images/s on 2 cores, slower than the backbone itself
(BENCHMARKS.md). For grayscale inputs the colour-only parts (saturation, hue,
grayscale) are left out: on one channel they do nothing.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .data import ImageSet

AUG_VERSION = "crovca-batched-v1"  # part of the feature-cache key: bump when the recipe changes


def to_batch(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 images (H, W) or (H, W, 3), all the same size -> float (B, C, H, W) in [0, 1]."""
    arr = np.ascontiguousarray(np.stack(images) if isinstance(images, list) else images)
    t = torch.from_numpy(arr)
    t = t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return t.float().div_(255.0)


def load_batch(ds: "ImageSet", idx: np.ndarray, size: int) -> torch.Tensor:
    """Images idx as a float batch in [0, 1]; files of different sizes are brought to ``size`` first."""
    if ds.images is not None:
        return to_batch(ds.images[idx])
    return torch.cat([resize(to_batch([ds.image(int(i))]), size) for i in idx])


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """The clean view: the whole image, resized to size x size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _crop_boxes(n: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop boxes (x1, y1, x2, y2), scale 0.4-1 of the area, aspect ratio 3/4-4/3."""
    area = h * w * torch.empty(n).uniform_(0.4, 1.0, generator=g)
    logr = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    ratio = torch.exp(logr)
    cw = torch.sqrt(area * ratio).clamp(1, w)
    ch = torch.sqrt(area / ratio).clamp(1, h)
    x1 = torch.rand(n, generator=g) * (w - cw)
    y1 = torch.rand(n, generator=g) * (h - ch)
    return torch.stack([x1, y1, x1 + cw, y1 + ch], dim=1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def augment(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Augmented views of a float batch (B, C, H, W) in [0, 1] -> (B, C, size, size)."""
    n, c, h, w = x.shape
    boxes = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], _crop_boxes(n, h, w, g)], dim=1)
    # roi_align averages sampling_ratio^2 bilinear samples per output pixel: a crop-and-resize with light anti-aliasing
    # here, not at the top: torchvision's import costs ~2 s (it loads torch._dynamo)
    from torchvision.ops import roi_align  # noqa: I001

    out = roi_align(x, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)

    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)

    def per_sample(lo: float, hi: float) -> torch.Tensor:
        return torch.empty(n, 1, 1, 1).uniform_(lo, hi, generator=g)

    jit = (torch.rand(n, generator=g) < 0.8).view(n, 1, 1, 1)
    b, ct = per_sample(0.6, 1.4), per_sample(0.6, 1.4)
    jittered = (out * b).clamp_(0, 1)
    m = _gray(jittered).mean(dim=(1, 2, 3), keepdim=True)
    jittered = ((jittered - m) * ct + m).clamp_(0, 1)
    if c == 3:
        s = per_sample(0.6, 1.4)
        gr = _gray(jittered)
        jittered = ((jittered - gr) * s + gr).clamp_(0, 1)
        hue = torch.empty(n).uniform_(-0.1, 0.1, generator=g)
        jittered = _hue_rotate(jittered, hue)
    out = torch.where(jit, jittered, out)
    if c == 3:
        gray = (torch.rand(n, generator=g) < 0.2).view(n, 1, 1, 1)
        out = torch.where(gray, _gray(out).expand(-1, 3, -1, -1), out)

    blur = torch.nonzero(torch.rand(n, generator=g) < 0.1).flatten()
    if len(blur):
        sigma = torch.empty(len(blur)).uniform_(0.1, 2.0, generator=g)
        out[blur] = _blur(out[blur], sigma, max(3, (size // 10) | 1))

    sol = (torch.rand(n, generator=g) < 0.1).view(n, 1, 1, 1)
    out = torch.where(sol & (out >= 0.5), 1.0 - out, out)
    return out


def _blur(x: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Gaussian blur with one sigma per sample: a separable depthwise convolution, reflect-padded."""
    n, c, h, w = x.shape
    r = torch.arange(k, dtype=x.dtype) - k // 2
    ker = torch.exp(-0.5 * (r[None] / sigma[:, None]) ** 2)
    ker = (ker / ker.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, k)
    y = F.pad(x.reshape(1, n * c, h, w), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, ker.view(n * c, 1, k, 1), groups=n * c)
    y = F.conv2d(y, ker.view(n * c, 1, 1, k), groups=n * c)
    return y.view(n, c, h, w)


def _hue_rotate(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Shift hue by a fraction of a turn per sample: a rotation of the chroma plane in YIQ space."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = torch.linalg.inv(to_yiq)
    theta = hue * 2 * math.pi
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(len(hue), 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    mat = from_yiq @ rot @ to_yiq  # (n, 3, 3)
    return torch.einsum("nij,njhw->nihw", mat, x).clamp_(0, 1)


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """float (B, 1|3, S, S) in [0, 1] -> (B, 3, S, S) normalised with the backbone's mean and std."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- whole-image transforms


def invert(images: np.ndarray) -> np.ndarray:
    """``255 - x`` of uint8 images."""
    return (255 - images).astype(np.uint8)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of uint8 images ``(n, H, W)`` or ``(n, H, W, 3)`` (separable, reflected edges), as uint8."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.empty_like(images)
    for start in range(0, len(images), 2048):  # bounded float memory on large silos
        a = images[start : start + 2048].astype(np.float32)
        for axis in (1, 2):
            r = min(radius, a.shape[axis] - 1)  # reflect needs pad < size
            pad = [(0, 0)] * a.ndim
            pad[axis] = (r, r)
            padded = np.pad(a, pad, mode="reflect" if r > 0 else "edge")
            kk = kernel[radius - r : radius + r + 1]
            kk = kk / kk.sum()
            acc = np.zeros_like(a)
            for j, w in enumerate(kk):
                acc += w * np.take(padded, np.arange(j, j + a.shape[axis]), axis=axis)
            a = acc
        out[start : start + 2048] = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return out
