"""LSH / PCA / ITQ baselines: layout, determinism, and that ITQ does what ITQ should."""
from __future__ import annotations

import numpy as np
import pytest

from hashing import baselines, codes, metrics
from hashing.errors import CodeLengthError, ConfigError, DataError


def _clusters(seed, n_per=200, n_cls=10, d=128, spread=1.0, sep=4.0, offset=3.0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_cls, d)) * sep / np.sqrt(2)
    labels = np.repeat(np.arange(n_cls), n_per)
    x = centres[labels] + rng.standard_normal((labels.size, d)) * spread
    perm = rng.permutation(labels.size)
    return (x[perm] + offset).astype(np.float32), labels[perm]  # offset: the data is not centred


@pytest.fixture(scope="module")
def clusters():
    x, y = _clusters(0)
    return x[:1800], y[:1800], x[1800:], y[1800:]  # db, db labels, queries, query labels


@pytest.mark.parametrize("name", baselines.BASELINES)
@pytest.mark.parametrize("bits", [16, 64])
def test_shapes_dtypes_and_determinism(clusters, name, bits):
    db, _, q, _ = clusters
    a = baselines.fit_baseline(name, db, bits, seed=3)
    c = a.encode(q)
    assert a.bits == bits and c.dtype == np.uint8 and c.shape == (len(q), bits // 8)
    b = baselines.fit_baseline(name, db, bits, seed=3)
    assert np.array_equal(b.encode(q), c)
    # codes are the sign of the projection in the fedhash layout
    assert np.array_equal(codes.pack(a.project(q) > 0), c)


def test_lsh_seed_changes_codes_and_matches_explicit_projection():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((500, 48)) + 2.0).astype(np.float32)
    m1 = baselines.fit_baseline("lsh", x, 32, seed=1)
    m2 = baselines.fit_baseline("lsh", x, 32, seed=2)
    assert not np.array_equal(m1.encode(x), m2.encode(x))
    W = m1.projection
    assert W.shape == (32, 48)
    np.testing.assert_allclose(W @ W.T, np.eye(32), atol=1e-5)  # orthonormal rows
    explicit = (x - x.mean(0)) @ W.T
    # IndexLSH.sa_encode output decoded bit by bit = sign of the explicit projection
    bits01 = codes.unpack(m1.encode(x))
    assert np.array_equal(bits01.astype(bool), explicit >= 0)
    assert np.allclose(m1.mean, x.mean(0), atol=1e-5)


def test_lsh_bits_balanced_on_centred_data():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2000, 64)) * 0.5 + 5.0).astype(np.float32)  # far from the origin
    c = codes.unpack(baselines.fit_baseline("lsh", x, 64, seed=0).encode(x))
    means = c.mean(0)
    assert means.min() > 0.3 and means.max() < 0.7, means


def test_itq_lowers_quantization_loss_versus_pca(clusters):
    db, *_ = clusters
    for bits in (16, 32):
        pca = baselines.fit_baseline("pca", db, bits)
        itq = baselines.fit_baseline("itq", db, bits)
        v_pca, v_itq = pca.project(db), itq.project(db)
        # ITQ only rotates the PCA projection: same variance, same norms
        np.testing.assert_allclose(np.linalg.norm(v_itq, axis=1), np.linalg.norm(v_pca, axis=1), rtol=1e-3)
        assert baselines.quantization_loss(v_itq) < 0.97 * baselines.quantization_loss(v_pca)
        # PCA output is centred on the training data (faiss PCAMatrix subtracts the mean)
        assert np.abs(v_pca.mean(0)).max() < 1e-3 * np.abs(v_pca).mean()


def test_itq_beats_pca_and_is_good_on_clusters(clusters):
    db, yd, q, yq = clusters
    res = {}
    for name in ("pca", "itq", "lsh"):
        m = baselines.fit_baseline(name, db, 32, seed=0)
        res[name] = metrics.retrieval_metrics(m.encode(q), m.encode(db), yq, yd, asymmetric=False, k=100, pr=False)[
            "mAP@100"
        ]
    assert res["itq"] >= res["pca"], res
    assert res["itq"] > 0.8, res
    m = baselines.fit_baseline("itq", db, 64, seed=0)
    assert metrics.retrieval_metrics(m.encode(q), m.encode(db), yq, yd, asymmetric=False, k=100, pr=False)[
        "mAP@100"
    ] > 0.8


def test_itq_faiss_variant_is_equivalent_in_quality(clusters):
    db, yd, q, yq = clusters
    m = baselines.fit_baseline("itq_faiss", db, 32)
    assert np.allclose(m.mean, db.mean(0), atol=1e-4)  # ITQTransform centres with the training mean
    r = metrics.retrieval_metrics(m.encode(q), m.encode(db), yq, yd, asymmetric=False, k=100, pr=False)
    assert r["mAP@100"] > 0.8


def test_errors():
    x = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    with pytest.raises(ConfigError):
        baselines.fit_baseline("sh", x, 16)
    with pytest.raises(CodeLengthError):
        baselines.fit_baseline("pca", x, 32)  # more bits than dimensions
    with pytest.raises(CodeLengthError):
        baselines.fit_baseline("itq", x, 12)
    m = baselines.fit_baseline("lsh", x, 32)  # LSH can have more bits than dimensions
    assert m.encode(x).shape == (100, 4)
    with pytest.raises(DataError):
        m.encode(x[:, :8])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError):
        baselines.fit_baseline("itq", bad, 16)
