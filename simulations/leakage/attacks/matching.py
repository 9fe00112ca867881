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

**Supervised** CroVCA pulls each view's logits towards the code of its class's global prototype (the
server sent the prototypes). The server then also optimises the labels, which are discrete: it starts
from iDLG's guess (the final shift's sign, :mod:`.labels`) and, every ``label_every`` steps of the
features, sweeps the images one by one, giving each the class whose simulated step matches best with the
others fixed (coordinate descent over the C classes; soft labels, DLG's relaxation, did not find the
classes here even from the true views: the mixture of prototype codes is not a code). The labels show in
the final layers' few entries, so the supervised match is the mean of the per-tensor cosines.

**The DP head** (``dp = "sample"``) trains a per-image objective under Opacus (``hashing.privacy.objective``:
one sample per image, both views in one pass): the server simulates it as DP-SGD computes it before the
noise, each image's gradient clipped to the run's ``dp-clip`` and summed, and matches that against the
step it observed (the noise is the silo's secret).

Entry point: :func:`recover` (observation, model sent, auxiliary features -> candidate inputs).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from hashing.hashers import Hasher
from hashing.loss import coding_rate_loss, crovca_loss

from ..victim import Observation
from .analytic import Recovery, adam_direction


def _mismatch(g: torch.Tensor, target: torch.Tensor, sign: bool) -> torch.Tensor:
    """1 - cos(g, target); with ``sign``, g compared as Adam's first step makes it, g / (|g| + eps), smoothed at
    the gradient's own scale."""
    if sign:
        g = torch.tanh(g / (0.1 * g.abs().mean().detach()).clamp_min(1e-20))
    return 1 - torch.nn.functional.cosine_similarity(g, target, dim=0)


def supervised_loss(views, targets: torch.Tensor, lam: float, eps: float) -> torch.Tensor:
    """Supervised CroVCA as :func:`hashing.loss.crovca_loss` computes it with global prototypes, for given
    0/1 targets (each image's class's prototype code): mean over views of BCE(z_v, t) + lam * coding rate."""
    align = torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(z, targets) for z in views]).mean()
    return align + lam * coding_rate_loss(views, eps)


def starting_points(aux: np.ndarray, start: np.ndarray | None, b: int, seed: int = 0) -> np.ndarray:
    """2B dummy inputs (first views, then second views): ``start``'s rows (e.g. the analytic candidates)
    first, random rows of the server's auxiliary features for the rest."""
    rng = np.random.default_rng(seed)
    picks = np.asarray(aux, np.float32)[rng.choice(len(aux), 2 * b, replace=len(aux) < 2 * b)]
    if start is not None and len(start):
        picks[: min(len(start), 2 * b)] = np.asarray(start, np.float32)[: 2 * b]
    return picks


def recover(obs: Observation, model: Hasher, aux: np.ndarray, *, iterations: int = 200, lr: float = 0.05,
            seed: int = 0, start: np.ndarray | None = None, sign: bool = True,
            label_start: np.ndarray | None = None, layerwise: bool | None = None,
            label_every: int = 20) -> Recovery:
    """Dummy views whose simulated step best matches the silo's (cosine), as candidates (2B, d); supervised,
    with the images' classes (``label_start``: iDLG's class ranking, best first, to start from).
    ``layerwise`` (default: supervised) averages the cosine over the parameter tensors instead of taking it
    over their concatenation, so that the final shift's few entries, where the labels show, weigh as much as
    the first layer's many."""
    supervised = bool(obs.cfg.supervised)
    if supervised and obs.prototypes is None:
        raise ValueError("supervised update matching needs the global prototypes the server sent")
    whole = copy.deepcopy(model)
    whole.train_mode()
    # in LoRA mode the head on the (adapted) backbone's features: its own step, named as the reply names it
    net, prefix = (whole.head, "head.") if model.kind == "lora" else (whole, "")
    own = dict(net.named_parameters())
    names = [prefix + k for k, p in own.items() if p.requires_grad and prefix + k in obs.sent]
    params = [own[k[len(prefix):]] for k in names]
    targets = [adam_direction(obs, k).float().reshape(-1) for k in names]
    target = torch.cat(targets)
    layerwise = supervised if layerwise is None else layerwise
    per_image = None
    if model.kind == "dp":  # DP-SGD's objective: per-image terms, each image's gradient clipped
        from hashing.privacy.objective import DPCroVCALoss, reference_precision

        per_image = DPCroVCALoss(reference_precision(net, obs.cfg.eps), lam=obs.cfg.lam, eps=obs.cfg.eps,
                                 reduction="none")
    b = int(obs.metrics.get("num_examples", 1))
    start = starting_points(aux, start, b, seed)
    # non-negative dummies: x = softplus(theta), started at the auxiliary images
    theta = torch.from_numpy(np.log(np.expm1(np.clip(start, 1e-3, None)))).requires_grad_(True)
    y = codes = None
    if supervised:  # the classes with a prototype; each image starts at iDLG's best guess (else the first class)
        protos = np.asarray(obs.prototypes, np.float64)
        known = np.flatnonzero(np.isfinite(protos).all(axis=1))
        codes = torch.from_numpy((protos[known] > 0).astype(np.float32))
        first = next((int(np.flatnonzero(known == c)[0]) for c in (label_start if label_start is not None else [])
                      if c in known), 0)
        y = np.full(b, first)

    def clipped_sum(x: torch.Tensor, graph: bool) -> torch.Tensor:
        losses = per_image(net(torch.stack([x[:b], x[b:]], 1)))
        total = 0
        for i in range(b):
            gi = torch.autograd.grad(losses[i], params, create_graph=graph, retain_graph=True)
            flat = torch.cat([q.reshape(-1) for q in gi])
            total = total + flat * torch.clamp(obs.cfg.dp_clip / (flat.norm() + 1e-12), max=1.0)
        return total

    def mismatch(x: torch.Tensor, y: np.ndarray | None, graph: bool) -> torch.Tensor:
        if per_image is not None:
            return _mismatch(clipped_sum(x, graph), target, sign)
        views = [net(x[:b]), net(x[b:])]
        loss = (supervised_loss(views, codes[y], obs.cfg.lam, obs.cfg.eps) if supervised
                else crovca_loss(views, lam=obs.cfg.lam, eps=obs.cfg.eps)[0])
        grads = torch.autograd.grad(loss, params, create_graph=graph)
        if layerwise:  # every tensor counts alike: the labels speak through the small final ones
            return torch.stack([_mismatch(q.reshape(-1), t, sign) for q, t in zip(grads, targets)]).mean()
        return _mismatch(torch.cat([q.reshape(-1) for q in grads]), target, sign)

    def sweep(x: torch.Tensor, y: np.ndarray) -> np.ndarray:
        y = y.copy()
        for i in range(b):
            scores = []
            for c in range(len(known)):
                y[i] = c
                scores.append(float(mismatch(x, y, False)))
            y[i] = int(np.argmin(scores))
        return y

    opt = torch.optim.Adam([theta], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iterations))
    best, best_loss, best_labels = None, float("inf"), None
    with whole.renorm(obs.cfg.batch_renorm):
        for it in range(iterations):
            x = torch.nn.functional.softplus(theta)
            if supervised and it % label_every == 0:
                y = sweep(x.detach(), y)
            match = mismatch(x, y, True)
            if float(match.detach()) < best_loss:
                best_loss, best = float(match.detach()), x.detach().numpy().copy()
                best_labels = None if y is None else known[y].copy()
            opt.zero_grad()
            match.backward()
            opt.step()
            sched.step()
        if best is None:  # no iterations: the start
            x = torch.nn.functional.softplus(theta)
            y = sweep(x.detach(), y) if supervised else y
            best, best_labels = x.detach().numpy().copy(), None if y is None else known[y].copy()
            best_loss = float(mismatch(x, y, False))
    whole.eval()
    return Recovery(best, np.ones(len(best), dtype=int), names[0], "features", labels=best_labels,
                    mismatch=best_loss)
