"""One simulated silo's work, single-threaded, on the demo's silos (warm feature cache): what a
SuperNode process pays to start (imports, loading its silo) and what each message costs it.

    python benchmarks/bench_silo_parts.py

Start-up runs in a fresh interpreter per silo (as a simulation actor starts); the per-message
parts run in-process, best of 3: training (1 local epoch), statistics (which keeps the database
activations), evaluation reading those activations, evaluation encoding the database again.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STARTUP = """
import json, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
import client.client_app
from client import site
from simulations.scenario import load_scenario
t1 = time.perf_counter()
cfg = load_scenario("demo").cfg
site.silo_data(cfg, {"partition-id": %d, "num-partitions": cfg.num_silos})
print(json.dumps({"import": t1 - t0, "silo": time.perf_counter() - t1}))
"""


def best(fn, n: int = 3) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from client import site
    from hashing.backbones import weights_fingerprint
    from simulations.scenario import load_scenario

    cfg = load_scenario("demo").cfg
    print("| silo | train images | start: imports s | start: load silo s | train s | statistics s | "
          "evaluate (kept activations) s | evaluate (encode again) s |")
    print("|---|---|---|---|---|---|---|---|")
    tot = {"train": 0.0, "stats": 0.0, "hit": 0.0, "miss": 0.0}
    for pid in range(cfg.num_silos):
        out = subprocess.run([sys.executable, "-c", STARTUP % pid], cwd=ROOT, capture_output=True, text=True, check=True)
        start = json.loads(out.stdout.strip().splitlines()[-1])
        d = site.silo_data(cfg, {"partition-id": pid, "num-partitions": cfg.num_silos})
        m = site.fresh_model(cfg, d.feature_dim)
        digest = weights_fingerprint(m.state()[0])
        row = {"train": best(lambda: site.local_train(cfg, d, m, 1, prototypes=None)),
               "stats": best(lambda: site.local_stats(cfg, d, m, digest)),
               "hit": best(lambda: site.evaluate(cfg, d, m, digest)),
               "miss": best(lambda: site.evaluate(cfg, d, m))}
        for k in tot:
            tot[k] += row[k]
        print(f"| {d.name} | {len(d.silo.splits.train)} | {start['import']:.2f} | {start['silo']:.2f} | "
              f"{row['train']:.3f} | {row['stats']:.3f} | {row['hit']:.3f} | {row['miss']:.3f} |")
    print(f"| all {cfg.num_silos} | | | | {tot['train']:.3f} | {tot['stats']:.3f} | {tot['hit']:.3f} | {tot['miss']:.3f} |")


if __name__ == "__main__":
    main()
