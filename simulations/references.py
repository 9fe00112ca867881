"""What a federation is measured between, on the same silos, splits and cached features:
local-only (each silo alone), centralized (every silo's training data pooled: the upper bound) and
ITQ (a classical unsupervised hash fitted on the pooled features). Every reference trains for as many
epochs as the federation ran in all (``hashing.train.Schedule.reference``)."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from client import site
from hashing.baselines import fit_baseline
from hashing.config import Config
from hashing.hashers import Hasher
from hashing.train import Schedule, fit

from . import cross_silo


def row(scores: list[tuple[str, site.Score]], t0: float) -> dict[str, Any]:
    """A table row from (silo name, score) pairs."""
    per = {name: m.map for name, m in scores}
    return {"per_silo": per, "mean": float(np.mean(list(per.values()))),
            "bit_balance": float(np.mean([m.bit_balance for _, m in scores])), "seconds": time.perf_counter() - t0}


def _trained(cfg: Config, views: np.ndarray, labels: np.ndarray | None) -> Hasher:
    hasher, _ = fit(views, labels if cfg.supervised else None, cfg, schedule=Schedule.reference(cfg))
    return hasher


def local_only_silo(cfg: Config, d: site.SiloData, everyone: list[site.SiloData] | None = None
                    ) -> tuple[site.Score, dict[str, Any] | None]:
    """One silo trains alone for as many epochs as the federation ran, scored on its own data and, with
    ``everyone``, deployed as every silo's shared function (its cross-silo row, :mod:`.cross_silo`)."""
    hasher = _trained(cfg, d.train_views, d.train_labels)
    cross = cross_silo.pooled_row(cross_silo.hasher_encoder(hasher), everyone) if everyone else None
    return site.evaluate(cfg, d, hasher), cross


def centralized(cfg: Config, silos: list[site.SiloData]) -> dict[str, Any]:
    """All silos' training views pooled (the upper bound), scored per silo and across silos."""
    t0 = time.perf_counter()
    feats = np.concatenate([np.asarray(d.train_views) for d in silos])
    labels = np.concatenate([d.train_labels for d in silos]) if cfg.supervised else None
    hasher = _trained(cfg, feats, labels)
    out = row([(d.name, site.evaluate(cfg, d, hasher)) for d in silos], t0)
    return out | {"cross_silo": cross_silo.pooled_row(cross_silo.hasher_encoder(hasher), silos)}


def itq(cfg: Config, silos: list[site.SiloData]) -> dict[str, Any]:
    """ITQ fitted on the pooled clean features of every silo's training split."""
    t0 = time.perf_counter()
    feats = np.concatenate([np.asarray(d.clean[d.silo.splits.train], dtype=np.float32) for d in silos])
    model = fit_baseline("itq", feats, cfg.bits, seed=cfg.seed)
    out = row(score_encoder(model, silos), t0)
    return out | {"cross_silo": cross_silo.pooled_row(cross_silo.clean_encoder(model), silos)}


def single_silo_rows(cross: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{"best single silo": the local-only model (of the silo named in ``model_of``) with the best cross-silo
    mean, "single silo (mean over models)": each cross-silo figure averaged over the silos' local models}
    from ``{silo: cross-silo row of its local-only model}``."""
    best = max(cross, key=lambda s: cross[s]["mean"])
    names = list(cross[best]["per_silo"])
    mean = {n: float(np.mean([cross[s]["per_silo"][n] for s in cross])) for n in names}
    return {"best single silo": dict(cross[best], model_of=best),
            "single silo (mean over models)": {"per_silo": mean, "mean": float(np.mean(list(mean.values()))),
                                               "seconds": sum(r["seconds"] for r in cross.values())}}


def score_encoder(model, silos: list[site.SiloData]) -> list[tuple[str, site.Score]]:
    """(silo name, score) of each silo's query split against its own database, coded by a
    fitted hash whose ``encode`` maps clean features to packed codes (ITQ, the DP baselines)."""
    scores = []
    for d in silos:
        sp = d.silo.splits
        q = model.encode(np.asarray(d.clean[sp.query], np.float32))
        db = model.encode(np.asarray(d.clean[sp.database], np.float32))
        scores.append((d.name, site.silo_map(d, q, db)))
    return scores


def side_by_side(jobs: list[tuple[Any, Callable[[], dict[str, Any]]]],
                 progress: bool) -> dict[Any, tuple[dict[str, Any], float]]:
    """Run reference jobs as many at a time as there are cores, each on one core (torch ops release
    the GIL; one training loop per core uses the cores better than one loop on all of them).
    Returns {key: (row, seconds)}; a job's seconds are its own wall time, shared cores included."""
    import torch

    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    threads = torch.get_num_threads()
    out: dict[Any, tuple[dict[str, Any], float]] = {}

    def timed(fn):
        t0 = time.perf_counter()
        return fn(), time.perf_counter() - t0

    torch.set_num_threads(max(1, threads // workers))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool, \
                tqdm(total=len(jobs), desc="references", unit="run", disable=not progress) as bar:
            futures = {pool.submit(timed, fn): key for key, fn in jobs}
            for fut in as_completed(futures):
                out[futures[fut]] = fut.result()
                bar.update(1)
    finally:
        torch.set_num_threads(threads)
    return out
