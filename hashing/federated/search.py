"""Search across silos by code only: what every silo answers, how the answers merge into one top-k, the
brute-force reference the merge must equal, and the answer a querying site gets back. Flower-free: the
server's fan-out (``server.search``), the simulation's cross-silo evaluation and the tests share it.

Ranking, everywhere: ascending Hamming distance, ties broken by silo name, then by content id. A silo
answers with its own top-k in that order (``hashing.index.SiloIndex.search(ties="id")``), so the merged
top-k of the replies is exactly the top-k of the union of every silo's codes (:func:`brute_force`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..catalogue import fmt_id
from ..codes import topk_by_id
from . import protocol as P

PAD_ID = -1
PAD_DISTANCE = np.iinfo(np.int32).max


@dataclass(frozen=True)
class SiloHits:
    """One silo's reply: its top-k of every query (content ids, Hamming distances; ``PAD_ID`` where the
    silo holds fewer than k codes) and, when its node config shares them, the hits' labels."""

    silo: str
    ids: np.ndarray        # int64 (n, k)
    distances: np.ndarray  # int32 (n, k)
    labels: list[list[str]] | None = None  # (n, k) of ';'-joined label names, when shared
    n_db: int = 0


@dataclass
class Merged:
    """The global top-k: for query q, rank r: ``silos[silo[q, r]]``, ``ids[q, r]``, ``distances[q, r]``
    (``silo`` -1 past the last hit)."""

    silos: list[str]
    silo: np.ndarray       # int32 (n, k): index into silos, -1 for padding
    ids: np.ndarray        # int64 (n, k)
    distances: np.ndarray  # int32 (n, k)
    labels: list[list[str | None]] | None = None  # shared labels (None where that silo shares none)

    def hits(self, q: int) -> list[dict[str, Any]]:
        out = []
        for r in range(self.ids.shape[1]):
            s = int(self.silo[q, r])
            if s < 0:
                break
            h = {"rank": r + 1, "silo": self.silos[s], "id": fmt_id(int(self.ids[q, r])),
                 "distance": int(self.distances[q, r])}
            if self.labels is not None and self.labels[q][r] is not None:
                h["labels"] = [x for x in self.labels[q][r].split(";") if x]
            out.append(h)
        return out


def merge(replies: Sequence[SiloHits], k: int) -> Merged:
    """The global top-``k`` of the silos' replies: by distance, then silo name, then content id."""
    replies = sorted(replies, key=lambda r: r.silo)
    names = [r.silo for r in replies]
    if len(set(names)) != len(names):
        raise ValueError(f"two replies name the same silo: {sorted(n for n in names if names.count(n) > 1)[0]!r}")
    if not replies:
        return Merged([], np.zeros((0, k), np.int32), np.zeros((0, k), np.int64), np.zeros((0, k), np.int32))
    n = replies[0].ids.shape[0]
    ids = np.concatenate([r.ids for r in replies], axis=1).astype(np.int64, copy=False)
    dist = np.concatenate([r.distances for r in replies], axis=1).astype(np.int64, copy=False)
    silo = np.concatenate([np.full(r.ids.shape, i, np.int32) for i, r in enumerate(replies)], axis=1)
    pad = ids < 0
    dist = np.where(pad, PAD_DISTANCE, dist)
    order = np.lexsort((ids, silo, dist), axis=1)[:, :k]
    take = lambda a: np.take_along_axis(a, order, 1)  # noqa: E731
    m_ids, m_dist, m_silo, m_pad = take(ids), take(dist).astype(np.int32), take(silo), take(pad)
    m_silo = np.where(m_pad, -1, m_silo).astype(np.int32)
    m_ids = np.where(m_pad, PAD_ID, m_ids)
    if m_ids.shape[1] < k:  # fewer codes in all than k
        extra = k - m_ids.shape[1]
        m_ids = np.pad(m_ids, ((0, 0), (0, extra)), constant_values=PAD_ID)
        m_dist = np.pad(m_dist, ((0, 0), (0, extra)), constant_values=PAD_DISTANCE)
        m_silo = np.pad(m_silo, ((0, 0), (0, extra)), constant_values=-1)
    labels = None
    if any(r.labels is not None for r in replies):
        offsets = np.cumsum([0] + [r.ids.shape[1] for r in replies])
        labels = []
        for q in range(n):
            row = []
            for r in range(k):
                s = int(m_silo[q, r])
                if s < 0 or replies[s].labels is None:
                    row.append(None)
                else:
                    row.append(replies[s].labels[q][int(order[q, r]) - int(offsets[s])])
            labels.append(row)
    return Merged(names, m_silo, m_ids, m_dist, labels)


def brute_force(silos: Mapping[str, tuple[np.ndarray, np.ndarray]], query: np.ndarray, k: int) -> Merged:
    """The reference: top-``k`` of ``query`` (packed uint8) over the union of ``{silo: (content ids,
    packed codes)}``, ranked as :func:`merge` ranks (the pooled codes in one place: tests and the
    references' rows only; a federation answers through the fan-out)."""
    replies = []
    for name, (ids, codes) in silos.items():
        d, i = topk_by_id(np.asarray(codes, np.uint8), ids, np.asarray(query, np.uint8), k)
        replies.append(SiloHits(name, i, d))
    return merge(replies, k)


@dataclass
class Answer:
    """What a querying site gets back: the merged hits, who answered and who did not (and why)."""

    model_version: str
    k: int
    merged: Merged
    answered: list[str]
    failed: list[dict[str, Any]] = field(default_factory=list)  # {"node", "silo" (when known), "reason"}
    asked: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"model_version": self.model_version, "k": self.k, "asked": self.asked, "answered": self.answered,
                "failed": self.failed, "seconds": round(self.seconds, 4),
                "queries": [self.merged.hits(q) for q in range(self.merged.ids.shape[0])]}


# --------------------------------------------------------------------------- the answer in a run's log

ANSWER_MARK = "fedhash-search-answer:"


def answer_line(answer: Mapping[str, Any]) -> str:
    """The answer as one log line: how a search run's ServerApp hands its answer to ``flwr log``, the one
    channel open-source Flower gives a remote user."""
    return P.log_line(ANSWER_MARK, answer)


def read_answer(log_text: str) -> dict[str, Any] | None:
    """The last answer line of a run's log, or None when the log holds none."""
    return P.read_log_line(log_text, ANSWER_MARK)
