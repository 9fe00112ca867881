"""LoRA mode: CroVCA through the backbone's LoRA adapters and the head, on images.

Probe mode trains the head on cached backbone features; LoRA mode must run the
(adapted) backbone on fresh augmentations every step, so it works on images.
:class:`LoraHasher` is backbone + head in one module, so that
:func:`hashing.lora.trainable_state` gives exactly what federation exchanges: the
LoRA tensors and the head (never the frozen backbone).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .backbones import create_backbone, data_config
from .coder import HashCoder, batch_renorm
from .data import ImageSet
from .errors import ConfigError, TrainingError
from .features import load_batch
from .loss import crovca_loss
from .lora import set_lora_train, wrap_lora
from .train import History, TrainConfig
from .views import augment, normalise, resize


class LoraHasher(nn.Module):
    """A LoRA-wrapped frozen backbone followed by a HashCoder: images -> logits z."""

    def __init__(self, backbone: nn.Module, head: HashCoder, name: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.name = name
        self.norm = data_config(backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_lora_hasher(backbone_name: str, weights: str | None, bits: int, *, r: int = 16, alpha: float = 16.0,
                      dropout: float = 0.1, variant: str = "small", seed: int = 0) -> LoraHasher:
    """Backbone with its offline weights, LoRA adapters (seeded) and a fresh head (seeded)."""
    torch.manual_seed(seed)
    backbone, dim = create_backbone(backbone_name, weights or None)
    backbone = wrap_lora(backbone, r=r, alpha=alpha, dropout=dropout, name=backbone_name)
    head = HashCoder(dim, bits, variant)
    return LoraHasher(backbone, head, backbone_name)


def _views(model: LoraHasher, x: torch.Tensor, size: int, g: torch.Generator, clean: bool = False) -> torch.Tensor:
    v = resize(x, size) if clean else augment(x, size, g)
    return normalise(v.clone(), model.norm["mean"], model.norm["std"]).contiguous(memory_format=torch.channels_last)


def train_lora(model: LoraHasher, ds: ImageSet, idx: np.ndarray, cfg: TrainConfig, *, size: int,
               prototypes: np.ndarray | None = None, prox_mu: float = 0.0, progress: bool = True) -> History:
    """CroVCA on two fresh augmentations per image, through LoRA adapters and head."""
    idx = np.asarray(idx)
    n = len(idx)
    if n < 2:
        raise TrainingError(f"need at least 2 training images, got {n}; give the silo more data")
    if cfg.supervised and ds.labels is None:
        raise ConfigError("supervised training needs labels; the data set has none")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; wrap the backbone with LoRA first")
    bs = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // bs)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1), eta_min=cfg.lr_min)
    protos = torch.as_tensor(np.asarray(prototypes, np.float32)) if prototypes is not None and cfg.supervised else None
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None
    hist = History()
    t0 = time.perf_counter()
    set_lora_train(model, True)
    with batch_renorm(model.head, cfg.renorm):
        step = 0
        for epoch in range(cfg.epochs):
            perm = rng.permutation(n)
            sums = {"loss": 0.0, "align": 0.0, "reg": 0.0, "bit_balance": 0.0}
            for i in tqdm(range(steps_per_epoch), desc=f"LoRA epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not progress):
                sel = np.sort(perm[i * bs : (i + 1) * bs])
                x = load_batch(ds, idx[sel], size)
                views = [model(_views(model, x, size, g)), model(_views(model, x, size, g))]
                y = torch.as_tensor(ds.labels[idx[sel]]) if cfg.supervised else None
                loss, parts = crovca_loss(views, y, protos, lam=cfg.lam, eps=cfg.eps, step=step)
                if anchor is not None:
                    loss = loss + 0.5 * prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                hist.step_loss.append(loss.item())
                sums["loss"] += hist.step_loss[-1]
                for k in ("align", "reg", "bit_balance"):
                    sums[k] += parts[k]
            hist.epoch.append({k: s / steps_per_epoch for k, s in sums.items()} | {"epoch": epoch + 1})
    hist.seconds = time.perf_counter() - t0
    model.eval()
    return hist


@torch.inference_mode()
def backbone_features(model: LoraHasher, ds: ImageSet, idx: np.ndarray, *, size: int, batch_size: int = 128) -> np.ndarray:
    """Pooled (LoRA-adapted) backbone features of the clean view of images ``idx``: (n, d) float32."""
    model.eval()
    out = []
    for s in range(0, len(idx), batch_size):
        x = load_batch(ds, np.asarray(idx[s : s + batch_size]), size)
        out.append(model.backbone(_views(model, x, size, None, clean=True)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.head.in_dim), np.float32)
