"""hashing.federated.pooling: the silos' pooled BatchNorm statistics and global prototypes are those of the union.

Real data: scikit-learn's digits (1,797 8x8 images), raw 64-d pixels as features (two views: the
image and its left-right mirror), cut into Dirichlet(0.3) label-skewed silos; a HashCoder(64, 16).
Every reference below is computed directly with torch on the concatenation of the silos.
"""
import numpy as np
import pytest
import torch

from hashing.coder import HashCoder
from hashing.config import Config
from hashing.federated import pooling as fedstats
from hashing.silos import make_silos, partition_indices
from hashing.errors import CodeLengthError, DataError

C, K, D = 10, 16, 64


@pytest.fixture(scope="module")
def setup(digits):
    spec = Config(partitioner="dirichlet", num_silos=4, alpha=0.3, seed=0)
    parts = partition_indices(digits.labels, spec)
    # the same cut as the silos a simulation builds
    silos = make_silos(digits, spec)
    assert [list(s.source_ids) for s in silos] == [list(p) for p in parts]
    pix = digits.images.reshape(len(digits), D).astype(np.float32) / 255.0
    mirror = digits.images[:, :, ::-1].reshape(len(digits), D).astype(np.float32) / 255.0
    feats = np.stack([pix, mirror], axis=1)  # (n, V=2, d)
    torch.manual_seed(0)
    coder = HashCoder(D, K)
    # a trained-looking head: larger weights so the pre-BN activations are far from zero and skewed per silo
    with torch.no_grad():
        for m in coder.net:
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.5)
                m.bias.normal_(0, 0.5)
    stats = [fedstats.head_stats(coder, feats[p], digits.labels[p], C, batch_size=100) for p in parts]
    return dict(parts=parts, feats=feats, coder=coder, stats=stats, labels=digits.labels)


def _union_pre_bn(coder, feats_union):
    """(n*V, K) pre-BatchNorm activations of every view of every union image, direct torch."""
    n, v, d = feats_union.shape
    with torch.no_grad():
        coder.eval()
        return coder.net[:-1](torch.from_numpy(feats_union.reshape(n * v, d))).double()


def test_silos_are_label_skewed(setup):
    hists = np.array([np.bincount(setup["labels"][p], minlength=C) for p in setup["parts"]])
    shares = hists / hists.sum(1, keepdims=True)
    # Dirichlet(0.3): some silo holds a class at more than twice its 10% share, and some class is nearly missing somewhere
    assert shares.max() > 0.2 and shares.min() < 0.03
    # disjoint and covering
    allidx = np.concatenate(setup["parts"])
    assert len(allidx) == len(np.unique(allidx)) == len(setup["labels"])


def test_pooled_moments_are_the_union_moments(setup):
    coder, parts, feats, stats = setup["coder"], setup["parts"], setup["feats"], setup["stats"]
    union = np.concatenate([feats[p] for p in parts])
    h = _union_pre_bn(coder, union)
    want_mean = h.mean(0).numpy()
    want_var = h.var(0, unbiased=True).numpy()

    pooled = fedstats.pool(stats)
    assert pooled["count"][0] == len(union) * 2 == 2 * 1797
    mean, var = fedstats.pooled_moments(pooled)
    scale = np.sqrt(want_var)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-6 * scale.max())
    np.testing.assert_allclose(var, want_var, rtol=1e-6)
    # per-silo sums are the silos' own: count and sums add up
    assert [s["count"][0] for s in stats] == [2 * len(p) for p in parts]

    # the naive FedAvg of per-silo BatchNorm moments is NOT the union's under label skew
    per_mean = np.stack([s["sum"] / s["count"][0] for s in stats])
    per_var = np.stack([(s["sumsq"] - s["count"][0] * (s["sum"] / s["count"][0]) ** 2) / (s["count"][0] - 1)
                        for s in stats])
    naive_mean, naive_var = per_mean.mean(0), per_var.mean(0)
    mean_gap = np.abs(naive_mean - want_mean) / scale
    var_gap = np.abs(naive_var - want_var) / want_var
    print(f"naive average vs union: mean off by up to {mean_gap.max():.4f} std, variance by up to {var_gap.max():.2%}")
    # a real gap: four orders of magnitude above the tolerance the pooled moments meet
    assert mean_gap.max() > 1e-2, mean_gap.max()
    assert var_gap.max() > 1e-2, var_gap.max()
    # the union's variance includes the spread between silo means: the average of within-silo variances misses it
    assert (naive_var < want_var).mean() > 0.5


def test_global_prototypes_are_union_class_means(setup):
    coder, parts, feats, stats, labels = (setup[k] for k in ("coder", "parts", "feats", "stats", "labels"))
    pooled = fedstats.pool(stats)
    mean, var = fedstats.pooled_moments(pooled)
    fedstats.set_bn_stats(coder, mean, var)
    bn = coder.net[-1]
    np.testing.assert_allclose(bn.running_mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), var, rtol=1e-6)
    # give the BN affine part non-trivial values, as after training
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, K))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, K))
    protos = fedstats.global_prototypes(coder, pooled)
    assert protos.shape == (C, K) and protos.dtype == np.float32

    idx = np.concatenate(parts)
    x = feats[idx]
    y = labels[idx]
    with torch.no_grad():
        coder.eval()
        z = coder(torch.from_numpy(x.reshape(-1, D))).double().reshape(len(idx), 2, K).mean(1).numpy()
    want = np.stack([z[y == c].mean(0) for c in range(C)])
    np.testing.assert_allclose(protos, want, rtol=1e-5, atol=1e-5)
    # the eval-mode logits are normalised by the pooled statistics: over the union each bit has mean ~bias
    zall = z.mean(0)
    np.testing.assert_allclose(zall, bn.bias.detach().numpy(), atol=1e-3)

    # a class no silo holds gets a NaN row; the others are unchanged
    stats11 = [fedstats.head_stats(coder, feats[p], labels[p], C + 1) for p in parts]
    p11 = fedstats.global_prototypes(coder, fedstats.pool(stats11))
    assert np.isnan(p11[C]).all() and np.allclose(p11[:C], protos, atol=1e-5)


def test_unsupervised_stats_have_no_classes(setup):
    s = fedstats.head_stats(setup["coder"], setup["feats"][:50], None, 0)
    assert s["class_count"].shape == (0,) and s["class_sum"].shape == (0, K)
    assert fedstats.global_prototypes(setup["coder"], fedstats.pool([s, s])).shape == (0, K)
    # (n, d) features count one view each
    s1 = fedstats.head_stats(setup["coder"], setup["feats"][:50, 0], None, 0)
    assert s1["count"][0] == 50


def test_pool_errors(setup):
    stats = setup["stats"]
    with pytest.raises(DataError):
        fedstats.pool([])
    other = fedstats.head_stats(HashCoder(D, 8), setup["feats"][:20], setup["labels"][:20], C)
    with pytest.raises(CodeLengthError, match="sum"):
        fedstats.pool([stats[0], other])
    # a silo with another class list (one class fewer)
    fewer_classes = dict(stats[1], class_count=stats[1]["class_count"][:-1], class_sum=stats[1]["class_sum"][:-1])
    with pytest.raises(CodeLengthError, match="class_count"):
        fedstats.pool([stats[0], fewer_classes])
    with pytest.raises(CodeLengthError, match="64-d"):
        fedstats.head_stats(HashCoder(32, 16), setup["feats"][:20])
    one = fedstats.head_stats(setup["coder"], setup["feats"][:1, 0], None, 0)
    with pytest.raises(DataError, match="at least 2"):
        fedstats.pooled_moments(fedstats.pool([one]))
