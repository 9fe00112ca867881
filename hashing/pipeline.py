"""From a data spec to cached features: the steps every centralized run and every eval shares.

``prepare`` loads the data set, draws the deterministic splits, builds the
backbone and returns the clean-view features of every image (query and
database) and the augmented-view features of the training images, both from
the feature cache.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .backbones import DEFAULT_BACKBONE, create_backbone, weights_fingerprint
from .data import ImageSet, Splits, load_dataset, make_splits
from .features import cached_features

DEFAULT_SIZE = 96  # see BENCHMARKS.md: backbone throughput and mAP by input size


@dataclass
class DataConfig:
    data: str = "fashion-mnist"
    seed: int = 0
    n_query: int | None = 1000
    n_train: int | None = 10000
    size: int = DEFAULT_SIZE
    views: int = 4
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    cache_dir: str | None = None
    strict: bool = False
    limit: int | None = None
    batch_size: int = 256

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prepared:
    cfg: DataConfig
    ds: ImageSet
    splits: Splits
    clean: np.ndarray  # (len(ds), d) clean-view features of every image
    train_views: np.ndarray  # (len(splits.train), V, d)
    backbone: str
    weights_id: str
    seconds: dict = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return self.clean.shape[1]

    def labels(self, idx: np.ndarray) -> np.ndarray:
        return self.ds.labels[idx]


def prepare(cfg: DataConfig) -> Prepared:
    t0 = time.perf_counter()
    ds = load_dataset(cfg.data, strict=cfg.strict, limit=cfg.limit)
    n_query = None if cfg.n_query is None else min(cfg.n_query, max(1, len(ds) // 10))
    splits = make_splits(len(ds), seed=cfg.seed, n_query=n_query, n_train=cfg.n_train)
    t1 = time.perf_counter()
    model, _ = create_backbone(cfg.backbone, cfg.weights)
    model = model.to(memory_format=torch.channels_last)
    wid = weights_fingerprint(model)
    t2 = time.perf_counter()
    common = dict(size=cfg.size, cache_dir=cfg.cache_dir, batch_size=cfg.batch_size)
    clean = cached_features(model, cfg.backbone, ds, np.arange(len(ds)), views=0, seed=0,
                            desc=f"clean view, {len(ds)} images", **common)
    train_views = cached_features(model, cfg.backbone, ds, splits.train, views=cfg.views, seed=cfg.seed,
                                  desc=f"{cfg.views} views, {len(splits.train)} train images", **common)
    t3 = time.perf_counter()
    return Prepared(cfg, ds, splits, clean, train_views, cfg.backbone, wid,
                    seconds={"data": t1 - t0, "backbone": t2 - t1, "features": t3 - t2})
