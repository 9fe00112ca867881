"""The fedhash ClientApp: one silo's side of every round, on Flower's Message API. Thin handlers: the
protocol (``hashing.federated.protocol``) names every record and key, ``client.site`` does the work.

- ``train``: load the global state; when the config says ``evaluate``, score it first (the previous
  round's global model: mAP@1000 of the query split against the silo's own database); run the local
  epochs; reply with the trainable parameters and the metrics.
- ``query.stats``: count / sum / sum of squares of the activations entering the final BatchNorm, and
  per-class sums, of the clean training images under the new global model (the server pools them
  into the exact statistics of the union and the global prototypes).
- ``query.moments``: the DP head's one release of feature moments (round 0 under DP).
- ``evaluate``: the same evaluation alone, for silos a round did not sample.
- ``query.index``: encode the database with the global function, fill the silo's index folder
  (catalogue of content ids, FAISS codes, the model; hashing.retrieval) stamped with the model
  version, and evaluate the final model.
- ``query.secagg_keys`` / ``-shares`` / ``-unmask``: secure aggregation's key setup and unmasking
  (``client.secagg``; ``secagg_mod`` masks the train, statistics and moments replies).
- ``query.search``: another site's query codes (never an image): the silo's top-k in its own index,
  content ids and Hamming distances, plus labels only where the node config's ``search-share`` says so.

The silo's data comes from the node config: ``partition-id`` in simulation, ``data`` (a folder or
manifest) and ``silo`` at a real site.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hashing.backbones import weights_fingerprint
from hashing.config import Config, failures_of
from hashing.errors import FedhashError
from hashing.federated import protocol as P
from hashing.hashers import Hasher
from hashing.state import state_nbytes

from . import secagg, site
from .mods import site_errors_mod, train_clipping_mod, wire_mod

# records of several arrays travel packed; a real site's errors reach the server without its paths; under
# secure aggregation the replies to sum leave masked (secagg_mod sees the update after client-side clipping)
app = ClientApp(mods=[wire_mod, site_errors_mod, secagg.secagg_mod])

_warm = False


def _warm_up() -> None:
    """Once per process: one AdamW step on a dummy parameter. torch's optimizers import
    torch._dynamo (and sympy) on their first step, ~2 s; paid here, it lands in the engine's
    start-up (the first message a node gets is the round-0 statistics) instead of round 1."""
    global _warm
    if not _warm:
        p = torch.nn.Parameter(torch.zeros(1))
        p.grad = torch.zeros(1)
        torch.optim.AdamW([p]).step()
        _warm = True


@dataclass
class Received:
    """A message as the silo reads it."""

    cfg: Config
    round: P.RoundConfig
    data: site.SiloData
    hasher: Hasher | None = None
    prototypes: np.ndarray | None = None
    bytes_down: int = 0
    digest: str | None = None  # fingerprint of the parameters received


def _receive(msg: Message, context: Context, *, model: bool = True) -> Received:
    rc = P.read_round_config(msg.content[P.CONFIG])
    node = context.node_config
    site.check_node_config(node)
    cfg = site.own_settings(Config.from_json(rc.fedconfig), node)
    site.set_threads(cfg, node)
    if site.is_site(node):
        site.check_privacy_floor(cfg, node, None)  # the DP unit, before any work
    _warm_up()
    data = site.silo_data(cfg, node)
    site.check_silo(data)
    if site.is_site(node):
        site.check_privacy_floor(cfg, node, data.n_train)
    got = Received(cfg, rc, data)
    if model:
        params = msg.content[P.ARRAYS].to_torch_state_dict()
        glob = msg.content[P.GLOBALS].to_torch_state_dict() if P.GLOBALS in msg.content.array_records else {}
        buffers, protos = P.split_globals(glob)
        got.hasher = site.fresh_model(cfg, data.feature_dim)
        got.hasher.load_state(params, buffers)
        got.prototypes = None if protos is None else protos.numpy()
        got.bytes_down = state_nbytes(params) + state_nbytes(glob)
        got.digest = weights_fingerprint(params)
    return got


def _silo(data: site.SiloData, index: str | None = None) -> ConfigRecord:
    return ConfigRecord(P.silo_info(data.name, data.silo.content_fingerprint(), data.silo.domain, index))


def _reply(msg: Message, got: Received, metrics: dict, **records) -> Message:
    content = RecordDict({**records, P.METRICS: MetricRecord(metrics), P.SILO: _silo(got.data)})
    return Message(content, reply_to=msg)


@app.train(mods=[train_clipping_mod])  # client-level DP with client-side clipping; a no-op otherwise
def train(msg: Message, context: Context) -> Message:
    got = _receive(msg, context)
    cfg, data, rnd = got.cfg, got.data, got.round.server_round
    if rnd in failures_of(cfg.inject_failures).get(data.name, ()):
        raise RuntimeError(f"injected failure of {data.name} in round {rnd} (inject-failures)")
    t0 = time.perf_counter()
    ev = site.evaluate(cfg, data, got.hasher, got.digest) if got.round.evaluate else None
    hist, planned = site.local_train(cfg, data, got.hasher, rnd, prototypes=got.prototypes,
                                     prox_mu=got.round.proximal_mu)
    params, _ = got.hasher.state()
    metrics = P.train_metrics(num_examples=data.n_train, loss=hist.loss, bit_balance=hist.bit_balance,
                              seconds=time.perf_counter() - t0, bytes_down=got.bytes_down,
                              bytes_up=state_nbytes(params), evaluation=None if ev is None else (ev.map, ev.bit_balance))
    if hist.releases:  # sample-level DP: Opacus's record of this round's steps, for the server's ledger
        metrics |= P.releases(hist.releases, planned)
    return _reply(msg, got, metrics, **{P.ARRAYS: ArrayRecord(params)})


@app.query(P.query_action(P.MSG_STATS))
def stats(msg: Message, context: Context) -> Message:
    got = _receive(msg, context)
    s = {k: torch.from_numpy(v) for k, v in site.local_stats(got.cfg, got.data, got.hasher, got.digest).items()}
    metrics = P.transfer_metrics(num_examples=got.data.n_train, bytes_down=got.bytes_down, bytes_up=state_nbytes(s))
    return _reply(msg, got, metrics, **{P.STATS: ArrayRecord(s)})


@app.query(P.query_action(P.MSG_MOMENTS))
def moments(msg: Message, context: Context) -> Message:
    got = _receive(msg, context, model=False)
    released, plan = site.release_moments(got.cfg, got.data)
    m = {k: torch.from_numpy(v) for k, v in released.items()}
    metrics = P.transfer_metrics(num_examples=got.data.n_train, bytes_down=0, bytes_up=state_nbytes(m))
    if plan is not None:
        metrics |= P.releases([(plan.moments_noise, 1.0, 1)], plan.epsilon)
    return _reply(msg, got, metrics, **{P.MOMENTS: ArrayRecord(m)})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    got = _receive(msg, context)
    score = site.evaluate(got.cfg, got.data, got.hasher, got.digest)
    return _reply(msg, got, P.evaluation(score.map, score.bit_balance, num_examples=score.n_query, n_db=score.n_db))


@app.query(P.query_action(P.MSG_INDEX))
def index(msg: Message, context: Context) -> Message:
    got = _receive(msg, context)
    if not got.round.model_version:
        raise FedhashError(f"the index message names no model version ({P.MODEL_VERSION!r}); server and silo "
                           "must run the same fedhash")
    out = site.out_dir(got.cfg, context.node_config)
    privacy = (site.own_privacy(got.cfg, got.data, got.round.privacy) if site.is_site(context.node_config)
               else got.round.privacy)
    try:
        path, n = site.build_index(got.cfg, got.data, got.hasher, got.round.model_version, out, privacy)
    except OSError as e:
        raise FedhashError(f"silo {got.data.name}: cannot write its index under {out} ({e}); "
                           "set the node's out-dir to a writable folder") from e
    score = site.evaluate(got.cfg, got.data, got.hasher, got.digest)
    content = RecordDict({P.METRICS: MetricRecord(P.evaluation(score.map, score.bit_balance, num_examples=n)),
                          P.SILO: _silo(got.data, str(path))})
    return Message(content, reply_to=msg)


@app.query(P.query_action(P.MSG_SECAGG_KEYS))
def secagg_keys(msg: Message, context: Context) -> Message:
    return secagg.keys(msg, context)


@app.query(P.query_action(P.MSG_SECAGG_SHARES))
def secagg_shares(msg: Message, context: Context) -> Message:
    return secagg.shares(msg, context)


@app.query(P.query_action(P.MSG_SECAGG_UNMASK))
def secagg_unmask(msg: Message, context: Context) -> Message:
    return secagg.unmask(msg, context)


@app.query(P.query_action(P.MSG_SEARCH))
def search(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    queries = msg.content.array_records.get(P.QUERIES)
    if queries is None or P.CONFIG not in msg.content.config_records:
        raise FedhashError("the search message lacks its query codes or config; server and silo must run the same "
                           "fedhash")
    try:
        req = P.read_search_request(queries, msg.content[P.CONFIG])
    except ValueError as e:
        raise FedhashError(f"a malformed search message: {e}") from None
    res = site.search(context.node_config, req)
    hits, shared = P.search_reply(res.ids, res.distances, res.labels)
    content = RecordDict({
        P.HITS: ArrayRecord(OrderedDict((k, Array(v)) for k, v in hits.items())),
        P.METRICS: MetricRecord({P.N_DB: res.n_db, P.SECONDS: time.perf_counter() - t0}),
        P.SILO: ConfigRecord({P.SILO_NAME: res.silo})})
    if shared is not None:
        content[P.SHARED] = ConfigRecord(shared)
    return Message(content, reply_to=msg)
