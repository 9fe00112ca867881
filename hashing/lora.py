"""LoRA adapters (peft) on timm backbones, and the state federation exchanges.

* :func:`lora_targets` picks the layers to adapt per architecture: for EfficientNet
  the 1x1 convolutions (``conv_pw``, ``conv_pwl``) of the last stage(s) of
  ``model.blocks`` plus ``conv_head``; for Vision Transformers every ``attn.qkv``
  Linear.
* :func:`wrap_lora` injects the adapters in place with ``peft.inject_adapter_in_model``
  (the model stays the timm model; no ``PeftModel`` wrapper), freezes every base
  weight and leaves only ``lora_`` parameters trainable.
* :class:`LoraHasher` is the ``lora`` kind of :mod:`hashing.hashers`: the wrapped backbone
  followed by a :class:`~hashing.coder.HashCoder`, on images. Its trainable state
  (:mod:`hashing.state`) is the LoRA tensors and the head, never the frozen backbone.

Train with :func:`set_lora_train`, not ``model.train()``: it keeps the frozen
backbone in eval mode (its BatchNorm statistics must not drift on one silo) and
switches only the LoRA dropout to training behaviour.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .backbones import create_backbone, data_config, weights_fingerprint
from .coder import HashCoder
from .errors import ConfigError, TrainingError
from .hashers import Hasher, Inputs, register
from .state import tuner_layer_cls
from .views import augment, load_batch, normalise, resize

__all__ = ["lora_targets", "wrap_lora", "is_lora_wrapped", "set_lora_train", "LoraHasher", "build_lora_hasher"]


# --------------------------------------------------------------------------- #
# Target selection
# --------------------------------------------------------------------------- #
def _arch_name(model: nn.Module, name: str | None) -> str:
    if name:
        return name
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _is_efficientnet(model: nn.Module, name: str) -> bool:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not len(blocks):
        return False
    has_pw = any(hasattr(b, "conv_pwl") or hasattr(b, "conv_pw") for st in blocks for b in _children(st))
    return has_pw and ("efficientnet" in name.lower() or "mobilenet" in name.lower()
                       or type(model).__name__ in ("EfficientNet", "MobileNetV3"))


def _children(stage: nn.Module) -> Iterable[nn.Module]:
    return stage.children() if isinstance(stage, nn.Sequential) else [stage]


def lora_targets(model: nn.Module, name: str | None = None, *, stages: int = 2,
                 include_head: bool = True) -> list[str]:
    """Full module names to adapt in ``model`` (a timm model, before wrapping).

    EfficientNet/MobileNet: ``conv_pw`` and ``conv_pwl`` (1x1 convs) of every block in
    the last ``stages`` stages of ``model.blocks``, plus ``conv_head`` when
    ``include_head``. ViT (any model whose blocks have ``attn.qkv`` Linear layers):
    every ``qkv``. Other architectures raise ConfigError: pass ``targets=`` to
    :func:`wrap_lora` yourself.
    """
    arch = _arch_name(model, name)
    modules = dict(model.named_modules())
    if _is_efficientnet(model, arch):
        if stages < 1:
            raise ConfigError(f"stages={stages}: LoRA needs at least one stage of {arch!r}")
        out: list[str] = []
        n_stages = len(model.blocks)
        for si in range(max(0, n_stages - stages), n_stages):
            stage = model.blocks[si]
            blocks = list(stage.children()) if isinstance(stage, nn.Sequential) else [stage]
            for bi, block in enumerate(blocks):
                prefix = f"blocks.{si}.{bi}" if isinstance(stage, nn.Sequential) else f"blocks.{si}"
                for attr in ("conv_pw", "conv_pwl"):
                    full = f"{prefix}.{attr}"
                    mod = modules.get(full)
                    if isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) and mod.groups == 1:
                        out.append(full)
        head = modules.get("conv_head")
        if include_head and isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1):
            out.append("conv_head")
        if out:
            return out
    qkv = [n for n, m in modules.items() if n.endswith("attn.qkv") and isinstance(m, nn.Linear)]
    if qkv:
        return qkv
    raise ConfigError(
        f"no default LoRA targets for architecture {arch!r}: pass targets=[module names] "
        f"(nn.Linear or nn.Conv2d, e.g. {next((n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))), 'fc')!r})"
    )


# --------------------------------------------------------------------------- #
# Wrapping
# --------------------------------------------------------------------------- #
def is_lora_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` holds any peft adapter layer."""
    cls = tuner_layer_cls()
    return any(isinstance(m, cls) for m in model.modules())


def wrap_lora(model: nn.Module, r: int = 16, alpha: float = 16, dropout: float = 0.1,
              targets: Sequence[str] | None = None, *, name: str | None = None) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and return it.

    ``targets``: full module names (or peft name suffixes); default
    :func:`lora_targets`. Afterwards every base parameter has requires_grad=False and
    only ``lora_A``/``lora_B`` weights are trainable. ``lora_B`` starts at zero, so
    the wrapped model computes exactly what it did before. The model keeps its
    train/eval mode (timm backbones come in eval mode).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if r < 1:
        raise ConfigError(f"LoRA rank r={r}: must be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA dropout={dropout}: must be in [0, 1)")
    if is_lora_wrapped(model):
        raise ConfigError("model already holds LoRA adapters: wrap a freshly built backbone")
    targets = list(targets) if targets is not None else lora_targets(model, name)
    if not targets:
        raise ConfigError("targets=[] names no module: pass LoRA target module names")
    modules = dict(model.named_modules())
    # peft matches a target as an exact name or a ".suffix"; check that each one hits something we support.
    for t in targets:
        hits = [m for n, m in modules.items() if n == t or n.endswith("." + t)]
        if not hits:
            raise ConfigError(f"LoRA target {t!r} names no module of {_arch_name(model, name)!r}: pass targets= existing module names")
        bad = [type(m).__name__ for m in hits if not isinstance(m, (nn.Linear, nn.Conv2d))]
        if bad:
            raise ConfigError(f"LoRA target {t!r} is a {bad[0]}: only nn.Linear and nn.Conv2d layers can be adapted")
    was_training = model.training
    config = LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=targets,
                        bias="none", init_lora_weights=True)
    model = inject_adapter_in_model(config, model)
    # peft already froze the base; make sure of it (and of anything it might skip).
    for pname, p in model.named_parameters():
        p.requires_grad_("lora_" in pname)
    model.train(was_training)
    model.fedhash_lora = {"r": int(r), "alpha": float(alpha), "dropout": float(dropout), "targets": list(targets)}
    return model


def set_lora_train(model: nn.Module, mode: bool = True) -> nn.Module:
    """Training mode for a model that holds a LoRA-wrapped frozen backbone.

    Every module whose parameters are all frozen (the backbone, its BatchNorms)
    stays in eval mode; LoRA dropout and modules that own trainable parameters (a
    hash head) follow ``mode``. Returns ``model``.
    """
    model.train(mode)
    if not mode:
        return model
    for mname, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            m.eval()
    # Parameter-less modules under the frozen backbone (activations, pooling, Identity) have no
    # train/eval behaviour except dropout / drop-path: keep those inside frozen regions in eval.
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d)) and "lora_dropout" not in mname and _under_frozen(model, mname):
            m.eval()
        if type(m).__name__ == "DropPath" and _under_frozen(model, mname):
            m.eval()
    return model


def _under_frozen(model: nn.Module, mname: str) -> bool:
    """True if the nearest ancestor that owns parameters has them all frozen."""
    parts = mname.split(".")
    for i in range(len(parts) - 1, -1, -1):
        anc = model.get_submodule(".".join(parts[:i])) if i else model
        ps = list(anc.parameters())
        if ps:
            return not any(p.requires_grad for p in ps)
    return False


# --------------------------------------------------------------------------- #
# The hasher
# --------------------------------------------------------------------------- #
class LoraHasher(Hasher):
    """A LoRA-wrapped frozen backbone followed by a HashCoder: images -> logits z (the ``lora`` kind).

    Probe mode trains the head on cached backbone features; this kind runs the (adapted) backbone on
    fresh augmentations every step, so it works on images."""

    kind = "lora"

    def __init__(self, backbone: nn.Module, head: HashCoder, name: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.name = name
        self.bits = head.bits
        self.preprocess = data_config(backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @property
    def norm(self) -> nn.Module:
        return self.head.norm

    def architecture(self) -> dict[str, Any]:
        cfg = getattr(self.backbone, "fedhash_lora", {})
        return self.head.architecture() | {"lora_r": cfg.get("r"), "lora_alpha": cfg.get("alpha"),
                                           "lora_dropout": cfg.get("dropout"), "lora_targets": cfg.get("targets")}

    def _views(self, x: torch.Tensor, size: int, g: torch.Generator | None, clean: bool = False) -> torch.Tensor:
        v = resize(x, size) if clean else augment(x, size, g)
        return normalise(v.clone(), self.preprocess["mean"], self.preprocess["std"]).contiguous(
            memory_format=torch.channels_last)

    @torch.inference_mode()
    def backbone_features(self, inputs: Inputs, idx: np.ndarray, batch_size: int = 128) -> np.ndarray:
        """Pooled (LoRA-adapted) backbone features of the clean view of images ``idx``: (n, d) float32."""
        self.eval()
        out = []
        for s in range(0, len(idx), batch_size):
            x = load_batch(inputs.ds, np.asarray(idx[s : s + batch_size]), inputs.size)
            out.append(self.backbone(self._views(x, inputs.size, None, clean=True)).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.head.in_dim), np.float32)

    def encode(self, inputs: Inputs, idx: np.ndarray) -> np.ndarray:
        return self.head.encode_features(self.backbone_features(inputs, idx))

    def activations(self, inputs: Inputs, idx: np.ndarray) -> np.ndarray:
        return self.head.encode_features(self.backbone_features(inputs, idx), 4096, pre_norm=True)

    def check_inputs(self, inputs: Inputs, supervised: bool) -> None:
        if inputs.n_train < 2:
            raise TrainingError(f"need at least 2 training images, got {inputs.n_train}; give the silo more data")
        if not self.trainable_parameters():
            raise ConfigError("the model has no trainable parameters; wrap the backbone with LoRA first")

    def view_batch(self, inputs: Inputs, idx: np.ndarray, rng: np.random.Generator,
                   g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Two fresh augmentations of each image (the backbone runs on them: nothing is cached)."""
        x = load_batch(inputs.ds, inputs.train[idx], inputs.size)
        return self._views(x, inputs.size, g), self._views(x, inputs.size, g)

    def train_mode(self) -> None:
        set_lora_train(self, True)


@register("lora", reads_features=False)
def _lora(*, feature_dim: int, bits: int, backbone: str, weights: str | None = None, r: int = 16,
          alpha: float = 16.0, dropout: float = 0.1, variant: str = "small") -> LoraHasher:
    return build_lora_hasher(backbone, weights, bits, r=r, alpha=alpha, dropout=dropout, variant=variant,
                             feature_dim=feature_dim)


def build_lora_hasher(backbone_name: str, weights: str | None, bits: int, *, r: int = 16, alpha: float = 16.0,
                      dropout: float = 0.1, variant: str = "small", feature_dim: int | None = None) -> LoraHasher:
    """Backbone with its offline weights, LoRA adapters and a fresh head (seed torch first:
    :func:`hashing.hashers.create_hasher` does)."""
    backbone, dim = create_backbone(backbone_name, weights or None)
    if feature_dim is not None and int(feature_dim) != dim:
        raise ConfigError(f"backbone {backbone_name} gives {dim}-d features, not {feature_dim}; use its own width")
    weights_id = weights_fingerprint(backbone)  # of the plain backbone, as hashing.backbones.backbone_identity
    backbone = wrap_lora(backbone, r=r, alpha=alpha, dropout=dropout, name=backbone_name)
    hasher = LoraHasher(backbone, HashCoder(dim, bits, variant), backbone_name)
    hasher.weights_id = weights_id
    return hasher
