import numpy as np
import pytest
import torch

from hashing.errors import ConfigError, FedhashError, TrainingError
from hashing.model import load_model, model_version, save_model
from hashing.train import TrainConfig, encode, train_head


def _clusters(n=512, v=3, d=48, c=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d)) * 1.5
    y = rng.integers(0, c, n)
    base = centres[y]
    feats = base[:, None, :] + 0.6 * rng.normal(size=(n, v, d))
    return feats.astype(np.float16), base.astype(np.float32) + 0.3 * rng.normal(size=(n, d)).astype(np.float32), y


def test_train_head_unsupervised_and_supervised():
    feats, clean, y = _clusters()
    cfg = TrainConfig(bits=16, epochs=4, batch_size=128, seed=0)
    coder, hist = train_head(feats, None, cfg, progress=False)
    assert len(hist.step_loss) == 4 * 4 and hist.epoch[-1]["loss"] < hist.epoch[0]["loss"]
    z = encode(coder, clean)
    assert z.shape == (512, 16) and z.dtype == np.float32
    # same seed, same model
    coder2, _ = train_head(feats, None, cfg, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(coder.state_dict().values(), coder2.state_dict().values()))
    sup, hs = train_head(feats, y, TrainConfig(bits=16, epochs=4, batch_size=128, supervised=True), progress=False)
    assert hs.epoch[-1]["loss"] < hs.epoch[0]["loss"]


def test_bad_training_input():
    feats, _, y = _clusters(n=64)
    with pytest.raises(ConfigError, match=r"\(n, views, dim\)"):
        train_head(feats[:, 0], None, TrainConfig(bits=16))
    with pytest.raises(ConfigError, match="needs labels"):
        train_head(feats, None, TrainConfig(bits=16, supervised=True))
    with pytest.raises(TrainingError, match="at least 2 training images"):
        train_head(feats[:1], None, TrainConfig(bits=16))
    bad = feats.copy()
    bad[3, 0, 0] = np.nan
    with pytest.raises(TrainingError, match="NaN"):
        train_head(bad, None, TrainConfig(bits=16, epochs=1, batch_size=64), progress=False)


def test_model_roundtrip_version_and_corruption(tmp_path):
    feats, clean, _ = _clusters(n=256)
    coder, _ = train_head(feats, None, TrainConfig(bits=16, epochs=1, batch_size=128), progress=False)
    v = save_model(tmp_path / "m.pt", coder, backbone="bb", weights="w0", size=64)
    loaded, rec = load_model(tmp_path / "m.pt")
    assert rec["model_version"] == v and rec["config"]["bits"] == 16
    assert np.array_equal(encode(loaded, clean), encode(coder, clean))
    # the version depends on the weights and on the config that defines the function
    state = coder.state_dict()
    cfg = rec["config"]
    assert model_version(state, cfg) == v
    assert model_version(state, {**cfg, "size": 96}) != v
    state2 = {k: t.clone() for k, t in state.items()}
    state2["net.0.weight"][0, 0] += 1e-3
    assert model_version(state2, cfg) != v
    # a corrupt file is refused with a one-line error
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(FedhashError, match="unreadable or not a fedhash model"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(FedhashError, match="no model at"):
        load_model(tmp_path / "missing.pt")
