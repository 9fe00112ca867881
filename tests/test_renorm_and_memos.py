"""Batch Renormalization in the hash head, and the per-process costs fedhash memoises on disk
(the silo partition, the backbone's fingerprint, the database activations between messages)."""
import subprocess
import sys

import numpy as np
import torch

from pathlib import Path

from client import site
from hashing import backbones
from hashing.backbones import weights_fingerprint
from hashing.coder import BatchRenorm1d, HashCoder
from hashing.config import Config
from hashing.hashers import Inputs
from hashing.silos import partition_indices
from hashing.train import Schedule, fit, train

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**kw) -> Config:
    return Config.from_dict({"bits": 8, "supervised": False, "epochs": 1, "batch-size": 32} | kw, source="test")


# ------------------------------------------------------------------ Batch Renormalization

def _head_with_reference(seed=0):
    torch.manual_seed(seed)
    h = HashCoder(12, 8)
    h.norm.running_mean.copy_(torch.randn(8))
    h.norm.running_var.copy_(torch.rand(8) + 0.5)
    h.norm.weight.data.copy_(torch.rand(8) + 0.5)
    h.norm.bias.data.copy_(torch.randn(8) * 0.1)
    return h


def test_renorm_forward_is_the_reference_normalisation_and_leaves_it_unchanged():
    h = _head_with_reference()
    assert isinstance(h.norm, BatchRenorm1d) and isinstance(h.norm, torch.nn.BatchNorm1d)
    x = torch.randn(32, 12)
    ref = h.eval()(x)  # eval mode: the running statistics
    mean, var = h.norm.running_mean.clone(), h.norm.running_var.clone()
    h.train()
    with h.renorm():
        z = h(x)
    assert torch.allclose(z, ref, atol=1e-5)
    assert torch.equal(h.norm.running_mean, mean) and torch.equal(h.norm.running_var, var)  # not updated
    assert not h.norm.renorm  # switched off again after the block
    plain = h(x)  # plain BatchNorm in train mode: the batch's own statistics
    assert not torch.allclose(plain, ref, atol=1e-3)


def test_renorm_gradient_is_batchnorm_when_the_batch_matches_the_reference():
    """r = 1, d = 0: values and gradients are those of plain BatchNorm."""
    x = torch.randn(64, 12, dtype=torch.float64)  # float64: the bias before BatchNorm gets a gradient of 0 + rounding
    a, b = _head_with_reference(1).double(), _head_with_reference(1).double()
    with torch.no_grad():
        hx = a.net[:-1](x)
    for m in (a, b):
        m.norm.running_mean.copy_(hx.mean(0))
        m.norm.running_var.copy_(hx.var(0, unbiased=False))
        m.train()
    with a.renorm():
        za = a(x)
    zb = b(x)
    assert torch.allclose(za, zb, atol=1e-10)
    w = torch.randn_like(za)
    (za * w).sum().backward()
    (zb * w).sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-10, rtol=1e-8)


def test_train_uses_renorm_only_when_asked():
    feats = np.random.default_rng(0).standard_normal((64, 2, 12)).astype(np.float16)
    cfg = _cfg()
    h = _head_with_reference()
    mean = h.norm.running_mean.clone()
    train(h, Inputs.of_features(feats), cfg, Schedule(1, 1e-3, 1e-6, 0, renorm=True))
    assert torch.equal(h.norm.running_mean, mean) and not h.norm.renorm
    train(h, Inputs.of_features(feats), cfg, Schedule(1, 1e-3, 1e-6, 0))
    assert not torch.equal(h.norm.running_mean, mean)  # plain BatchNorm tracks its running statistics


def test_batch_renorm_is_a_config_key():
    assert Config().batch_renorm is True
    assert Config.from_dict({"batch-renorm": False}).batch_renorm is False
    assert Schedule.federated_round(Config.from_dict({"batch-renorm": False}), 1).renorm is False
    assert Schedule.federated_round(Config(), 1).renorm is True
    assert Schedule.reference(Config()).renorm is False and Schedule.centralized(Config()).renorm is False


# ------------------------------------------------------------------ the partition memo

def test_partition_memo_same_cut_and_rebuilt_when_corrupt(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDHASH_CACHE", str(tmp_path))
    spec = Config(partitioner="dirichlet", num_silos=4, alpha=0.5, seed=3)
    first = partition_indices(digits.labels, spec)
    memo = list((tmp_path / "partitions").glob("*.npz"))
    assert len(memo) == 1
    again = partition_indices(digits.labels, spec)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other = partition_indices(digits.labels, Config(partitioner="dirichlet", num_silos=4, alpha=0.5, seed=4))
    assert len(list((tmp_path / "partitions").glob("*.npz"))) == 2  # another key
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    memo[0].write_bytes(b"not a zip file")
    rebuilt = partition_indices(digits.labels, spec)
    assert all(np.array_equal(a, b) for a, b in zip(first, rebuilt))
    # a memo that is not a partition of these images (out of range ids) is not trusted either
    np.savez(memo[0], unused=np.zeros(0, np.int64), **{f"silo{i}": np.array([10**6]) for i in range(4)})
    assert all(np.array_equal(a, b) for a, b in zip(first, partition_indices(digits.labels, spec)))
    # a given cache folder (a scenario's cache-dir) wins over the default
    there = partition_indices(digits.labels, Config(partitioner="dirichlet", num_silos=4, alpha=0.5, seed=3,
                                                    cache_dir=str(tmp_path / "elsewhere")))
    assert all(np.array_equal(a, b) for a, b in zip(first, there))
    assert len(list((tmp_path / "elsewhere" / "partitions").glob("*.npz"))) == 1


def test_memo_hit_skips_flwr_datasets_and_keeps_the_warning(digits, tmp_path):
    """A process that finds the cut memoised does not import flwr-datasets (seconds per process),
    and a pathological cut that drops classes still warns."""
    code = (
        "import sys, warnings\n"
        "from hashing.data import load_digits\n"
        "from hashing.config import Config\n"
        "from hashing.silos import partition_indices\n"
        "spec = Config(partitioner='pathological', num_silos=2, classes_per_silo=2, seed=0)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    partition_indices(load_digits().labels, spec)\n"
        "print(int('flwr_datasets' in sys.modules), int(any('belong to no silo' in str(x.message) for x in w)))\n"
    )
    env = {"FEDHASH_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert runs[0].stdout.split() == ["1", "1"]  # computed: flwr-datasets drew it
    assert runs[1].stdout.split() == ["0", "1"]  # memoised: no flwr-datasets, same warning


# ------------------------------------------------------------------ backbone fingerprint memo

def test_backbone_identity_matches_the_built_backbone_and_is_memoised(tmp_path):
    def forget():  # this process's copies: the built backbone and what it read from a memo
        backbones._backbones.clear()
        backbones._identities.clear()

    args = (backbones.DEFAULT_BACKBONE, None, str(tmp_path))
    _, wid, dim = backbones.backbone_for()
    forget()
    try:
        assert backbones.backbone_identity(*args) == (wid, dim)  # built (no memo yet), then memoised
        memo = list((tmp_path / "backbones").glob("*.json"))
        assert len(memo) == 1
        forget()
        assert backbones.backbone_identity(*args) == (wid, dim)
        assert backbones._backbones == {}  # answered from the memo, nothing built
        memo[0].write_text("{broken")
        assert backbones.backbone_identity(*args) == (wid, dim)  # kept in-process: the file is not read again
        assert backbones._backbones == {}
        forget()
        assert backbones.backbone_identity(*args) == (wid, dim)  # a new process: broken memo, rebuilt
        assert backbones._backbones != {}
    finally:
        forget()


# ------------------------------------------------------------------ database activations

def test_evaluation_reuses_the_statistics_phase_activations_exactly(digits, tmp_path):
    from hashing.data import subset

    from hashing.silos import make_silo

    cfg = Config(data="digits", n_images=0, num_silos=2, partitioner="iid", bits=16, size=32, views=2,
                 supervised=False, cache_dir=str(tmp_path))
    silo = make_silo(subset(digits, np.arange(300)), cfg, 0)
    data = site.silo_features(cfg, silo)
    model = site.fresh_model(cfg, data.feature_dim)
    digest = weights_fingerprint(model.state()[0])
    stats = site.local_stats(cfg, data, model, digest)
    kept = list((tmp_path / "activations").glob(f"*-{digest}.npy"))
    assert len(kept) == 1
    h = np.load(kept[0])
    assert np.array_equal(h, model.encode_features(data.clean[data.silo.splits.database], pre_norm=True))
    assert stats["count"][0] == len(data.silo.splits.train)
    np.testing.assert_allclose(stats["sum"], h.astype(np.float64).sum(0), rtol=1e-12)
    from hashing.federated import pooling

    m, v = pooling.pooled_moments(pooling.pool([stats]))
    pooling.set_bn_stats(model, m, v)
    with_cache = site.evaluate(cfg, data, model, digest)
    without = site.evaluate(cfg, data, model)
    assert with_cache == without
    # the kept file is what the evaluation reads: flipped activations give other codes
    np.save(kept[0], -h)
    assert site.evaluate(cfg, data, model, digest).map != without.map
    # a broken file is not used, and the digest of another model finds nothing
    np.save(kept[0], np.full_like(h, np.nan))
    assert site.evaluate(cfg, data, model, digest) == without
    assert site._kept_activations(cfg, data, "0" * 16) is None


# ------------------------------------------------------------------ references side by side

def test_trainings_side_by_side_in_threads_equal_one_at_a_time():
    """fedhash simulate runs its references in threads, one core each: every training must still
    get its own seed's initialisation (torch's global generator is shared by the threads)."""
    import functools

    from simulations.references import side_by_side as _run_side_by_side

    feats = np.random.default_rng(0).standard_normal((96, 2, 16)).astype(np.float16)

    def job(seed):
        coder, _ = fit(feats, None, _cfg(epochs=2, seed=seed))
        return {"w": coder.net[0].weight.detach().clone(), "z": coder.encode_features(feats[:, 0])}

    torch.set_num_threads(1)
    try:
        alone = {s: job(s) for s in range(6)}
    finally:
        torch.set_num_threads(2)
    together = _run_side_by_side([(s, functools.partial(job, s)) for s in range(6)], progress=False)
    assert sorted(together) == list(range(6))
    for s in range(6):
        res, seconds = together[s]
        assert seconds > 0
        assert torch.equal(res["w"], alone[s]["w"]) and np.array_equal(res["z"], alone[s]["z"])
    assert not torch.equal(alone[0]["w"], alone[1]["w"])
