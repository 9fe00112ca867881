"""Why a federated model can lose more across silos than on each silo's own data: class confusions by
whether the two classes ever share a silo.

    .venv/bin/python benchmarks/cross_silo_confusion.py --run runs/<demo run> [--mode unsupervised]

For the run's federated model (``--mode``) and a centralized model retrained here on the same silos and
schedule (``simulations.references.centralized``'s training), every silo's queries are ranked against the
union of every silo's database (mAP@1000 ranking). For each query of class a, the share of its top 1000
that is class b is its confusion with b. Class pairs are split by how often they share a silo under the
run's partition (co-occurrence sum_s p_s(a) p_s(b), p_s the silo's class shares): the third of pairs
that share silos least and the third that share them most. A model whose extra cross-silo errors come
from classes it never saw side by side confuses the first group more than the centralized model does.
Unsupervised runs add the same centralized loop twice, with batches mixed over all silos and with every
batch drawn from one silo (the batch composition a federation's local training has), own-silo and
cross-silo mAP side by side.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import site  # noqa: E402
from hashing.federated.search import brute_force  # noqa: E402
from hashing.model import load_model  # noqa: E402
from hashing.silos import label_histogram, make_silos, source_dataset  # noqa: E402
from hashing.train import Schedule, fit  # noqa: E402
from simulations import cross_silo, federated_search  # noqa: E402


def confusions(encode, data, truth, classes: int) -> tuple[np.ndarray, float]:
    union = {d.name: (truth.db[d.name][0], encode(d, truth.db[d.name][1])) for d in data}
    conf = np.zeros((classes, classes))
    count = np.zeros(classes)
    maps = []
    for d in data:
        q = d.silo.splits.query
        merged = brute_force(union, encode(d, q), 1000)
        maps.append(cross_silo.score(merged, truth, d.labels[q]))
        hit_labels, found = truth.hit_labels(merged)
        for a, row, ok in zip(d.labels[q], hit_labels, found):
            conf[a] += np.bincount(row[ok], minlength=classes) / max(1, ok.sum())
            count[a] += 1
    return conf / np.maximum(count, 1)[:, None], float(np.mean(maps))


def central_loop(cfg, data, epochs: int, homogeneous: bool, seed: int = 0):
    """Centralized CroVCA on the pooled cached views, every batch drawn from all silos or from one silo (by
    size), as benchmarks/unsup_batch_composition.py's central(); BatchNorm statistics pooled at the end."""
    import torch

    from hashing.federated import pooling
    from hashing.loss import crovca_loss

    torch.manual_seed(seed)
    g = site.global_model(cfg, data[0].feature_dim)
    g.train()
    n = sum(len(d.train_views) for d in data)
    bs = cfg.batch_size
    steps = epochs * n // bs
    opt = torch.optim.AdamW(g.parameters(), lr=cfg.lr, weight_decay=1e-2)
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=1e-6)
    rng = np.random.default_rng(seed)
    sizes = np.array([len(d.train_views) for d in data])
    every = np.concatenate([np.asarray(d.train_views) for d in data])
    for _ in range(steps):
        X = np.asarray(data[rng.choice(len(data), p=sizes / sizes.sum())].train_views) if homogeneous else every
        idx = np.sort(rng.choice(len(X), min(bs, len(X)), replace=False))
        v = X.shape[1]
        a = rng.integers(0, v, size=len(idx))
        b = (a + rng.integers(1, v, size=len(idx))) % v
        batch = X[idx]
        zs = [g(torch.from_numpy(batch[np.arange(len(idx)), j].astype(np.float32))) for j in (a, b)]
        loss, _ = crovca_loss(zs, lam=0.1, eps=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sch.step()
    st = [pooling.head_stats(g, d.clean[d.silo.splits.train]) for d in data]
    mm, vv = pooling.pooled_moments(pooling.pool(st))
    pooling.set_bn_stats(g, mm, vv)
    g.eval()
    return g


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--mode", default="unsupervised", choices=("supervised", "unsupervised"))
    args = p.parse_args()
    cfg, fed = federated_search.run_config(args.run, args.mode)
    silos = make_silos(source_dataset(cfg), cfg)
    data = [site.silo_features(dataclasses.replace(cfg, mode="probe"), s) for s in silos]
    truth = cross_silo.Truth(data)
    classes = len(silos[0].ds.classes)
    hist = label_histogram(silos).astype(float)
    share = hist / hist.sum(1, keepdims=True)
    co = share.T @ share  # co[a, b]: how much classes a and b share silos
    pairs = [(a, b) for a, b in itertools.combinations(range(classes), 2)]
    order = sorted(pairs, key=lambda ab: co[ab])
    third = len(pairs) // 3
    low, high = order[:third], order[-third:]

    fed_model, _ = load_model(fed / "model.pt")
    feats = np.concatenate([np.asarray(d.train_views) for d in data])
    labels = np.concatenate([d.train_labels for d in data]) if cfg.supervised else None
    cen_model, _ = fit(feats, labels, dataclasses.replace(cfg, mode="probe"), schedule=Schedule.reference(cfg))
    print(f"{args.run} ({args.mode}); class pairs by co-occurrence: {third} least / {third} most shared of {len(pairs)}")
    models = [("federated", fed_model), ("centralized", cen_model)]
    if not cfg.supervised:  # the same centralized loop, batches mixed over silos or each from one silo
        epochs = cfg.num_server_rounds * cfg.local_epochs
        models += [(f"central loop, mixed batches, {epochs} epochs", central_loop(cfg, data, epochs, False)),
                   (f"central loop, one-silo batches, {epochs} epochs", central_loop(cfg, data, epochs, True))]
    print(f"{'model':<44} {'own mAP':>8} {'cross mAP':>9} {'confusion: least-shared pairs':>30} {'most-shared':>12}")
    for name, m in models:
        conf, mean_map = confusions(cross_silo.hasher_encoder(m), data, truth, classes)
        own = np.mean([site.evaluate(cfg, d, m).map for d in data])
        sym = conf + conf.T
        lo, hi = np.mean([sym[ab] for ab in low]), np.mean([sym[ab] for ab in high])
        print(f"{name:<44} {own:>8.4f} {mean_map:>9.4f} {lo:>30.4f} {hi:>12.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
