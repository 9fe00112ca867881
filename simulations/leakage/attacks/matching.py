"""Update matching in feature space (DLG, Zhu et al. 2019; Inverting Gradients, Geiping et al. 2020): the
honest server optimises dummy inputs so that the update they would cause matches the one it received.

The server knows the model it sent, the loss (CroVCA, the run's ``lam``/``eps``), the number of images
(the reply's ``num_examples``) and that each step sees two views of each. It simulates one step on dummy
views ``(xa, xb)`` (B x d each, non-negative like the backbone's ReLU6 features, started from random
images of its auxiliary data), computes their gradient with ``create_graph=True`` and minimises
``1 - cos(g_dummy, observed step)`` over the dummies (double backward). The observed step is the silo's
AdamW step with weight decay removed (:func:`.analytic.adam_direction`): after one step that is
``g / (|g| + 1e-8)``, the gradient's sign where it is large, which the cosine still rewards. A round of
several local steps is matched as if it were one (its steps add up).

Entry point: :func:`recover` (observation, model sent, auxiliary features -> candidate inputs).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from hashing.hashers import Hasher
from hashing.loss import crovca_loss

from ..victim import Observation
from .analytic import Recovery, adam_direction


def recover(obs: Observation, model: Hasher, aux: np.ndarray, *, iterations: int = 200, lr: float = 0.05,
            seed: int = 0, start: np.ndarray | None = None, sign: bool = True) -> Recovery:
    """Dummy views whose simulated step best matches the silo's (cosine), as candidates (2B, d)."""
    if obs.cfg.supervised:
        raise ValueError("update matching is built for unsupervised CroVCA (the supervised loss needs the batch's "
                         "labels too)")
    net = copy.deepcopy(model)
    net.train_mode()
    names = [k for k, p in net.named_parameters() if p.requires_grad and k in obs.sent]
    params = [dict(net.named_parameters())[k] for k in names]
    target = torch.cat([adam_direction(obs, k).float().reshape(-1) for k in names])
    b = int(obs.metrics.get("num_examples", 1))
    rng = np.random.default_rng(seed)
    picks = np.asarray(aux, np.float32)[rng.choice(len(aux), 2 * b, replace=len(aux) < 2 * b)]
    if start is not None and len(start):  # e.g. the analytic candidates; auxiliary images for the rest
        picks[: min(len(start), 2 * b)] = np.asarray(start, np.float32)[: 2 * b]
    start = picks
    # non-negative dummies: x = softplus(theta), started at the auxiliary images
    theta = torch.from_numpy(np.log(np.expm1(np.clip(start, 1e-3, None)))).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations)
    best, best_loss = None, float("inf")
    with net.renorm(obs.cfg.batch_renorm):
        for _ in range(iterations):
            x = torch.nn.functional.softplus(theta)
            loss, _ = crovca_loss([net(x[:b]), net(x[b:])], lam=obs.cfg.lam, eps=obs.cfg.eps)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            g = torch.cat([q.reshape(-1) for q in grads])
            if sign:  # compare as Adam's first step does: g / (|g| + eps), smoothed at the gradient's own scale
                g = torch.tanh(g / (0.1 * g.abs().mean().detach()).clamp_min(1e-20))
            match = 1 - torch.nn.functional.cosine_similarity(g, target, dim=0)
            opt.zero_grad()
            match.backward()
            opt.step()
            sched.step()
            if float(match.detach()) < best_loss:
                best_loss, best = float(match), x.detach().numpy().copy()
    net.eval()
    w = names[0]
    return Recovery(best, np.ones(len(best), dtype=int), w, "features")
