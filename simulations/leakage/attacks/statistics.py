"""What the statistics phase says: a silo's reply is count / sum / sum of squares of the head's activations
over its training images (and, supervised, per-class counts and sums), exact, every round.

- the **label histogram** is the reply's per-class counts (supervised): exact, for any silo size;
- the **mean activation** is sum / count; pushed through the global model's final BatchNorm it gives logits,
  and their code searches the silo's index. For a silo of one image the mean *is* that image's activation,
  so its code is the image's own database code; :func:`mean_code` is the query, and the lab measures how
  the re-identification of a silo's images by it falls as the silo grows.

Entry points: :func:`label_histogram`, :func:`mean_code`.
"""
from __future__ import annotations

import numpy as np

from hashing.hashers import Hasher


def label_histogram(stats: dict[str, np.ndarray]) -> np.ndarray | None:
    """The silo's label counts (supervised replies), else None."""
    c = stats.get("class_count")
    return None if c is None or np.size(c) == 0 else np.asarray(c, dtype=np.float64).ravel()


def mean_activation(stats: dict[str, np.ndarray]) -> np.ndarray:
    n = float(np.asarray(stats["count"]).ravel()[0])
    return np.asarray(stats["sum"], np.float64).reshape(-1) / max(n, 1.0)


def mean_code(model: Hasher, stats: dict[str, np.ndarray]) -> np.ndarray:
    """(1, bits) logits of the silo's mean activation under the global model's final normalisation: the query
    (:func:`hashing.codes.logits_to_codes` gives its code)."""
    return model.normalise(mean_activation(stats)[None, :])
