"""The trainable state of a hash function: what federation exchanges and what a model file holds.

* :func:`trainable_state`: every parameter with ``requires_grad=True``, plus the buffers of the
  modules that own one (a hash head's BatchNorm statistics) or that say ``federated_buffers = True``
  (the DP head's frozen projection), in module order. Never the frozen backbone, never LoRA layers'
  own buffers.
* :func:`split_state`: the same, split into the parameters (which a strategy aggregates) and the
  buffers (which the server sets: pooled statistics, released moments; never averaged).
* :func:`load_state`: strict, the inverse.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .backbones import state_mismatch
from .errors import WeightsError


class _NoTunerLayer:
    """Stands for peft's BaseTunerLayer while peft is not imported: nothing is an instance."""


def tuner_layer_cls() -> type:
    """peft's adapter layer class, or a class nothing is an instance of while peft is not imported.

    A module can hold peft adapter layers only once peft is imported; importing it (and with it
    transformers) takes seconds, which a probe-mode client or server should not pay per process."""
    if "peft" not in sys.modules:
        return _NoTunerLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def _live(module: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Live references, in module order: trainable params, then the owning module's buffers."""
    tuner_cls = tuner_layer_cls()
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for mname, m in module.named_modules():
        prefix = f"{mname}." if mname else ""
        trainable = [(n, p) for n, p in m.named_parameters(recurse=False) if p.requires_grad]
        for n, p in trainable:
            out[prefix + n] = p
        shared = trainable or getattr(m, "federated_buffers", False)
        if shared and not isinstance(m, tuner_cls) and "lora_" not in mname:
            for n, b in m.named_buffers(recurse=False):
                if b is not None and not b.is_complex():  # floating, integer (and bool) buffers
                    out[prefix + n] = b
    return out


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).clone()


def trainable_state(module: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The arrays federation exchanges: detached CPU clones, deterministic module order."""
    return OrderedDict((k, _clone(v)) for k, v in _live(module).items())


def split_state(module: nn.Module) -> tuple["OrderedDict[str, torch.Tensor]", "OrderedDict[str, torch.Tensor]"]:
    """(parameters, server-set buffers) of the trainable state, as clones; never the frozen backbone."""
    params, buffers = OrderedDict(), OrderedDict()
    for k, v in _live(module).items():
        (params if isinstance(v, nn.Parameter) else buffers)[k] = _clone(v)
    return params, buffers


def load_state(module: nn.Module, state: Mapping[str, Any]) -> None:
    """Copy ``state`` (tensors or numpy arrays) into ``module`` in place.

    Strict: the names must be exactly those of ``trainable_state(module)`` and every shape must
    match, else WeightsError naming the first few offenders (nothing is loaded then)."""
    live = _live(module)
    tensors = {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in state.items()}
    problems = state_mismatch(live, tensors)
    if problems:
        raise WeightsError(
            "trainable state does not fit this model: " + ", ".join(problems)
            + ": build the model with the same backbone, LoRA targets/rank and head as the sender"
        )
    with torch.no_grad():
        for k, target in live.items():
            target.copy_(tensors[k].to(device=target.device, dtype=target.dtype))


def state_nbytes(state: Mapping[str, Any]) -> int:
    """Total bytes of a state (tensors or numpy arrays)."""
    total = 0
    for v in state.values():
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
        total += t.numel() * t.element_size()
    return total
