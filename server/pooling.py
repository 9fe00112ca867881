"""The statistics phase of a round: what the server pools for the global model, by the hasher's ``pooling``.

``activations`` (the probe and LoRA heads, with BatchNorm): before round 1 and after every round, every
silo reports count / sum / sum of squares of the head's activations (and per-class sums); the server
sets the BatchNorm running statistics to the exact statistics of the union and, supervised, the
prototypes to the exact class means (:mod:`hashing.federated.pooling`).

``moments`` (the DP head): before round 1 only, every silo's one release of feature moments (noised by
the silo under sample-level DP; under client-level DP the exact means, noised here on their sum); the
DP head's frozen projection and starting rotation (DP-ITQ) follow from them. After each round only
post-processing: the bits' scales from the released covariance and the new rotation (no message).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict

from hashing.config import Config
from hashing.federated import pooling
from hashing.federated import protocol as P
from hashing.privacy import head as dp_head
from hashing.privacy import release

from .global_model import GlobalModel
from .ledger import Ledger
from .link import Link, silo_of
from .secagg import SecureAggregation, plain_sum

log = logging.getLogger("fedhash.server")


def _note_silos(model: GlobalModel, replies) -> None:
    for m in replies:
        s = silo_of(m)
        model.silos[s[P.SILO_NAME]] = s.get(P.SILO_IDS, "")


def _gather(cfg: Config, link: Link, secagg: SecureAggregation | None, node_ids: list[int], message_type: str,
            content: RecordDict, what: str, server_round: int, require: str,
            key: str) -> tuple[list, list[dict], dict[str, Any]]:
    """Send a statistics phase; (good replies, [the sum of their arrays], what secure aggregation did). The sum
    is fixed point either way (``server.secagg.plain_sum`` in the clear), so plain and secure runs pool the same
    numbers. Under secure aggregation it holds the silos that unmasked (the good replies still count for the
    privacy ledger: a silo left out of the sum has spent its release all the same)."""
    msgs = link.messages(node_ids, message_type, content)
    label = f"r{server_round}-{what}"
    if secagg is not None:
        keyed = secagg.attach(content, node_ids, label, server_round)
        msgs = [m for m in msgs if m.metadata.dst_node_id in keyed]
    ok = link.send(msgs, what, server_round, require=require)
    if secagg is None:  # the same sum as secure aggregation's, of replies in the clear
        return ok, [plain_sum(cfg, len(msgs), ok, key, server_round, what).part64], {}
    total = secagg.unmask(label, msgs, ok, server_round, what)
    return ok, [total.part64], {"stats_secagg_silos": len(total.contributors), "stats_secagg_asked": total.asked,
                                "stats_secagg_dropped": total.dropped, "stats_secagg_bytes_up": total.bytes_up,
                                "stats_secagg_bytes_down": total.bytes_down}


class ActivationPooling:
    """Exact pooled BatchNorm statistics and global prototypes, before round 1 and after every round."""

    def __init__(self, cfg: Config, secagg: SecureAggregation | None = None):
        self.cfg, self.secagg = cfg, secagg

    def start(self, link: Link, model: GlobalModel, node_ids: list[int]) -> dict[str, Any]:
        return self.after_round(link, model, 0, node_ids)

    def after_round(self, link: Link, model: GlobalModel, server_round: int, node_ids: list[int]) -> dict[str, Any]:
        content = model.content(self.cfg, server_round)
        ok, stats, secure = _gather(self.cfg, link, self.secagg, node_ids, P.MSG_STATS, content, "stats", server_round,
                                    "statistics", P.STATS)
        pooled = pooling.pool(stats)
        mean, var = pooling.pooled_moments(pooled)
        model.update(lambda h: pooling.set_bn_stats(h, mean, var))
        if self.cfg.supervised and pooled["class_count"].size:
            model.prototypes = torch.from_numpy(pooling.global_prototypes(model.hasher, pooled))
        _note_silos(model, ok)
        up = sum(int(m.content[P.METRICS][P.BYTES_UP]) for m in ok)
        return {"stats_silos": len(ok), "stats_bytes_up": up, "pooled_count": float(pooled["count"][0])} | secure


class MomentsPooling:
    """The DP head: one release of feature moments before round 1; post-processing after every round."""

    def __init__(self, cfg: Config, ledger: Ledger, secagg: SecureAggregation | None = None):
        self.cfg, self.ledger, self.secagg = cfg, ledger, secagg

    def start(self, link: Link, model: GlobalModel, node_ids: list[int]) -> dict[str, Any]:
        cfg = self.cfg
        content = RecordDict({P.CONFIG: ConfigRecord(P.round_config(cfg.to_json(), 0))})
        ok, released, secure = _gather(self.cfg, link, self.secagg, node_ids, P.MSG_MOMENTS, content, "moments", 0,
                                       "moments release", P.MOMENTS)
        if cfg.dp == "sample":  # each silo noised its own release and says so
            self.ledger.record_replies(ok)
        elif self.secagg is not None:  # client level, distributed: the silos' noise shares are in the sum
            self.ledger.record_server_release(secure["stats_secagg_silos"], secure["stats_secagg_asked"])
        else:  # client level: the sum of the silos' means, noised once for the whole federation
            released = [release.server_release(released, self.ledger.record_server_release(), cfg.seed)]
        mean, cov, _ = release.pooled_moments(released)
        model.update(lambda h: release.init_dp_head(h, mean, cov, seed=cfg.seed, axes=cfg.dp_axes))
        replaced = release.tail_replaced(cov, cfg.dp_dims, cfg.dp_axes)
        log.info("DP head's basis: %s", f"the top {cfg.dp_axes} principal axes and random directions of the rest "
                 "(dp-axes)" if replaced else "PCA of the released moments (their noise has mixed its tail)")
        _note_silos(model, ok)
        return ({"stats_silos": len(ok), "stats_bytes_up": sum(int(m.content[P.METRICS][P.BYTES_UP]) for m in ok),
                 "dp_basis_tail_replaced": replaced} | secure)

    def after_round(self, link: Link, model: GlobalModel, server_round: int, node_ids: list[int]) -> dict[str, Any]:
        model.update(dp_head.restandardize)
        return {"stats_silos": 0, "stats_bytes_up": 0}


def pooling_for(cfg: Config, model: GlobalModel, ledger: Ledger,
                secagg: SecureAggregation | None = None) -> ActivationPooling | MomentsPooling:
    """The statistics phase the global model's kind of hash function asks for (summed securely with ``secagg``)."""
    return (MomentsPooling(cfg, ledger, secagg) if model.hasher.pooling == "moments"
            else ActivationPooling(cfg, secagg))
