"""The global model of a federated run, as every node builds it: same config, same seed, same start.

Its trainable state splits in two: the parameters (which the server's strategy
aggregates) and the BatchNorm buffers (which the server sets from the silos'
pooled statistics, never by averaging).
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from . import atomic
from .backbones import create_backbone, resolve_weights, weights_fingerprint
from .features import cache_root
from .coder import HashCoder
from .dp import DP_BUFFERS, DPHashCoder
from .fedconfig import FedConfig
from .finetune import LoraHasher, build_lora_hasher
from .lora import load_trainable_state, state_nbytes, trainable_state
from .model import model_version

log = logging.getLogger("fedhash.fedmodel")

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# buffers the server sets (never averaged): BatchNorm's, and the DP head's frozen projection
SERVER_BUFFERS = BN_BUFFERS + DP_BUFFERS
PROTOTYPES = "prototypes"

_backbones: dict[tuple, tuple[torch.nn.Module, str, int]] = {}
_identities: dict[tuple, tuple[str, int]] = {}  # (fingerprint, width) read from backbone_identity's disk memo
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


def backbone_identity(cfg: FedConfig) -> tuple[str, int]:
    """(weights fingerprint, feature width) of ``cfg``'s backbone, without building it when it can.

    Building a timm backbone imports timm and torchvision (seconds per process), and a node whose
    features are cached needs only these two values, the cache key. They are memoised on disk,
    keyed by the backbone name, the sha256 of the weights file and the timm and torch versions;
    random weights (no file) are always built.
    """
    key = (cfg.backbone, cfg.weights)
    with _lock:
        if key in _backbones:
            return _backbones[key][1], _backbones[key][2]
        if key in _identities:  # read from the disk memo before: no second hash of the weights file
            return _identities[key]
    memo = _identity_memo(cfg)
    if memo is not None and memo.exists():
        try:
            got = json.loads(memo.read_text())
            ident = str(got["weights_fingerprint"]), int(got["feature_dim"])
            with _lock:
                _identities[key] = ident
            return ident
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: build below and write it again
    _, wid, dim = backbone_for(cfg)
    if memo is not None:
        try:
            atomic.write_json(memo, {"backbone": cfg.backbone, "weights_fingerprint": wid, "feature_dim": dim})
        except OSError as e:
            log.warning("could not memoise the backbone's fingerprint under %s (%s)", memo.parent, e)
    return wid, dim


def _identity_memo(cfg: FedConfig) -> Path | None:
    from importlib.metadata import version

    path = resolve_weights(cfg.backbone, cfg.weights or None)
    if path is None or not path.is_file():
        return None  # random weights, or a missing file (backbone_for names the problem)
    what = {"backbone": cfg.backbone, "weights_sha256": atomic.sha256_file(path), "timm": version("timm"),
            "torch": torch.__version__, "format": 1}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]
    root = cache_root(cfg.cache_dir)
    return root / "backbones" / f"{digest}.json"


def build_model(cfg: FedConfig, feature_dim: int) -> torch.nn.Module:
    """A fresh global model, identical on every node for the same config (seeded)."""
    if cfg.mode == "lora":
        return build_lora_hasher(cfg.backbone, cfg.weights or None, cfg.bits, r=cfg.lora_r, alpha=cfg.lora_alpha,
                                 variant=cfg.variant, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.dp != "none":  # under any DP: the head whose statistics are released once, not pooled each round
        return DPHashCoder(feature_dim, cfg.bits, cfg.dp_dims)
    return HashCoder(feature_dim, cfg.bits, cfg.variant)


def head_of(model: torch.nn.Module) -> HashCoder | DPHashCoder:
    return model.head if isinstance(model, LoraHasher) else model


def is_bn_buffer(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in SERVER_BUFFERS


def split_state(model: torch.nn.Module) -> tuple["OrderedDict[str, torch.Tensor]", "OrderedDict[str, torch.Tensor]"]:
    """(parameters, server-set buffers) of the trainable state; never the frozen backbone."""
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
