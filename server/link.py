"""The server's side of the wire: send a phase's messages, wait up to ``round-timeout``, log every
silo that failed or did not answer, and stop the run when fewer than ``min-train-nodes`` replied."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from hashing.errors import TrainingError
from hashing.federated import protocol as P

log = logging.getLogger("fedhash.server")


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
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        # Replies arrive in whatever order the silos finish; aggregate in silo order instead, so that
        # float sums (FedAvg, pooled statistics) and with them the whole run are reproducible.
        ok = sorted((m for m in replies if not m.has_error()),
                    key=lambda m: (silo_of(m)[P.SILO_NAME], int(m.metadata.src_node_id)))
        for m in ok:
            self.names[int(m.metadata.src_node_id)] = silo_of(m)[P.SILO_NAME]
        answered = {m.metadata.src_node_id for m in replies}
        for m in replies:
            if m.has_error():
                self.failure(server_round, what, m.metadata.src_node_id, m.error.reason)
        for msg in messages:
            if msg.metadata.dst_node_id not in answered:
                self.failure(server_round, what, msg.metadata.dst_node_id,
                             f"no reply within round-timeout={self.timeout:.0f} s")
        if require and len(ok) < self.min_nodes:
            raise TrainingError(f"round {server_round} {require}: only {len(ok)} of {len(messages)} silos replied, "
                                f"fewer than min-train-nodes={self.min_nodes}; the run stops here: {self.kept()}")
        return ok

    def failure(self, server_round: int, what: str, node: int, reason: str) -> None:
        reason = " ".join(str(reason).split())
        silo = self.names.get(int(node))
        who = f"node {node}" + (f" ({silo})" if silo else "")
        log.warning("round %d %s: %s failed: %s", server_round, what, who, gist(reason))
        self.failures.append({"round": server_round, "phase": what, "node": int(node), "reason": reason[-2000:]}
                             | ({"silo": silo} if silo else {}))


def gist(reason: str) -> str:
    """The silo's own error in a reason Flower wraps in its actor's traceback (all of it stays in failures)."""
    if "Message: " in reason:
        return reason.rsplit("Message: ", 1)[1].rstrip("'>\" ")[:300]
    return reason[-300:]
