#!/usr/bin/env python3
"""Where a simulated silo's load goes (issue 20): what ``client.site.silo_data`` does for a message whose
silo its process does not hold (``client.site.silo_from_node`` + ``silo_features``), on the demo's data
cut into 200 silos, with a warm feature cache. Times a load with the per-process IDX memo
(``hashing.data.read_idx``) and with it emptied first, as every load was before it, and prints cProfile's
top entries of one load without the memo.

    .venv/bin/python benchmarks/silo_load_profile.py [--silos 200] [--repeat 5]

The features of that partition must be in the cache (``benchmarks/silos_scale.py`` or ``fedhash simulate``
put them there); otherwise the first load extracts them and the script says so.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--silos", type=int, default=200)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    from client import site
    from hashing import data
    from simulations.scenario import load_scenario

    cfg = load_scenario("demo").cfg.replace(num_silos=args.silos)
    node = {"partition-id": 0, "num-partitions": args.silos}

    def load() -> None:
        site.silo_features(cfg, site.silo_from_node(cfg, node))

    t = time.perf_counter()
    load()
    print(f"first load (fills the memo; extracts features if the cache lacks them): {time.perf_counter() - t:.3f} s")
    for memo in (True, False):
        times = []
        for _ in range(args.repeat):
            if not memo:
                data._IDX_READ.clear()
            t = time.perf_counter()
            load()
            times.append(time.perf_counter() - t)
        print(f"load {'with' if memo else 'without'} the IDX memo: median {statistics.median(times):.3f} s "
              f"of {args.repeat}")
    data._IDX_READ.clear()
    prof = cProfile.Profile()
    prof.runcall(load)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(12)
    print("one load without the memo, cProfile (cumulative):")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
