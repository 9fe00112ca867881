"""The global model of a federated run, as every node builds it: same config, same seed, same start.

Its trainable state splits in two: the parameters (which the server's strategy
aggregates) and the BatchNorm buffers (which the server sets from the silos'
pooled statistics, never by averaging).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

import torch

from .backbones import create_backbone, weights_fingerprint
from .coder import HashCoder
from .fedconfig import FedConfig
from .finetune import LoraHasher, build_lora_hasher
from .lora import load_trainable_state, state_nbytes, trainable_state
from .model import model_version

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
PROTOTYPES = "prototypes"

_backbones: dict[tuple, tuple[torch.nn.Module, str, int]] = {}
_lock = threading.Lock()


def backbone_for(cfg: FedConfig) -> tuple[torch.nn.Module, str, int]:
    """The frozen backbone (built once per process), its weights fingerprint and feature width."""
    key = (cfg.backbone, cfg.weights)
    with _lock:
        if key not in _backbones:
            model, dim = create_backbone(cfg.backbone, cfg.weights or None)
            model = model.to(memory_format=torch.channels_last)
            _backbones[key] = (model, weights_fingerprint(model), dim)
        return _backbones[key]


def build_model(cfg: FedConfig, feature_dim: int) -> torch.nn.Module:
    """A fresh global model, identical on every node for the same config (seeded)."""
    if cfg.mode == "lora":
        return build_lora_hasher(cfg.backbone, cfg.weights or None, cfg.bits, r=cfg.lora_r, alpha=cfg.lora_alpha,
                                 variant=cfg.variant, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    return HashCoder(feature_dim, cfg.bits, cfg.variant)


def head_of(model: torch.nn.Module) -> HashCoder:
    return model.head if isinstance(model, LoraHasher) else model


def is_bn_buffer(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in BN_BUFFERS


def split_state(model: torch.nn.Module) -> tuple["OrderedDict[str, torch.Tensor]", "OrderedDict[str, torch.Tensor]"]:
    """(parameters, BatchNorm buffers) of the trainable state; never the frozen backbone."""
    params, buffers = OrderedDict(), OrderedDict()
    for k, v in trainable_state(model).items():
        (buffers if is_bn_buffer(k) else params)[k] = v
    return params, buffers


def load_state(model: torch.nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]) -> None:
    """Strict: exactly the names of :func:`split_state` (a WeightsError names the offenders)."""
    load_trainable_state(model, {**params, **{k: v for k, v in buffers.items() if k != PROTOTYPES}})


def version_of(params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor], cfg: FedConfig,
               weights_id: str) -> str:
    """The model version (hash of the weights and the function config) of a global state."""
    state = OrderedDict(list(params.items()) + [(k, v) for k, v in buffers.items() if k != PROTOTYPES])
    return model_version(state, cfg.function_config() | {"weights_id": weights_id})


__all__ = ["backbone_for", "build_model", "head_of", "split_state", "load_state", "version_of", "state_nbytes",
           "PROTOTYPES", "LoraHasher"]
