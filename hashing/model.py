"""A trained hash function on disk, and its model version.

The model version is a hash of the trainable weights and the config that
defines the function (backbone, weights, input size, bits, head). Every index
and every query carries it: codes of different hash functions never meet.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch

from . import atomic
from .coder import HashCoder
from .errors import FedhashError

FORMAT = 1


def model_version(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> str:
    """sha256 (first 16 hex digits) over the config (JSON, sorted) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def function_config(coder: HashCoder, backbone: str, weights: str, size: int) -> dict:
    """What, besides the weights, defines the hash function."""
    return {"backbone": backbone, "weights": weights, "size": int(size), "bits": coder.bits,
            "in_dim": coder.in_dim, "variant": coder.variant, "hidden": coder.hidden}


def save_model(path: str | Path, coder: HashCoder, *, backbone: str, weights: str, size: int,
               extra: Mapping[str, Any] | None = None) -> str:
    """Write the head and its function config atomically; return the model version."""
    state = OrderedDict((k, v.detach().cpu().clone()) for k, v in coder.state_dict().items())
    cfg = function_config(coder, backbone, weights, size)
    version = model_version(state, cfg)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "state": state, "config": cfg, "model_version": version,
                "extra": dict(extra or {})}, buf)
    atomic.write_bytes(path, buf.getvalue())
    return version


def load_model(path: str | Path) -> tuple[HashCoder, dict]:
    """Load a head saved by :func:`save_model`; returns (coder in eval mode, record without the state)."""
    path = Path(path)
    if not path.exists():
        raise FedhashError(f"no model at {path}; train one first (fedhash train)")
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
        cfg = rec["config"]
        coder = HashCoder(cfg["in_dim"], cfg["bits"], cfg["variant"], cfg["hidden"] if cfg["variant"] == "large" else None)
        coder.load_state_dict(rec["state"])
    except FedhashError:
        raise
    except Exception as e:
        raise FedhashError(f"model file {path} is unreadable or not a fedhash model ({type(e).__name__}: {e}); retrain it") from e
    if model_version(rec["state"], cfg) != rec["model_version"]:
        raise FedhashError(f"model file {path}: weights do not match its recorded model version (corrupt?); retrain it")
    coder.eval()
    rec = {k: v for k, v in rec.items() if k != "state"}
    return coder, rec
