"""The cache folder: where fedhash memoises what costs seconds to recompute and never changes for the
same inputs: the feature cache's entries at its top, and ``partitions/`` (silo cuts), ``backbones/``
(weights fingerprints) and ``activations/`` (a silo's database activations between two messages). The folder is the config's ``cache-dir``, else ``$FEDHASH_CACHE``, else
``~/.cache/fedhash/features``."""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$FEDHASH_CACHE``, else ``~/.cache/fedhash/features``; an empty or blank variable counts as unset (it
    would otherwise mean the current folder, and fill it with cache files)."""
    return Path(os.environ.get("FEDHASH_CACHE", "").strip() or Path.home() / ".cache" / "fedhash" / "features")


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """The cache folder a config's ``cache-dir`` names; empty or None means :func:`default_cache_dir`."""
    return Path(cache_dir) if cache_dir else default_cache_dir()
