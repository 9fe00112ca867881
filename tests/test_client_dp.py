"""Client-level DP: Flower's DP wrappers around fedhash's strategy, the client clipping mod, the accounting.

Real Flower objects throughout (strategies, wrappers, mods, ClientApp); only the grid is a stand-in."""
from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import strategy as fl
from flwr.supercore.task_identity import TaskIdentity

from client.mods import train_clipping_mod
from hashing.errors import ConfigError
from hashing.config import Config as FedConfig
from server import privacy
from server.strategies import make_strategy

TaskIdentity.run_id = 1  # Message objects outside a Flower run
TaskIdentity.node_id = 0
TaskIdentity.task_id = 1


class Grid:
    """Stand-in for Flower's grid: what the strategies' configure_train asks of it."""

    def __init__(self, n: int):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def _rec(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _cfg(**kw) -> FedConfig:
    base = dict(dp="client", dp_noise=1.0, dp_clip=1.0, num_silos=4, min_train_nodes=4, fraction_train=1.0)
    return FedConfig(**(base | kw))  # the constructor does not check: dp-noise 0 is allowed here


def _ctx(node: int = 1) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def _round(strategy, cfg, current, updates, weights, globals_=None):
    """configure_train -> fabricated replies (current + update) -> aggregate_train, as federation does."""
    arrays = _rec({"w": current[0], "b": current[1]})
    config = ConfigRecord({"fedconfig": cfg.to_json(), "server-round": 1})
    msgs = list(strategy.configure_train(1, arrays, config, Grid(len(updates))))
    assert len(msgs) == len(updates)
    replies = []
    for m, upd, w in zip(msgs, updates, weights):
        new = {"w": current[0] + upd[0], "b": current[1] + upd[1]}
        replies.append(Message(RecordDict({"arrays": _rec(new), "metrics": MetricRecord({"num-examples": w}),
                                           "silo": ConfigRecord({"name": f"s{w}"})}), reply_to=m))
    agg, _ = strategy.aggregate_train(1, replies)
    out = agg.to_numpy_ndarrays()
    return [o - c for o, c in zip(out, current)]


def _clipped(upd, clip):
    norm = np.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in upd))
    return [u * min(1.0, clip / norm) for u in upd]


# ------------------------------------------------------------------ wrap_strategy


@pytest.mark.parametrize("clipping", list(privacy.WRAPPERS))
def test_wrap_strategy_picks_flowers_wrapper(clipping):
    cfg = _cfg(dp_clipping=clipping, dp_noise=1.0, dp_clip=0.3)
    inner = make_strategy(cfg)
    s = privacy.wrap_strategy(inner, cfg, 5)
    assert type(s) is privacy.WRAPPERS[clipping]
    assert s.strategy is inner and s.num_sampled_clients == 5 and s.clipping_norm == pytest.approx(0.3)
    assert s.accountant is None if clipping.endswith("fixed") else True
    assert inner.weighted_by_key == privacy.UNIT_WEIGHT
    # what protects the round: dp-noise; the adaptive wrappers put more on the update (the count takes a share)
    assert privacy.effective_noise(cfg, 5) == pytest.approx(1.0)
    if clipping.endswith("adaptive"):
        s_b = privacy.clipped_count_stddev(1.0, 5)
        assert privacy.update_noise(cfg, 5) == pytest.approx(s.noise_multiplier)
        assert s.noise_multiplier == pytest.approx((1.0 - (2 * s_b) ** -2) ** -0.5)
    else:
        assert s.noise_multiplier == privacy.update_noise(cfg, 5) == 1.0


def test_wrap_strategy_leaves_non_client_dp_alone():
    for dp in ("none", "sample"):
        cfg = _cfg(dp=dp)
        inner = make_strategy(cfg)
        assert privacy.wrap_strategy(inner, cfg, 4) is inner
        assert inner.weighted_by_key == "num-examples"


def test_wrap_strategy_refuses_non_mean_aggregation():
    cfg = _cfg(strategy="fedmedian")
    with pytest.raises(ConfigError, match="strategy"):
        privacy.wrap_strategy(make_strategy(cfg), cfg, 4)


# ------------------------------------------------------------------ server-side fixed clipping


def test_server_fixed_clipping_noise_has_the_calibrated_std():
    cfg = _cfg(dp_clipping="server-fixed", dp_noise=1.5, dp_clip=2.0)
    s = privacy.wrap_strategy(make_strategy(cfg), cfg, 4)
    rng = np.random.default_rng(0)
    d = 200_000
    current = [rng.normal(size=(d - 1000,)).astype(np.float32), rng.normal(size=(1000,)).astype(np.float32)]
    updates = [[rng.normal(0, scale, size=a.shape).astype(np.float32) for a in current] for scale in (0.001, 0.01, 0.1, 1)]
    got = _round(s, cfg, current, updates, weights=[10, 200, 3000, 7])
    mean = [np.mean([_clipped(u, 2.0)[i] for u in updates], axis=0) for i in range(2)]
    dev = np.concatenate([g - m for g, m in zip(got, mean)]).astype(np.float64)
    assert abs(dev.mean()) < 0.05 * 1.5 * 2.0 / 4
    assert dev.std() == pytest.approx(1.5 * 2.0 / 4, rel=0.05)


@pytest.mark.parametrize("clipping", ["server-fixed", "client-fixed"])
def test_noiseless_aggregate_is_the_equal_weight_mean_of_clipped_updates(clipping):
    cfg = _cfg(dp_clipping=clipping, dp_noise=0.0, dp_clip=0.5, num_silos=3, min_train_nodes=3)
    s = privacy.wrap_strategy(make_strategy(cfg), cfg, 3)
    rng = np.random.default_rng(1)
    current = [rng.normal(size=(30, 4)), rng.normal(size=(4,))]
    updates = [[rng.normal(0, sc, size=a.shape) for a in current] for sc in (0.01, 1.0, 5.0)]
    if clipping == "client-fixed":  # the clients clip: do it as train_clipping_mod would
        updates = [_clipped(u, 0.5) for u in updates]
    got = _round(s, cfg, current, updates, weights=[1, 50, 1000])  # unequal sizes, equal weights under DP
    want = [np.mean([_clipped(u, 0.5)[i] for u in updates], axis=0) for i in range(2)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-6)


# ------------------------------------------------------------------ train_clipping_mod


def _train_message(clipping_norm=None, dp_clipping="client-fixed"):
    config = {"fedconfig": json.dumps({"dp_clipping": dp_clipping}), "server-round": 1}
    if clipping_norm is not None:
        config["clipping_norm"] = float(clipping_norm)
    rng = np.random.default_rng(2)
    content = RecordDict({"arrays": _rec({"w": rng.normal(size=(8, 3)), "b": rng.normal(size=(3,))}),
                          "config": ConfigRecord(config),
                          "globals": _rec({"bn.mean": np.ones(5)})})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def _handler(seen: dict):
    def handler(msg: Message, context: Context) -> Message:
        seen["globals"] = "globals" in msg.content.array_records and \
            np.array_equal(msg.content["globals"]["bn.mean"].numpy(), np.ones(5))
        got = msg.content["arrays"].to_numpy_ndarrays()
        new = {k: a + 10.0 for k, a in zip(msg.content["arrays"].keys(), got)}
        return Message(RecordDict({"arrays": _rec(new), "metrics": MetricRecord({"num-examples": 3}),
                                   "silo": ConfigRecord({"name": "s0"})}), reply_to=msg)
    return handler


def _update_norm(msg_in: Message, reply: Message) -> float:
    sent = msg_in.content["arrays"].to_numpy_ndarrays()
    got = reply.content["arrays"].to_numpy_ndarrays()
    return float(np.sqrt(sum(np.sum((g - s) ** 2) for g, s in zip(got, sent))))


@pytest.mark.parametrize("dp_clipping", ["client-fixed", "client-adaptive"])
def test_mod_clips_and_the_handler_sees_globals(dp_clipping):
    msg, seen = _train_message(0.5, dp_clipping), {}
    reply = train_clipping_mod(msg, _ctx(), _handler(seen))
    assert not reply.has_error(), reply.error
    assert seen["globals"]
    assert _update_norm(msg, reply) == pytest.approx(0.5, rel=1e-6)
    assert list(msg.content.array_records) == ["arrays", "globals"]  # the message is left as it came
    metrics = reply.content["metrics"]
    assert ("norm_bit" in metrics) == (dp_clipping == "client-adaptive")
    if dp_clipping == "client-adaptive":
        assert metrics["norm_bit"] == 1


def test_mod_leaves_non_dp_messages_alone():
    msg, seen = _train_message(None), {}
    reply = train_clipping_mod(msg, _ctx(), _handler(seen))
    assert seen["globals"]
    assert _update_norm(msg, reply) == pytest.approx(10.0 * np.sqrt(8 * 3 + 3))
    assert "norm_bit" not in reply.content["metrics"]


def test_client_side_wrapper_and_mod_end_to_end():
    """Flower's client-side wrapper -> our train message (arrays + globals) -> ClientApp with the mod
    -> aggregate: every silo's update arrives clipped, and noise 0 leaves their mean."""
    cfg = _cfg(dp_clipping="client-fixed", dp_noise=0.0, dp_clip=0.25, num_silos=3, min_train_nodes=3)
    s = privacy.wrap_strategy(make_strategy(cfg), cfg, 3)
    app, seen = ClientApp(), {}
    app.train(mods=[train_clipping_mod])(_handler(seen))
    current = {"w": np.zeros((8, 3)), "b": np.zeros(3)}
    msgs = list(s.configure_train(1, _rec(current), ConfigRecord({"fedconfig": cfg.to_json()}), Grid(3)))
    glob = _rec({"bn.mean": np.ones(5)})
    for m in msgs:
        m.content["globals"] = glob
    replies = [app(m, _ctx(m.metadata.dst_node_id)) for m in msgs]
    assert seen["globals"] and not any(r.has_error() for r in replies)
    assert all(_update_norm(m, r) == pytest.approx(0.25) for m, r in zip(msgs, replies))
    agg, _ = s.aggregate_train(1, replies)
    out = agg.to_numpy_ndarrays()
    assert float(np.sqrt(sum(np.sum(o ** 2) for o in out))) == pytest.approx(0.25, rel=1e-6)


# ------------------------------------------------------------------ accounting


def _google(history, delta):
    events = [dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), steps) for z, _q, steps in history]
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("history,delta", [
    ([(1.0, 1.0, 1)] * 10, 1e-5),
    ([(2.0, 1.0, 1)] * 50, 1e-5),
    ([(3.0, 1.0, 1)] * 20 + [(1.5, 1.0, 1)], 1e-6),
    ([(0.7, 1.0, 5)], 1e-3),
])
def test_epsilon_agrees_with_googles_accountant(history, delta):
    """The reported ε is tight (within 1 % of Google's PLD accountant); its RDP cross-check is Google's RDP."""
    import dp_accounting

    from hashing.privacy import accountant

    events = [dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), steps) for z, _q, steps in history]
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.ComposedDpEvent(events))
    ref = pld.get_epsilon(delta)
    assert ref * 0.999 <= privacy.client_level_epsilon(history, delta, 5) <= ref * 1.01
    assert accountant.rdp_epsilon([(z, 1.0, n) for z, _q, n in history], delta) == pytest.approx(
        _google(history, delta), rel=0.02)


def test_epsilon_falls_with_noise_and_ignores_sampling():
    eps = [privacy.client_level_epsilon([(z, 1.0, 1)] * 10, 1e-5, 5) for z in (0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(eps, eps[1:]))
    assert eps == pytest.approx([46.2, 17.9, 7.52, 3.35], rel=0.01)  # the module docstring's numbers
    # a sample rate below 1 gets no amplification (Flower's sampling gives none)
    assert privacy.client_level_epsilon([(1.0, 0.4, 1)] * 10, 1e-5, 5) == pytest.approx(eps[1])
    assert privacy.client_level_epsilon([], 1e-5, 5) == 0.0
