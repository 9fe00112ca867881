"""Retrieval metrics for hashing, DeepHash convention.

Every metric here works on a distance matrix between queries (rows) and
database items (columns), given either as a precomputed ``(nq, ndb)`` array or
as a callable ``dist(start, stop) -> (stop - start, ndb)`` array that produces
the rows of a chunk of queries on demand (so a 1000 x 70000 matrix never has to
exist at once).  The wrappers :func:`retrieval_metrics` (Hamming or asymmetric
distances between codes) and :func:`float_retrieval_metrics` (cosine distance
between float features, the "no hashing" ceiling) build such callables and
compute every metric in one pass over the queries.

Conventions
-----------
* Labels are either int class ids ``(n,)`` or a multi-hot int/bool matrix
  ``(n, C)``; a database item is relevant to a query when they share at least
  one label (:func:`relevance`).
* Ranking is by ascending distance, ties broken by database order (exactly
  ``np.argsort(dist, kind="stable")``), so results are deterministic even with
  the many ties of Hamming distances.
* mAP@k (DeepHash): for each query, AP = mean of precision@i over the relevant
  positions i of the top k, i.e. divided by the number of relevant items
  *within the top k*; a query with no relevant item in its top k scores 0.
  ``k=None`` (or ``k >= ndb``) ranks the whole database, which is the usual
  average precision.
* P@k: mean over queries of (#relevant in the top k) / k (k capped at ndb).
* Precision within radius r: retrieved = items with distance <= r (+ ``eps``
  for float distances); precision = relevant / retrieved, a query retrieving
  nothing scores 0; the mean over all queries is returned.
* PR curve: for each threshold t, an item is retrieved when its distance is
  <= t.  Precision and recall are macro-averaged over queries: precision(t)
  averages only the queries that retrieve something at t (NaN where none
  does), recall(t) averages only the queries that have at least one relevant
  item in the database.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence, Union

import numpy as np

from . import codes as _codes
from .errors import CodeLengthError, ConfigError, DataError

DistSource = Union[np.ndarray, Callable[[int, int], np.ndarray]]

DEFAULT_CHUNK = 256
FLOAT_RADIUS_EPS = 1e-5
"""Slack added to the radius for float distances (float32 sums of up to 64 terms)."""


# --------------------------------------------------------------------------- labels


def _labels(labels: np.ndarray, name: str) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim == 1:
        if lab.dtype.kind not in "iub":
            raise DataError(f"{name}: single-label ids must be integers, got {lab.dtype}; pass int class ids")
        return lab.astype(np.int64, copy=False)
    if lab.ndim == 2:
        if lab.dtype.kind not in "iub":
            raise DataError(f"{name}: multi-hot labels must be int or bool, got {lab.dtype}; pass a 0/1 matrix")
        return lab.astype(bool, copy=False)
    raise DataError(f"{name}: labels must be (n,) class ids or an (n, C) multi-hot matrix, got shape {lab.shape}")


def _check_labels(q_labels: np.ndarray, db_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ql = _labels(q_labels, "query labels")
    dl = _labels(db_labels, "database labels")
    if ql.ndim != dl.ndim or (ql.ndim == 2 and ql.shape[1] != dl.shape[1]):
        raise DataError(
            f"query labels {ql.shape} and database labels {dl.shape} are not the same kind; "
            "use class ids for both or multi-hot matrices with the same number of classes"
        )
    return ql, dl


def relevance(q_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """Bool ``(nq, ndb)``: True where query and database item share a label.

    Labels are int class ids ``(n,)`` or multi-hot ``(n, C)`` (int or bool).
    Meant for a chunk of queries against the whole database.
    """
    ql, dl = _check_labels(q_labels, db_labels)
    if ql.ndim == 1:
        return ql[:, None] == dl[None, :]
    # shared label <=> dot product of the 0/1 vectors > 0; float32 is exact for C < 2**24.
    return (ql.astype(np.float32) @ dl.astype(np.float32).T) > 0.5


# --------------------------------------------------------------------------- ranking


def topk_stable(dist: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest distances per row, ties by column order.

    Exactly ``np.argsort(dist, axis=1, kind="stable")[:, :k]`` but without a
    full sort when ``k`` is much smaller than the number of columns.
    """
    dist = np.asarray(dist)
    if dist.ndim != 2:
        raise DataError(f"distance matrix must be 2-D, got shape {dist.shape}")
    n, m = dist.shape
    k = int(k)
    if k <= 0:
        raise ConfigError(f"k must be positive, got {k}")
    if k >= m or n == 0:
        return np.argsort(dist, axis=1, kind="stable")
    if dist.dtype.kind in "iub":
        return _topk_int(dist, k)
    if dist.dtype.kind == "f":
        return _topk_float(dist, k)
    raise DataError(f"distances must be integer or float, got {dist.dtype}")


def _topk_int(dist: np.ndarray, k: int) -> np.ndarray:
    # key = dist * m + column is unique per row and orders exactly like (dist, column).
    n, m = dist.shape
    lo, hi = int(dist.min()), int(dist.max())
    d = dist.astype(np.int64) - lo
    span = (hi - lo + 1) * m
    key_dtype = np.int32 if span < 2**31 else np.int64
    key = (d * m).astype(key_dtype) + np.arange(m, dtype=key_dtype)
    part = np.argpartition(key, k - 1, axis=1)[:, :k]
    kpart = np.take_along_axis(key, part, axis=1)
    order = np.argsort(kpart, axis=1)
    return np.take_along_axis(part, order, axis=1)


def _topk_float(dist: np.ndarray, k: int) -> np.ndarray:
    # Every column with dist <= (k-th smallest value) is a candidate: at least k per
    # row, more when there are ties at the boundary. np.nonzero lists candidates in
    # column order, so a stable sort of the candidates' values is the stable order.
    n, m = dist.shape
    if np.isnan(dist).any():
        raise DataError("distance matrix contains NaN; check the features or logits for NaN")
    kth = np.partition(dist, k - 1, axis=1)[:, k - 1 : k]
    mask = dist <= kth
    counts = mask.sum(axis=1)
    width = int(counts.max())
    rows, cols = np.nonzero(mask)
    starts = np.cumsum(counts) - counts
    pos = np.arange(rows.size) - np.repeat(starts, counts)
    cand = np.full((n, width), m, dtype=np.int64)
    vals = np.full((n, width), np.inf, dtype=dist.dtype)
    cand[rows, pos] = cols
    vals[rows, pos] = dist[rows, cols]
    # padding (inf, placed after every real candidate) is never among the first k.
    order = np.argsort(vals, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cand, order, axis=1)


# --------------------------------------------------------------------------- per-chunk pieces


def _ap_from_ranked(rel_ranked: np.ndarray) -> np.ndarray:
    """AP per row of a (nq, k) bool matrix of relevance in ranked order (DeepHash)."""
    rel = rel_ranked.astype(np.float64)
    hits = np.cumsum(rel, axis=1)
    prec = hits / np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    n_rel = hits[:, -1] if rel.shape[1] else np.zeros(rel.shape[0])
    num = (prec * rel).sum(axis=1)
    return np.divide(num, n_rel, out=np.zeros_like(num), where=n_rel > 0)


def map_of_ranked(rel_ranked: np.ndarray) -> float:
    """mAP of ranked lists given as a (nq, k) bool matrix of relevance (False past a list's end): the
    same AP as :func:`map_at_k`, for rankings made elsewhere (a cross-silo fan-out's merged top-k)."""
    rel = np.asarray(rel_ranked, dtype=bool)
    if rel.ndim != 2:
        raise DataError(f"ranked relevance must be (queries, k), got shape {rel.shape}")
    return float(_ap_from_ranked(rel).mean()) if rel.shape[0] else float("nan")


def _chunks(dist: DistSource, nq: int, ndb: int, chunk: int) -> Iterator[tuple[int, int, np.ndarray]]:
    if chunk <= 0:
        raise ConfigError(f"chunk must be positive, got {chunk}")
    if not callable(dist):
        arr = np.asarray(dist)
        if arr.shape != (nq, ndb):
            raise DataError(f"distance matrix has shape {arr.shape}, labels give ({nq}, {ndb})")
    for start in range(0, nq, chunk):
        stop = min(start + chunk, nq)
        block = np.asarray(dist(start, stop) if callable(dist) else arr[start:stop])
        if block.shape != (stop - start, ndb):
            raise DataError(f"distance chunk has shape {block.shape}, expected ({stop - start}, {ndb})")
        yield start, stop, block


def _is_int(block: np.ndarray) -> bool:
    return block.dtype.kind in "iub"


def _bins(block: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """int32 bin j per entry = index of the first threshold with dist <= t_j (len(thresholds) if none).

    Same as ``np.searchsorted(thresholds, block, side="left")``, which is slow on
    tens of millions of entries: integer distances go through a lookup table,
    evenly spaced thresholds through arithmetic plus an exact fix-up.
    """
    n_t = thresholds.size
    if block.dtype.kind in "iub":
        lo, hi = int(block.min()), int(block.max())
        lut = np.searchsorted(thresholds, np.arange(lo, hi + 1), side="left").astype(np.int32)
        return lut[block.astype(np.int64, copy=False) - lo] if lo else lut[block]
    step = (thresholds[-1] - thresholds[0]) / (n_t - 1) if n_t > 1 else 0.0
    if n_t < 2 or step <= 0 or not np.allclose(np.diff(thresholds), step, rtol=1e-9, atol=0.0):
        return np.searchsorted(thresholds, block.ravel(), side="left").astype(np.int32).reshape(block.shape)
    j = np.ceil((block.astype(np.float64) - thresholds[0]) / step)
    np.clip(j, 0, n_t, out=j)
    j = j.astype(np.int32)
    th_ext = np.concatenate([[-np.inf], thresholds, [np.inf]])  # th_ext[j + 1] = t_j, th_ext[0] = -inf
    for _ in range(4):  # rounding can put an entry one bin off; move it until exact
        up = block > th_ext[j + 1]  # t_j < d: bin too low (t_{n_t} = +inf never is)
        down = block <= th_ext[j]  # d <= t_{j-1}: bin too high (t_{-1} = -inf never is)
        if not (up.any() or down.any()):
            break
        j += up.astype(np.int32)
        j -= down.astype(np.int32)
    else:  # pragma: no cover - only with absurd thresholds
        return np.searchsorted(thresholds, block.ravel(), side="left").astype(np.int32).reshape(block.shape)
    return j


def evaluate_distances(
    dist: DistSource,
    q_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    map_k: int | None | bool = None,
    p_at: int | Sequence[int] | None = None,
    radius: float | None = None,
    thresholds: np.ndarray | None = None,
    eps: float | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> dict:
    """One pass over the queries computing the requested metrics.

    ``map_k``: ``False`` skips mAP; ``None`` means the whole database; an int is k.
    ``p_at``: int or ints for P@k. ``radius``: precision within distance <= radius
    (+ ``eps``, default 0 for integer distances and :data:`FLOAT_RADIUS_EPS` for
    float ones). ``thresholds``: sorted thresholds for the PR curve.
    Returns ``{"map": float, "map_k": int, "p_at": {k: float}, "p_radius": float,
    "pr": {"threshold", "precision", "recall"}}`` with only the requested entries.
    """
    ql, dl = _check_labels(q_labels, db_labels)
    nq, ndb = ql.shape[0], dl.shape[0]
    if ndb == 0:
        raise DataError("the database is empty; index some items before evaluating")
    if nq == 0:
        raise DataError("there are no queries; pass at least one query")
    want_map = map_k is not False
    if not want_map:
        kmap = 0
    elif map_k is None or map_k is True:
        kmap = ndb
    else:
        if int(map_k) <= 0:
            raise ConfigError(f"mAP k must be positive, got {map_k}")
        kmap = min(int(map_k), ndb)
    p_list = [] if p_at is None else ([int(p_at)] if np.isscalar(p_at) else [int(p) for p in p_at])
    if any(p <= 0 for p in p_list):
        raise ConfigError(f"P@k needs positive k, got {p_list}")
    k_rank = max([kmap] + [min(p, ndb) for p in p_list])
    if thresholds is not None:
        thresholds = np.asarray(thresholds, dtype=np.float64)
        if thresholds.ndim != 1 or thresholds.size == 0 or np.any(np.diff(thresholds) < 0):
            raise ConfigError("PR thresholds must be a non-empty ascending 1-D array")
        n_t = thresholds.size
        pr_hit = np.zeros(n_t)  # summed precision over queries retrieving something
        pr_cnt = np.zeros(n_t)  # number of such queries
        rc_sum = np.zeros(n_t)
        rc_cnt = 0

    ap_sum = 0.0
    p_sums = {p: 0.0 for p in p_list}
    rad_sum = 0.0
    for start, stop, block in _chunks(dist, nq, ndb, chunk):
        rel = relevance(ql[start:stop], dl)
        nb = stop - start
        if k_rank > 0:
            top = topk_stable(block, k_rank)
            rel_top = np.take_along_axis(rel, top, axis=1)
            if want_map:
                ap_sum += float(_ap_from_ranked(rel_top[:, :kmap]).sum())
            for p in p_list:
                pk = min(p, ndb)
                p_sums[p] += float(rel_top[:, :pk].sum()) / pk
        if radius is not None:
            e = (0.0 if _is_int(block) else FLOAT_RADIUS_EPS) if eps is None else float(eps)
            within = block <= radius + e
            n_ret = within.sum(axis=1)
            n_hit = (within & rel).sum(axis=1)
            rad_sum += float(np.divide(n_hit, n_ret, out=np.zeros(nb), where=n_ret > 0).sum())
        if thresholds is not None:
            flat = _bins(block, thresholds)
            flat += (np.arange(nb, dtype=np.int32) * (n_t + 1))[:, None]
            size = nb * (n_t + 1)
            ret = np.bincount(flat.ravel(), minlength=size).reshape(nb, n_t + 1)[:, :n_t]
            hit = np.bincount(flat[rel], minlength=size).reshape(nb, n_t + 1)[:, :n_t]
            ret = np.cumsum(ret, axis=1).astype(np.float64)
            hit = np.cumsum(hit, axis=1).astype(np.float64)
            has = ret > 0
            pr_hit += np.divide(hit, ret, out=np.zeros_like(hit), where=has).sum(axis=0)
            pr_cnt += has.sum(axis=0)
            tot = rel.sum(axis=1)
            ok = tot > 0
            rc_sum += (hit[ok] / tot[ok, None]).sum(axis=0)
            rc_cnt += int(ok.sum())

    out: dict = {}
    if want_map:
        out["map"] = ap_sum / nq
        out["map_k"] = kmap
    if p_list:
        out["p_at"] = {p: s / nq for p, s in p_sums.items()}
    if radius is not None:
        out["p_radius"] = rad_sum / nq
    if thresholds is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(pr_cnt > 0, pr_hit / np.maximum(pr_cnt, 1), np.nan)
        recall = rc_sum / rc_cnt if rc_cnt else np.full(n_t, np.nan)
        out["pr"] = {"threshold": thresholds.copy(), "precision": precision, "recall": recall}
    return out


# --------------------------------------------------------------------------- public metrics


def _n_queries(q_labels: np.ndarray) -> int:
    return int(np.asarray(q_labels).shape[0])


def map_at_k(dist: DistSource, q_labels, db_labels, k: int | None = None, *, chunk: int = DEFAULT_CHUNK) -> float:
    """mAP@k (DeepHash); ``k=None`` ranks the whole database."""
    return float(evaluate_distances(dist, q_labels, db_labels, map_k=k, chunk=chunk)["map"])


def precision_at_k(dist: DistSource, q_labels, db_labels, k: int = 100, *, chunk: int = DEFAULT_CHUNK) -> float:
    """Mean over queries of (#relevant in the top k) / k."""
    res = evaluate_distances(dist, q_labels, db_labels, map_k=False, p_at=k, chunk=chunk)
    return float(res["p_at"][int(k)])


def precision_radius(
    dist: DistSource, q_labels, db_labels, radius: float = 2, *, eps: float | None = None, chunk: int = DEFAULT_CHUNK
) -> float:
    """Mean precision of the items within distance <= radius; an empty retrieval scores 0."""
    res = evaluate_distances(dist, q_labels, db_labels, map_k=False, radius=radius, eps=eps, chunk=chunk)
    return float(res["p_radius"])


def default_thresholds(kind: str, bits: int | None = None) -> np.ndarray:
    """PR-curve thresholds: ``hamming`` 0..K, ``asymmetric`` K+1 points on [0, K],
    ``cosine`` 51 points on [0, 2]."""
    if kind == "cosine":
        return np.linspace(0.0, 2.0, 51)
    if bits is None:
        raise ConfigError(f"PR thresholds for {kind} distances need the code length; pass bits=")
    if kind == "hamming":
        return np.arange(int(bits) + 1, dtype=np.float64)
    if kind == "asymmetric":
        return np.linspace(0.0, float(bits), int(bits) + 1)
    raise ConfigError(f"unknown distance kind {kind!r}; use hamming, asymmetric or cosine")


def pr_curve(
    dist: DistSource,
    q_labels,
    db_labels,
    thresholds: np.ndarray | None = None,
    *,
    bits: int | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> dict[str, np.ndarray]:
    """Macro-averaged precision/recall at each threshold (retrieved = distance <= t).

    Thresholds default to 0..bits for integer distances and bits+1 points on
    [0, bits] for float ones when ``bits`` is given; for a precomputed array
    without ``bits``, to its integer range (int) or 51 points over its range (float).
    """
    if thresholds is None:
        if bits is not None:
            is_int = (not callable(dist)) and np.asarray(dist).dtype.kind in "iub"
            thresholds = default_thresholds("hamming" if is_int else "asymmetric", bits)
        elif callable(dist):
            raise ConfigError("pr_curve on a distance callable needs thresholds= or bits=")
        else:
            arr = np.asarray(dist)
            lo, hi = float(arr.min()), float(arr.max())
            thresholds = np.arange(int(lo), int(hi) + 1, dtype=np.float64) if arr.dtype.kind in "iub" else np.linspace(lo, hi, 51)
    res = evaluate_distances(dist, q_labels, db_labels, map_k=False, thresholds=thresholds, chunk=chunk)
    return res["pr"]


# --------------------------------------------------------------------------- wrappers


def _summary(res: dict, k_name: str, p_at: int | None, radius: float | None) -> dict:
    out: dict = {}
    if "map" in res:
        out[f"mAP@{k_name}"] = float(res["map"])
    if p_at is not None:
        out[f"P@{int(p_at)}"] = float(res["p_at"][int(p_at)])
    if radius is not None:
        r = int(radius) if float(radius).is_integer() else radius
        out[f"P@r{r}"] = float(res["p_radius"])
    if "pr" in res:
        out["pr"] = {key: [float(v) for v in res["pr"][key]] for key in ("precision", "recall", "threshold")}
    return out


def _k_name(k: int | None) -> str:
    return "all" if k is None else str(int(k))


def retrieval_metrics(
    queries: np.ndarray,
    db_codes: np.ndarray,
    q_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    asymmetric: bool,
    k: int | None = 1000,
    p_at: int | None = 100,
    radius: float | None = 2,
    bits: int | None = None,
    pr: bool = True,
    thresholds: np.ndarray | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> dict:
    """All retrieval metrics of queries against packed database codes, chunk-wise.

    ``asymmetric=False``: Hamming distance; ``queries`` are packed uint8 codes,
    or float logits ``(nq, bits)`` which are binarised with
    :func:`codes.logits_to_codes`.  ``asymmetric=True``: ``queries`` are float
    logits and the distance is :func:`codes.asymmetric_distance`.
    Returns ``{"mAP@<k>", "P@<p_at>", "P@r<radius>", "pr": {"precision",
    "recall", "threshold"} (lists), "distance", "bits", "n_queries", "n_db"}``.
    """
    db = np.asarray(db_codes)
    if db.dtype != np.uint8 or db.ndim != 2:
        raise CodeLengthError(f"database codes must be packed 2-D uint8, got {db.dtype} {db.shape}")
    K = db.shape[1] * 8
    if bits is not None and _codes.check_bits(bits) != K:
        raise CodeLengthError(f"database codes are {K} bits, expected {bits}")
    q = np.asarray(queries)
    if q.ndim != 2:
        raise CodeLengthError(f"queries must be 2-D, got shape {q.shape}")
    if asymmetric:
        if q.dtype.kind != "f":
            raise CodeLengthError("asymmetric search needs float query logits, got packed codes; pass the logits")
        if q.shape[1] != K:
            raise CodeLengthError(f"query logits have {q.shape[1]} bits, database codes {K}")
        q = q.astype(np.float32, copy=False)

        def dist(a: int, b: int) -> np.ndarray:
            return _codes.asymmetric_distance(q[a:b], db)

        kind = "asymmetric"
    else:
        if q.dtype.kind == "f":
            if q.shape[1] != K:
                raise CodeLengthError(f"query logits have {q.shape[1]} bits, database codes {K}")
            q = _codes.logits_to_codes(q)
        elif q.dtype != np.uint8:
            raise CodeLengthError(f"query codes must be packed uint8 or float logits, got {q.dtype}")

        def dist(a: int, b: int) -> np.ndarray:
            return _codes.hamming(q[a:b], db)

        kind = "hamming"
    if q.shape[0] != _n_queries(q_labels):
        raise DataError(f"{q.shape[0]} queries but {_n_queries(q_labels)} query labels")
    if db.shape[0] != _n_queries(db_labels):
        raise DataError(f"{db.shape[0]} database codes but {_n_queries(db_labels)} database labels")
    th = (thresholds if thresholds is not None else default_thresholds(kind, K)) if pr else None
    res = evaluate_distances(
        dist, q_labels, db_labels, map_k=k, p_at=p_at, radius=radius, thresholds=th, chunk=chunk
    )
    out = _summary(res, _k_name(k), p_at, radius)
    out.update({"distance": kind, "bits": K, "n_queries": int(q.shape[0]), "n_db": int(db.shape[0])})
    return out


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, np.float32(1e-12))


def cosine_distances(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    """1 - cosine similarity, float32 ``(nq, ndb)``; zero vectors count as orthogonal."""
    q, db = np.asarray(q), np.asarray(db)
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise DataError(f"features must be 2-D with the same width, got {q.shape} and {db.shape}")
    return (1.0 - _l2_normalise(q) @ _l2_normalise(db).T).astype(np.float32)


def float_retrieval_metrics(
    q_feats: np.ndarray,
    db_feats: np.ndarray,
    q_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    k: int | None = 1000,
    p_at: int | None = 100,
    radius: float | None = None,
    pr: bool = True,
    thresholds: np.ndarray | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> dict:
    """Metrics of cosine-distance search on float features (the no-hashing ceiling).

    Same keys as :func:`retrieval_metrics`; precision within a radius is only
    computed when ``radius`` (a cosine distance) is given.
    """
    qf, dbf = np.asarray(q_feats), np.asarray(db_feats)
    if qf.ndim != 2 or dbf.ndim != 2 or qf.shape[1] != dbf.shape[1]:
        raise DataError(f"features must be 2-D with the same width, got {qf.shape} and {dbf.shape}")
    if qf.shape[0] != _n_queries(q_labels) or dbf.shape[0] != _n_queries(db_labels):
        raise DataError("number of features and labels differ; pass one label per feature row")
    qn, dn = _l2_normalise(qf), _l2_normalise(dbf)

    def dist(a: int, b: int) -> np.ndarray:
        return (1.0 - qn[a:b] @ dn.T).astype(np.float32)

    th = (thresholds if thresholds is not None else default_thresholds("cosine")) if pr else None
    res = evaluate_distances(
        dist, q_labels, db_labels, map_k=k, p_at=p_at, radius=radius, thresholds=th, chunk=chunk
    )
    out = _summary(res, _k_name(k), p_at, radius)
    out.update({"distance": "cosine", "n_queries": int(qf.shape[0]), "n_db": int(dbf.shape[0])})
    return out
