import numpy as np
import torch
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from hashing.views import _blur, _crop_boxes, augment, normalise, resize, to_batch


def test_blur_equals_torchvision_per_sample():
    x = torch.rand(4, 3, 40, 40)
    sigma = torch.tensor([0.3, 0.9, 1.4, 2.0])
    ours = _blur(x, sigma, 7)
    ref = torch.stack([TF.gaussian_blur(x[i], kernel_size=[7, 7], sigma=[float(s)] * 2) for i, s in enumerate(sigma)])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_crop_boxes_follow_random_resized_crop_ranges():
    g = torch.Generator().manual_seed(0)
    b = _crop_boxes(5000, 28, 28, g)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    area = w * h / (28 * 28)
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 28 + 1e-4).all() and (b[:, 3] <= 28 + 1e-4).all()
    assert area.max() <= 1.0 + 1e-4 and np.quantile(area.numpy(), 0.01) >= 0.3
    assert 0.6 < area.mean() < 0.8  # uniform in 0.4..1 before clamping


def test_augment_shapes_determinism_and_identity_crop():
    imgs = np.random.default_rng(0).integers(0, 256, (16, 28, 28), dtype=np.uint8)
    x = to_batch(imgs)
    a = augment(x, 64, torch.Generator().manual_seed(1))
    b = augment(x, 64, torch.Generator().manual_seed(1))
    c = augment(x, 64, torch.Generator().manual_seed(2))
    assert a.shape == (16, 1, 64, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    rgb = augment(torch.rand(8, 3, 40, 40), 32, torch.Generator().manual_seed(0))
    assert rgb.shape == (8, 3, 32, 32) and rgb.min() >= 0 and rgb.max() <= 1
    # the crop-resize primitive on a full-image box averages bilinear samples at +-1/4 pixel: exact on a linear
    # ramp away from the borders, so the crop is placed where the box says
    ramp = (torch.arange(28.0)[None, :] * 0.02 + torch.arange(28.0)[:, None] * 0.01).expand(1, 1, 28, 28).contiguous()
    full = roi_align(ramp, torch.tensor([[0, 0, 0, 28, 28]], dtype=torch.float32), (28, 28), 1.0, 2, True)
    torch.testing.assert_close(full[0, 0, 1:-1, 1:-1], ramp[0, 0, 1:-1, 1:-1], atol=1e-5, rtol=0)
    half = roi_align(ramp, torch.tensor([[0, 14, 0, 28, 28]], dtype=torch.float32), (28, 14), 1.0, 2, True)
    torch.testing.assert_close(half[0, 0, 1:-1, 1:-1], ramp[0, 0, 1:-1, 15:-1], atol=1e-5, rtol=0)


def test_clean_view_and_normalise():
    imgs = np.full((2, 10, 10), 255, dtype=np.uint8)
    x = resize(to_batch(imgs), 20)
    assert x.shape == (2, 1, 20, 20)
    n = normalise(x, (0.5,) * 3, (0.5,) * 3)
    assert n.shape == (2, 3, 20, 20) and torch.allclose(n, torch.ones_like(n))
    assert to_batch(np.zeros((3, 5, 5, 3), np.uint8)).shape == (3, 3, 5, 5)
