import json
import logging

import numpy as np
import pytest
import torch

import hashing.features as F
from hashing.backbones import create_backbone
from hashing.data import subset


@pytest.fixture(scope="module")
def backbone():
    model, dim = create_backbone()
    assert dim == 1280
    return model


def test_extract_deterministic_and_views_differ(backbone, digits):
    idx = np.arange(16)
    a = F.extract(backbone, digits, idx, size=32, views=2, seed=1, batch_size=8)
    b = F.extract(backbone, digits, idx, size=32, views=2, seed=1, batch_size=8)
    c = F.extract(backbone, digits, idx, size=32, views=2, seed=2, batch_size=8)
    assert a.shape == (16, 2, 1280) and a.dtype == np.float16
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.allclose(a[:, 0], a[:, 1])  # two views of an image are different augmentations


def test_clean_view_matches_direct_backbone(backbone, digits):
    """The clean view is the resized, normalised image through the backbone: check against a direct call."""
    from hashing.views import normalise, resize, to_batch

    idx = np.array([0, 5, 9])
    got = F.extract(backbone, digits, idx, size=32)
    x = normalise(resize(to_batch(digits.images[idx]), 32), (0.5,) * 3, (0.5,) * 3)
    with torch.inference_mode():
        ref = backbone(x).numpy()
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=1e-2, atol=1e-2)


def test_cache_reused_stale_and_corrupt_rebuilt(backbone, digits, tmp_path, monkeypatch, caplog):
    ds = subset(digits, np.arange(40))
    idx = np.arange(40)
    first = np.array(F.cached_features(backbone, "tf_efficientnet_lite0", ds, idx, size=32, views=2, cache_dir=tmp_path))
    files = sorted(tmp_path.glob("*.npy"))
    assert len(files) == 1 and files[0].with_suffix(".json").exists()

    calls = []
    real_extract = F.extract
    monkeypatch.setattr(F, "extract", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    again = F.cached_features(backbone, "tf_efficientnet_lite0", ds, idx, size=32, views=2, cache_dir=tmp_path)
    assert calls == [] and np.array_equal(first, again)  # warm: no extraction

    # another seed, size or index set is another key
    F.cached_features(backbone, "tf_efficientnet_lite0", ds, idx[:20], size=32, views=2, cache_dir=tmp_path)
    assert calls == [1] and len(list(tmp_path.glob("*.npy"))) == 2

    # corrupt the first entry's bytes: detected by checksum and rebuilt, identical to the original
    data = bytearray(files[0].read_bytes())
    data[-100] ^= 0xFF
    files[0].write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        rebuilt = F.cached_features(backbone, "tf_efficientnet_lite0", ds, idx, size=32, views=2, cache_dir=tmp_path)
    assert calls == [1, 1] and "corrupt" in caplog.text
    assert np.array_equal(first, rebuilt)

    # stale metadata (a key that is not this one): rebuilt
    meta = files[0].with_suffix(".json")
    m = json.loads(meta.read_text())
    m["key"]["size"] = 999
    meta.write_text(json.dumps(m))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        F.cached_features(backbone, "tf_efficientnet_lite0", ds, idx, size=32, views=2, cache_dir=tmp_path)
    assert calls == [1, 1, 1] and "stale" in caplog.text
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_interrupted_extraction_leaves_no_cache(backbone, digits, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(F, "extract", boom)
    with pytest.raises(KeyboardInterrupt):
        F.cached_features(backbone, "tf_efficientnet_lite0", subset(digits, np.arange(8)), np.arange(8), size=32,
                          cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_fedhash_cache_variable_means_the_default_folder_not_the_current_one(value, monkeypatch, tmp_path):
    from hashing.cache import default_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FEDHASH_CACHE", value)
    assert default_cache_dir() == tmp_path / ".cache" / "fedhash" / "features"
    monkeypatch.setenv("FEDHASH_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
