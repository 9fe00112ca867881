"""The one training loop, for every kind of hash function (:mod:`hashing.hashers`), centralized or
federated, with or without differential privacy.

Each step takes a batch of training images, two views of each (cached features in probe and dp mode,
fresh augmentations in LoRA mode: ``hasher.view_batch``), and minimises the objective: CroVCA
(:class:`hashing.loss.CroVCA`), or under DP-SGD its per-image form. AdamW, cosine learning rate from
``schedule.lr`` to ``schedule.lr_min``, FedProx's proximal term when ``prox_mu`` > 0. DP-SGD reaches
the loop through Opacus's ``make_private`` (:class:`hashing.privacy.dpsgd.DPSGD`), which wraps the
module, the optimizer, the objective and the batches; the loop itself stays the same.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import Config
from .errors import ConfigError
from .hashers import TORCH_RNG, Hasher, Inputs, create_hasher
from .loss import CroVCA


@dataclass(frozen=True)
class Schedule:
    """What one call of :func:`train` runs: its epochs, the learning rate (cosine from ``lr`` to
    ``lr_min``), the seed of its batches and views, and whether the final BatchNorm trains with Batch
    Renormalization against its running statistics (federated silos, whose running statistics are
    the pooled ones of all silos)."""

    epochs: int
    lr: float
    lr_min: float
    seed: int
    renorm: bool = False

    @classmethod
    def centralized(cls, cfg: Config) -> "Schedule":
        """``fedhash train``: ``epochs`` epochs from ``lr`` to ``lr-min``."""
        return cls(cfg.epochs, cfg.lr, cfg.lr_min, cfg.seed)

    @classmethod
    def federated_round(cls, cfg: Config, server_round: int) -> "Schedule":
        """Round ``server_round``'s slice of one cosine schedule over all rounds, ``local-epochs`` long."""

        def lr_at(t: float) -> float:
            return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * t))

        r, total = int(server_round), cfg.num_server_rounds
        return cls(cfg.local_epochs, lr_at((r - 1) / total), lr_at(r / total), cfg.seed * 100003 + r, cfg.batch_renorm)

    @classmethod
    def reference(cls, cfg: Config) -> "Schedule":
        """The federation's references (local-only, centralized): one cosine schedule over as many epochs as
        the federation ran in all, plain BatchNorm (a reference trains on the data it sees whole)."""
        return cls(cfg.num_server_rounds * cfg.local_epochs, cfg.lr, cfg.lr_min, cfg.seed * 100003 + 1)


@dataclass
class History:
    step_loss: list[float] = field(default_factory=list)
    epoch: list[dict] = field(default_factory=list)  # per epoch: the means of the loss and its parts
    steps: int = 0
    seconds: float = 0.0
    releases: list[tuple[float, float, int]] = field(default_factory=list)  # under DP-SGD: what ε composes

    loss: float = float("nan")         # what the call reports: the last epoch's mean (under DP-SGD: every step's)
    bit_balance: float = float("nan")


class Batches:
    """Each epoch a fresh permutation of the ``n`` training positions, cut into batches of ``batch_size``;
    the ragged last batch is dropped (BatchNorm needs a real batch)."""

    def __init__(self, n: int, batch_size: int, rng: np.random.Generator):
        self.n, self.bs, self.rng = n, min(batch_size, n), rng

    def __len__(self) -> int:
        return max(1, self.n // self.bs)

    def __iter__(self):
        perm = self.rng.permutation(self.n)
        for i in range(len(self)):
            yield perm[i * self.bs : (i + 1) * self.bs]


def train(hasher: Hasher, inputs: Inputs, cfg: Config, schedule: Schedule, *, labels: np.ndarray | None = None,
          prototypes: np.ndarray | None = None, prox_mu: float = 0.0, private=None,
          progress: bool = False) -> History:
    """Train ``hasher`` in place on ``inputs``' training images; ``labels`` (by position) for supervised CroVCA.

    ``prototypes`` (C, K): global class prototypes (federated, supervised). ``private``: a
    :class:`hashing.privacy.dpsgd.DPSGD` (sample-level DP). From ``cfg``: batch-size, weight-decay,
    lam, eps, supervised."""
    if cfg.supervised and labels is None:
        raise ConfigError("supervised training needs labels; the data set has none")
    hasher.check_inputs(inputs, cfg.supervised)
    n = inputs.n_train
    with TORCH_RNG:  # LoRA's dropout and DP-SGD's sampling and noise then draw from it (training that draws
        torch.manual_seed(schedule.seed)  # from torch's global generator is deterministic in one thread only)
    rng = np.random.default_rng(schedule.seed)
    g = torch.Generator().manual_seed(schedule.seed)
    params = hasher.trainable_parameters()
    hasher.train_mode()
    opt = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=cfg.weight_decay)
    model, batches = hasher, Batches(n, cfg.batch_size, rng)
    if private is None:
        objective = CroVCA(lam=cfg.lam, eps=cfg.eps, labels=labels if cfg.supervised else None, prototypes=prototypes)
    else:
        if prox_mu > 0:
            raise ConfigError("FedProx's proximal term is not a per-image loss, so DP-SGD cannot bound it; "
                              "use strategy = \"fedavg\" under dp = \"sample\"")
        objective = private.objective(hasher, lam=cfg.lam, eps=cfg.eps)
        model, opt, objective, batches = private.make_private(hasher, opt, objective, n, cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(getattr(opt, "original_optimizer", opt),
                                                       T_max=max(schedule.epochs * len(batches), 1),
                                                       eta_min=schedule.lr_min)
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None
    hist = History()
    balances: list[float] = []
    t0 = time.perf_counter()
    try:
        with hasher.renorm(schedule.renorm), (private.quiet() if private is not None else contextlib.nullcontext()):
            for epoch in range(schedule.epochs):
                sums: dict[str, float] = {}
                count = 0
                bar = tqdm(batches, desc=f"epoch {epoch + 1}/{schedule.epochs}", leave=False, disable=not progress)
                for b in bar:
                    idx = np.sort(np.asarray(b))
                    opt.zero_grad(set_to_none=True)
                    if len(idx) == 0:  # Poisson sampling (DP-SGD) can draw an empty batch
                        private.noise_only_step(opt, params)
                    else:
                        xa, xb = hasher.view_batch(inputs, idx, rng, g)
                        loss, value, parts = objective(model, xa, xb, idx, hist.steps)
                        if anchor is not None:
                            loss = loss + 0.5 * prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                            value = loss.item()
                        loss.backward()
                        opt.step()
                        hist.step_loss.append(value)
                        balances.append(parts.get("bit_balance", float("nan")))
                        count += 1
                        for k, v in {"loss": value, **parts}.items():
                            sums[k] = sums.get(k, 0.0) + v
                        bar.set_postfix(loss=f"{value:.4f}")
                    sched.step()
                    hist.steps += 1
                means = {k: s / count for k, s in sums.items()} if count else {"loss": float("nan")}
                hist.epoch.append(means | {"epoch": epoch + 1})
    finally:
        if private is not None:
            hist.releases = private.releases()
            private.close()
    hist.seconds = time.perf_counter() - t0
    if private is not None:  # a DP silo reports the mean over every step it took (empty Poisson batches aside)
        hist.loss = float(np.mean(hist.step_loss)) if hist.step_loss else float("nan")
        hist.bit_balance = float(np.mean(balances)) if balances else float("nan")
    elif hist.epoch:
        hist.loss = float(hist.epoch[-1]["loss"])
        hist.bit_balance = float(hist.epoch[-1].get("bit_balance", float("nan")))
    hasher.eval()
    return hist


def fit(views: np.ndarray, labels: np.ndarray | None = None, cfg: Config | None = None, *,
        schedule: Schedule | None = None, progress: bool = False) -> tuple[Hasher, History]:
    """A fresh probe head (CroVCA's HashCoder) trained on cached training views ``(n, V, d)``: the
    library's door for centralized training. ``labels`` make it supervised (without a ``cfg``, the default
    config in the mode the labels say); ``schedule`` defaults to ``Schedule.centralized(cfg)``."""
    cfg = cfg or Config(supervised=labels is not None)
    schedule = schedule or Schedule.centralized(cfg)
    if views.ndim != 3:
        raise ConfigError(f"training features must be (n, views, dim), got shape {views.shape}")
    hasher = create_hasher("probe", feature_dim=views.shape[2], bits=cfg.bits, variant=cfg.variant, seed=schedule.seed)
    hist = train(hasher, Inputs.of_features(views), cfg, schedule, labels=labels, progress=progress)
    return hasher, hist
