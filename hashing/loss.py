"""CroVCA's loss, exactly as its public code computes it.

    loss = 1.0 * L_align + lam * L_reg          (lam = 0.1)

* L_align (unsupervised): for every ordered pair of views (i, j), i != j,
  BCE-with-logits(z_i, 1[z_j > 0]); the thresholded teacher carries no gradient.
  Averaged over pairs, batch and bits.
* L_align (supervised): BCE-with-logits(z_v, t) averaged over views, where t_i is
  1[mean of the class prototypes of sample i's labels > 0] and a prototype is the
  label-masked mean of the (view-averaged, detached) logits.
* L_reg = -R * (K + m) / (K * m), averaged over views, with the coding rate
  R = 1/2 logdet(I_K + K / (m * eps) * Z^T Z), Z = row-L2-normalised z (m x K).
  The public code divides by eps, not eps^2; so does this.

Every function takes ``views``: a list of (m, K) logit tensors, one per view of
the same m samples in the same order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import CodeLengthError, TrainingError


def _check_views(views, min_views: int = 1) -> list[torch.Tensor]:
    views = list(views)
    if len(views) < min_views:
        raise TrainingError(f"got {len(views)} view(s), need at least {min_views}; give every sample {min_views} augmented views")
    m, k = views[0].shape
    for v in views:
        if v.ndim != 2 or tuple(v.shape) != (m, k):
            raise CodeLengthError(f"all views must be (m, K) = {(m, k)} logits, got {tuple(v.shape)}")
    if m == 0:
        raise TrainingError("empty batch; check the data loader yields at least one sample")
    return views


# ---------------------------------------------------------------- alignment

def alignment_loss(views) -> torch.Tensor:
    """Unsupervised cross-view alignment: mean over ordered pairs (i, j), i != j, of
    BCE-with-logits(z_i, 1[z_j > 0]), the target detached."""
    views = _check_views(views, min_views=2)
    targets = [(z > 0).to(z.dtype).detach() for z in views]
    total = 0.0
    pairs = 0
    for i, zi in enumerate(views):
        for j, tj in enumerate(targets):
            if i != j:
                total = total + F.binary_cross_entropy_with_logits(zi, tj)
                pairs += 1
    return total / pairs


def _multi_hot(labels: torch.Tensor, num_classes: int | None, m: int, device, dtype) -> torch.Tensor:
    labels = torch.as_tensor(labels, device=device)
    if labels.shape[0] != m:
        raise TrainingError(f"{labels.shape[0]} labels for a batch of {m} samples; give one label row per sample")
    if labels.ndim == 1:
        labels = labels.long()
        if labels.numel() and labels.min() < 0:
            raise TrainingError("class ids must be non-negative integers")
        c = int(num_classes) if num_classes is not None else int(labels.max()) + 1
        if labels.numel() and int(labels.max()) >= c:
            raise TrainingError(f"class id {int(labels.max())} out of range for {c} classes")
        return F.one_hot(labels, c).to(dtype)
    if labels.ndim == 2:
        if num_classes is not None and labels.shape[1] != int(num_classes):
            raise TrainingError(f"multi-hot labels have {labels.shape[1]} classes, expected {num_classes}")
        return (labels > 0).to(dtype)
    raise TrainingError(f"labels must be class ids (m,) or multi-hot (m, C), got shape {tuple(labels.shape)}")


def _mean_logits(views) -> torch.Tensor:
    return torch.stack([v.detach() for v in views]).mean(0)


def class_logit_sums(views, labels, num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sample counts (C,) and sums (C, K) of the view-averaged, detached logits.

    Prototypes are ``sums / counts`` (classes with count 0 have none). Sites can
    pool these across silos to build global prototypes.
    """
    views = _check_views(views)
    zbar = _mean_logits(views)
    y = _multi_hot(labels, num_classes, zbar.shape[0], zbar.device, zbar.dtype)
    return y.sum(0), y.T @ zbar


def prototypes_from_sums(counts: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """(C, K) prototypes; rows of classes with count 0 are NaN (= no prototype)."""
    counts = counts.to(sums.dtype)
    protos = sums / counts.clamp_min(1).unsqueeze(1)
    protos[counts <= 0] = float("nan")
    return protos


def supervised_targets(views, labels, prototypes: torch.Tensor | None = None) -> torch.Tensor:
    """(m, K) 0/1 targets: 1[mean of the prototypes of sample i's labels > 0].

    Without ``prototypes`` they are the batch's own (label-masked means of the
    view-averaged logits). External prototypes (C, K) may mark a class with no
    prototype by a non-finite row. A sample none of whose labels has a prototype
    gets the sign of its own view-averaged logits.
    """
    views = _check_views(views)
    zbar = _mean_logits(views)
    m, k = zbar.shape
    if prototypes is None:
        y = _multi_hot(labels, None, m, zbar.device, zbar.dtype)
        counts, sums = y.sum(0), y.T @ zbar
        protos = prototypes_from_sums(counts, sums)
    else:
        protos = prototypes.detach().to(device=zbar.device, dtype=zbar.dtype)
        if protos.ndim != 2 or protos.shape[1] != k:
            raise CodeLengthError(f"prototypes must be (C, {k}), got {tuple(protos.shape)}")
        y = _multi_hot(labels, protos.shape[0], m, zbar.device, zbar.dtype)
    valid = torch.isfinite(protos).all(1)
    w = y * valid.to(y.dtype)                                # (m, C): labels that have a prototype
    n = w.sum(1, keepdim=True)                               # (m, 1)
    mean = (w @ torch.where(valid.unsqueeze(1), protos, torch.zeros_like(protos))) / n.clamp_min(1)
    mean = torch.where(n > 0, mean, zbar)
    return (mean > 0).to(zbar.dtype)


def supervised_alignment_loss(views, targets: torch.Tensor) -> torch.Tensor:
    """Mean over views of BCE-with-logits(z_v, targets)."""
    views = _check_views(views)
    t = targets.detach().to(views[0].dtype)
    return torch.stack([F.binary_cross_entropy_with_logits(z, t) for z in views]).mean()


# ---------------------------------------------------------------- coding rate

def coding_rate(z: torch.Tensor, eps: float = 0.05) -> torch.Tensor:
    """R = 1/2 logdet(I_K + K / (m * eps) * Z^T Z), Z = F.normalize(z, dim=1).

    Computed by Cholesky (the matrix is I + PSD, so positive definite for finite z;
    non-finite z gives NaN, which ``crovca_loss`` turns into a TrainingError).
    """
    if z.ndim != 2:
        raise CodeLengthError(f"coding rate needs (m, K) logits, got shape {tuple(z.shape)}")
    m, k = z.shape
    zn = F.normalize(z, dim=1).double()  # K x K in float64: cheap, and exact to float32's last digit
    a = torch.eye(k, dtype=zn.dtype, device=z.device) + (k / (m * eps)) * (zn.T @ zn)
    chol, info = torch.linalg.cholesky_ex(a)  # fails only on non-finite logits: give NaN, not an exception
    r = torch.log(torch.diagonal(chol)).sum()  # = 1/2 * logdet(a)
    return torch.where(info == 0, r, torch.full_like(r, float("nan"))).to(z.dtype)


def coding_rate_loss(views, eps: float = 0.05) -> torch.Tensor:
    """L_reg: mean over views of -R * (K + m) / (K * m)."""
    views = _check_views(views)
    m, k = views[0].shape
    scale = (k + m) / (k * m)
    return torch.stack([-coding_rate(z, eps) * scale for z in views]).mean()


# ---------------------------------------------------------------- total

def check_finite(loss: torch.Tensor, step=None) -> torch.Tensor:
    """Raise TrainingError when the loss is NaN or infinite."""
    if not bool(torch.isfinite(loss.detach()).all()):
        where = f"step {step}" if step is not None else "this step"
        what = "NaN" if bool(torch.isnan(loss.detach()).any()) else "infinite"
        raise TrainingError(f"loss became {what} at {where}; lower the learning rate or check the features for NaN/inf")
    return loss


def bit_balance(views) -> float:
    """1 - mean_k |2 p_k - 1|, p_k the fraction of ones of bit k over all views:
    1.0 when every bit is on for half the samples, 0.0 when every bit is constant."""
    b = torch.cat([(v.detach() > 0).float() for v in views])
    return float(1.0 - (2.0 * b.mean(0) - 1.0).abs().mean())


class CroVCA:
    """The training loop's objective (:func:`hashing.train.train`): each of the two views through the
    model in its own pass (BatchNorm normalises each view's batch), then :func:`crovca_loss`.

    ``labels`` (labels of the training images, by position) make it supervised; ``prototypes`` (C, K)
    are global class prototypes (pooled by the server) that replace the batch's own."""

    def __init__(self, *, lam: float, eps: float, labels=None, prototypes=None):
        self.lam, self.eps = lam, eps
        self.labels = torch.as_tensor(labels) if labels is not None else None
        self.prototypes = torch.as_tensor(prototypes, dtype=torch.float32) if prototypes is not None and labels is not None else None

    def __call__(self, model, xa: torch.Tensor, xb: torch.Tensor, idx, step: int):
        views = [model(xa), model(xb)]
        y = self.labels[idx] if self.labels is not None else None
        loss, parts = crovca_loss(views, y, self.prototypes, lam=self.lam, eps=self.eps, step=step)
        return loss, loss.item(), parts


def crovca_loss(views, labels=None, prototypes: torch.Tensor | None = None, lam: float = 0.1,
                eps: float = 0.05, step=None) -> tuple[torch.Tensor, dict[str, float]]:
    """CroVCA loss = L_align + lam * L_reg, and its parts as floats.

    Unsupervised (``labels`` None): cross-view alignment, needs >= 2 views.
    Supervised: prototype targets from ``labels`` (batch prototypes, or the given
    global ``prototypes``). Raises TrainingError if the loss is not finite.
    """
    views = _check_views(views, min_views=2 if labels is None else 1)
    if labels is None:
        if prototypes is not None:
            raise TrainingError("prototypes were given without labels; pass the batch labels too")
        align = alignment_loss(views)
    else:
        align = supervised_alignment_loss(views, supervised_targets(views, labels, prototypes))
    reg = coding_rate_loss(views, eps)
    loss = align + lam * reg
    check_finite(loss, step)
    return loss, {"align": float(align.detach()), "reg": float(reg.detach()), "bit_balance": bit_balance(views)}
