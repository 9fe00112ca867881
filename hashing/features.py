"""Backbone features of image views, extracted in batches and cached on disk.

The backbone is frozen in probe mode, so its features of a view never change:
fedhash extracts them once per (data, backbone, weights, input size,
augmentation seed, number of views) and trains the head on the cache. A cache
entry is one ``.npy`` (float16, ``(n, d)`` for clean views or ``(n, V, d)`` for
augmented ones) plus a ``.json`` that records its key and the file's sha256. An
entry whose metadata, shape or checksum does not match is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import atomic
from .backbones import data_config, feature_dim, weights_fingerprint
from .cache import cache_root
from .data import ImageSet
from .errors import ConfigError
from .views import AUG_VERSION, augment, load_batch, normalise, resize

log = logging.getLogger(__name__)
CACHE_FORMAT = 1


@dataclass(frozen=True)
class FeatureKey:
    data: str  # ImageSet.fingerprint()
    indices: str  # sha256 of the image indices
    backbone: str
    weights: str  # weights_fingerprint of the backbone
    size: int
    views: int  # 0: the clean view, (n, d); V > 0: V augmented views, (n, V, d)
    seed: int
    aug: str = AUG_VERSION
    format: int = CACHE_FORMAT

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


def _indices_digest(idx: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).data).hexdigest()[:16]


_MALLOC_TUNED = False


def tune_malloc() -> None:
    """Keep glibc from returning activation buffers to the kernel after every layer.

    By default glibc serves allocations above 128 KiB with mmap and unmaps them
    on free, so each backbone layer pays page faults for its output: on 2 cores
    that was 40% of the extraction time as kernel time. Raising the mmap and
    trim thresholds (process-wide, once; Linux glibc only) removes it
    (BENCHMARKS.md: 1.7x more images/s at 64 px).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: its maximum on 64-bit
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def micro_batch(size: int) -> int:
    """Images per backbone call: activations stay under malloc's 32 MiB mmap threshold (64 at 64 px)."""
    return max(4, 4096 * 64 // (size * size))


def _out_shape(n: int, views: int, dim: int) -> tuple[int, ...]:
    return (n, dim) if views == 0 else (n, views, dim)


@torch.inference_mode()
def extract(
    backbone: torch.nn.Module,
    ds: ImageSet,
    idx: np.ndarray,
    *,
    size: int,
    views: int = 0,
    seed: int = 0,
    batch_size: int = 256,
    out: np.ndarray | None = None,
    desc: str = "features",
    progress: bool = True,
) -> np.ndarray:
    """Features of images ``idx``: the clean view (views=0) or ``views`` augmented views.

    Works batch by batch, so memory stays bounded by one batch of images; ``out``
    may be a memory-mapped array. Augmentations draw from one generator seeded
    with ``seed``, so the same call gives the same views.
    """
    cfg = data_config(backbone)
    if out is None:
        out = np.empty(_out_shape(len(idx), views, feature_dim(backbone)), dtype=np.float16)
    g = torch.Generator().manual_seed(int(seed))
    tune_malloc()
    mb = micro_batch(size)
    backbone.eval()
    n_views = max(views, 1)
    # no bar for a handful of images (a search query)
    with tqdm(total=len(idx) * n_views, desc=desc, unit="img", leave=False, mininterval=1.0,
              disable=not progress or len(idx) * n_views < 64) as bar:
        for start in range(0, len(idx), batch_size):
            sel = idx[start : start + batch_size]
            x = load_batch(ds, sel, size)
            for v in range(n_views):
                xv = resize(x, size) if views == 0 else augment(x, size, g)
                xv = normalise(xv, cfg["mean"], cfg["std"]).contiguous(memory_format=torch.channels_last)
                f = torch.cat([backbone(xv[i : i + mb]) for i in range(0, len(xv), mb)]).float().numpy()
                if not np.isfinite(f).all():
                    raise FloatingPointError(f"backbone gave non-finite features for images {sel[:3]}...")
                if views == 0:
                    out[start : start + len(sel)] = f
                else:
                    out[start : start + len(sel), v] = f
                bar.update(len(sel))
    return out


def cached_features(
    backbone: torch.nn.Module | Callable[[], torch.nn.Module],
    backbone_name: str,
    ds: ImageSet,
    idx: np.ndarray,
    *,
    size: int,
    views: int = 0,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    desc: str | None = None,
    weights_id: str | None = None,
) -> np.ndarray:
    """Features of images ``idx`` from the disk cache, extracting and saving them on a miss.

    ``backbone`` may be a zero-argument function that builds it: with ``weights_id`` (its
    :func:`weights_fingerprint`) given, it is then called only on a cache miss.
    Returns a float16 array (memory-mapped read-only from the cache file).
    """
    idx = np.asarray(idx, dtype=np.int64)
    if weights_id is None:
        backbone = backbone if isinstance(backbone, torch.nn.Module) else backbone()
        weights_id = weights_fingerprint(backbone)
    key = FeatureKey(
        data=ds.fingerprint(), indices=_indices_digest(idx), backbone=backbone_name,
        weights=weights_id, size=int(size), views=int(views), seed=int(seed),
    )
    cache_dir = cache_root(cache_dir)
    stem = cache_dir / key.digest()
    npy, meta = stem.with_suffix(".npy"), stem.with_suffix(".json")
    cached = _try_load(npy, meta, key, len(idx))
    if cached is not None:
        return cached

    cache_dir.mkdir(parents=True, exist_ok=True)
    backbone = backbone if isinstance(backbone, torch.nn.Module) else backbone()
    if weights_fingerprint(backbone) != weights_id:
        raise ConfigError(f"weights_id {weights_id} is not the fingerprint of the backbone given; "
                          "pass the backbone's own weights_fingerprint")
    shape = _out_shape(len(idx), views, feature_dim(backbone))
    with atomic.atomic_path(npy) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        extract(backbone, ds, idx, size=size, views=views, seed=seed, batch_size=batch_size, out=arr,
                desc=desc or ("clean view" if views == 0 else f"{views} augmented views"))
        arr.flush()
        del arr
        digest = atomic.sha256_file(tmp)
    atomic.write_json(meta, {"key": asdict(key), "shape": list(shape), "sha256": digest})
    return np.load(npy, mmap_mode="r")


def lookup(backbone_name: str, weights_id: str, ds: ImageSet, idx: np.ndarray, *, size: int, views: int = 0,
           seed: int = 0, cache_dir: str | os.PathLike | None = None) -> np.ndarray | None:
    """The cached features of images ``idx`` of ``ds`` if the cache holds them, else None (nothing is
    extracted). Reading a folder's fingerprint costs one ``stat`` per file, no decoding."""
    idx = np.asarray(idx, dtype=np.int64)
    key = FeatureKey(data=ds.fingerprint(), indices=_indices_digest(idx), backbone=backbone_name,
                     weights=weights_id, size=int(size), views=int(views), seed=int(seed))
    stem = cache_root(cache_dir) / key.digest()
    return _try_load(stem.with_suffix(".npy"), stem.with_suffix(".json"), key, len(idx))


def _try_load(npy: Path, meta: Path, key: FeatureKey, n: int) -> np.ndarray | None:
    if not npy.exists() or not meta.exists():
        return None
    try:
        m = json.loads(meta.read_text())
        if m.get("key") != asdict(key):
            log.warning("feature cache %s is stale (key differs); rebuilding", npy.name)
            return None
        arr = np.load(npy, mmap_mode="r")
        if list(arr.shape) != m["shape"] or arr.shape[0] != n or arr.dtype != np.float16:
            raise ValueError(f"shape {arr.shape} does not match {m['shape']}")
        if atomic.sha256_file(npy) != m["sha256"]:
            raise ValueError("checksum mismatch")
        return arr
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        log.warning("feature cache %s is corrupt (%s); rebuilding", npy.name, e)
        return None
