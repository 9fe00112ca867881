import numpy as np
import pytest
import torch

from hashing.config import Config
from hashing.errors import ConfigError, FedhashError, ModelVersionError, TrainingError
from hashing.hashers import Inputs, create_hasher
from hashing.model import identity, load_model, model_version, save_model
from hashing.train import Schedule, fit, train


def _clusters(n=512, v=3, d=48, c=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d)) * 1.5
    y = rng.integers(0, c, n)
    base = centres[y]
    feats = base[:, None, :] + 0.6 * rng.normal(size=(n, v, d))
    return feats.astype(np.float16), base.astype(np.float32) + 0.3 * rng.normal(size=(n, d)).astype(np.float32), y


def _cfg(**kw) -> Config:
    return Config.from_dict({"bits": 16, "supervised": False, "batch-size": 128, "epochs": 4} | kw, source="test")


def test_train_head_unsupervised_and_supervised():
    feats, clean, y = _clusters()
    cfg = _cfg()
    coder, hist = fit(feats, None, cfg)
    assert len(hist.step_loss) == 4 * 4 and hist.epoch[-1]["loss"] < hist.epoch[0]["loss"]
    z = coder.encode_features(clean)
    assert z.shape == (512, 16) and z.dtype == np.float32
    # same seed, same model
    coder2, _ = fit(feats, None, cfg)
    assert all(torch.equal(a, b) for a, b in zip(coder.state_dict().values(), coder2.state_dict().values()))
    sup, hs = fit(feats, y, _cfg(supervised=True))
    assert hs.epoch[-1]["loss"] < hs.epoch[0]["loss"]


def test_fit_is_the_one_loop_on_a_fresh_seeded_hasher():
    """fit() = create_hasher + train(): the same weights, step for step."""
    feats, _, _ = _clusters(n=256)
    cfg = _cfg(epochs=2)
    a, ha = fit(feats, None, cfg)
    b = create_hasher("probe", feature_dim=48, bits=16, seed=cfg.seed)
    hb = train(b, Inputs.of_features(feats), cfg, Schedule.centralized(cfg))
    assert ha.step_loss == hb.step_loss
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_training_input():
    feats, _, y = _clusters(n=64)
    with pytest.raises(ConfigError, match=r"\(n, views, dim\)"):
        fit(feats[:, 0], None, _cfg())
    with pytest.raises(ConfigError, match="needs labels"):
        fit(feats, None, _cfg(supervised=True))
    with pytest.raises(TrainingError, match="at least 2 training images"):
        fit(feats[:1], None, _cfg())
    bad = feats.copy()
    bad[3, 0, 0] = np.nan
    with pytest.raises(TrainingError, match="NaN"):
        fit(bad, None, _cfg(epochs=1, **{"batch-size": 64}))


def test_model_roundtrip_version_and_corruption(tmp_path):
    feats, clean, _ = _clusters(n=256)
    coder, _ = fit(feats, None, _cfg(epochs=1))
    ident = identity(coder, backbone="bb", weights_id="w0", size=64)
    v = save_model(tmp_path / "m.pt", coder, ident)
    loaded, rec = load_model(tmp_path / "m.pt")
    assert rec["model_version"] == v and rec["identity"]["bits"] == 16 and rec["identity"]["kind"] == "probe"
    assert rec["privacy"] == {"unit": "none"}
    assert np.array_equal(loaded.encode_features(clean), coder.encode_features(clean))
    # the version depends on the weights and on the identity that defines the function
    state = coder.state_dict()
    assert model_version(state, ident) == v
    assert model_version(state, {**ident, "size": 96}) != v
    state2 = {k: t.clone() for k, t in state.items()}
    state2["net.0.weight"][0, 0] += 1e-3
    assert model_version(state2, ident) != v
    # an edited file is refused: its weights no longer match its version
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    raw["params"]["net.0.weight"][0, 0] += 1.0
    torch.save(raw, tmp_path / "edited.pt")
    with pytest.raises(ModelVersionError, match="do not match its recorded model version"):
        load_model(tmp_path / "edited.pt")
    # a corrupt file is refused with a one-line error
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(FedhashError, match="unreadable or not a fedhash model"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(FedhashError, match="no model at"):
        load_model(tmp_path / "missing.pt")
