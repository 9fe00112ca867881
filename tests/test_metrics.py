"""Retrieval metrics against sklearn, a slow reference, and hand-computed numbers."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from hashing import codes, metrics
from hashing.errors import CodeLengthError, DataError


# --------------------------------------------------------------------------- slow reference


def _rel(ql, dl):
    ql, dl = np.asarray(ql), np.asarray(dl)
    if ql.ndim == 1:
        return ql[:, None] == dl[None, :]
    return (ql.astype(int) @ dl.astype(int).T) > 0


def ref_metrics(dist, ql, dl, k, p, r, eps=0.0):
    """Per-query loop with np.argsort(kind="stable"): the definitions, literally."""
    rel = _rel(ql, dl)
    nq, ndb = dist.shape
    aps, pks, prs = [], [], []
    for i in range(nq):
        order = np.argsort(dist[i], kind="stable")
        relk = rel[i, order[: min(k, ndb)]]
        hits, s = 0, 0.0
        for pos, is_rel in enumerate(relk, start=1):
            if is_rel:
                hits += 1
                s += hits / pos
        aps.append(s / hits if hits else 0.0)
        pks.append(rel[i, order[:p]].sum() / p)
        within = dist[i] <= r + eps
        prs.append(rel[i, within].sum() / within.sum() if within.any() else 0.0)
    return float(np.mean(aps)), float(np.mean(pks)), float(np.mean(prs))


def ref_pr(dist, ql, dl, thresholds):
    rel = _rel(ql, dl)
    prec, rec = [], []
    for t in thresholds:
        ret = dist <= t
        n_ret = ret.sum(1)
        n_hit = (ret & rel).sum(1)
        tot = rel.sum(1)
        prec.append(np.mean(n_hit[n_ret > 0] / n_ret[n_ret > 0]) if (n_ret > 0).any() else np.nan)
        rec.append(np.mean(n_hit[tot > 0] / tot[tot > 0]))
    return np.array(prec), np.array(rec)


def _hamming_case(seed, nq=37, ndb=300, bits=16, n_cls=5, multi=False):
    rng = np.random.default_rng(seed)
    q = codes.pack(rng.random((nq, bits)) < 0.5)
    db = codes.pack(rng.random((ndb, bits)) < 0.5)
    if multi:
        ql = (rng.random((nq, n_cls)) < 0.3).astype(np.int64)
        dl = (rng.random((ndb, n_cls)) < 0.3).astype(np.int64)
    else:
        ql = rng.integers(0, n_cls, nq)
        dl = rng.integers(0, n_cls, ndb)
    return q, db, ql, dl


# --------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.parametrize("k", [1, 5, 37, 199, 200, 500])
def test_topk_equals_stable_argsort_with_ties(kind, k):
    rng = np.random.default_rng(k)
    if kind == "int":
        dist = rng.integers(0, 9, (23, 200)).astype(np.int32)
    else:  # few distinct values -> many exact float ties, plus +inf entries
        dist = rng.choice(np.array([0.25, 1.5, 1.5000001, 3.0, np.inf], dtype=np.float32), (23, 200))
    got = metrics.topk_stable(dist, k)
    assert np.array_equal(got, np.argsort(dist, axis=1, kind="stable")[:, :k])


def test_topk_negative_ints_and_float64():
    rng = np.random.default_rng(3)
    d = rng.integers(-5, 5, (10, 50))
    assert np.array_equal(metrics.topk_stable(d, 7), np.argsort(d, axis=1, kind="stable")[:, :7])
    f = np.round(rng.standard_normal((10, 50)), 1)
    assert np.array_equal(metrics.topk_stable(f, 7), np.argsort(f, axis=1, kind="stable")[:, :7])


def test_pr_bins_match_searchsorted():
    rng = np.random.default_rng(0)
    th = np.linspace(0.0, 16.0, 17)
    block = np.concatenate([rng.random(2000) * 18 - 1, th, np.nextafter(th, -np.inf), np.nextafter(th, np.inf)])
    block = block.astype(np.float32)[None, :]
    want = np.searchsorted(th, block.ravel(), side="left")
    assert np.array_equal(metrics._bins(block, th).ravel(), want)
    th2 = np.array([0.1, 0.5, 3.0])  # uneven grid -> searchsorted path
    assert np.array_equal(metrics._bins(block, th2).ravel(), np.searchsorted(th2, block.ravel(), side="left"))
    ib = rng.integers(0, 17, (4, 100))
    assert np.array_equal(metrics._bins(ib, np.arange(17.0)), ib)


# --------------------------------------------------------------------------- sklearn


@pytest.mark.parametrize("multi", [False, True])
def test_map_all_equals_sklearn_average_precision(multi):
    rng = np.random.default_rng(11 + multi)
    nq, ndb = 40, 250
    dist = rng.random((nq, ndb))  # continuous: no ties
    if multi:
        ql = (rng.random((nq, 6)) < 0.3).astype(bool)
        dl = (rng.random((ndb, 6)) < 0.3).astype(bool)
    else:
        ql, dl = rng.integers(0, 4, nq), rng.integers(0, 4, ndb)
    rel = _rel(ql, dl)
    keep = rel.any(1)  # sklearn's AP is undefined without positives
    assert keep.sum() > 30
    want = np.mean([average_precision_score(rel[i], -dist[i]) for i in np.flatnonzero(keep)])
    got = metrics.map_at_k(dist[keep], np.asarray(ql)[keep], dl, k=None)
    assert abs(got - want) < 1e-9
    assert abs(metrics.map_at_k(dist[keep], np.asarray(ql)[keep], dl, k=10_000) - want) < 1e-9


# --------------------------------------------------------------------------- brute-force reference


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_symmetric_matches_reference_with_ties(multi, seed):
    q, db, ql, dl = _hamming_case(seed, multi=multi)
    dist = codes.hamming(q, db)
    assert len(np.unique(dist)) <= 17  # many ties
    k, p, r = 50, 20, 5
    want = ref_metrics(dist, ql, dl, k, p, r)
    res = metrics.retrieval_metrics(q, db, ql, dl, asymmetric=False, k=k, p_at=p, radius=r, bits=16, chunk=8)
    assert res["mAP@50"] == pytest.approx(want[0], abs=1e-12)
    assert res["P@20"] == pytest.approx(want[1], abs=1e-12)
    assert res["P@r5"] == pytest.approx(want[2], abs=1e-12)
    # the same through the matrix-level functions
    assert metrics.map_at_k(dist, ql, dl, k) == pytest.approx(want[0], abs=1e-12)
    assert metrics.precision_at_k(dist, ql, dl, p) == pytest.approx(want[1], abs=1e-12)
    assert metrics.precision_radius(dist, ql, dl, r) == pytest.approx(want[2], abs=1e-12)
    prec, rec = ref_pr(dist, ql, dl, np.arange(17))
    np.testing.assert_allclose(res["pr"]["precision"], prec, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res["pr"]["recall"], rec, rtol=0, atol=1e-12)
    assert res["pr"]["threshold"] == list(range(17))
    assert res["pr"]["recall"][-1] == pytest.approx(1.0)


@pytest.mark.parametrize("multi", [False, True])
def test_asymmetric_matches_reference(multi):
    rng = np.random.default_rng(5)
    _, db, ql, dl = _hamming_case(7, multi=multi)
    # saturated logits -> soft distances equal Hamming distances: lots of exact float ties
    logits = np.where(rng.random((len(ql), 16)) < 0.5, -30.0, 30.0).astype(np.float32)
    logits[:5] = rng.standard_normal((5, 16)) * 2  # and some genuinely soft queries
    dist = codes.asymmetric_distance(logits, db)
    k, p, r = 40, 10, 2
    want = ref_metrics(dist, ql, dl, k, p, r, eps=metrics.FLOAT_RADIUS_EPS)
    res = metrics.retrieval_metrics(logits, db, ql, dl, asymmetric=True, k=k, p_at=p, radius=r, chunk=16)
    assert res["distance"] == "asymmetric"
    assert res["mAP@40"] == pytest.approx(want[0], abs=1e-12)
    assert res["P@10"] == pytest.approx(want[1], abs=1e-12)
    assert res["P@r2"] == pytest.approx(want[2], abs=1e-12)
    th = metrics.default_thresholds("asymmetric", 16)
    prec, rec = ref_pr(dist, ql, dl, th)
    np.testing.assert_allclose(res["pr"]["precision"], prec, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res["pr"]["recall"], rec, rtol=0, atol=1e-12)


def test_symmetric_accepts_logits_and_matches_codes():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((20, 16)).astype(np.float32)
    _, db, _, dl = _hamming_case(3)
    ql = rng.integers(0, 5, 20)
    a = metrics.retrieval_metrics(logits, db, ql, dl, asymmetric=False, k=30, pr=False)
    b = metrics.retrieval_metrics(codes.logits_to_codes(logits), db, ql, dl, asymmetric=False, k=30, pr=False)
    assert a == b


# --------------------------------------------------------------------------- hand-computed


def test_hand_computed_map_at_3():
    # distances rank the db as [1, 3, 0, 4, 2] (items 1 and 3 tie at 1: stable -> 1 first)
    dist = np.array([[4, 1, 7, 1, 5]], dtype=np.int32)
    db_labels = np.array([0, 1, 1, 0, 1])
    q_labels = np.array([1])
    # top 3 = items 1 (rel), 3 (not), 0 (not): AP@3 = (1/1) / 1 = 1.0
    assert metrics.map_at_k(dist, q_labels, db_labels, k=3) == pytest.approx(1.0)
    # relabel so top 3 relevance is [no, yes, yes]: AP@3 = (1/2 + 2/3) / 2 = 7/12
    db_labels = np.array([1, 0, 1, 1, 1])
    assert metrics.map_at_k(dist, q_labels, db_labels, k=3) == pytest.approx(7 / 12, abs=1e-15)
    # over the whole ranking [1, 3, 0, 4, 2] -> rel [0, 1, 1, 1, 1]:
    # AP = (1/2 + 2/3 + 3/4 + 4/5) / 4
    assert metrics.map_at_k(dist, q_labels, db_labels, k=None) == pytest.approx((1 / 2 + 2 / 3 + 3 / 4 + 4 / 5) / 4)
    assert metrics.precision_at_k(dist, q_labels, db_labels, k=2) == pytest.approx(0.5)
    # radius 1: items 1, 3 -> 1 relevant out of 2
    assert metrics.precision_radius(dist, q_labels, db_labels, radius=1) == pytest.approx(0.5)
    # radius 0: retrieves nothing -> 0
    assert metrics.precision_radius(dist, q_labels, db_labels, radius=0) == 0.0


def test_ties_are_broken_by_database_order():
    dist = np.zeros((1, 4), dtype=np.int32)  # everything tied
    q = np.array([0])
    assert metrics.map_at_k(dist, q, np.array([0, 1, 1, 1]), k=1) == 1.0
    assert metrics.map_at_k(dist, q, np.array([1, 0, 1, 1]), k=1) == 0.0
    assert metrics.map_at_k(dist.astype(np.float32), q, np.array([1, 0, 0, 0]), k=2) == pytest.approx(0.5)
    # deterministic: repeated runs and different chunk sizes agree exactly
    q_, db, ql, dl = _hamming_case(9)
    runs = {
        metrics.retrieval_metrics(q_, db, ql, dl, asymmetric=False, k=30, chunk=c, pr=False)["mAP@30"]
        for c in (1, 7, 256, 256)
    }
    assert len({round(v, 12) for v in runs}) == 1


def test_query_without_relevant_items_scores_zero():
    dist = np.array([[0, 1, 2], [0, 1, 2]], dtype=np.int32)
    ql = np.array([5, 0])  # class 5 is absent from the database
    dl = np.array([0, 1, 0])
    # query 0: 0; query 1: rel [1,0,1] -> (1 + 2/3)/2
    assert metrics.map_at_k(dist, ql, dl, k=None) == pytest.approx((0 + (1 + 2 / 3) / 2) / 2)
    assert metrics.map_at_k(dist[:1], ql[:1], dl) == 0.0
    pr = metrics.pr_curve(dist[:1], ql[:1], dl, thresholds=np.arange(3))
    assert np.all(pr["precision"] == 0.0)
    assert np.all(np.isnan(pr["recall"]))  # no query with a relevant item to average


def test_multilabel_relevance_and_labels_validation():
    ql = np.array([[1, 0, 0], [0, 1, 1]])
    dl = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]])
    assert metrics.relevance(ql, dl).tolist() == [[True, False, False], [True, True, False]]
    with pytest.raises(DataError):
        metrics.relevance(ql, np.array([0, 1, 2]))
    with pytest.raises(DataError):
        metrics.map_at_k(np.zeros((2, 2)), np.array([0, 1]), np.array([0, 1, 2]))


def test_float_metrics_and_callable_source():
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((4, 32)) * 3
    ql, dl = rng.integers(0, 4, 30), rng.integers(0, 4, 200)
    qf = (centres[ql] + rng.standard_normal((30, 32))).astype(np.float32)
    df = (centres[dl] + rng.standard_normal((200, 32))).astype(np.float32)
    res = metrics.float_retrieval_metrics(qf, df, ql, dl, k=50, p_at=10, chunk=7)
    d = metrics.cosine_distances(qf, df)
    want = ref_metrics(d, ql, dl, 50, 10, 0.0)
    assert res["mAP@50"] == pytest.approx(want[0], abs=1e-9)
    assert res["P@10"] == pytest.approx(want[1], abs=1e-9)
    assert res["mAP@50"] > 0.9
    assert "P@r2" not in res and len(res["pr"]["precision"]) == 51
    # a callable producing chunks gives the same as the matrix
    assert metrics.map_at_k(lambda a, b: d[a:b], ql, dl, 50, chunk=4) == metrics.map_at_k(d, ql, dl, 50)


def test_code_length_mismatch_raises():
    q, db, ql, dl = _hamming_case(0)
    with pytest.raises(CodeLengthError):
        metrics.retrieval_metrics(q, db, ql, dl, asymmetric=False, bits=32)
    with pytest.raises(CodeLengthError):
        metrics.retrieval_metrics(q, db, ql, dl, asymmetric=True)  # packed codes as soft queries


def test_plot_pr_curves_writes_png(tmp_path):
    q, db, ql, dl = _hamming_case(1)
    res = metrics.retrieval_metrics(q, db, ql, dl, asymmetric=False, k=20)
    out = tmp_path / "plots" / "pr.png"
    from hashing import plots

    plots.plot_pr_curves({"hamming": res["pr"], "other": res["pr"]}, out, title="PR")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["pr.png"]  # no temp file left behind
