"""Secure aggregation (``secagg = true``), against the plain aggregation of the same replies.

Five silos of scikit-learn's digits answer through the real ClientApp (mods included) in this process
(``tests/inprocess.py``), so the tests read every byte the server receives; one run goes through Flower's
simulation engine, as ``fedhash simulate`` does. A plain run sums its replies in the same fixed point
(``server.secagg.plain_sum``), so the two runs must agree bit for bit; the references independent of the
protocol are numpy's float FedAvg over the silos' own (unmasked) replies and numpy's sums of their
statistics."""
from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from scipy import stats

from client import site
from hashing.config import Config
from hashing.errors import ConfigError, TrainingError
from hashing.federated import protocol as P
from hashing.federated import secagg as S
from hashing.silos import make_silos
from server.federation import Federation
from server.link import unpack_content

from .inprocess import Grid

N = 5
BASE = dict(data="digits", n_images=0, partitioner="dirichlet", alpha=0.3, num_silos=N, seed=0, bits=16, size=32,
            views=2, batch_size=64, num_server_rounds=2, min_train_nodes=2, supervised=True, client_threads=1,
            round_timeout=30)
NODES = {101 + i: {"partition-id": i, "num-partitions": N} for i in range(N)}


@pytest.fixture(scope="module")
def cfg(cache_dir, digits):
    c = Config(**BASE, cache_dir=str(cache_dir))
    for s in make_silos(digits, c):  # features in the cache first, as fedhash simulate does
        site.silo_features(c, s)
    return c


def _fed(cfg, tmp_path, name, **kw):
    fed = Federation(Grid(NODES), cfg.replace(out_dir=str(tmp_path / name), **kw))
    return fed, fed.link.grid


def _start(fed):
    ids = fed.link.wait_for_nodes()
    fed.started = fed.pooling.start(fed.link, fed.model, ids)
    return ids


def _same_start(dst, src):
    dst.model.params = OrderedDict((k, v.clone()) for k, v in src.model.params.items())
    dst.model.buffers = OrderedDict((k, v.clone()) for k, v in src.model.buffers.items())
    dst.model.prototypes = None if src.model.prototypes is None else src.model.prototypes.clone()


def _replies(grid, message_type):
    """What the server received for ``message_type``: node id -> content, unpacked."""
    out = {}
    for node, kind, content in grid.received:
        if kind == message_type:
            c = copy.deepcopy(content)
            unpack_content(c)
            out[node] = c
    return out


def _bound(ring: S.Ring, n: int, scale: float = 1.0) -> float:
    """The fixed point's worst error on a sum of n silos' entries (each rounds by half a step)."""
    return n * ring.resolution / 2 / scale


def _same(a, b) -> None:
    """Two federations' models, bit for bit."""
    for name in ("params", "buffers"):
        x, y = getattr(a.model, name), getattr(b.model, name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert (a.model.prototypes is None and b.model.prototypes is None) or torch.equal(a.model.prototypes,
                                                                                      b.model.prototypes)


def test_the_sums_equal_the_plain_aggregation_bit_for_bit_and_numpys_within_the_fixed_point(cfg, tmp_path):
    plain, pgrid = _fed(cfg, tmp_path, "plain")
    sec, sgrid = _fed(cfg, tmp_path, "sec", secagg=True)
    ids = _start(plain)
    _start(sec)
    # round 0's statistics: a plain run sums in the same fixed point, so the pooled statistics are the same
    _same(sec, plain)
    # the server saw masked vectors only: no STATS record came back under secagg
    assert all(P.STATS not in c.array_records and P.MASKED in c.array_records
               for c in _replies(sgrid, P.MSG_STATS).values())
    # the independent reference: numpy's float sums of the silos' statistics (the plain replies)
    plain_stats = _replies(pgrid, P.MSG_STATS)
    count = sum(float(c[P.STATS]["count"].numpy()[0]) for c in plain_stats.values())
    total = sum(c[P.STATS]["sum"].numpy() for c in plain_stats.values())
    sumsq = sum(c[P.STATS]["sumsq"].numpy() for c in plain_stats.values())
    mean, var = total / count, (sumsq - total * total / count) / (count - 1)
    assert sec.started["pooled_count"] == count == plain.started["pooled_count"]
    bn = [k for k in sec.model.buffers if k.endswith("running_mean")][0]
    assert np.allclose(sec.model.buffers[bn].double().numpy(), mean, rtol=1e-6, atol=1e-6)
    assert np.allclose(sec.model.buffers[bn.replace("mean", "var")].double().numpy(), var, rtol=1e-5, atol=1e-6)
    assert sec.started["stats_secagg_silos"] == N and sec.model.silos == plain.model.silos
    # one round of training: the same model bit for bit, and FedAvg's float mean within the fixed point's bound
    start = {k: v.clone() for k, v in plain.model.params.items()}
    plain.train_round(1, node_ids=ids)
    _, rec = sec.train_round(1, node_ids=ids)
    assert rec["secagg_silos"] == N and rec["secagg_dropped"] == []
    _same(sec, plain)
    replies = _replies(pgrid, P.MSG_TRAIN)
    w = np.array([replies[n][P.METRICS][P.NUM_EXAMPLES] for n in ids], np.float64)
    r32 = S.Ring.for_sum(32, cfg.secagg_range, N)
    for k, v in sec.model.params.items():
        ref = sum(wi * replies[n][P.ARRAYS][k].numpy().astype(np.float64) for wi, n in zip(w, ids)) / w.sum()
        err = float(np.abs(v.double().numpy() - ref).max())
        assert err <= _bound(r32, N, scale=0.99) + 2e-7 * float(np.abs(ref).max()) + 1e-9, (k, err)
    # the model moved: the comparison is not of two untouched copies
    assert max(float((v - start[k]).abs().max()) for k, v in plain.model.params.items()) > 1e-4
    # after the round: statistics of the new model, both ways
    plain.pooling.after_round(plain.link, plain.model, 1, ids)
    after = sec.pooling.after_round(sec.link, sec.model, 1, ids)
    assert after["stats_secagg_silos"] == N
    _same(sec, plain)


def test_a_plain_round_does_not_depend_on_the_order_of_the_replies(cfg, tmp_path):
    fwd, fgrid = _fed(cfg, tmp_path, "forward")
    rev, _ = _fed(cfg, tmp_path, "reversed")
    send = rev.link.send
    rev.link.send = lambda msgs, *a, **kw: list(reversed(send(msgs, *a, **kw)))
    ids = _start(fwd)
    _start(rev)
    _same(fwd, rev)
    fwd.train_round(1, node_ids=ids)
    rev.train_round(1, node_ids=ids)
    fwd.pooling.after_round(fwd.link, fwd.model, 1, ids)
    rev.pooling.after_round(rev.link, rev.model, 1, ids)
    _same(fwd, rev)
    # the test has teeth: a float weighted mean of the same replies does depend on their order
    replies = _replies(fgrid, P.MSG_TRAIN)
    w = {n: float(replies[n][P.METRICS][P.NUM_EXAMPLES]) for n in ids}
    k = max(replies[ids[0]][P.ARRAYS].keys(), key=lambda k: replies[ids[0]][P.ARRAYS][k].numpy().size)

    def mean(order):
        return sum(np.float32(w[n]) * replies[n][P.ARRAYS][k].numpy() for n in order) / np.float32(sum(w.values()))

    assert not np.array_equal(mean(ids), mean(ids[::-1]))


def test_what_the_server_receives_from_one_silo_is_independent_of_its_update(cfg, tmp_path):
    plain, pgrid = _fed(cfg, tmp_path, "plain")
    sec, sgrid = _fed(cfg, tmp_path, "sec", secagg=True)
    ids = _start(plain)
    _start(sec)
    _same_start(sec, plain)
    g = {k: v.double().numpy() for k, v in plain.model.params.items()}
    plain.train_round(1, node_ids=ids)
    sec.train_round(1, node_ids=ids)
    node = ids[0]
    mine = _replies(pgrid, P.MSG_TRAIN)[node][P.ARRAYS]
    update = np.concatenate([(mine[k].numpy().astype(np.float64) - g[k]).ravel() for k in g])
    got = _replies(sgrid, P.MSG_TRAIN)[node]
    assert set(got.array_records) == {P.MASKED}  # no parameters in the clear
    y = got[P.MASKED][P.Y32].numpy()
    assert y.dtype == np.uint32 and y.size == update.size
    # correlation with the true update ~ 0 (|r| below 5 standard errors of independent samples)
    assert abs(np.corrcoef(y.astype(np.float64), update)[0, 1]) < 5 / np.sqrt(y.size)
    # uniform over the ring: the top byte's histogram passes a chi-square test
    top = np.bincount((y >> 24).astype(np.int64), minlength=256)
    assert stats.chisquare(top).pvalue > 1e-3
    # and the plain fixed-point encoding of the same update is far from uniform (the test can fail)
    enc = S.Ring.for_sum(32, 4.0, N).encode(update * 0.2)
    assert stats.chisquare(np.bincount((enc >> 24).astype(np.int64), minlength=256)).pvalue < 1e-6
    y64 = got[P.MASKED][P.Y64].numpy()
    assert y64.dtype == np.uint64 and y64.size == 1


def test_two_of_five_silos_dropping_after_masking_still_give_the_survivors_sum(cfg, tmp_path):
    names = [f"silo-{i}" for i in range(N)]
    plain, pgrid = _fed(cfg, tmp_path, "plain")
    sec, sgrid = _fed(cfg, tmp_path, "sec", secagg=True, inject_failures=f"{names[1]}@unmask1,{names[3]}@unmask1")
    ids = _start(plain)
    _start(sec)
    _same_start(sec, plain)
    g = {k: v.double().numpy() for k, v in plain.model.params.items()}
    plain.train_round(1, node_ids=ids)
    _, rec = sec.train_round(1, node_ids=ids)
    dropped = [ids[1], ids[3]]
    assert rec["secagg_dropped"] == dropped and rec["secagg_silos"] == N - 2
    # they did send their masked update before dropping out
    assert {n for n, kind, _ in sgrid.received if kind == P.MSG_TRAIN} == set(ids)
    # the reference: FedAvg of the three survivors' own replies
    replies = _replies(pgrid, P.MSG_TRAIN)
    keep = [n for n in ids if n not in dropped]
    w = np.array([replies[n][P.METRICS][P.NUM_EXAMPLES] for n in keep], np.float64)
    r32 = S.Ring.for_sum(32, cfg.secagg_range, N)
    for k in g:
        ref = sum(wi * replies[n][P.ARRAYS][k].numpy().astype(np.float64) for wi, n in zip(w, keep)) / w.sum()
        err = float(np.abs(sec.model.params[k].double().numpy() - ref).max())
        assert err <= _bound(r32, N, scale=0.5) + 2e-7 * float(np.abs(ref).max()) + 1e-9, (k, err)
    # their mask keys are spent: the next phase keys the silos anew before they sum again
    setups = sec.secagg.setups
    sec.pooling.after_round(sec.link, sec.model, 1, ids)
    assert sec.secagg.setups == setups + 1


def test_more_dropouts_than_the_threshold_stop_the_round(cfg, tmp_path):
    fails = ",".join(f"silo-{i}@unmask1" for i in (0, 2, 4))
    sec, _ = _fed(cfg, tmp_path, "sec", secagg=True, inject_failures=fails)
    ids = _start(sec)
    with pytest.raises(TrainingError, match=r"only 2 of 5 silos revealed their self-mask, fewer than the "
                                            r"secure-aggregation threshold 3"):
        sec.train_round(1, node_ids=ids)


def test_a_silo_without_keys_refuses_before_any_work(cfg, tmp_path):
    sec, grid = _fed(cfg, tmp_path, "sec", secagg=True)
    ids = _start(sec)
    grid.contexts[ids[2]].state = type(grid.contexts[ids[2]].state)()  # a silo that restarted: its keys are gone
    sec.secagg.keys.burnt = set()
    msgs = sec.link.messages(ids, P.MSG_STATS, sec.model.content(sec.cfg, 1))
    sec.secagg.attach(msgs[0].content, ids, "r1-stats", 1)
    ok = sec.link.send(msgs, "stats", 1)
    assert len(ok) == N - 1
    assert "holds no keys of the key set" in sec.link.failures[-1]["reason"]


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum"])
def test_strategies_that_need_each_update_are_refused(strategy):
    with pytest.raises(ConfigError, match=f"secagg.*{strategy}.*needs every silo's own update"):
        Config.from_dict({"secagg": True, "strategy": strategy})


def test_client_level_dp_under_secagg_needs_the_silos_own_fixed_clipping():
    with pytest.raises(ConfigError, match="secagg.*dp = \"client\".*set dp-clipping = \"client-fixed\""):
        Config.from_dict({"secagg": True, "dp": "client", "dp-noise": 1.0})
    Config.from_dict({"secagg": True, "dp": "client", "dp-noise": 1.0, "dp-clipping": "client-fixed"})


def test_distributed_dp_the_sum_carries_the_calibrated_noise(cfg, tmp_path):
    """dp = "client" under secagg: each silo clips its update and adds its share of the noise; the aggregate
    is the mean of the clipped updates (Flower's client-side clipping in the plain run, the reference) plus
    Gaussian noise of std z C / m per entry, and the ledger accounts z per round."""
    from server import privacy

    dp = dict(dp="client", dp_noise=1.0, dp_clip=0.05, dp_clipping="client-fixed", supervised=False)
    plain, pgrid = _fed(cfg, tmp_path, "plain", **dp)
    sec, _ = _fed(cfg, tmp_path, "sec", secagg=True, **dp)
    ids = _start(plain)
    _start(sec)
    assert sec.ledger.entries["federation"] == [[1.0 * sec.cfg.dp_moments_ratio, 1.0, 1]]  # the moments release
    assert type(sec.strategy).__name__ == "EqualWeightFedAvg"  # no server-side noise
    _same_start(sec, plain)
    g = {k: v.double().numpy() for k, v in plain.model.params.items()}
    plain.train_round(1, node_ids=ids)
    _, rec = sec.train_round(1, node_ids=ids)
    assert rec["secagg_silos"] == N
    replies = _replies(pgrid, P.MSG_TRAIN)  # clipped by the silos (Flower's client-side fixed clipping)
    resid = np.concatenate([
        (sec.model.params[k].double().numpy() - g[k]
         - np.mean([replies[n][P.ARRAYS][k].numpy().astype(np.float64) - g[k] for n in ids], axis=0)).ravel()
        for k in g])
    want = 1.0 * 0.05 / N
    # the DP head trains only its rotation (4,096 entries): a sample std's relative error is about 1/sqrt(2n)
    assert resid.size == 16 * 256 and resid.std() == pytest.approx(want, rel=5 / np.sqrt(2 * resid.size))
    assert abs(resid.mean()) < 5 * want / np.sqrt(resid.size)
    assert stats.normaltest(resid[:100_000]).pvalue > 1e-3
    # the ledger: one Gaussian mechanism of multiplier z for the round, all five shares in the sum
    led = sec.ledger.after_round(N, N)
    assert sec.ledger.entries["federation"][-1] == [1.0, 1.0, 1]
    assert led["epsilon"] == pytest.approx(privacy.client_level_epsilon(sec.ledger.entries["federation"], 1e-5, N))
    assert sec.ledger.after_round(3, N) and sec.ledger.entries["federation"][-1][0] == pytest.approx(np.sqrt(3 / 5))
    assert "distributed" in sec.ledger.guarantee(1)["mechanism"]


def test_the_protocol_pieces_against_their_definitions():
    # Shamir: any t of n shares rebuild the key, t-1 do not
    secret = S.fresh_seed()
    shares = S.split_secret(secret, 3, 5)
    assert S.combine_secret([shares[4], shares[0], shares[2]]) == secret
    assert S.combine_secret(shares[:2]) != secret
    # sealed shares open only for their pair and their direction
    a, b = S.KeyPair.new(), S.KeyPair.new()
    nonce = b"n" * 16
    box = S.seal(S.agree(a.secret, b.public, nonce, b"share"), shares[1], S.share_aad(nonce, 1, 2))
    assert S.open_sealed(S.agree(b.secret, a.public, nonce, b"share"), box, S.share_aad(nonce, 1, 2)) == shares[1]
    with pytest.raises(S.SecAggError):
        S.open_sealed(S.agree(b.secret, a.public, nonce, b"share"), box, S.share_aad(nonce, 2, 1))
    # the fixed point refuses what could wrap the sum, and NaN
    ring = S.Ring.for_sum(32, 4.0, 5)
    assert 5 * 4.0 * 2 ** ring.frac < 2 ** 31
    with pytest.raises(S.SecAggError, match="raise secagg-range"):
        ring.encode(np.array([4.5]))
    with pytest.raises(S.SecAggError, match="NaN"):
        ring.encode(np.array([np.nan]))
    x = np.linspace(-4, 4, 1001)
    assert np.abs(ring.decode(ring.encode(x)) - x).max() <= ring.resolution / 2


def test_the_dp_heads_moments_release_sums_securely(cfg, tmp_path):
    dp = dict(dp="sample", dp_epsilon=8.0, supervised=False)
    plain, _ = _fed(cfg, tmp_path, "plain", **dp)
    sec, sgrid = _fed(cfg, tmp_path, "sec", secagg=True, **dp)
    _start(plain)
    _start(sec)
    assert sec.started["stats_secagg_silos"] == N
    assert all(P.MOMENTS not in c.array_records for c in _replies(sgrid, P.MSG_MOMENTS).values())
    # the same released moments, summed in the same fixed point: the DP head is the same, ITQ's rotation too
    _same(sec, plain)
    assert any(k.endswith("basis") for k in sec.model.buffers)
    # each silo's own release is still on the privacy ledger
    assert sec.ledger.entries.keys() == plain.ledger.entries.keys() and len(sec.ledger.entries) == N


def test_a_site_that_requires_secagg_refuses_a_clear_aggregation():
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from client.secagg import secagg_mod

    node = {"data": "/nowhere", "silo": "hospital-a", "out-dir": "/nowhere/out", "require-secagg": True}
    ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    msg = Message(RecordDict({P.CONFIG: ConfigRecord({"x": 1})}), message_type=P.MSG_STATS, dst_node_id=7)
    ran = []
    with pytest.raises(ConfigError, match=f"hospital-a' refuses: its {P.PRIVACY_FLOOR} is require-secagg=true"):
        secagg_mod(msg, ctx, lambda m, c: ran.append(m))
    assert not ran  # refused before the handler ran
    with pytest.raises(ConfigError, match="give true or false"):
        secagg_mod(msg, Context(run_id=1, node_id=7, node_config=node | {"require-secagg": "maybe"},
                                state=RecordDict(), run_config={}), lambda m, c: ran.append(m))
    # a search or an index message is no sum: it goes through
    search = Message(RecordDict({P.CONFIG: ConfigRecord({"x": 1})}), message_type=P.MSG_INDEX, dst_node_id=7)
    secagg_mod(search, ctx, lambda m, c: ran.append(m))
    assert ran == [search]


def test_a_silo_that_misses_the_key_setup_is_left_out_of_the_sums(cfg, tmp_path):
    from client.client_app import app

    def flaky(msg, context):  # the silo of node 103 never answers the key setup
        if context.node_id == 103 and msg.metadata.message_type == P.MSG_SECAGG_KEYS:
            raise RuntimeError("node 103 is down during the key setup")
        return app(msg, context)

    fed = Federation(Grid(NODES, app=flaky), cfg.replace(out_dir=str(tmp_path / "sec"), secagg=True))
    ids = _start(fed)
    assert fed.started["stats_secagg_silos"] == N - 1 and 103 not in fed.secagg.keys.ids
    _, rec = fed.train_round(1, node_ids=ids)
    assert rec["secagg_silos"] == N - 1 and rec["clients_sent"] == N - 1 and rec["clients_ok"] == N - 1
    assert fed.secagg.setups == 2  # the train phase tried the missing silo again, once
    fed.pooling.after_round(fed.link, fed.model, 1, ids)
    assert fed.secagg.setups == 2  # the statistics phase did not
