"""A silo's side of secure aggregation (``secagg = true``; the arithmetic is ``hashing.federated.secagg``).

- ``query.secagg_keys``: make two fresh X25519 key pairs, keep the secrets in the node's context state
  (they never leave the silo), reply with the public keys.
- ``query.secagg_shares``: split the mask key into Shamir shares, t of n, and seal share j for silo j
  under their agreed key (the server routes what it cannot read).
- :func:`secagg_mod`: on a train, statistics or moments message that carries SECAGG, check the keys
  *before any work*, run the handler, then replace its ARRAYS / STATS / MOMENTS by the masked vectors
  (a train reply sends its weighted update ``w (x - g)``, ``w = num-examples / scale``, and ``w``). Under
  ``dp = "client"`` (distributed DP) the silo first clips its update and adds its share of the noise, with
  equal weights, and adds its share of the moments release's noise (``hashing.privacy.distributed``).
- ``query.secagg_unmask``: reveal this silo's self-mask seed of one sum and open the shares of the
  silos that dropped out of it. A silo never reveals its seed for a sum it is listed as dropped from.

A site whose node config says ``require-secagg = true`` refuses (with the words of a privacy floor, which
stop the run) a train, statistics or moments message that is not securely aggregated.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from hashing.config import UNMASK_FAILURE, Config, failures_of
from hashing.errors import ConfigError
from hashing.federated import protocol as P
from hashing.federated import secagg as S
from hashing.privacy import distributed as distributed_dp

from . import site

STATE = "fedhash.secagg"   # the node's context state: this silo's secrets for the current key set
NODE_REQUIRE_SECAGG = "require-secagg"
MASKED_TYPES = {P.MSG_TRAIN: P.ARRAYS, P.MSG_STATS: P.STATS, P.MSG_MOMENTS: P.MOMENTS}
KEEP_SEEDS = 16  # self-mask seeds of sums not unmasked yet (a server that stopped mid-round leaves some)


def _config(msg: Message) -> Any:
    rec = msg.content.config_records.get(P.SECAGG) if msg.has_content() else None
    if rec is None:
        raise S.SecAggError(f"the {msg.metadata.message_type} message carries no {P.SECAGG!r} record; server and "
                            "silo must run the same fedhash")
    return rec


def _stored(context: Context, nonce: bytes) -> ConfigRecord:
    st = context.state.config_records.get(STATE)
    if st is None or bytes(st[P.SA_NONCE]) != bytes(nonce):
        raise S.SecAggError("secure aggregation: this silo holds no keys of the key set the message names (the silo "
                            "restarted, or the server skipped the key setup); the server must run the setup again")
    return st


def _field(rec: Any, key: str) -> Any:
    try:
        return rec[key]
    except KeyError:
        raise S.SecAggError(f"a secure-aggregation message lacks {key!r}; server and silo must run the same "
                            "fedhash") from None


def keys(msg: Message, context: Context) -> Message:
    rec = _config(msg)
    nonce, ids = bytes(_field(rec, P.SA_NONCE)), S.ids_of(_field(rec, P.SA_IDS))
    if context.node_id not in ids:
        raise S.SecAggError("secure aggregation: the key setup does not list this silo; server and silo must run the "
                            "same fedhash")
    c, s = S.KeyPair.new(), S.KeyPair.new()
    context.state[STATE] = ConfigRecord({P.SA_NONCE: nonce, "c-sk": c.secret, "s-sk": s.secret})
    return Message(RecordDict({P.SECAGG: ConfigRecord({P.SA_C_PK: c.public, P.SA_S_PK: s.public})}), reply_to=msg)


def shares(msg: Message, context: Context) -> Message:
    rec = _config(msg)
    nonce = bytes(_field(rec, P.SA_NONCE))
    st = _stored(context, nonce)
    ids = S.ids_of(_field(rec, P.SA_IDS))
    me = context.node_id
    c_pks = S.keys_of(_field(rec, P.SA_C_PKS), len(ids))
    s_pks = S.keys_of(_field(rec, P.SA_S_PKS), len(ids))
    mine = S.KeyPair.of(bytes(st["c-sk"])).public, S.KeyPair.of(bytes(st["s-sk"])).public
    if me not in ids or (c_pks[ids.index(me)], s_pks[ids.index(me)]) != mine:
        raise S.SecAggError("secure aggregation: the server's key table does not hold this silo's keys; the server "
                            "must run the setup again")
    t = int(_field(rec, P.SA_THRESHOLD))
    parts = S.split_secret(bytes(st["s-sk"]), t, len(ids))
    c_sk = bytes(st["c-sk"])
    sealed = [b"" if j == me else S.seal(S.agree(c_sk, c_pks[k], nonce, b"share"), parts[k], S.share_aad(nonce, me, j))
              for k, j in enumerate(ids)]
    return Message(RecordDict({P.SECAGG: ConfigRecord({P.SA_SEALED: sealed})}), reply_to=msg)


def unmask(msg: Message, context: Context) -> Message:
    rec = _config(msg)
    nonce = bytes(_field(rec, P.SA_NONCE))
    st = _stored(context, nonce)
    label, me = str(_field(rec, P.SA_LABEL)), context.node_id
    dropped = S.ids_of(_field(rec, P.SA_DROPPED))
    if me in dropped:
        raise S.SecAggError(f"secure aggregation of {label}: the server lists this silo as dropped; it reveals nothing")
    c_pks = S.keys_of(_field(rec, P.SA_C_PKS), len(dropped))
    sealed = list(_field(rec, P.SA_SEALED)) if dropped else []
    if len(sealed) != len(dropped):
        raise S.SecAggError(f"secure aggregation of {label}: {len(sealed)} sealed shares for {len(dropped)} dropped "
                            "silos; server and silo must run the same fedhash")
    _injected(msg, context, label)
    seed = b""
    if bool(_field(rec, P.SA_SEED)):
        key = "b:" + label
        if key not in st:
            raise S.SecAggError(f"secure aggregation of {label}: this silo sent no masked reply for it")
        seed = bytes(st[key])
        del st[key]
    c_sk = bytes(st["c-sk"])
    opened = [S.open_sealed(S.agree(c_sk, pk, nonce, b"share"), box, S.share_aad(nonce, i, me))
              for i, pk, box in zip(dropped, c_pks, sealed)]
    return Message(RecordDict({P.SECAGG: ConfigRecord({P.SA_SEED: seed, P.SA_SHARES: opened})}), reply_to=msg)


def _injected(msg: Message, context: Context, label: str) -> None:
    """Testing (simulation): ``inject-failures = "<silo>@unmask<r>"`` makes the silo fail round r's unmaskings
    (it sent its masked reply, then drops out). A real site ignores the server's switch."""
    config = msg.content.config_records.get(P.CONFIG)
    if config is None or site.is_site(context.node_config):
        return
    rc = P.read_round_config(config)
    cfg = Config.from_json(rc.fedconfig)
    name = site.node_silo_name(context.node_config)
    if f"{UNMASK_FAILURE}{rc.server_round}" in failures_of(cfg.inject_failures).get(name, ()):
        raise RuntimeError(f"injected failure of {name} in round {rc.server_round}'s unmasking of {label} "
                           "(inject-failures)")


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Mask the reply of a train, statistics or moments message that asks for secure aggregation."""
    kind = msg.metadata.message_type
    if kind not in MASKED_TYPES:
        return call_next(msg, context)
    rec = msg.content.config_records.get(P.SECAGG) if msg.has_content() else None
    if rec is None:
        _check_floor(context)
        return call_next(msg, context)
    phase = _Phase(rec, context)  # before any work: a silo without the keys refuses at once
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    return phase.masked(msg, reply, MASKED_TYPES[kind], context)


def _check_floor(context: Context) -> None:
    node = context.node_config
    if not site.is_site(node) or NODE_REQUIRE_SECAGG not in node:
        return
    value = str(node[NODE_REQUIRE_SECAGG]).strip().lower()
    if value not in ("true", "false"):
        raise ConfigError(f"node config {NODE_REQUIRE_SECAGG}={node[NODE_REQUIRE_SECAGG]!r}: give true or false")
    if value == "true":
        raise ConfigError(f"site '{site.node_silo_name(node)}' refuses: its {P.PRIVACY_FLOOR} is "
                          f"{NODE_REQUIRE_SECAGG}=true and the run aggregates in the clear; run with secagg = true")


class _Phase:
    """A masked phase's SECAGG record as this silo checked it."""

    def __init__(self, rec: Any, context: Context):
        self.nonce = bytes(_field(rec, P.SA_NONCE))
        st = _stored(context, self.nonce)
        self.label = str(_field(rec, P.SA_LABEL))
        self.ids = S.ids_of(_field(rec, P.SA_IDS))
        self.me = context.node_id
        if self.me not in self.ids:
            raise S.SecAggError(f"secure aggregation of {self.label}: the message does not list this silo")
        self.s_pks = dict(zip(self.ids, S.keys_of(_field(rec, P.SA_S_PKS), len(self.ids))))
        if self.s_pks[self.me] != S.KeyPair.of(bytes(st["s-sk"])).public:
            raise S.SecAggError(f"secure aggregation of {self.label}: the message's key for this silo is not its own; "
                                "the server must run the setup again")
        self.range = float(_field(rec, P.SA_RANGE))
        self.scale = float(rec.get(P.SA_SCALE, 0.0))
        n = len(self.ids)
        self.r32, self.r64 = S.Ring.for_sum(32, self.range, n), S.Ring.for_sum(64, S.RANGE64, n)

    def masked(self, msg: Message, reply: Message, name: str, context: Context) -> Message:
        got = reply.content.array_records.get(name)
        if got is None:
            raise S.SecAggError(f"secure aggregation: the reply holds no {name!r} record to mask")
        arrays = {k: got[k].numpy() for k in got}
        metrics = reply.content.metric_records.get(P.METRICS)
        cfg = Config.from_json(P.read_round_config(msg.content[P.CONFIG]).fedconfig)
        distributed = cfg.dp == "client"  # each silo clips and adds its share of the noise (hashing.privacy.distributed)
        n = len(self.ids)
        if name == P.ARRAYS:  # the weighted update and its weight
            if not self.scale > 0 or metrics is None:
                raise S.SecAggError("secure aggregation of a train reply needs the scale of its weights and the silo's "
                                    "num-examples")
            sent = {k: a.numpy() for k, a in msg.content[P.ARRAYS].items()}
            if distributed:  # equal weights: the server's scale is the number of silos in the sum
                update = distributed_dp.clip_and_share(S.weighted_update(arrays, sent, 1.0), cfg.dp_clip, cfg.dp_noise,
                                                       n, distributed_dp.secret_rng())
                w = 1.0 / self.scale
                update = {k: w * u for k, u in update.items()}
            else:  # the same numbers a plain run's server sums (server.secagg.plain_sum)
                w = float(metrics[P.NUM_EXAMPLES]) / self.scale
                update = S.weighted_update(arrays, sent, w)
            v32, layout32 = S.flatten(update)
            v64, layout64 = np.array([w]), [[P.SA_WEIGHT, [1]]]
        else:
            if distributed and name == P.MOMENTS:  # the exact means, plus this silo's share of the release's noise
                arrays = distributed_dp.moments_share(arrays, cfg.dp_moments_ratio * cfg.dp_noise, n,
                                                      distributed_dp.secret_rng())
            v32, layout32 = np.zeros(0), []
            v64, layout64 = S.flatten(arrays)
        q32 = self.r32.encode(v32, f"the weighted update of {self.label}")
        q64 = self.r64.encode(v64, f"the statistics of {self.label}")
        seed = S.fresh_seed()
        st = context.state.config_records[STATE]
        seeds = [k for k in st if k.startswith("b:")]
        for k in seeds[:max(0, len(seeds) - KEEP_SEEDS + 1)]:
            del st[k]
        st["b:" + self.label] = seed
        s_sk = bytes(st["s-sk"])
        y32 = S.mask(q32, self.r32, self.label, seed, self.me, s_sk, self.s_pks, self.nonce)
        y64 = S.mask(q64, self.r64, self.label, seed, self.me, s_sk, self.s_pks, self.nonce)
        content = RecordDict({k: v for k, v in reply.content.items() if k != name})
        content[P.MASKED] = ArrayRecord({P.Y32: Array(y32), P.Y64: Array(y64)})
        content[P.SECAGG] = ConfigRecord({P.SA_LABEL: self.label, P.SA_LAYOUT32: S.layout_text(layout32),
                                          P.SA_LAYOUT64: S.layout_text(layout64)})
        if metrics is not None:
            m = MetricRecord(dict(metrics))
            m[P.BYTES_UP] = int(y32.nbytes + y64.nbytes)
            content[P.METRICS] = m
        return Message(content, reply_to=msg)

