"""From a config to cached features: the steps every centralized run and every eval shares.

``prepare`` loads the data set, draws the deterministic splits (``n-query`` query images, the rest the
database, ``n-train`` training images drawn from it) and returns the hasher inputs: the clean-view
features of every image and the augmented-view features of the training images, from the feature cache.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from .backbones import backbone_for, backbone_identity
from .config import Config
from .data import ImageSet, Splits, make_splits
from .features import cached_features
from .hashers import Inputs
from .silos import source_dataset

log = logging.getLogger("fedhash.train")


@dataclass
class Prepared:
    cfg: Config
    ds: ImageSet
    splits: Splits
    inputs: Inputs
    weights_id: str
    seconds: dict = field(default_factory=dict)

    @property
    def clean(self) -> np.ndarray:
        return self.inputs.clean

    @property
    def train_views(self) -> np.ndarray:
        return self.inputs.views

    @property
    def feature_dim(self) -> int:
        return self.clean.shape[1]

    def labels(self, idx: np.ndarray) -> np.ndarray:
        return self.ds.labels[idx]


def clamped_counts(cfg: Config, n: int, say: bool = True) -> tuple[int, int]:
    """``n-query`` and ``n-train`` as they fit ``n`` images (queries at most a tenth of them, training images at
    most the database), each clamp said in one line (with ``say``)."""
    n_query = min(cfg.n_query, max(1, n // 10))
    if n_query < cfg.n_query and say:
        log.warning("n-query %d is more than a tenth of the %d images; using %d query images (give --n-query %d "
                    "or less to silence this)", cfg.n_query, n, n_query, n_query)
    n_train = min(cfg.n_train, n - n_query)
    if n_train < cfg.n_train and say:
        log.warning("n-train %d is more than the %d database images; training on all %d of them (give --n-train %d "
                    "or less to silence this)", cfg.n_train, n - n_query, n_train, n_train)
    return n_query, n_train


def prepare(cfg: Config, *, say_clamps: bool = True) -> Prepared:
    t0 = time.perf_counter()
    ds = source_dataset(cfg)
    n_query, n_train = clamped_counts(cfg, len(ds), say_clamps)
    splits = make_splits(len(ds), seed=cfg.seed, n_query=n_query, n_train=n_train)
    t1 = time.perf_counter()
    weights = cfg.weights or None
    wid, _ = backbone_identity(cfg.backbone, weights, cfg.cache_dir or None)
    t2 = time.perf_counter()
    common = dict(size=cfg.size, cache_dir=cfg.cache_dir or None, weights_id=wid)
    model = lambda: backbone_for(cfg.backbone, weights)[0]  # noqa: E731 - built only on a cache miss
    clean = cached_features(model, cfg.backbone, ds, np.arange(len(ds)), views=0, seed=0,
                            desc=f"clean view, {len(ds)} images", **common)
    views = cached_features(model, cfg.backbone, ds, splits.train, views=cfg.views, seed=cfg.seed,
                            desc=f"{cfg.views} views, {len(splits.train)} train images", **common)
    t3 = time.perf_counter()
    inputs = Inputs(ds, splits.train, cfg.size, clean=clean, views=views)
    return Prepared(cfg, ds, splits, inputs, wid, seconds={"data": t1 - t0, "backbone": t2 - t1, "features": t3 - t2})
