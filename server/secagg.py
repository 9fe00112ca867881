"""The server's side of secure aggregation (``secagg = true``): it learns the sum of the silos' masked
vectors and nothing else of any one silo's (the arithmetic: ``hashing.federated.secagg``; a silo's side:
``client.secagg``).

**Key setup**, before the first sum and again whenever a phase's silos are not all keyed (a silo
joined, or its mask key was rebuilt after it dropped out): ``query.secagg_keys`` (every silo makes two
fresh key pairs and sends the public halves), then ``query.secagg_shares`` (every silo seals Shamir
shares of its mask key for the others; the server keeps the ciphertexts, which it cannot open).

**Each sum** (a round's parameter update, its statistics, round 0's moments): the phase's messages carry
the sum's label and its silos' mask keys (:meth:`SecureAggregation.attach`); the replies carry masked
vectors only; :meth:`SecureAggregation.unmask` then sends ``query.secagg_unmask`` to the silos that
replied (each reveals its self-mask seed and its shares of the silos that did not reply), rebuilds the
missing silos' mask keys from ``threshold`` shares, and removes every mask. A silo that replied but
did not unmask is left out of the sum (a second unmasking collects its key's shares); fewer than
``threshold`` contributors stop the round.

Threat model: an honest-but-curious server (README, "Secure aggregation"): it follows the protocol and
reads every byte it receives. Against a server that lies to silos about who dropped out, SecAgg adds
signed consistency checks, which are not built here.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from hashing.config import Config
from hashing.errors import TrainingError
from hashing.federated import protocol as P
from hashing.federated import secagg as S

from .link import Link

log = logging.getLogger("fedhash.server")


@dataclass
class Sum:
    """One unmasked sum: the 32-bit part (weighted updates) and the 64-bit part (weights, statistics), each
    decoded and split by its layout."""

    part32: dict[str, np.ndarray]
    part64: dict[str, np.ndarray]
    contributors: list[int]
    dropped: list[int]
    asked: int = 0       # the silos the sum's phase went to (the noise shares of distributed DP assume them)
    bytes_up: int = 0    # the unmasking replies (the masked vectors are the silos' own replies, counted there)
    bytes_down: int = 0  # the unmasking messages' sealed shares and key tables


@dataclass
class KeySet:
    nonce: bytes
    asked: list[int]                # the silos the setup asked
    share_ids: list[int]            # the silos that made keys, in share order (share k belongs to share_ids[k])
    ids: list[int]                  # the silos that also sealed their shares: those a sum may hold
    threshold: int
    c_pks: dict[int, bytes]
    s_pks: dict[int, bytes]
    sealed: dict[int, list[bytes]]  # silo i -> its sealed shares, in share_ids order
    burnt: set[int] = field(default_factory=set)  # silos whose mask key the server rebuilt


class SecureAggregation:
    def __init__(self, cfg: Config, link: Link, kept: Callable[[], str]):
        self.cfg, self.link, self.kept = cfg, link, kept
        self.keys: KeySet | None = None
        self.examples: dict[int, int] = {}  # node id -> num-examples it last reported (in the clear)
        self.attached: dict[str, int] = {}  # sum label -> bytes its SECAGG records added to the phase's messages
        self.setups = 0
        self.setup_bytes = 0  # the key setups' messages so far (public keys and sealed shares, both ways)

    # ------------------------------------------------------------------ key setup

    def ready(self, node_ids: Sequence[int], server_round: int, retry: bool = True) -> None:
        """Every silo in ``node_ids`` keyed and unburnt, or a new key setup over every connected silo: when one
        is burnt or new to the key set; one that missed the last setup is tried again only with ``retry``
        (once a round, at its train phase), not at every phase."""
        k = self.keys
        if k is not None:
            want = set(map(int, node_ids))
            if not (want & k.burnt or want - set(k.asked) or (retry and want - set(k.ids))):
                return
        self.setup(sorted(set(self.link.node_ids()) | set(node_ids)), server_round)

    def setup(self, node_ids: list[int], server_round: int) -> None:
        cfg = self.cfg
        nonce = os.urandom(16)
        want = cfg.secagg_threshold or S.majority(len(node_ids))
        content = RecordDict({P.SECAGG: ConfigRecord({P.SA_NONCE: nonce, P.SA_IDS: S.ids_bytes(node_ids),
                                                      P.SA_THRESHOLD: want})})
        ok = self.link.send(self.link.messages(node_ids, P.MSG_SECAGG_KEYS, content), "secagg-keys", server_round,
                            require="secure aggregation's key setup")
        got = {int(m.metadata.src_node_id): m.content[P.SECAGG] for m in ok}
        share_ids = sorted(got)
        t = cfg.secagg_threshold or S.majority(len(share_ids))
        if len(share_ids) < 2 or t > len(share_ids):
            raise TrainingError(f"round {server_round}: secure aggregation needs at least max(2, secagg-threshold="
                                f"{t}) silos with keys; {len(share_ids)} made them. {self.kept()}")
        c_pks = {i: bytes(got[i][P.SA_C_PK]) for i in share_ids}
        s_pks = {i: bytes(got[i][P.SA_S_PK]) for i in share_ids}
        content = RecordDict({P.SECAGG: ConfigRecord({
            P.SA_NONCE: nonce, P.SA_IDS: S.ids_bytes(share_ids), P.SA_THRESHOLD: t,
            P.SA_C_PKS: S.keys_bytes([c_pks[i] for i in share_ids]),
            P.SA_S_PKS: S.keys_bytes([s_pks[i] for i in share_ids])})})
        ok = self.link.send(self.link.messages(share_ids, P.MSG_SECAGG_SHARES, content), "secagg-shares", server_round,
                            require="secure aggregation's key setup")
        sealed = {int(m.metadata.src_node_id): [bytes(b) for b in m.content[P.SECAGG][P.SA_SEALED]] for m in ok}
        bad = [i for i, s in sealed.items() if len(s) != len(share_ids)]
        if bad:
            raise TrainingError(f"round {server_round}: silos {bad} sealed shares for another key set; server and "
                                f"silos must run the same fedhash. {self.kept()}")
        ids = sorted(sealed)
        if len(ids) < t:
            raise TrainingError(f"round {server_round}: only {len(ids)} silos sealed their key shares, fewer than the "
                                f"threshold {t} (secagg-threshold); {self.kept()}")
        self.keys = KeySet(nonce, list(node_ids), share_ids, ids, t, c_pks, s_pks, sealed)
        self.setups += 1
        self.setup_bytes += (record_bytes(content[P.SECAGG]) * len(share_ids) + len(node_ids) * 64
                             + sum(len(b) for s in sealed.values() for b in s))
        log.info("secure aggregation: %d silos keyed, threshold %d", len(ids), t)

    # ------------------------------------------------------------------ one sum

    def attach(self, content: RecordDict, node_ids: Sequence[int], label: str, server_round: int) -> list[int]:
        """Ask the silos ``node_ids`` (the phase's messages, which share ``content``) to mask their replies
        for the sum ``label``; returns those that can (a silo that did not answer the key setup cannot, and
        its message must not go out)."""
        self.ready(node_ids, server_round, retry=label.endswith("-train"))
        k = self.keys
        ids = sorted(int(i) for i in node_ids if int(i) in set(k.ids) - k.burnt)
        if len(ids) < len(node_ids):
            log.warning("round %d %s: nodes %s hold no keys of the secure-aggregation key set and are left out",
                        server_round, label, sorted(set(map(int, node_ids)) - set(ids)))
        known = [self.examples[i] for i in ids if i in self.examples]
        scale = float(sum(known)) if len(known) == len(ids) else float(max(known, default=1) * len(ids))
        if self.cfg.dp == "client":  # distributed DP: equal weights, 1 / (silos in the sum) each
            scale = float(len(ids))
        rec = ConfigRecord({
            P.SA_NONCE: k.nonce, P.SA_LABEL: label, P.SA_IDS: S.ids_bytes(ids),
            P.SA_S_PKS: S.keys_bytes([k.s_pks[i] for i in ids]), P.SA_RANGE: float(self.cfg.secagg_range),
            P.SA_SCALE: max(scale, 1.0)})
        content[P.SECAGG] = rec
        self.attached[label] = record_bytes(rec) * len(ids)  # what the phase's messages carry for it
        return ids

    def note(self, replies: Sequence[Message]) -> None:
        """The silos' sizes from any phase's replies (num-examples travels in the clear), for the train
        weights' scale."""
        for m in replies:
            metrics = m.content.metric_records.get(P.METRICS)
            if metrics is not None and P.NUM_EXAMPLES in metrics:
                self.examples[int(m.metadata.src_node_id)] = int(metrics[P.NUM_EXAMPLES])

    def unmask(self, label: str, sent: Sequence[Message], ok: Sequence[Message], server_round: int,
               what: str) -> Sum:
        """The sum ``label`` of the masked replies ``ok`` to the messages ``sent``."""
        k = self.keys
        self.note(ok)
        u1 = sorted({int(m.metadata.dst_node_id) for m in sent})
        n = len(u1)
        r32, r64 = S.Ring.for_sum(32, self.cfg.secagg_range, n), S.Ring.for_sum(64, S.RANGE64, n)
        masked: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        layouts = set()
        for m in ok:
            rec, sa = m.content.array_records.get(P.MASKED), m.content.config_records.get(P.SECAGG)
            if rec is None or sa is None or str(sa.get(P.SA_LABEL)) != label:
                raise TrainingError(f"round {server_round} {what}: a reply is not masked for {label}; server and "
                                    f"silos must run the same fedhash. {self.kept()}")
            masked[int(m.metadata.src_node_id)] = (rec[P.Y32].numpy(), rec[P.Y64].numpy())
            layouts.add((str(sa[P.SA_LAYOUT32]), str(sa[P.SA_LAYOUT64])))
        l32, l64 = _one_layout(layouts, f"round {server_round} {what}: the silos masked vectors", f" {self.kept()}")
        u2 = sorted(masked)
        self._enough(u2, n, server_round, what, "sent their masked vectors")
        # first unmasking: every silo that sent reveals its seed and its shares of those that did not
        seeds, shares, down, up = self._ask(label, u2, [i for i in u1 if i not in masked], True, server_round, what)
        u3 = sorted(seeds)
        self._enough(u3, n, server_round, what, "revealed their self-mask")
        late = [i for i in u2 if i not in seeds]  # sent, then dropped: left out; their keys' shares from u3
        if late:
            _, more, d2, g2 = self._ask(label, u3, late, False, server_round, what)
            down, up = down + d2, up + g2
            shares |= more
        dropped = sorted(set(u1) - set(u3))
        secrets = {}
        for i in dropped:
            have = shares.get(i, [])
            if len(have) < k.threshold:
                raise TrainingError(f"round {server_round} {what}: only {len(have)} shares of silo node {i}'s mask key "
                                    f"came back, fewer than the threshold {k.threshold}; the sum cannot be unmasked "
                                    f"and the round stops. {self.kept()}")
            secret = S.combine_secret(have[:k.threshold])
            if S.KeyPair.of(secret).public != k.s_pks[i]:
                raise TrainingError(f"round {server_round} {what}: the shares of node {i}'s mask key do not rebuild it "
                                    f"(a silo sent a wrong share); the round stops. {self.kept()}")
            secrets[i] = secret
        k.burnt |= set(dropped)  # their pairwise masks are known now: a new key set before they sum again
        y32 = S.ring_sum([masked[j][0] for j in u3], r32)
        y64 = S.ring_sum([masked[j][1] for j in u3], r64)
        q32 = S.unmask(y32, r32, label, seeds, secrets, k.s_pks, k.nonce)
        q64 = S.unmask(y64, r64, label, seeds, secrets, k.s_pks, k.nonce)
        down += self.attached.pop(label, 0)
        up += sum(record_bytes(m.content[P.SECAGG]) for m in ok)  # the replies' layouts
        if dropped:
            log.warning("round %d %s: secure aggregation left out nodes %s (no reply or no unmasking); the sum holds "
                        "%d silos", server_round, what, dropped, len(u3))
        return Sum(dict(S.unflatten(r32.decode(q32), l32)), dict(S.unflatten(r64.decode(q64), l64)),
                   u3, dropped, asked=n, bytes_up=up, bytes_down=down)

    def _enough(self, ids: Sequence[int], n: int, server_round: int, what: str, did: str) -> None:
        t = self.keys.threshold
        if len(ids) < t:
            raise TrainingError(f"round {server_round} {what}: only {len(ids)} of {n} silos {did}, fewer than the "
                                f"secure-aggregation threshold {t} (secagg-threshold): the sum cannot be unmasked "
                                f"without exposing a silo, and the round stops. {self.kept()}")

    def _ask(self, label: str, to: Sequence[int], dropped: Sequence[int], reveal: bool, server_round: int,
             what: str) -> tuple[dict[int, bytes], dict[int, list[bytes]], int, int]:
        """One unmasking message to each silo of ``to``: (seeds, shares of each dropped silo, bytes down, up)."""
        k = self.keys
        pos = {j: p for p, j in enumerate(k.share_ids)}
        # the run's config rides along only for the test switch inject-failures (a real site ignores it)
        config = ConfigRecord(P.round_config(self.cfg.to_json(), server_round)) if self.cfg.inject_failures else None
        msgs, down = [], 0
        for j in to:
            sealed = [k.sealed[i][pos[j]] for i in dropped]
            rec = ConfigRecord({P.SA_NONCE: k.nonce, P.SA_LABEL: label, P.SA_DROPPED: S.ids_bytes(dropped),
                                P.SA_C_PKS: S.keys_bytes([k.c_pks[i] for i in dropped]), P.SA_SEED: bool(reveal)})
            if sealed:
                rec[P.SA_SEALED] = sealed
            down += record_bytes(rec)
            content = RecordDict({P.SECAGG: rec} | ({P.CONFIG: config} if config is not None else {}))
            msgs.append(Message(content, message_type=P.MSG_SECAGG_UNMASK, dst_node_id=int(j)))
        ok = self.link.send(msgs, f"{what}-unmask", server_round)
        seeds, shares, up = {}, {}, 0
        for m in ok:
            src, rec = int(m.metadata.src_node_id), m.content[P.SECAGG]
            seed, opened = bytes(rec[P.SA_SEED]), [bytes(b) for b in rec.get(P.SA_SHARES, [])]
            up += record_bytes(rec)
            if reveal and len(seed) == S.KEY_BYTES:
                seeds[src] = seed
            for i, share in zip(dropped, opened):
                shares.setdefault(i, []).append(share)
        return seeds, shares, down, up



def _one_layout(layouts: set[tuple[str, str]], who: str, more: str = "") -> tuple[list, list]:
    """The one (32-bit, 64-bit) layout every reply of a sum has, parsed; ``who`` begins the error when they differ."""
    if len(layouts) > 1:
        raise TrainingError(f"{who} of different layouts; every silo must run the same head.{more}")
    (l32, l64), = layouts
    return json.loads(l32), json.loads(l64)


def plain_sum(cfg: Config, sent: int, replies: Sequence[Message], key: str, server_round: int, what: str,
              params: Mapping[str, torch.Tensor] | None = None) -> Sum:
    """What :meth:`SecureAggregation.unmask` gives, from replies that came in the clear: the same fixed point
    in the same rings (``sent`` silos; the train phase's weights ``num-examples / their total``), summed as
    integers. A plain run's model therefore equals a secure one's bit for bit, and no order of the replies
    can change it (a float sum's last bits depend on the order). ``params``: the global model the train
    phase sent (its replies' arrays ``key`` then give the weighted updates); without it the replies' arrays
    are statistics."""
    if not replies:
        raise TrainingError(f"round {server_round} {what}: no silo replied; at least one must answer")
    arrays = [{k: a.numpy() for k, a in m.content[key].items()} for m in replies]
    if params is None:
        vec32, l32 = [np.zeros(0)] * len(arrays), [[]] * len(arrays)
        vec64, l64 = zip(*[S.flatten(a) for a in arrays])
    else:
        g = {k: p.detach().cpu().numpy() for k, p in params.items()}
        nums = [int(m.content[P.METRICS][P.NUM_EXAMPLES]) for m in replies]
        scale = max(float(sum(nums)), 1.0)
        vec32, l32 = zip(*[S.flatten(S.weighted_update(a, g, num / scale)) for a, num in zip(arrays, nums)])
        vec64, l64 = [np.array([num / scale]) for num in nums], [[[P.SA_WEIGHT, [1]]]] * len(nums)
    l32, l64 = _one_layout({(S.layout_text(a), S.layout_text(b)) for a, b in zip(l32, l64)},
                           f"round {server_round} {what}: the silos replied with arrays")
    try:
        r32 = S.plain_ring(32, cfg.secagg_range, sent, vec32)
        r64 = S.plain_ring(64, S.RANGE64, sent, vec64)
        q32, q64 = S.fixed_point_sum(vec32, r32, f"{what}'s update"), S.fixed_point_sum(vec64, r64, f"{what}'s sums")
    except S.SecAggError as e:
        raise TrainingError(f"round {server_round} {what}: {e}") from None
    return Sum(dict(S.unflatten(q32, l32)), dict(S.unflatten(q64, l64)),
               sorted(int(m.metadata.src_node_id) for m in replies), [], asked=sent)


def summed_reply(params: Mapping[str, torch.Tensor], total: Sum, num_examples: int) -> Message:
    """The one reply a strategy aggregates under secure aggregation: the weighted mean of the contributors'
    parameters, ``g + sum(w_i (x_i - g)) / sum(w_i)``, weighing ``num_examples`` (their total)."""
    w = float(total.part64[P.SA_WEIGHT][0])
    if set(total.part32) != set(params) or not w > 0:
        raise TrainingError(f"the securely summed update holds {sorted(total.part32)[:3]}... and weight {w:g}, not the "
                            "model's parameters; server and silos must run the same fedhash")
    mean = OrderedDict()
    for k, p in params.items():
        g = p.detach().cpu().numpy()
        mean[k] = Array((g.astype(np.float64) + total.part32[k].reshape(g.shape) / w).astype(g.dtype))
    content = RecordDict({P.ARRAYS: ArrayRecord(mean), P.METRICS: MetricRecord({P.NUM_EXAMPLES: int(num_examples)})})
    return Message(content, message_type=P.MSG_TRAIN, dst_node_id=0)


def record_bytes(rec) -> int:
    """The payload of a ConfigRecord on the wire, near enough: its values' bytes (8 per number) and key names."""
    n = 0
    for key, v in rec.items():
        vals = v if isinstance(v, list) else [v]
        n += len(key) + sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in vals)
    return n
