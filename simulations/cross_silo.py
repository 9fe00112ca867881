"""Cross-silo evaluation: each silo's query split searched against the union of every silo's database.

This is the comparison a federation exists for: a code computed at one hospital must mean the same at
every other, so a query from silo A is answered from the collections of A, B, C... at once. The
federated model is scored through the real fan-out (``server.search.fan_out``: the simulated silos'
ClientApps search their own index folders and answer with content ids and distances only); the
references, whose codes no silo indexed, by the same ranking over their pooled codes
(``hashing.federated.search.brute_force``, which the fan-out is tested to equal). Relevance is the
simulation's ground truth: the querying side never learns another silo's labels.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from client import site
from hashing.codes import logits_to_codes
from hashing.federated import protocol as P
from hashing.federated.search import Merged, brute_force
from hashing.metrics import map_of_ranked

K = 1000  # mAP@1000, as every other table

# encode(silo data, positions in the silo's data set) -> packed codes
Encode = Callable[[site.SiloData, np.ndarray], np.ndarray]


class Truth:
    """Every silo's database as the indexes hold it (content ids, first copy of equal pixels), with labels."""

    def __init__(self, data: Sequence[site.SiloData]):
        self.db: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # silo -> (content ids, positions in its data set)
        self.labels: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # silo -> (sorted ids, their labels)
        for d in data:
            pos = np.asarray(d.silo.splits.database)
            cids = d.silo.content_ids()[pos]
            _, first = np.unique(cids, return_index=True)
            first = np.sort(first)
            self.db[d.name] = (cids[first], pos[first])
            order = np.argsort(cids[first], kind="stable")
            self.labels[d.name] = (cids[first][order], d.labels[pos[first]][order])

    def hit_labels(self, merged: Merged) -> tuple[np.ndarray, np.ndarray]:
        """(labels of every hit (nq, k) + the label shape, bool (nq, k): where there is a hit)."""
        found = merged.silo >= 0
        some = next(iter(self.labels.values()))[1]
        out = np.zeros(merged.ids.shape + some.shape[1:], some.dtype)
        for s, name in enumerate(merged.silos):
            mask = merged.silo == s
            if not mask.any():
                continue
            ids, labels = self.labels[name]
            at = np.searchsorted(ids, merged.ids[mask])
            if not np.array_equal(ids[np.minimum(at, len(ids) - 1)], merged.ids[mask]):
                raise ValueError(f"silo {name} answered with a content id its database does not hold")
            out[mask] = labels[at]
        return out, found

    def hit_relevance(self, merged: Merged, q_labels: np.ndarray) -> np.ndarray:
        """(nq, k) bool: hit r of query q shares a label with it (False past the last hit)."""
        labels, found = self.hit_labels(merged)
        if q_labels.ndim == 1:
            return found & (q_labels[:, None] == labels)
        return found & (q_labels[:, None, :].astype(bool) & labels.astype(bool)).any(axis=2)


def score(merged: Merged, truth: Truth, q_labels: np.ndarray) -> float:
    return map_of_ranked(truth.hit_relevance(merged, np.asarray(q_labels)))


def row(per_silo: dict[str, float], t0: float, **extra: Any) -> dict[str, Any]:
    return {"per_silo": per_silo, "mean": float(np.mean(list(per_silo.values()))) if per_silo else float("nan"),
            "seconds": time.perf_counter() - t0, **extra}


def pooled_row(encode: Encode, data: Sequence[site.SiloData], truth: Truth | None = None, k: int = K) -> dict[str, Any]:
    """A model that no silo indexed (a reference), scored on the union: every silo's database and
    queries encoded by ``encode``, ranked as the fan-out ranks."""
    t0 = time.perf_counter()
    truth = truth or Truth(data)
    union = {d.name: (truth.db[d.name][0], encode(d, truth.db[d.name][1])) for d in data}
    per = {}
    for d in data:
        q = d.silo.splits.query
        per[d.name] = score(brute_force(union, encode(d, q), k), truth, d.labels[q])
    return row(per, t0)


def hasher_encoder(hasher) -> Encode:
    """Codes of a trained hasher (what the silos index: 1[z > 0])."""
    return lambda d, idx: logits_to_codes(hasher.encode(d.inputs, np.asarray(idx)))


def clean_encoder(model) -> Encode:
    """Codes of a fitted hash on clean features (ITQ)."""
    return lambda d, idx: model.encode(np.asarray(d.clean[np.asarray(idx)], np.float32))


def fanout_row(fan_out: Callable[[P.SearchRequest], Any], encode: Encode, model_version: str,
               data: Sequence[site.SiloData], fedconfig: str, truth: Truth | None = None, k: int = K) -> dict[str, Any]:
    """The federated model on the union, through the fan-out: each silo's query codes, one batch per
    querying silo, sent to every silo; ``fan_out(request) -> hashing.federated.search.Answer``."""
    t0 = time.perf_counter()
    truth = truth or Truth(data)
    per, answered, failed, seconds = {}, {}, [], []
    for d in data:
        q = d.silo.splits.query
        ans = fan_out(P.SearchRequest(encode(d, q), k, model_version, fedconfig))
        per[d.name] = score(ans.merged, truth, d.labels[q])
        answered[d.name] = list(ans.answered)
        failed += [f | {"querying": d.name} for f in ans.failed]
        seconds.append(ans.seconds)
    return row(per, t0, answered=answered, failed=failed, fanout_seconds=seconds)
