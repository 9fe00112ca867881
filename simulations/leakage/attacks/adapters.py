"""Inverting Gradients through the adapters (LoRA mode; Geiping et al. 2020): images straight from a silo's
LoRA update, by double backward through the backbone.

In LoRA mode a silo's reply carries its adapters (``lora_A``/``lora_B`` of the backbone's adapted layers)
after its local steps. The honest server knows the model it sent (backbone, adapters, head), the loss
(CroVCA with the run's ``lam``/``eps``), the number of images (``num_examples``) and that each step sees two
augmented views of each. It optimises ``2B`` dummy view images ``x`` in [0, 1] (a sigmoid of free pixels,
started at images of its own auxiliary data; grey data is one channel copied to three, as the silos'
loader does), normalised as the silos normalise theirs (``hashing.views.normalise``), so that the
adapters' gradient they cause, ``d CroVCA / d adapters`` (``create_graph=True``: the second backward runs
through the whole backbone), points the way the observed adapter step does: ``1 - cos + tv * TV(x)``.

As in :mod:`.matching`, the observed step is AdamW's (weight decay removed: :func:`.analytic.adam_direction`),
``g / (|g| + 1e-8)`` after one step, and the dummies' gradient is compared through the same smoothed sign.
Only the adapters are matched, never the head: what this attack shows is what the adapters alone leak.
The simulated step runs the model as the silo trains it (``train_mode``: frozen backbone in eval, the head's
Batch Renormalization on the batch) with LoRA dropout off (the silo's dropout masks are its own).

Entry point: :func:`recover` (observation, model sent, auxiliary images -> images (2B, S, S[, 3]) in [0, 1]).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hashing.hashers import Hasher
from hashing.loss import crovca_loss
from hashing.views import normalise

from ..victim import Observation
from .analytic import adam_direction
from .invert import total_variation


@dataclass
class Images:
    """The dummy view images the server ends with, and how well their simulated step matched."""

    images: np.ndarray   # (2B, S, S) grey or (2B, S, S, 3), in [0, 1]; rows 0..B-1 first views, B.. second
    match: float         # 1 - cosine of the adapters' step at the end (0 is a perfect match)
    start_match: float   # the same at the start (the auxiliary images)


def adapter_names(obs: Observation) -> list[str]:
    names = [k for k in obs.sent if "lora_" in k]
    if not names:
        raise ValueError("the reply holds no LoRA adapters: the adapters attack needs mode = \"lora\"")
    return names


def recover(obs: Observation, model: Hasher, aux_images: np.ndarray, *, iterations: int = 100, lr: float = 0.05,
            tv: float = 0.05, seed: int = 0, sign: bool = True, start: np.ndarray | None = None,
            softness: float = 0.1) -> Images:
    """Dummy view images whose simulated adapter step best matches the silo's (cosine).

    ``aux_images``: the server's own images (n, S, S) or (n, S, S, 3) in [0, 1], the dummies' starts drawn from
    them; ``start``: the 2B starts themselves instead (first views, then second views)."""
    if obs.cfg.supervised:
        raise ValueError("the adapters attack simulates unsupervised CroVCA (the supervised loss needs the batch's "
                         "labels too)")
    try:  # double backward through timm's fused attention is not implemented on CPU (ViT backbones)
        from timm.layers import set_fused_attn

        set_fused_attn(False)
    except ImportError:  # pragma: no cover - timm always has it
        pass
    net = copy.deepcopy(model)
    net.train_mode()
    for name, m in net.named_modules():
        if "lora_dropout" in name:
            m.eval()
    names = adapter_names(obs)
    by_name = dict(net.named_parameters())
    params = [by_name[k] for k in names]
    for k, p in by_name.items():  # only the adapters' gradient is simulated
        p.requires_grad_(k in names)
    target = torch.cat([adam_direction(obs, k).float().reshape(-1) for k in names])
    b = int(obs.metrics.get("num_examples", 1))
    pre = getattr(net, "preprocess", None) or {}
    mean, std = pre.get("mean", (0.5, 0.5, 0.5)), pre.get("std", (0.5, 0.5, 0.5))
    aux = np.asarray(aux_images, np.float32)
    rng = np.random.default_rng(seed)
    start = aux[rng.choice(len(aux), 2 * b, replace=len(aux) < 2 * b)] if start is None else np.asarray(start, np.float32)
    start = start[:, None] if start.ndim == 3 else start.transpose(0, 3, 1, 2)
    free = torch.logit(torch.from_numpy(np.ascontiguousarray(start)).clamp(0.02, 0.98)).requires_grad_(True)
    opt = torch.optim.Adam([free], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iterations))

    def mismatch(x: torch.Tensor) -> torch.Tensor:
        v = normalise(x, mean, std).contiguous(memory_format=torch.channels_last)
        with net.renorm(obs.cfg.batch_renorm):
            loss, _ = crovca_loss([net(v[:b]), net(v[b:])], lam=obs.cfg.lam, eps=obs.cfg.eps)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        g = torch.cat([q.reshape(-1) for q in grads])
        if sign:  # compare as Adam's first step does: g / (|g| + eps), smoothed at the gradient's own scale
            g = torch.tanh(g / (softness * g.abs().mean().detach()).clamp_min(1e-20))
        return 1 - F.cosine_similarity(g, target, dim=0)

    first = None
    best, best_match = None, float("inf")
    for _ in range(iterations):
        x = torch.sigmoid(free)
        match = mismatch(x)
        m = float(match.detach())
        first = m if first is None else first
        if m < best_match:
            best_match, best = m, x.detach().clone()
        opt.zero_grad()
        (match + tv * total_variation(x)).backward()
        opt.step()
        sched.step()
    x = torch.sigmoid(free).detach()
    m = float(mismatch(x).detach())
    if m < best_match or best is None:
        best_match, best = m, x
    first = best_match if first is None else first
    out = best[:, 0].numpy() if best.shape[1] == 1 else best.permute(0, 2, 3, 1).numpy()
    return Images(out, best_match, first)
