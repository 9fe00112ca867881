"""LoRA adapters (peft) on timm backbones, and the state federation exchanges.

* :func:`lora_targets` picks the layers to adapt per architecture: for EfficientNet
  the 1x1 convolutions (``conv_pw``, ``conv_pwl``) of the last stage(s) of
  ``model.blocks`` plus ``conv_head``; for Vision Transformers every ``attn.qkv``
  Linear.
* :func:`wrap_lora` injects the adapters in place with ``peft.inject_adapter_in_model``
  (the model stays the timm model; no ``PeftModel`` wrapper), freezes every base
  weight and leaves only ``lora_`` parameters trainable.
* :func:`trainable_state` / :func:`load_trainable_state` are the exact arrays a
  client sends and receives: trainable parameters plus the buffers of the modules
  that own them (e.g. a hash head's BatchNorm statistics), in module order.

Train with :func:`set_lora_train`, not ``model.train()``: it keeps the frozen
backbone in eval mode (its BatchNorm statistics must not drift on one silo) and
switches only the LoRA dropout to training behaviour.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import ConfigError, WeightsError
from .backbones import state_mismatch

__all__ = [
    "lora_targets",
    "wrap_lora",
    "is_lora_wrapped",
    "set_lora_train",
    "trainable_state",
    "load_trainable_state",
    "state_nbytes",
]


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
class _NoTunerLayer:
    """Stands for peft's BaseTunerLayer while peft is not imported: nothing is an instance."""


def _tuner_layer_cls():
    # A module can hold peft adapter layers only once peft is imported; importing it (and with it
    # transformers) takes seconds, which a probe-mode client or server should not pay per process.
    if "peft" not in sys.modules:
        return _NoTunerLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def is_lora_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` holds any peft adapter layer."""
    cls = _tuner_layer_cls()
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
# Federation state
# --------------------------------------------------------------------------- #
def _live_trainable(module: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Live references, in module order: trainable params, then the owning module's buffers."""
    tuner_cls = _tuner_layer_cls()
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for mname, m in module.named_modules():
        prefix = f"{mname}." if mname else ""
        trainable = [(n, p) for n, p in m.named_parameters(recurse=False) if p.requires_grad]
        for n, p in trainable:
            out[prefix + n] = p
        shared = trainable or getattr(m, "federated_buffers", False)  # the DP head's frozen, server-set buffers
        if shared and not isinstance(m, tuner_cls) and "lora_" not in mname:
            for n, b in m.named_buffers(recurse=False):
                if b is not None and not b.is_complex():  # floating, integer (and bool) buffers
                    out[prefix + n] = b
    return out


def trainable_state(module: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The arrays federation exchanges: detached CPU clones, deterministic module order.

    Every parameter with ``requires_grad=True`` plus the buffers (BatchNorm
    ``running_mean``/``running_var``/``num_batches_tracked``, ...) of the modules that
    own a trainable parameter, except LoRA layers themselves. Frozen backbone
    weights and statistics are never included.
    """
    return OrderedDict((k, v.detach().to("cpu", copy=True).clone()) for k, v in _live_trainable(module).items())


def state_nbytes(state: Mapping[str, Any]) -> int:
    """Total bytes of a state (tensors or numpy arrays)."""
    total = 0
    for v in state.values():
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
        total += t.numel() * t.element_size()
    return total


def load_trainable_state(module: nn.Module, state: Mapping[str, Any]) -> None:
    """Copy ``state`` (from :func:`trainable_state`, tensors or numpy arrays) into ``module`` in place.

    Strict: the names must be exactly those of ``trainable_state(module)`` and every
    shape must match, else WeightsError naming the first few offenders (nothing is
    loaded then).
    """
    live = _live_trainable(module)
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
