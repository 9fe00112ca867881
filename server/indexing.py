"""After the last round: every silo encodes its database with the global hash function and saves its
SiloIndex, stamped with the model version and the privacy guarantee, and scores the final model."""
from __future__ import annotations

from typing import Any

from hashing.config import Config
from hashing.federated import protocol as P

from .global_model import GlobalModel
from .link import Link, silo_of


def build_indexes(link: Link, model: GlobalModel, cfg: Config, node_ids: list[int],
                  privacy: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[float, float]]]:
    """({silo: {"index": path, "n": codes, "map": mAP}}, {silo: (mAP, bit balance)}) of the final model."""
    content = model.content(cfg, cfg.num_server_rounds, model_version=model.version(), privacy=privacy)
    ok = link.send(link.messages(node_ids, P.MSG_INDEX, content), "index", cfg.num_server_rounds)
    indexes, scores = {}, {}
    for m in ok:
        name, met = silo_of(m)[P.SILO_NAME], m.content[P.METRICS]
        scores[name] = P.read_evaluation(met)
        indexes[name] = {"index": str(m.content[P.SILO][P.SILO_INDEX]), "n": int(met[P.NUM_EXAMPLES]),
                         "map": scores[name][0]}
    return indexes, scores
