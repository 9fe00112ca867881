"""The server's side of the wire: send a phase's messages, wait up to ``round-timeout``, log every
silo that failed or did not answer, and stop the run when fewer than ``min-train-nodes`` replied."""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from hashing.errors import TrainingError
from hashing.federated import protocol as P

log = logging.getLogger("fedhash.server")

POLL = 0.05  # seconds between two pulls of a phase's replies
OBJECT_POLL = 0.2  # the longest wait between two tries at a reply's object still on its way


def quick_object_pulls(poll: float, max_time: float) -> None:
    """The ServerApp's pulls of the replies' objects: Flower backs off from 1 s to 10 s while an object is on
    its way (a floor of 1-3 s under every phase) and keeps at it for 2 hours (one silo that died mid-upload
    then holds the whole phase); here from poll/10 to ``poll``, for at most ``max_time`` seconds. Guarded: an
    unknown Flower is left as it is. (client/supernode.py does the same for a site.)"""
    try:
        from flwr.supercore.inflatable import inflatable_utils as iu
    except ImportError:
        return
    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        kw = getattr(fn, "__kwdefaults__", None) or {}
        if {"initial_backoff", "backoff_cap", "max_tries_per_object", "max_time"} <= set(kw):
            kw.update(initial_backoff=poll / 10, backoff_cap=poll, max_tries_per_object=None, max_time=float(max_time))


def pack_content(content: RecordDict) -> None:
    """Every ArrayRecord of ``content`` with more than one array packed into one, in place (the wire's
    form, ``hashing.federated.protocol.pack_arrays``; client/mods.py unpacks it, and packs the replies)."""
    for name, rec in list(content.array_records.items()):
        if len(rec) > 1:
            content[name] = ArrayRecord({P.PACKED: Array(P.pack_arrays({k: rec[k].numpy() for k in rec}))})


def unpack_content(content: RecordDict) -> None:
    """A reply's packed ArrayRecords back to their arrays, in place."""
    for name, rec in list(content.array_records.items()):
        if list(rec.keys()) == [P.PACKED]:
            arrays = P.unpack_arrays(rec[P.PACKED].numpy())
            content[name] = ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items()))


def silo_of(msg: Message) -> dict[str, str]:
    """Who sent ``msg`` (its SILO record, or its node id)."""
    return P.read_silo(msg.content.config_records.get(P.SILO), msg.metadata.src_node_id)


class Link:
    """Messages to and from the silos of one federated run."""

    def __init__(self, grid: Grid, *, round_timeout: float, min_nodes: int, kept: Callable[[], str]):
        self.grid, self.timeout, self.min_nodes = grid, float(round_timeout), int(min_nodes)
        self.kept = kept  # what a stopped run keeps (the last checkpoint), for the error
        self.failures: list[dict] = []
        self.names: dict[int, str] = {}  # node id -> silo name, learnt from every good reply
        self.last: dict[str, dict] = {}  # node id -> its last reply (or silence): round, phase, when, ok
        self.on_phase: Callable[[str, int], None] | None = None  # called as a phase's messages go out
        self.sent_to: dict[str, int] = {}  # message id -> the node it went to, for the phase in flight

    def node_ids(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def wait_for_nodes(self) -> list[int]:
        t0 = time.time()
        while True:
            ids = self.node_ids()
            if len(ids) >= self.min_nodes:
                return ids
            if time.time() - t0 > self.timeout:
                raise TrainingError(f"only {len(ids)} of the {self.min_nodes} silos needed (min-train-nodes) connected "
                                    f"within {self.timeout:.0f} s; start more SuperNodes or lower min-train-nodes")
            time.sleep(0.1)

    @staticmethod
    def messages(node_ids: Iterable[int], message_type: str, content: RecordDict) -> list[Message]:
        """One message per node, all carrying the same content (built once, as Flower's strategies do)."""
        return [Message(content=content, message_type=message_type, dst_node_id=nid) for nid in node_ids]

    def send(self, messages: list[Message], what: str, server_round: int, *, require: str | None = None) -> list[Message]:
        """Send, wait up to round-timeout, log every failure and timeout (under phase ``what``); return the good
        replies in silo order. With ``require`` (the phase's name for the user, "training"), fewer than
        min-train-nodes good replies stop the run (TrainingError)."""
        n_failed = len(self.failures)
        if self.on_phase is not None:
            self.on_phase(what, server_round)
        replies = self.exchange(messages)
        # Replies arrive in whatever order the silos finish; aggregate in silo order instead, so that
        # float sums (FedAvg, pooled statistics) and with them the whole run are reproducible.
        ok = sorted((m for m in replies if not m.has_error()),
                    key=lambda m: (silo_of(m)[P.SILO_NAME], int(m.metadata.src_node_id)))
        now = time.time()
        for m in ok:
            self.names[int(m.metadata.src_node_id)] = silo_of(m)[P.SILO_NAME]
            self.last[str(m.metadata.src_node_id)] = {"silo": silo_of(m)[P.SILO_NAME], "round": server_round,
                                                     "phase": what, "at": now, "ok": True}
        answered = {self.node_of(m) for m in replies}
        for m in replies:
            if m.has_error():
                self.failure(server_round, what, self.node_of(m), m.error.reason)
        for msg in messages:
            if msg.metadata.dst_node_id not in answered:
                self.failure(server_round, what, msg.metadata.dst_node_id,
                             f"no reply within round-timeout={self.timeout:.0f} s")
        refusals = [f for f in self.failures[n_failed:] if P.PRIVACY_FLOOR in f["reason"]]
        if refusals:
            raise TrainingError(f"round {server_round} {what}: {gist(refusals[0]['reason'])}; the run stops: a site "
                                f"refuses to work below its own privacy floor. {self.kept()}")
        if require and len(ok) < self.min_nodes:
            raise TrainingError(f"round {server_round} {require}: only {len(ok)} of {len(messages)} silos replied, "
                                f"fewer than min-train-nodes={self.min_nodes}; the run stops here: {self.kept()}")
        return ok

    def node_of(self, reply: Message) -> int:
        """The node a reply answers for: the one its message went to (an error the SuperLink writes itself,
        "Node Unavailable", comes from no node)."""
        return self.sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def exchange(self, messages: list[Message]) -> list[Message]:
        """Push the messages, then pull their replies every POLL seconds until all are in or round-timeout
        has passed (Flower's ``send_and_receive`` pulls every 3 s, a floor under every message phase)."""
        quick_object_pulls(OBJECT_POLL, self.timeout)  # a reply whose objects stop coming fails, not hangs
        for content in {id(m.content): m.content for m in messages if m.has_content()}.values():
            pack_content(content)  # shared by the messages of a phase: once per content
        pushed = list(self.grid.push_messages(messages))
        self.sent_to = {mid: m.metadata.dst_node_id for mid, m in zip(pushed, messages)}
        ids = set(pushed)
        deadline = time.time() + self.timeout
        replies: list[Message] = []
        last = False
        while ids:
            got = list(self.grid.pull_messages(ids))
            replies += got
            ids -= {m.metadata.reply_to_message_id for m in got}
            for m in got:
                if m.has_content():
                    unpack_content(m.content)
            if not ids or last:
                break
            last = time.time() >= deadline  # one more pull: replies that came in while a pull was blocked
            if not last:
                time.sleep(POLL)
        return replies

    def failure(self, server_round: int, what: str, node: int, reason: str) -> None:
        reason = " ".join(str(reason).split())
        silo = self.names.get(int(node))
        who = f"node {node}" + (f" ({silo})" if silo else "")
        log.warning("round %d %s: %s failed: %s", server_round, what, who, gist(reason))
        self.failures.append({"round": server_round, "phase": what, "node": int(node), "reason": reason[-2000:]}
                             | ({"silo": silo} if silo else {}))
        self.last[str(node)] = {"silo": silo, "round": server_round, "phase": what, "at": time.time(), "ok": False,
                                "reason": gist(reason)}


def gist(reason: str) -> str:
    """The silo's own error in a reason Flower wraps in its actor's traceback (all of it stays in failures)."""
    if "Message: " in reason:
        return reason.rsplit("Message: ", 1)[1].rstrip("'>\" ")[:300]
    return reason[-300:]
