"""The external reference: ``breaching``'s Inverting Gradients (Geiping et al. 2020; the PyPI package
``breaching`` 0.1.2, its own optimiser, objective and restarts) on the same observation as :mod:`.matching`.

breaching attacks a model it is given with a loss it is given, from "gradients" it is given. Here the model
is the head the server sent, wrapped so that one data point is an image's two views ``(2, d)`` and the
forward runs the head as the silo trains it (``train_mode`` and Batch Renormalization, whatever mode
breaching puts the wrapper in), one view at a time as the silo's step does; the loss is CroVCA with the
run's ``lam``/``eps``; the "gradients" are what the server observed, the silo's AdamW step with weight
decay removed (:func:`.analytic.adam_direction`), in the order of the wrapper's parameters. breaching's
``invertinggradients`` attack then runs as configured by the package (cosine objective, signed Adam, lr
0.1, step decay), with its image-only parts switched off: no total-variation prior and no box (the inputs
are feature vectors, not images), and fewer iterations than its 24,000 (``iterations``). Nothing is
downloaded: the attack's configuration is the package's own YAML.

Entry point: :func:`recover` (observation, model sent -> candidate inputs (2B, d), as :mod:`.matching`).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings

import numpy as np
import torch

from hashing.errors import ConfigError
from hashing.hashers import Hasher
from hashing.loss import crovca_loss

from ..victim import Observation
from .analytic import Recovery, adam_direction

INSTALL = ".venv/bin/pip install breaching==0.1.2 (make setup installs it with the test extras)"


class _TwoViews(torch.nn.Module):
    """The head as breaching sees it: data points (n, 2, d) -> logits (n, 2, K), trained as the silo trains it."""

    def __init__(self, head: Hasher, renorm: bool):
        super().__init__()
        self.head = head
        self.renorm_on = renorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.head.train_mode()  # breaching puts the model it attacks in eval mode; the silo's step trains
        with self.head.renorm(self.renorm_on):
            return torch.stack([self.head(x[:, 0]), self.head(x[:, 1])], dim=1)


def _breaching():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import breaching
    except ImportError:
        raise ConfigError(f"the breaching attack needs the breaching package: {INSTALL}") from None
    logging.getLogger("breaching").setLevel(logging.WARNING)
    return breaching


def recover(obs: Observation, model: Hasher, *, iterations: int = 500, start: np.ndarray | None = None) -> Recovery:
    """breaching's Inverting Gradients on the silo's observed step; ``start``: (2B, d) candidates to start from
    (first views, then second views), else breaching's own random start."""
    if obs.cfg.supervised:
        raise ValueError("the breaching reference runs unsupervised CroVCA (its labels are not the prototypes' codes)")
    if getattr(model, "kind", "") != "probe":
        raise ValueError(f"the breaching reference attacks the probe head on features; this is a {model.kind!r} head")
    breaching = _breaching()
    from omegaconf import OmegaConf

    wrapper = _TwoViews(copy.deepcopy(model), obs.cfg.batch_renorm)
    names = [k[len("head."):] for k, _ in wrapper.named_parameters()]
    missing = [k for k in names if k not in obs.sent]
    if missing:
        raise ValueError(f"the reply holds no step for {missing[0]}: not the model the server sent")
    gradients = [adam_direction(obs, k).float() for k in names]
    b = int(obs.metrics.get("num_examples", 1))
    d = int(model.in_dim)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # it prints the config it loads
        warnings.simplefilter("ignore")
        cfg = breaching.get_attack_config("invertinggradients")
    cfg.optim.max_iterations = int(iterations)
    cfg.optim.callback = int(iterations) + 1
    cfg.optim.boxed = False
    cfg.regularization = {}
    setup = dict(device=torch.device("cpu"), dtype=torch.float)
    lam, eps = obs.cfg.lam, obs.cfg.eps

    def loss_fn(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # labels: unused (unsupervised)
        return crovca_loss([out[:, 0], out[:, 1]], lam=lam, eps=eps)[0]

    payload = dict(parameters=[p.detach().clone() for p in wrapper.parameters()],
                   buffers=[t.detach().clone() for t in wrapper.buffers()],
                   metadata=OmegaConf.create(dict(shape=[2, d], modality="vision", classes=int(model.bits))))
    shared = dict(gradients=gradients, buffers=None,
                  metadata=dict(num_data_points=b, labels=torch.zeros(b, dtype=torch.long), local_hyperparams=None))
    init = None
    if start is not None:
        s = torch.from_numpy(np.asarray(start, np.float32))
        init = torch.stack([s[:b], s[b: 2 * b]], dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attacker = breaching.attacks.prepare_attack(wrapper, loss_fn, cfg, setup)
        rec, _ = attacker.reconstruct([payload], [shared], {}, initial_data=init, dryrun=False)
    x = rec["data"].detach()
    feats = torch.cat([x[:, 0], x[:, 1]]).double().numpy()
    return Recovery(feats, np.ones(len(feats), dtype=int), names[0], "features")
