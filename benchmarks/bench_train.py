"""Benchmarks of centralized training on 2 cores; prints markdown tables for BENCHMARKS.md.

    python benchmarks/bench_train.py head            # head training time per epoch on cached features
    python benchmarks/bench_train.py cli             # the whole `fedhash train --bits 64`: cold, then warm cache
    python benchmarks/bench_train.py sizes           # input size: extraction img/s and mAP@1000 vs ITQ (on a slice)

Each figure is a median of repeats where the benchmark repeats; `cli` runs the
real command in a subprocess, so it includes interpreter and import start-up.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_head(args) -> None:
    from hashing.config import Config
    from hashing.train import fit

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    n, v, d = args.n, args.views, 1280
    feats = rng.normal(size=(n, v, d)).astype(np.float16)
    labels = rng.integers(0, 10, n)
    print(f"| mode | bits | images x views | epoch seconds (median of {args.repeats}) | steps/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for sup in (False, True):
        for bits in (16, 32, 64):
            cfg = Config(bits=bits, supervised=sup, epochs=1)
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                _, h = fit(feats, labels if sup else None, cfg)
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            steps = len(h.step_loss)
            print(f"| {'sup' if sup else 'unsup'} | {bits} | {n} x {v} | {med:.2f} | {steps / med:.1f} | {peak_rss_mib():.0f} |")


def _run_cli(argv: list[str], env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "simulations.cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode:
        sys.exit(f"fedhash {' '.join(argv)} failed:\n{p.stderr[-3000:]}")
    return dt, p.stdout


def bench_cli(args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    with tempfile.TemporaryDirectory() as tmp:
        cache, runs = Path(tmp) / "cache", Path(tmp) / "runs"
        base = ["train", "--data", "fashion-mnist", "--bits", "64", "--cache-dir", str(cache), "--runs-dir", str(runs)]
        base += args.extra
        print("| cache | wall seconds | mAP@1000 (Hamming) | features s | train s |")
        print("|---|---|---|---|---|")
        for label in ["cold"] + ["warm"] * args.repeats:
            dt, out = _run_cli(base, env)
            run = sorted(runs.iterdir())[-1]
            m = json.loads((run / "metrics.json").read_text())
            print(f"| {label} | {dt:.1f} | {m['symmetric']['mAP@1000']:.4f} | {m['seconds']['features']:.1f} | "
                  f"{m['seconds']['train']:.1f} |", flush=True)


def bench_sizes(args) -> None:
    from hashing.backbones import create_backbone
    from hashing.baselines import fit_baseline
    from hashing.codes import logits_to_codes
    from hashing.data import load_dataset, make_splits, subset
    from hashing.features import extract
    from hashing.metrics import retrieval_metrics
    from hashing.config import Config
    from hashing.train import fit

    torch.set_num_threads(2)
    ds = load_dataset("fashion-mnist")
    ds = subset(ds, np.random.default_rng(0).permutation(len(ds))[: args.n])
    sp = make_splits(len(ds), seed=0, n_query=500, n_train=args.n_train)
    model, _ = create_backbone()
    model = model.to(memory_format=torch.channels_last)
    print(f"Slice of {len(ds)} Fashion-MNIST images: 500 queries, {len(sp.database)} database, {len(sp.train)} train x {args.views} views, 64 bits.")
    print("| size px | clean img/s | augmented img/s | CroVCA unsup mAP@1000 | CroVCA sup mAP@1000 | ITQ mAP@1000 |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        extract(model, ds, np.arange(256), size=size)  # warm-up
        t = time.perf_counter()
        clean = extract(model, ds, np.arange(len(ds)), size=size).astype(np.float32)
        r_clean = len(ds) / (time.perf_counter() - t)
        t = time.perf_counter()
        views = extract(model, ds, sp.train, size=size, views=args.views, seed=0)
        r_aug = len(sp.train) * args.views / (time.perf_counter() - t)
        q, db, y = sp.query, sp.database, ds.labels
        res = {}
        for sup in (False, True):
            coder, _ = fit(views, y[sp.train] if sup else None, Config(bits=64, supervised=sup))
            res[sup] = retrieval_metrics(coder.encode_features(clean[q]), logits_to_codes(coder.encode_features(clean[db])), y[q], y[db],
                                         asymmetric=False, pr=False)["mAP@1000"]
        itq = fit_baseline("itq", clean[sp.train], 64)
        r_itq = retrieval_metrics(itq.encode(clean[q]), itq.encode(clean[db]), y[q], y[db], asymmetric=False, pr=False)["mAP@1000"]
        print(f"| {size} | {r_clean:.0f} | {r_aug:.0f} | {res[False]:.4f} | {res[True]:.4f} | {r_itq:.4f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    h = sub.add_parser("head")
    h.add_argument("--n", type=int, default=10000)
    h.add_argument("--views", type=int, default=4)
    h.add_argument("--repeats", type=int, default=3)
    c = sub.add_parser("cli")
    c.add_argument("--repeats", type=int, default=3, help="warm runs after the cold one")
    c.add_argument("extra", nargs="*", help="extra fedhash train arguments (after --)")
    s = sub.add_parser("sizes")
    s.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 112])
    s.add_argument("--n", type=int, default=8000)
    s.add_argument("--n-train", type=int, default=4000)
    s.add_argument("--views", type=int, default=4)
    args = p.parse_args()
    {"head": bench_head, "cli": bench_cli, "sizes": bench_sizes}[args.what](args)


if __name__ == "__main__":
    main()
