#!/usr/bin/env python3
"""A round's cost against the number of silos, on the same images (issue 20): the demo's 10,000
Fashion-MNIST images cut into N silos (Dirichlet 0.3), supervised probe CroVCA, 64 bits, every silo
training every round (fraction-train 1), one Flower simulation per N, one after the other in this
process. The features are extracted first, as ``fedhash simulate`` does (cached: a second run extracts
nothing); the cross-silo evaluation is left out.

    .venv/bin/python benchmarks/silos_scale.py [--silos 5,50,200] [--rounds 3] [--out DIR]

For each N: the federation's start-up (nodes, silo loading, round-0 statistics), the median round over
rounds 2.. (train and statistics apart), the per-silo load (``client.site.silo_from_node`` +
``silo_features``, median of 5 in this process, warm; and without the per-process IDX memo, as before it), and the peak resident memory of this process
(the ServerApp; the simulated silos are Ray actors, not counted). Writes ``results/silos_scale.md`` and
``.json`` under --out (default: benchmarks/).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from simulations.scenario import load_scenario  # noqa: E402


def _load_seconds(cfg, memo: bool = True) -> float:
    """One silo's load as a simulated silo does it for a message; ``memo=False`` empties the per-process
    IDX memo first (``hashing.data.read_idx``), as every load was before it."""
    from client import site
    from hashing import data

    node = {"partition-id": 0, "num-partitions": cfg.num_silos}
    times = []
    for _ in range(6):
        if not memo:
            data._IDX_READ.clear()
        t = time.perf_counter()
        site.silo_features(cfg, site.silo_from_node(cfg, node))
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--silos", default="5,50,200")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = p.parse_args(argv)
    from hashing.silos import make_silos, source_dataset
    from simulations.runner import run_federations, silo_features_for_references

    scn = load_scenario("demo")
    work = Path(tempfile.mkdtemp(prefix="fedhash-scale-bench-"))
    rows = []
    t_all = time.perf_counter()
    for n in [int(x) for x in args.silos.split(",")]:
        cfg = scn.config_for(True).replace(num_silos=n, num_server_rounds=args.rounds, fraction_train=1.0,
                                           min_train_nodes=2, out_dir=str(work / f"silos-{n}"))
        t0 = time.perf_counter()
        silo_features_for_references(cfg, make_silos(source_dataset(cfg), cfg), False)
        features = time.perf_counter() - t0
        load, unmemo = _load_seconds(cfg), _load_seconds(cfg, memo=False)
        t0 = time.perf_counter()
        fed, = run_federations([cfg], scn.to_dict(), labels=[f"{n} silos"], progress=True)
        wall = time.perf_counter() - t0
        later = fed["rounds"][1:] or fed["rounds"]
        rows.append({"silos": n, "features_s": features, "startup_s": float(fed["seconds_startup"]),
                     "round_s": statistics.median(float(r["seconds"]) for r in later),
                     "train_s": statistics.median(float(r["seconds_train"]) for r in later),
                     "stats_s": statistics.median(float(r["seconds_stats"]) for r in later),
                     "silo_load_s": load, "silo_load_without_memo_s": unmemo, "wall_s": wall, "mean_map": fed["rounds"][-1].get("mean_map"),
                     "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    base = rows[0]["round_s"]
    lines = ["# A round's cost against the number of silos (the demo's 10,000 images)", "",
             f"`{' '.join(['.venv/bin/python', 'benchmarks/silos_scale.py'] + (argv or sys.argv[1:]))}`, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.perf_counter() - t_all:.0f} s", "",
             "| silos | features (s) | start-up (s) | median round (s) | train (s) | statistics (s) | ratio to the first "
             "| one silo's load (s) | without the IDX memo (s) | final mean mAP@1000 | peak RSS of the server process (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['silos']} | {r['features_s']:.1f} | {r['startup_s']:.1f} | {r['round_s']:.2f} | "
                     f"{r['train_s']:.2f} | {r['stats_s']:.2f} | {r['round_s'] / base:.2f}x | {r['silo_load_s']:.3f} | "
                     f"{r['silo_load_without_memo_s']:.3f} | "
                     f"{r['mean_map']:.4f} | {r['peak_rss_mib']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "silos_scale.md").write_text(text)
    (out / "silos_scale.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
