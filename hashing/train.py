"""Centralized CroVCA on cached backbone features (probe mode): one loop, one screen.

``features`` is ``(n, V, d)``: V augmented views per training image. Each step
takes a batch of images and two distinct cached views of each, runs the head on
both, and minimises the CroVCA loss. AdamW, cosine learning rate to ``lr_min``.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .coder import HashCoder, batch_renorm
from .errors import ConfigError, TrainingError
from .loss import crovca_loss


# Held while seeding torch's global generator and drawing from it, so that trainings run side by
# side in threads (fedhash simulate's references) each get their seed's initialisation.
_TORCH_RNG = threading.Lock()


@dataclass
class TrainConfig:
    bits: int = 64
    supervised: bool = False
    epochs: int = 5
    batch_size: int = 256
    lr: float = 1e-3
    lr_min: float = 1e-6
    weight_decay: float = 1e-2
    lam: float = 0.1
    eps: float = 0.05
    variant: str = "small"
    seed: int = 0
    # Batch Renormalization against the head's running statistics (federated clients, whose
    # running statistics are the pooled ones of all silos); see hashing.coder.BatchRenorm1d
    renorm: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class History:
    step_loss: list[float] = field(default_factory=list)
    epoch: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _views_pair(rng: np.random.Generator, n: int, v: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.integers(0, v, size=n)
    b = (a + rng.integers(1, v, size=n)) % v if v > 1 else a
    return a, b


def train_head(
    features: np.ndarray,
    labels: np.ndarray | None,
    cfg: TrainConfig,
    *,
    coder: HashCoder | None = None,
    progress: bool = True,
    prototypes: np.ndarray | None = None,
    prox_mu: float = 0.0,
) -> tuple[HashCoder, History]:
    """Train a HashCoder with CroVCA on cached features ``(n, V, d)``; labels given means supervised.

    Federated use: ``prototypes`` (C, K) are global class prototypes (pooled by
    the server) that replace the batch-local ones in supervised mode;
    ``prox_mu`` > 0 adds FedProx's mu/2 * ||w - w_start||^2 to the loss, w_start
    being the head's weights when the call begins.
    """
    if features.ndim != 3:
        raise ConfigError(f"training features must be (n, views, dim), got shape {features.shape}")
    n, v, d = features.shape
    if n < 2:
        raise TrainingError(f"need at least 2 training images, got {n}; give the silo more data")
    if cfg.supervised and labels is None:
        raise ConfigError("supervised training needs labels; the data set has none")
    if not cfg.supervised and v < 2:
        raise ConfigError("unsupervised CroVCA needs at least 2 cached views per image; raise views")
    with _TORCH_RNG:  # torch's global generator is one per process: seed and draw the init in one piece
        torch.manual_seed(cfg.seed)
        coder = coder or HashCoder(d, cfg.bits, cfg.variant)
    rng = np.random.default_rng(cfg.seed)
    if coder.in_dim != d or coder.bits != cfg.bits:
        raise ConfigError(f"head expects {coder.in_dim}-d features and {coder.bits} bits, got {d}-d and {cfg.bits}")
    bs = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // bs)  # drop the ragged last batch: BatchNorm needs a real batch
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(coder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1), eta_min=cfg.lr_min)
    lab_t = torch.as_tensor(np.asarray(labels)) if labels is not None else None
    protos = torch.as_tensor(np.asarray(prototypes, dtype=np.float32)) if prototypes is not None and cfg.supervised else None
    anchor = [p.detach().clone() for p in coder.parameters()] if prox_mu > 0 else None
    hist = History()
    t0 = time.perf_counter()
    coder.train()
    with batch_renorm(coder, cfg.renorm):
        step = 0
        for epoch in range(cfg.epochs):
            perm = rng.permutation(n)
            sums = {"loss": 0.0, "align": 0.0, "reg": 0.0, "bit_balance": 0.0}
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not progress)
            for i in bar:
                idx = np.sort(perm[i * bs : (i + 1) * bs])
                a, b = _views_pair(rng, len(idx), v)
                batch = features[idx]  # one read of the (memory-mapped) cache
                x1 = torch.from_numpy(batch[np.arange(len(idx)), a].astype(np.float32))
                x2 = torch.from_numpy(batch[np.arange(len(idx)), b].astype(np.float32))
                views = [coder(x1), coder(x2)]
                y = lab_t[idx] if cfg.supervised else None
                loss, parts = crovca_loss(views, y, protos, lam=cfg.lam, eps=cfg.eps, step=step)
                if anchor is not None:
                    loss = loss + 0.5 * prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(coder.parameters(), anchor))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                loss_value = loss.item()
                hist.step_loss.append(loss_value)
                sums["loss"] += loss_value
                for k in ("align", "reg", "bit_balance"):
                    sums[k] += parts[k]
                bar.set_postfix(loss=f"{loss_value:.4f}")
            hist.epoch.append({k: s / steps_per_epoch for k, s in sums.items()} | {"epoch": epoch + 1})
    hist.seconds = time.perf_counter() - t0
    coder.eval()
    return coder, hist


@torch.inference_mode()
def encode(coder: HashCoder, features: np.ndarray, batch_size: int = 8192, *, pre_bn: bool = False) -> np.ndarray:
    """Logits z (n, bits), float32, of clean-view features (n, d), head in eval mode.

    ``pre_bn``: the activations entering the final BatchNorm instead; ``coder.norm`` (eval mode)
    maps them to exactly the logits this function returns without it (same blocks, same kernels)."""
    coder.eval()
    net = coder.net[:-1] if pre_bn else coder
    out = np.empty((len(features), coder.bits), dtype=np.float32)
    for s in range(0, len(features), batch_size):
        out[s : s + batch_size] = net(torch.from_numpy(np.asarray(features[s : s + batch_size], dtype=np.float32))).numpy()
    if not np.isfinite(out).all():
        raise TrainingError("the head produced non-finite logits; the model is broken, retrain it")
    return out
