"""Search across silos by code only: the server's fan-out. One batch of packed query codes goes to every
connected silo (``query.search``); each answers with its own top-k (content ids, Hamming distances, and
only what its node config shares); the server merges the replies into the global top-k
(``hashing.federated.search.merge``: by distance, then silo, then content id). A silo that fails or does
not answer within round-timeout is named in the answer and costs no more than that timeout.

What the server learns: the query codes and every silo's top-k distances and content ids (never an
image, a feature or a path). What a silo learns: the query codes and k.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from hashing.config import Config
from hashing.federated import protocol as P
from hashing.federated.search import Answer, SiloHits, answer_line, merge

from .link import Link, silo_of

log = logging.getLogger("fedhash.server")


def fan_out(link: Link, req: P.SearchRequest, *, server_round: int = 0, node_ids: list[int] | None = None) -> Answer:
    """Send ``req`` to every node in ``node_ids`` (default: every connected node), merge the replies."""
    t0 = time.perf_counter()
    nodes = link.node_ids() if node_ids is None else list(node_ids)
    content = RecordDict({
        P.QUERIES: ArrayRecord(OrderedDict([(P.SEARCH_CODES, Array(req.codes))])),
        P.CONFIG: ConfigRecord(P.search_config(req.k, req.model_version, req.fedconfig or None))})
    before = len(link.failures)
    ok = link.send(link.messages(nodes, P.MSG_SEARCH, content), "search", server_round)
    n = req.codes.shape[0]
    replies = []
    for m in ok:
        name = silo_of(m)[P.SILO_NAME]
        try:
            ids, dist, labels = P.read_search_reply(m.content[P.HITS], m.content.config_records.get(P.SHARED), n, req.k)
        except (KeyError, ValueError) as e:
            link.failure(server_round, "search", m.metadata.src_node_id, f"a malformed search reply: {e}")
            continue
        replies.append(SiloHits(name, ids, dist, labels, int(m.content[P.METRICS].get(P.N_DB, 0))))
    merged = merge(replies, req.k)
    return Answer(req.model_version, req.k, merged, answered=list(merged.silos),
                  failed=[{k: v for k, v in f.items() if k in ("node", "silo", "reason")}
                          for f in link.failures[before:]],
                  asked=len(nodes), seconds=time.perf_counter() - t0)


def run_search(grid: Grid, cfg: Config, job: P.SearchJob) -> Answer:
    """A search run (``flwr run`` with the run config's ``search.*`` keys): wait for min-train-nodes silos (up to
    round-timeout), fan the codes out to every connected silo, and print the answer as one log line
    (``hashing.federated.search.answer_line``) for ``flwr log`` to carry back to the querying site. With
    ``search.repeat`` > 1 the same batch is fanned out that many times; the answer lists every fan-out's seconds."""
    link = Link(grid, round_timeout=cfg.round_timeout, min_nodes=max(1, cfg.min_train_nodes),
                kept=lambda: "nothing is kept: a search changes no state")
    link.wait_for_nodes()
    req = job.request
    answers = [fan_out(link, req) for _ in range(job.repeat)]
    answer = answers[-1]
    log.info("search: %d query codes, k=%d, %d of %d silos answered in %.2f s", req.codes.shape[0], req.k,
             len(answer.answered), answer.asked, answer.seconds)
    for f in answer.failed:
        log.warning("search: node %s%s did not answer: %s", f["node"], f" ({f['silo']})" if "silo" in f else "",
                    f["reason"][:300])
    print(answer_line(answer.to_json() | {"latencies": [a.seconds for a in answers]}), flush=True)
    return answer
