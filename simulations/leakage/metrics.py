"""How well an attack did: matched cosine (Hungarian assignment, scipy's ``linear_sum_assignment``) and the
retrieval re-identification rate through the silo's own FAISS index (``hashing.index.SiloIndex``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to norm 1 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def cosine_matrix(recovered: np.ndarray, true: np.ndarray, *, signed: bool = False) -> np.ndarray:
    """(m, n) cosines; ``signed``: candidates known up to sign (|cos|)."""
    c = unit(recovered) @ unit(true).T
    return np.abs(c) if signed else c


@dataclass
class Matched:
    """Recovered candidates assigned one-to-one to true inputs (Hungarian, maximal total cosine)."""

    rows: np.ndarray    # candidate index
    cols: np.ndarray    # true input index
    cosine: np.ndarray  # cosine of each pair

    @property
    def mean(self) -> float:
        return float(self.cosine.mean()) if len(self.cosine) else float("nan")


def hungarian(recovered: np.ndarray, true: np.ndarray, *, signed: bool = False) -> Matched:
    """One-to-one matching of candidates to true inputs by scipy's ``linear_sum_assignment``."""
    if len(recovered) == 0 or len(true) == 0:
        return Matched(np.zeros(0, int), np.zeros(0, int), np.zeros(0))
    c = cosine_matrix(recovered, true, signed=signed)
    r, k = linear_sum_assignment(-c)
    return Matched(r, k, c[r, k])


@dataclass
class Reidentified:
    """Where each victim's image landed when the server searched the silo's index with its reconstructions."""

    rank: np.ndarray    # (n_victims,) best 0-based rank of the victim over all the queries' hits, -1: in no top k
    n_db: int
    k: int
    queries: int        # how many queries the server searched with (each returns its own top k)

    def rate(self, top: int) -> float:
        return float(np.mean((self.rank >= 0) & (self.rank < top))) if len(self.rank) else float("nan")

    def chance(self, top: int) -> float:
        """The best a server that knows nothing does with as many guesses (``queries`` lists of ``top``
        images, uniform prior over the N): min(1, top * queries / N). Also the κ of the DP bound."""
        return min(1.0, top * self.queries / self.n_db) if self.n_db else float("nan")


def reidentify(index, queries: np.ndarray, victim_ids: np.ndarray, *, k: int = 10,
               model_version: str | None = None) -> Reidentified:
    """Search the silo's index (``hashing.index.SiloIndex``) with each of the server's queries and find every
    victim among the hits: its best rank over all the queries' top ``k`` (the server does not know which
    query is whose; it is scored on whether the victim's image is among what it found). Queries are packed
    codes (m, bytes): Hamming search; or float logits (m, bits): the silo's asymmetric search (soft query
    against database codes)."""
    q = np.atleast_2d(np.asarray(queries))
    victims = np.asarray(victim_ids)
    ranks = np.full(len(victims), -1)
    if len(q) == 0:
        return Reidentified(ranks, len(index), k, 0)
    if q.dtype.kind == "f":
        _, ids = index.search_asymmetric(q.astype(np.float32), k, model_version=model_version)
    else:
        _, ids = index.search(q.astype(np.uint8), k, model_version=model_version)
    for i, v in enumerate(victims):
        hit = np.nonzero(ids == v)[1]
        if len(hit):
            ranks[i] = int(hit.min())
    return Reidentified(ranks, len(index), k, len(q))


def clopper_pearson_low(successes: int, n: int, confidence: float = 0.95) -> float:
    """The lower end of the two-sided Clopper–Pearson interval of a rate (scipy's beta quantile): a measured
    rate is above a bound only when this is."""
    from scipy.stats import beta

    if n <= 0 or successes <= 0:
        return 0.0
    return float(beta.ppf((1 - confidence) / 2, successes, n - successes + 1))
