"""Images to codes with one hash function: the model file, the site's own backbone weights, the clean view.

An :class:`Encoder` is what an index encodes its database and its queries with, so the two go through
the same backbone, input size and hash function. It refuses backbone weights other than the ones the
model was trained on (their fingerprint is in the model's identity).
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .backbones import backbone_for
from .codes import logits_to_codes
from .data import ImageSet
from .errors import ModelVersionError
from .features import extract, lookup
from .hashers import FeatureHead, Hasher, Inputs
from .model import build, read_record


class Encoder:
    """One hash function, ready to encode images: ``logits(ds)``, ``codes(ds)``."""

    def __init__(self, hasher: Hasher, rec: Mapping[str, Any], *, weights: str | None = None,
                 cache_dir: str | os.PathLike | None = None):
        self.hasher = hasher.eval()
        self.record = dict(rec)  # the model record (with its state): what an index keeps a copy of
        self.identity: dict[str, Any] = dict(rec["identity"])
        self.version: str = str(rec["model_version"])
        self.bits: int = int(self.identity["bits"])
        self.size: int = int(self.identity["size"])
        self.backbone_name: str = str(self.identity["backbone"])
        self.weights = weights
        self.cache_dir = cache_dir
        self._backbone = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | os.PathLike, *, weights: str | None = None,
             cache_dir: str | os.PathLike | None = None) -> "Encoder":
        """The hash function of a model file, a federated checkpoint or a run folder."""
        rec = read_record(Path(path))
        hasher = build(rec["identity"], weights=weights)
        hasher.load_state(rec["params"], rec["buffers"])
        return cls(hasher, rec, weights=weights, cache_dir=cache_dir)

    @property
    def reads_features(self) -> bool:
        return isinstance(self.hasher, FeatureHead)

    def backbone(self):
        """The frozen backbone (built once per process), refused if its weights are not the model's."""
        with self._lock:
            return self._get_backbone()

    def _get_backbone(self):
        if self._backbone is None:
            model, wid, _ = backbone_for(self.backbone_name, self.weights)
            if wid != self.identity["weights_id"]:
                raise ModelVersionError(
                    f"the backbone weights given ({self.weights or 'the bundled ones'}, fingerprint {wid}) are not "
                    f"the ones model {self.version} was trained on (fingerprint {self.identity['weights_id']}); "
                    "pass that weights file")
            self._backbone = model
        return self._backbone

    def logits(self, ds: ImageSet, idx: np.ndarray | None = None, *,
               timings: dict[str, float] | None = None, progress: bool = True) -> np.ndarray:
        """Logits (n, bits) float32 of the clean view of images ``idx`` of ``ds`` (default: all), from the
        backbone; nothing is written to the feature cache (:meth:`cached_logits` reads it).
        ``timings`` (a dict) gets the seconds spent in the backbone and in the hash head."""
        idx = np.arange(len(ds)) if idx is None else np.asarray(idx, dtype=np.int64)
        t0 = time.perf_counter()
        if not self.reads_features:  # LoRA: the adapted backbone and the head are one function
            out = self.hasher.encode(Inputs(ds, np.empty(0, np.int64), self.size), idx)
            if timings is not None:
                timings["backbone"] = timings.get("backbone", 0.0) + time.perf_counter() - t0
            return out
        feats = extract(self.backbone(), ds, idx, size=self.size, desc="encoding", progress=progress)
        t1 = time.perf_counter()
        out = self.hasher.encode_features(np.asarray(feats))
        if timings is not None:
            timings["backbone"] = timings.get("backbone", 0.0) + t1 - t0
            timings["hash"] = timings.get("hash", 0.0) + time.perf_counter() - t1
        return out

    def cached_logits(self, ds: ImageSet) -> np.ndarray | None:
        """Logits of every image of ``ds`` from the feature cache, if it holds their clean view (the
        features a federation or ``fedhash train`` extracted from the same folder), else None."""
        if not self.reads_features:
            return None
        feats = lookup(self.backbone_name, self.identity["weights_id"], ds, np.arange(len(ds)), size=self.size,
                       cache_dir=self.cache_dir)
        return None if feats is None else self.hasher.encode_features(np.asarray(feats))

    def codes(self, ds: ImageSet, idx: np.ndarray | None = None, **kw: Any) -> np.ndarray:
        return logits_to_codes(self.logits(ds, idx, **kw))
