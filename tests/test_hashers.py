"""One door per kind of hash function (hashing/hashers.py): every kind gives the same interface
(encode, the activations the server pools, a training batch, the state federation exchanges), is
built identically from the same seed, and trains through the one loop (hashing/train.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hashing.config import Config
from hashing.errors import ConfigError, WeightsError
from hashing.hashers import Inputs, create_hasher, hasher_kinds, reads_features
from hashing.train import Schedule, train

D, BITS = 64, 16


@pytest.fixture(scope="module")
def inputs(digits):
    """Raw 8x8 digits pixels as 64-d 'features' (two views: the image and its mirror), and the images."""
    n = 240
    pix = digits.images[:n].reshape(n, D).astype(np.float32) / 255.0
    mirror = digits.images[:n, :, ::-1].reshape(n, D).astype(np.float32) / 255.0
    from hashing.data import subset

    return Inputs(subset(digits, np.arange(n)), np.arange(n), 32, clean=pix, views=np.stack([pix, mirror], 1))


def _build(kind: str, seed: int = 0):
    opts = {"feature_dim": D, "bits": BITS}
    if kind == "lora":
        opts = {"feature_dim": 1280, "bits": BITS, "backbone": "tf_efficientnet_lite0"}
    if kind == "dp":
        opts["dims"] = 32
    return create_hasher(kind, seed=seed, **opts)


def test_the_registry_names_every_kind_and_refuses_others():
    assert hasher_kinds() == ["dp", "lora", "probe"]
    assert reads_features("probe") and reads_features("dp") and not reads_features("lora")
    with pytest.raises(ConfigError, match="unknown kind of hash function 'lsh'.*dp, lora, probe"):
        create_hasher("lsh", feature_dim=D, bits=BITS)
    with pytest.raises(ConfigError, match="unknown kind"):
        reads_features("lsh")


@pytest.mark.parametrize("kind, pooling", [("probe", "activations"), ("dp", "moments"), ("lora", "activations")])
def test_every_kind_gives_the_same_interface(kind, pooling, inputs):
    h = _build(kind)
    assert h.kind == kind and h.pooling == pooling and h.bits == BITS
    idx = np.arange(0, 40)
    z = h.encode(inputs, idx) if kind != "lora" else h.encode(inputs, idx[:8])
    assert z.dtype == np.float32 and z.shape == (len(idx) if kind != "lora" else 8, BITS) and np.isfinite(z).all()
    # the logits are the final normalisation of the activations the server pools: exactly
    act = h.activations(inputs, idx if kind != "lora" else idx[:8])
    assert np.array_equal(h.normalise(act), z)
    params, buffers = h.state()
    assert params and all(isinstance(v, torch.Tensor) for v in params.values())
    live = dict(h.named_parameters())
    assert all(live[k].requires_grad for k in params)  # parameters: what a strategy aggregates
    assert not set(params) & set(buffers)
    assert not any(k.startswith("backbone.") and "lora_" not in k for k in params)  # never the frozen backbone
    assert h.architecture() and "in_dim" in h.architecture()


@pytest.mark.parametrize("kind", ["probe", "dp", "lora"])
def test_the_same_seed_builds_the_same_function_and_state_round_trips(kind):
    a, b = _build(kind, seed=3), _build(kind, seed=3)
    pa, ba = a.state()
    pb, bb = b.state()
    assert list(pa) == list(pb) and all(torch.equal(pa[k], pb[k]) for k in pa)
    if kind != "dp":  # the DP head starts as the identity rotation whatever the seed (DP-ITQ sets it)
        pc, _ = _build(kind, seed=4).state()
        assert any(not torch.equal(pa[k], pc[k]) for k in pa)
    with torch.no_grad():
        for v in a.trainable_parameters():
            v.add_(0.01)
    b.load_state(*a.state())
    assert all(torch.equal(x, y) for x, y in zip(a.state()[0].values(), b.state()[0].values()))
    with pytest.raises(WeightsError, match="does not fit"):
        b.load_state({"nope": torch.zeros(1)}, ba)


def test_probe_and_dp_train_through_the_one_loop(inputs, digits):
    cfg = Config(bits=BITS, supervised=False, batch_size=64, dp_dims=32)
    for kind in ("probe", "dp"):
        h = _build(kind)
        before = [p.detach().clone() for p in h.trainable_parameters()]
        hist = train(h, inputs, cfg, Schedule(2, 1e-3, 1e-6, 0))
        assert hist.steps == 2 * (240 // 64) and math.isfinite(hist.loss) and 0 <= hist.bit_balance <= 1
        assert any(not torch.equal(b, p) for b, p in zip(before, h.trainable_parameters())), kind
        assert not h.training
    # supervised, with global prototypes (what a federated silo gets from the server)
    sup = Config(bits=BITS, supervised=True, batch_size=64)
    protos = np.random.default_rng(0).standard_normal((10, BITS)).astype(np.float32)
    hist = train(_build("probe"), inputs, sup, Schedule(1, 1e-3, 1e-6, 0), labels=digits.labels[:240], prototypes=protos)
    assert math.isfinite(hist.loss)


def test_lora_trains_adapters_and_head_only(inputs):
    h = _build("lora")
    frozen = {k: v.clone() for k, v in h.backbone.state_dict().items() if "lora_" not in k}
    before = {k: v.clone() for k, v in h.state()[0].items()}
    small = Inputs(inputs.ds, np.arange(16), 32)
    hist = train(h, small, Config(bits=BITS, supervised=False, batch_size=8), Schedule(1, 1e-3, 1e-6, 0))
    assert hist.steps == 2 and math.isfinite(hist.loss)
    after = h.state()[0]
    assert any("lora_B" in k and not torch.equal(before[k], after[k]) for k in after)  # lora_B starts at 0: it moved
    assert all(torch.equal(v, h.backbone.state_dict()[k]) for k, v in frozen.items())  # the backbone did not


def test_dp_sgd_refuses_a_head_that_couples_samples(inputs):
    from hashing.privacy.accountant import plan
    from hashing.privacy.dpsgd import DPSGD

    p = plan(240, target_epsilon=0, delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0, batch_size=64,
             local_epochs=1, rounds=1, moments_ratio=1.0, max_noise=20.0)
    with pytest.raises(ConfigError, match="BatchRenorm1d"):
        train(_build("probe"), inputs, Config(bits=BITS, supervised=False), Schedule(1, 1e-3, 1e-6, 0), private=DPSGD(p))
    with pytest.raises(ConfigError, match="FedProx"):
        train(_build("dp"), inputs, Config(bits=BITS, supervised=False, dp_dims=32), Schedule(1, 1e-3, 1e-6, 0),
              private=DPSGD(p), prox_mu=0.1)


def test_federated_rounds_slice_one_cosine_schedule():
    cfg = Config(num_server_rounds=4, lr=1e-3, lr_min=1e-5)
    rounds = [Schedule.federated_round(cfg, r) for r in range(1, 5)]
    assert rounds[0].lr == cfg.lr and rounds[-1].lr_min == pytest.approx(cfg.lr_min)
    assert all(a.lr_min == b.lr for a, b in zip(rounds, rounds[1:]))  # each round starts where the last ended
    assert len({r.seed for r in rounds}) == 4 and all(r.renorm for r in rounds)
    ref = Schedule.reference(cfg)
    assert ref.epochs == 4 * cfg.local_epochs and ref.lr == cfg.lr and not ref.renorm
