"""One door to every kind of hash function: ``create_hasher(kind, **options)``, as timm's ``create_model``.

    from hashing.hashers import create_hasher
    hasher = create_hasher("probe", feature_dim=1280, bits=64)            # HashCoder on cached features
    hasher = create_hasher("lora", feature_dim=1280, bits=64, backbone="tf_efficientnet_lite0")
    hasher = create_hasher("dp", feature_dim=1280, bits=64, dims=256)     # the DP-valid head

Kinds (``hasher_kinds()``; :func:`register` adds more, as each built-in kind's module does for itself):

``probe``
    :class:`hashing.coder.HashCoder`, CroVCA's hash head, on cached features of the frozen backbone.
``lora``
    :class:`hashing.lora.LoraHasher`: the backbone with LoRA adapters, then a HashCoder; on images.
``dp``
    :class:`hashing.privacy.head.DPHashCoder`: the head whose every data-dependent statistic is released
    once under differential privacy (README, "Differential privacy"); on cached features.

Every hasher is an ``nn.Module`` with the interface of :class:`Hasher`, so that training, federation and
evaluation need not ask which kind they hold: encode a silo's images, the activations the server pools
(and which: ``pooling``), a training batch of two views, the trainable parameters, and the state
federation exchanges (:mod:`hashing.state`). What remains kind-specific is building one from a model
file's identity (:func:`hashing.model.build`) and DP-SGD, which trains the DP head only.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from . import state as _state
from .data import ImageSet
from .errors import CodeLengthError, ConfigError, TrainingError

# Held while seeding torch's global generator and drawing from it, so that hashers built and
# trained side by side in threads (fedhash simulate's references) each get their seed's initialisation.
TORCH_RNG = threading.Lock()


@dataclass
class Inputs:
    """What a hasher reads of one data set: its images and, where cached, the frozen backbone's features.

    ``train`` are the indices (into ``ds``) of the training images; row i of ``views`` belongs to image
    ``train[i]``. A training batch names rows of ``train`` (positions), an encoding names images of ``ds``."""

    ds: ImageSet | None  # None: features only (a pooled reference), no images to read
    train: np.ndarray
    size: int
    clean: np.ndarray | None = None  # (len(ds), d) clean-view features of every image
    views: np.ndarray | None = None  # (len(train), V, d) augmented views of the training images

    @property
    def n_train(self) -> int:
        return len(self.train)

    @classmethod
    def of_features(cls, views: np.ndarray, clean: np.ndarray | None = None, size: int = 0) -> "Inputs":
        """Inputs of cached features alone: training views (n, V, d), and optionally the clean-view
        features of the images to encode (their rows are the images)."""
        return cls(None, np.arange(len(views)), size, clean=clean, views=views)


class Hasher(nn.Module):
    """The interface of every kind of hash function (see the module docstring).

    ``pooling`` says what the server must pool for it: ``"activations"`` (the counts, sums and sums of
    squares of the activations before the final normalisation, every round: exact BatchNorm statistics
    of the union) or ``"moments"`` (the feature moments, released once before training)."""

    kind: ClassVar[str] = ""
    pooling: ClassVar[str] = "activations"
    bits: int

    # ---------------------------------------------------------------- what it is
    def architecture(self) -> dict[str, Any]:
        """What, besides the weights and the backbone, defines the function (JSON-able)."""
        raise NotImplementedError

    @property
    def norm(self) -> nn.Module:
        """The final normalisation (BatchNorm, or the DP head's frozen standardisation): z = norm(h)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- encoding
    def encode(self, inputs: Inputs, idx: np.ndarray) -> np.ndarray:
        """Logits z (n, bits), float32, of the clean view of images ``idx`` of ``inputs.ds``; codes are 1[z > 0]."""
        raise NotImplementedError

    def activations(self, inputs: Inputs, idx: np.ndarray) -> np.ndarray:
        """The activations h entering the final normalisation, (n, bits), of the clean view of images ``idx``."""
        raise NotImplementedError

    @torch.inference_mode()
    def normalise(self, h: np.ndarray) -> np.ndarray:
        """``norm(h)`` in eval mode: the logits of :meth:`encode` from those of :meth:`activations`."""
        norm = self.norm.eval()
        return norm(torch.from_numpy(np.asarray(h, dtype=np.float32))).numpy()

    # ---------------------------------------------------------------- training
    def check_inputs(self, inputs: Inputs, supervised: bool) -> None:
        """Raise a one-line error when ``inputs`` cannot train this hasher."""

    def view_batch(self, inputs: Inputs, idx: np.ndarray, rng: np.random.Generator,
                   g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of the training images at positions ``idx`` (sorted), as the module's inputs."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train_mode(self) -> None:
        self.train()

    @contextlib.contextmanager
    def renorm(self, on: bool = True) -> Iterator[None]:
        """Inside the block, the final normalisation trains with Batch Renormalization against its running
        statistics (:class:`hashing.coder.BatchRenorm1d`); a frozen normalisation ignores it."""
        norm = self.norm
        before = getattr(norm, "renorm", False)
        norm.renorm = bool(on)
        try:
            yield
        finally:
            norm.renorm = before

    # ---------------------------------------------------------------- state
    def state(self) -> tuple["OrderedDict[str, torch.Tensor]", "OrderedDict[str, torch.Tensor]"]:
        """(parameters, server-set buffers): what federation exchanges and a model file holds."""
        return _state.split_state(self)

    def load_state(self, params: Mapping[str, Any], buffers: Mapping[str, Any]) -> None:
        """Strict: exactly the names of :meth:`state` (a WeightsError names the offenders)."""
        _state.load_state(self, {**params, **buffers})


class FeatureHead(Hasher):
    """A hasher on cached backbone features (probe, dp): ``net`` is a Sequential that ends in ``norm``."""

    in_dim: int
    net: nn.Sequential

    @property
    def norm(self) -> nn.Module:
        return self.net[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.inference_mode()
    def encode_features(self, features: np.ndarray, batch_size: int = 8192, *, pre_norm: bool = False) -> np.ndarray:
        """Logits z (n, bits), float32, of clean-view features (n, d), in eval mode.

        ``pre_norm``: the activations entering the final normalisation instead; ``self.norm`` (eval mode)
        maps them to exactly the logits this function returns without it (same blocks, same kernels)."""
        self.eval()
        net = self.net[:-1] if pre_norm else self
        out = np.empty((len(features), self.bits), dtype=np.float32)
        for s in range(0, len(features), batch_size):
            out[s : s + batch_size] = net(torch.from_numpy(np.asarray(features[s : s + batch_size], dtype=np.float32))).numpy()
        if not np.isfinite(out).all():
            raise TrainingError("the head produced non-finite logits; the model is broken, retrain it")
        return out

    def encode(self, inputs: Inputs, idx: np.ndarray) -> np.ndarray:
        return self.encode_features(_clean(inputs)[idx])

    def activations(self, inputs: Inputs, idx: np.ndarray) -> np.ndarray:
        return self.encode_features(_clean(inputs)[idx], pre_norm=True)

    def check_inputs(self, inputs: Inputs, supervised: bool) -> None:
        views = inputs.views
        if views is None or views.ndim != 3:
            raise ConfigError(f"training features must be (n, views, dim), got "
                              f"{None if views is None else views.shape}; extract the training views first")
        n, v, d = views.shape
        if n < 2:
            raise TrainingError(f"need at least 2 training images, got {n}; give the silo more data")
        if not supervised and v < 2:
            raise ConfigError("unsupervised CroVCA needs at least 2 cached views per image; raise views")
        if d != self.in_dim:
            raise CodeLengthError(f"the head expects {self.in_dim}-d features, the cache holds {d}-d; "
                                  "use the backbone the head was built for")

    def view_batch(self, inputs: Inputs, idx: np.ndarray, rng: np.random.Generator,
                   g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Two distinct cached views of each image (one read of the memory-mapped cache)."""
        v = inputs.views.shape[1]
        a = rng.integers(0, v, size=len(idx))
        b = (a + rng.integers(1, v, size=len(idx))) % v if v > 1 else a
        batch = inputs.views[idx]
        rows = np.arange(len(idx))
        return (torch.from_numpy(batch[rows, a].astype(np.float32)), torch.from_numpy(batch[rows, b].astype(np.float32)))


def _clean(inputs: Inputs) -> np.ndarray:
    if inputs.clean is None:
        raise ConfigError("this hash head encodes cached backbone features, and none were given; extract them first")
    return inputs.clean


# --------------------------------------------------------------------------- the registry

_REGISTRY: dict[str, Callable[..., Hasher]] = {}
_READS_FEATURES: dict[str, bool] = {}


def register(kind: str, factory: Callable[..., Hasher] | None = None, *, reads_features: bool = True):
    """Register ``factory(**options) -> Hasher`` under ``kind`` (usable as a decorator). ``reads_features``:
    whether it trains on cached backbone features (``Inputs.clean``/``views``) or on the images themselves."""
    def add(f: Callable[..., Hasher]) -> Callable[..., Hasher]:
        _REGISTRY[kind] = f
        _READS_FEATURES[kind] = bool(reads_features)
        return f
    return add(factory) if factory is not None else add


def hasher_kinds() -> list[str]:
    return sorted(_REGISTRY)


def reads_features(kind: str) -> bool:
    """Whether hashers of ``kind`` read cached backbone features (so a silo extracts them once)."""
    if kind not in _READS_FEATURES:
        raise ConfigError(f"unknown kind of hash function {kind!r}; use one of: {', '.join(hasher_kinds())}")
    return _READS_FEATURES[kind]


def create_hasher(kind: str, *, seed: int = 0, **options: Any) -> Hasher:
    """A fresh hash function of ``kind``, identical on every node for the same options (seeded).

    The built-in kinds register themselves when ``hashing`` is imported (``hashing/__init__.py``)."""
    if kind not in _REGISTRY:
        raise ConfigError(f"unknown kind of hash function {kind!r}; use one of: {', '.join(hasher_kinds())}")
    # torch's global generator is one per process: seed and draw the init in one piece, then leave the
    # generator as it was (loading a model mid-experiment does not reset the caller's randomness)
    with TORCH_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _REGISTRY[kind](**options)
