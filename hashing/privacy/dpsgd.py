"""The one door to DP-SGD: Opacus's ``PrivacyEngine.make_private`` around the pieces of the one
training loop (:func:`hashing.train.train`): the module, its optimizer, its objective and its batches.

    private = DPSGD(plan)                     # a silo's plan (hashing.privacy.accountant.silo_plan)
    history = train(hasher, inputs, cfg, schedule, private=private)
    history.releases                          # Opacus's own record of the steps: what the silo's ε composes

Poisson sampling (sample rate 1 / steps per epoch, as Opacus's loader makes it), per-image clipping at
``plan.max_grad_norm``, Gaussian noise ``plan.noise_multiplier``; ghost clipping by default ("hooks"
materialises the per-sample gradients instead). ``secure_mode`` is off: the noise is seeded, so a
simulated scenario is reproducible (README, "Differential privacy").
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..errors import ConfigError
from .accountant import DPPlan, silo_plan
from .head import DPHashCoder, check_per_sample
from .objective import PerImageCroVCA

GRAD_SAMPLE_MODES = ("ghost", "hooks")


class _Indices:
    """Opacus's Poisson data loader as the loop's batches: index arrays, ``len`` steps per epoch."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[np.ndarray]:
        for (b,) in self.loader:
            yield b.numpy()


class DPSGD:
    """Sample-level DP-SGD for one call of the training loop."""

    def __init__(self, plan: DPPlan, grad_sample_mode: str = "ghost"):
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(f"grad_sample_mode {grad_sample_mode!r}; use one of {', '.join(GRAD_SAMPLE_MODES)}")
        self.plan, self.mode = plan, grad_sample_mode
        self.engine = None
        self._module = None

    def objective(self, hasher: nn.Module, *, lam: float, eps: float) -> PerImageCroVCA:
        """The per-image objective the loop must use: refused for a module that couples samples (and for
        any head but the DP head, whose released covariance the objective's reference comes from)."""
        check_per_sample(hasher)
        if not isinstance(hasher, DPHashCoder):
            raise ConfigError(f"DP-SGD trains the DP head, not a {type(hasher).__name__}; set dp = \"sample\"")
        return PerImageCroVCA(hasher, lam=lam, eps=eps)

    def make_private(self, module: nn.Module, optimizer: torch.optim.Optimizer, objective: PerImageCroVCA,
                     n: int, batch_size: int):
        """(private module, DP optimizer, objective with Opacus's criterion, Poisson batches of ``n`` images)."""
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=min(batch_size, n))
        kw = dict(module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=self.plan.noise_multiplier,
                  max_grad_norm=self.plan.max_grad_norm, poisson_sampling=True, grad_sample_mode=self.mode)
        with self.quiet():
            self.engine = PrivacyEngine(accountant="rdp")  # secure_mode off: seeded noise, reproducible simulations
            if self.mode == "ghost":
                module, optimizer, objective.criterion, loader = self.engine.make_private(
                    criterion=objective.criterion, **kw)
            else:
                module, optimizer, loader = self.engine.make_private(**kw)
        self._module = module
        return module, optimizer, objective, _Indices(loader)

    @contextlib.contextmanager
    def quiet(self):
        """Opacus warns about secure_mode and its backward hooks on every call and step: not to the user."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield

    def noise_only_step(self, optimizer, params: list[nn.Parameter]) -> None:
        """An empty Poisson batch is still a step of the mechanism: noise only, accounted."""
        for q in params:
            q.grad = torch.zeros_like(q)
            if self.mode != "ghost":
                q.grad_sample = q.new_zeros((0, *q.shape))
        optimizer.step()

    def releases(self) -> list[tuple[float, float, int]]:
        """Opacus's accountant history of the steps taken: (noise multiplier, sample rate, steps)."""
        return [(float(s), float(q), int(k)) for s, q, k in self.engine.accountant.history] if self.engine else []

    def close(self) -> None:
        if self._module is not None and hasattr(self._module, "_close"):
            self._module._close()
        self._module = None


def sample_level(cfg: Config, n: int, silo: str = "the silo") -> DPSGD | None:
    """The silo's DP-SGD when ``cfg`` asks for sample-level DP (its plan for ``n`` training images), else None."""
    return DPSGD(silo_plan(cfg, n, silo)) if cfg.dp == "sample" else None
