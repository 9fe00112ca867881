"""A Flower grid in this process: the real ClientApp (its mods included) answers each message with the
context of its node, which keeps its state between messages as a SuperNode does. For tests that need the
exact messages a server receives, or many phases without Ray's start-up."""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

if TaskIdentity._run_id is None:  # Message objects outside a Flower run
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class Grid:
    """``push_messages`` / ``pull_messages`` / ``get_node_ids``, what ``server.link.Link`` calls.

    ``nodes``: node id -> node config. Every reply is kept in ``received`` (node id, message type, content
    as the server got it, still packed for the wire), so a test can read what the server saw."""

    def __init__(self, nodes: Mapping[int, Mapping], app: Callable | None = None):
        if app is None:
            from client.client_app import app
        self.app = app
        self.contexts = {int(n): Context(run_id=1, node_id=int(n), node_config=dict(cfg), state=RecordDict(),
                                         run_config={}) for n, cfg in nodes.items()}
        self.replies: dict[str, Message] = {}
        self.received: list[tuple[int, str, RecordDict]] = []
        self.count = 0

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.count += 1
            mid = f"m{self.count}"
            node = int(m.metadata.dst_node_id)
            msg = Message(copy.deepcopy(m.content), message_type=m.metadata.message_type, dst_node_id=node)
            msg.metadata.__dict__["_message_id"] = mid
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as e:  # what a SuperNode sends back for a handler that raised
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            if reply.has_content():
                self.received.append((node, msg.metadata.message_type, copy.deepcopy(reply.content)))
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]
