"""Label inference from the update (the iDLG idea, Zhao et al. 2020, for supervised CroVCA).

Supervised CroVCA pulls the logits of an image of class ``c`` towards the code of the global prototype of
``c`` (``t = 1[prototype_c > 0]``, prototypes the server sent) with a BCE loss, so the gradient on the
final BatchNorm's shift is ``sum_i (sigmoid(z_ik) - t_ik)`` per bit (plus the coding-rate term): negative
where the batch's targets are 1. Adam's first step keeps exactly that sign. The server reads the targets
back as ``t_k = 1[shift moved up]`` and ranks the classes by how many bits of their prototype's code agree;
its guess for a batch of B images is the top B classes.

Entry point: :func:`infer` (observation, model sent -> classes ranked, best first).
"""
from __future__ import annotations

import numpy as np

from hashing.hashers import Hasher

from ..victim import Observation
from .analytic import adam_direction


def shift_name(model: Hasher) -> str:
    norm = getattr(model, "norm", None)
    bias = getattr(norm, "bias", None)
    for name, p in model.named_parameters():
        if bias is not None and p is bias:
            return name
    raise ValueError(f"the {model.kind} head has no trainable final shift to read the targets from")


def infer(obs: Observation, model: Hasher) -> np.ndarray:
    """Classes ranked by agreement of their prototype code with the targets the update's sign shows."""
    if obs.prototypes is None:
        raise ValueError("label inference needs the global prototypes the server sent (supervised CroVCA)")
    protos = np.asarray(obs.prototypes, np.float64)
    targets = adam_direction(obs, shift_name(model)).numpy() < 0  # gradient < 0 where the target is 1
    known = np.isfinite(protos).all(axis=1)
    agree = np.where(known, ((protos > 0) == targets[None, :]).mean(axis=1), -1.0)
    return np.argsort(-agree, kind="stable")
