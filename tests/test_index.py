"""SiloIndex: results against brute-force NumPy references, removal, versions, persistence."""
import json
import os

import numpy as np
import pytest

from hashing import codes
from hashing import index as index_mod
from hashing.errors import CodeLengthError, FedhashError, ModelVersionError
from hashing.index import Codes, SiloIndex, UnknownIdsError

BITS = 64
V = "m-2024-01"


def _data(n=3000, nq=40, bits=BITS, seed=0):
    rng = np.random.default_rng(seed)
    db = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    # queries: half near database items (a few flipped bits), half random, so distances vary widely
    near = db[rng.choice(n, nq // 2, replace=False)].copy()
    near ^= (rng.random(near.shape) < 0.05).astype(np.uint8) << rng.integers(0, 8, near.shape).astype(np.uint8)
    q = np.concatenate([near, rng.integers(0, 256, (nq - nq // 2, bits // 8), dtype=np.uint8)])
    ids = rng.permutation(10 * n)[:n].astype(np.int64) + 7  # sparse, shuffled ids
    return db, q, ids


def _make(kind, db, ids, **params):
    idx = SiloIndex(BITS, V, backbone="vit-s", kind=kind, **params)
    idx.add(db, ids)
    return idx


def assert_matches_bruteforce(D, I, q, db, ids, k):
    """Distances identical row by row; ids identical as sets wherever the distance is below the k-th."""
    ref = codes.hamming(q, db)
    order = np.argsort(ref, axis=1, kind="stable")[:, :k]
    ref_d = np.take_along_axis(ref, order, 1)
    np.testing.assert_array_equal(D, ref_d)
    id_to_row = {int(i): r for r, i in enumerate(ids)}
    for row in range(q.shape[0]):
        kth = ref_d[row, -1]
        strict = ref_d[row] < kth
        assert set(I[row][strict].tolist()) == set(ids[order[row][strict]].tolist())
        # every returned id really is at the distance reported
        rows = [id_to_row[int(i)] for i in I[row]]
        np.testing.assert_array_equal(ref[row, rows], D[row])
        assert len(set(I[row].tolist())) == k


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("kind,params", [("flat", {}), ("ivf", {"nlist": 16, "nprobe": 16})])
def test_exact_kinds_equal_bruteforce(kind, params):
    db, q, ids = _data()
    idx = _make(kind, db, ids, **params)
    assert len(idx) == idx.ntotal == len(db)
    for k in (1, 10, 57):
        D, I = idx.search(q, k, model_version=V)
        assert D.dtype == np.int32 and I.dtype == np.int64 and D.shape == I.shape == (len(q), k)
        assert_matches_bruteforce(D, I, q, db, ids, k)


def test_hnsw_recall_close_to_one():
    db, q, ids = _data(n=1500)
    idx = _make("hnsw", db, ids, M=16, efSearch=400)
    k = 10
    D, I = idx.search(q, k, model_version=V)
    ref = codes.hamming(q, db)
    ref_kth = np.sort(ref, 1)[:, k - 1]
    # recall up to ties: a returned id counts if its true distance is <= the true k-th distance
    id_to_row = {int(i): r for r, i in enumerate(ids)}
    hits = sum(ref[r, id_to_row[int(i)]] <= ref_kth[r] for r in range(len(q)) for i in I[r])
    assert hits / (len(q) * k) >= 0.97
    np.testing.assert_array_equal(D[:, 0], np.sort(ref, 1)[:, 0])  # nearest found exactly (queries are near)


def test_ivf_with_few_probes_is_subset_of_truth_distances():
    db, q, ids = _data()
    idx = _make("ivf", db, ids, nlist=16, nprobe=2)
    D, I = idx.search(q, 5, model_version=V)
    id_to_row = {int(i): r for r, i in enumerate(ids)}
    ref = codes.hamming(q, db)
    for r in range(len(q)):
        for d, i in zip(D[r], I[r]):
            if i >= 0:
                assert ref[r, id_to_row[int(i)]] == d


def test_fewer_than_k_stored_pads_uniformly():
    db, q, ids = _data(n=5, nq=4)
    for kind in ("flat", "hnsw"):
        idx = _make(kind, db, ids)
        D, I = idx.search(q[:3], 8, model_version=V)
        assert (I[:, 5:] == -1).all() and (D[:, 5:] == np.iinfo(np.int32).max).all()
        assert set(I[0, :5].tolist()) == set(ids.tolist())
    empty = SiloIndex(BITS, V, kind="ivf", nlist=4)
    D, I = empty.search(q[:2], 3, model_version=V)
    assert (I == -1).all()


# ------------------------------------------------------------------ removal


@pytest.mark.parametrize("kind,params", [("flat", {}), ("ivf", {"nlist": 8, "nprobe": 8})])
def test_remove_then_search_never_returns_removed(kind, params):
    db, q, ids = _data(n=1200)
    idx = _make(kind, db, ids, **params)
    rng = np.random.default_rng(1)
    gone = rng.choice(ids, 400, replace=False)
    # remove the nearest neighbours of the queries too, so removal visibly matters
    _, I0 = idx.search(q, 3, model_version=V)
    gone = np.unique(np.concatenate([gone, I0.ravel()]))
    assert idx.remove(gone) == len(gone)
    assert len(idx) == len(db) - len(gone)
    keep = ~np.isin(ids, gone)
    np.testing.assert_array_equal(idx.ids(), np.sort(ids[keep]))
    D, I = idx.search(q, 20, model_version=V)
    assert not np.isin(I, gone).any()
    assert_matches_bruteforce(D, I, q, db[keep], ids[keep], 20)
    # re-adding a removed id is allowed afterwards
    idx.add(db[:1], gone[:1])
    assert len(idx) == len(db) - len(gone) + 1


def test_remove_unknown_ids_changes_nothing():
    db, q, ids = _data(n=500)
    idx = _make("flat", db, ids)
    D0, I0 = idx.search(q, 10, model_version=V)
    unknown = np.arange(10**7, 10**7 + 25)
    with pytest.raises(KeyError) as ei:
        idx.remove(np.concatenate([ids[:5], unknown]))  # 5 known + 25 unknown: none may be removed
    assert isinstance(ei.value, FedhashError) and isinstance(ei.value, UnknownIdsError)
    msg = str(ei.value)
    assert str(10**7) in msg and str(10**7 + 9) in msg and "25" in msg
    assert str(int(ids[0])) not in msg.split("]")[0]
    assert len(idx) == 500
    D1, I1 = idx.search(q, 10, model_version=V)
    np.testing.assert_array_equal(D0, D1)
    np.testing.assert_array_equal(I0, I1)


def test_hnsw_remove_is_refused_clearly():
    db, _, ids = _data(n=200)
    idx = _make("hnsw", db, ids)
    with pytest.raises(FedhashError, match="hnsw.*kind='flat'"):
        idx.remove(ids[:3])
    assert len(idx) == 200


# ------------------------------------------------------------------ input checks


def test_duplicate_ids_refused_and_nothing_added():
    db, _, ids = _data(n=100)
    idx = _make("flat", db, ids)
    with pytest.raises(FedhashError, match=str(int(ids[3]))):
        idx.add(db[:2], np.array([ids[3], 10**8]))
    with pytest.raises(FedhashError, match="duplicate"):
        idx.add(db[:2], np.array([10**8, 10**8]))
    assert len(idx) == 100
    assert 10**8 not in idx.ids()


def test_wrong_code_length_and_dtype():
    db, q, ids = _data(n=50)
    idx = _make("flat", db, ids)
    with pytest.raises(CodeLengthError, match="32 bits.*64-bit"):
        idx.search(q[:, :4], 5, model_version=V)
    with pytest.raises(CodeLengthError):
        idx.search(q.astype(np.int64), 5, model_version=V)
    with pytest.raises(CodeLengthError, match="128 bits.*64-bit"):
        idx.add(np.zeros((2, 16), np.uint8), [1, 2])
    with pytest.raises(CodeLengthError):
        idx.search_asymmetric(np.zeros((2, 32), np.float32), 5, model_version=V)
    with pytest.raises(CodeLengthError):
        SiloIndex(60, V)


def test_model_version_required_and_checked():
    db, q, ids = _data(n=50)
    idx = _make("flat", db, ids)
    with pytest.raises(FedhashError, match="model_version="):
        idx.search(q, 5)
    with pytest.raises(ModelVersionError, match="model other.*index of model " + V):
        idx.search(q, 5, model_version="other")
    with pytest.raises(ModelVersionError):
        idx.search(Codes(q, "other"), 5)
    with pytest.raises(ModelVersionError):
        idx.search_asymmetric(np.zeros((2, BITS), np.float32), 5, model_version="other")
    with pytest.raises(FedhashError, match="model_version="):
        idx.search_asymmetric(np.zeros((2, BITS), np.float32), 5)
    with pytest.raises(ModelVersionError):
        idx.add(Codes(db[:1], "other"), [10**8])
    assert len(idx) == 50
    # a Codes array is enough on its own, and slices keep the version
    cq = Codes(q, V)
    D1, I1 = idx.search(cq[:7], 5)
    D2, I2 = idx.search(q[:7], 5, model_version=V)
    np.testing.assert_array_equal(I1, I2)
    # both given and disagreeing
    with pytest.raises(ModelVersionError):
        idx.search(cq, 5, model_version="other")


# ------------------------------------------------------------------ asymmetric


@pytest.mark.parametrize("kind,params", [("flat", {}), ("hnsw", {"efSearch": 64}), ("ivf", {"nlist": 8})])
def test_asymmetric_full_rerank_equals_bruteforce(kind, params):
    rng = np.random.default_rng(3)
    n, k = 1500, 15
    db_logits = rng.standard_normal((n, BITS)).astype(np.float32)
    db = codes.logits_to_codes(db_logits)
    ids = np.arange(n, dtype=np.int64) * 2 + 1
    idx = _make(kind, db, ids, **params)
    z = (db_logits[:10] + 0.8 * rng.standard_normal((10, BITS))).astype(np.float32)
    z = np.concatenate([z, rng.standard_normal((10, BITS)).astype(np.float32)])
    D, I = idx.search_asymmetric(z, k, rerank=n, model_version=V)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == (20, k)
    ref = codes.asymmetric_distance(z, db)
    order = np.argsort(ref, 1, kind="stable")[:, :k]
    ref_d = np.take_along_axis(ref, order, 1)
    np.testing.assert_allclose(D, ref_d, atol=1e-5, rtol=0)
    assert (np.diff(D, axis=1) >= 0).all()
    for r in range(len(z)):
        clear = ref_d[r] < ref_d[r, -1] - 1e-4  # ids must agree except in near-ties at the cut
        assert set(I[r][clear].tolist()) == set(ids[order[r][clear]].tolist())
        np.testing.assert_allclose(ref[r, (I[r] - 1) // 2], D[r], atol=1e-5)


def test_asymmetric_small_rerank_stays_in_hamming_shortlist():
    rng = np.random.default_rng(4)
    n, k, R = 2000, 5, 30
    db = codes.logits_to_codes(rng.standard_normal((n, BITS)))
    ids = np.arange(n, dtype=np.int64)
    idx = _make("flat", db, ids)
    z = rng.standard_normal((25, BITS)).astype(np.float32)
    D, I = idx.search_asymmetric(z, k, rerank=R, model_version=V)
    qcodes = codes.logits_to_codes(z)
    ham = codes.hamming(qcodes, db)
    asym = codes.asymmetric_distance(z, db)
    for r in range(len(z)):
        # the shortlist: the R Hamming-nearest, plus anything tied with the R-th
        cutoff = np.sort(ham[r])[R - 1]
        assert (ham[r, I[r]] <= cutoff).all()
        # and within the returned shortlist, the order is by asymmetric distance
        np.testing.assert_allclose(asym[r, I[r]], D[r], atol=1e-5)
    with pytest.raises(FedhashError, match="rerank"):
        idx.search_asymmetric(z, 10, rerank=5, model_version=V)
    # asymmetric reranking changes something versus the plain Hamming top-k (else the test is vacuous)
    _, Ih = idx.search(qcodes, k, model_version=V)
    assert any(set(Ih[r]) != set(I[r]) for r in range(len(z)))


# ------------------------------------------------------------------ persistence


@pytest.mark.parametrize("kind,params", [("flat", {}), ("hnsw", {"efSearch": 50}), ("ivf", {"nlist": 8, "nprobe": 3})])
def test_save_load_roundtrip(tmp_path, kind, params):
    db, q, ids = _data(n=800)
    idx = _make(kind, db, ids, **params)
    if kind != "hnsw":
        idx.remove(ids[:10])
    path = tmp_path / "silo" / "index.faiss"
    written = idx.save(path)
    side = json.loads((tmp_path / "silo" / "index.faiss.meta.json").read_text())
    assert side == written
    for key, val in {"model_version": V, "bits": BITS, "count": len(idx), "backbone": "vit-s", "kind": kind,
                     "format": 1}.items():
        assert side[key] == val
    assert side["params"] == idx.params and side["created"].endswith("+00:00") and len(side["sha256"]) == 64
    back = SiloIndex.load(path)
    assert back.meta == idx.meta
    np.testing.assert_array_equal(back.ids(), idx.ids())
    for a, b in zip(idx.search(q, 12, model_version=V), back.search(q, 12, model_version=V)):
        np.testing.assert_array_equal(a, b)
    z = np.random.default_rng(0).standard_normal((5, BITS)).astype(np.float32)
    for a, b in zip(idx.search_asymmetric(z, 4, model_version=V), back.search_asymmetric(z, 4, model_version=V)):
        np.testing.assert_array_equal(a, b)
    if kind != "hnsw":  # the loaded index still removes, and checks ids
        back.remove(ids[10:12])
        with pytest.raises(KeyError):
            back.remove(ids[:1])


def test_load_refuses_tampered_or_missing(tmp_path):
    db, _, ids = _data(n=100)
    idx = _make("flat", db, ids)
    path = tmp_path / "i.faiss"
    with pytest.raises(FedhashError, match="i.faiss"):
        SiloIndex.load(path)
    idx.save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FedhashError, match="disagree"):
        SiloIndex.load(path)
    idx.save(path)
    os.remove(str(path) + ".meta.json")
    with pytest.raises(FedhashError, match="meta"):
        SiloIndex.load(path)


def test_save_is_atomic(tmp_path, monkeypatch):
    db, q, ids = _data(n=100)
    idx = _make("flat", db, ids)
    path = tmp_path / "i.faiss"
    idx.save(path)
    before = path.read_bytes()
    before_meta = (tmp_path / "i.faiss.meta.json").read_bytes()
    idx.add(db[:5] ^ 1, np.arange(10**6, 10**6 + 5))

    real = index_mod.faiss.write_index_binary

    def half_then_crash(index, fname):
        real(index, fname)
        with open(fname, "r+b") as f:
            f.truncate(17)
        raise OSError("disk full")

    monkeypatch.setattr(index_mod.faiss, "write_index_binary", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        idx.save(path)
    assert path.read_bytes() == before
    assert (tmp_path / "i.faiss.meta.json").read_bytes() == before_meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.faiss", "i.faiss.meta.json"]
    assert len(SiloIndex.load(path)) == 100


def test_codes_keep_their_model_version_through_pickle():
    import pickle

    from hashing.index import Codes

    c = Codes(np.arange(16, dtype=np.uint8).reshape(2, 8), "v1")
    back = pickle.loads(pickle.dumps(c))
    assert isinstance(back, Codes) and back.model_version == "v1" and np.array_equal(back, c)
    assert pickle.loads(pickle.dumps(c[1:])).model_version == "v1"
