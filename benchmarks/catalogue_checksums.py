"""What the catalogue's row checksums cost (issue 13): writing N rows and reading a model's codes back (what
rebuilding a FAISS file from the catalogue reads), this checkout against another one, side by side.

    .venv/bin/python benchmarks/catalogue_checksums.py --other /path/to/checkout/of/the/commit/before

Each measurement runs in a fresh subprocess with ``PYTHONPATH`` set to one checkout; the two alternate
(``--repeats`` each) and the medians are compared. The rows are synthetic: random 63-bit ids, 64-bit codes,
a path and one label per row, as ``benchmarks/bench_retrieval.py`` writes them."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ONE = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from hashing.catalogue import Catalogue, NewItem
n, path = int(sys.argv[1]), Path(sys.argv[2])
rng = np.random.default_rng(0)
codes = rng.integers(0, 256, size=(n, 8), dtype=np.uint8)
ids = np.unique(rng.integers(0, 2 ** 63 - 1, size=n + 1000, dtype=np.int64))[:n]
items = [NewItem(int(i), f"{int(i):064x}", f"/data/images/{j:07d}.png", ("class",)) for j, i in enumerate(ids)]
cat = Catalogue(path, create=True)
t0 = time.perf_counter()
with cat.transaction():
    cat.add_model("v" * 16, "models/v.pt", 64)
    cat.insert(items, codes, "v" * 16)
t1 = time.perf_counter()
cat.close()
cat = Catalogue(path)
t2 = time.perf_counter()
got_ids, got = cat.codes("v" * 16)
t3 = time.perf_counter()
pick = rng.choice(got_ids, size=(1000, 10))
laps = []
for hits in pick:  # what a search's 10 hits read from the catalogue
    t = time.perf_counter()
    rows = cat.items(hits)
    laps.append(time.perf_counter() - t)
assert len(got_ids) == n and len(rows) == 10
print(json.dumps({"write": t1 - t0, "read_codes": t3 - t2, "hits": float(np.median(laps))}))
"""


def once(checkout: Path, n: int, work: Path) -> dict:
    db = work / f"c-{time.monotonic_ns()}.sqlite"
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", ONE, str(n), str(db)], env=env, check=True, capture_output=True,
                         text=True, cwd=str(checkout)).stdout
    for f in work.glob(db.name + "*"):
        f.unlink()
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--other", required=True, type=Path, help="a checkout of the commit to compare against")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runs = {"this": [], "other": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, checkout in (("other", args.other.resolve()), ("this", ROOT)):
                runs[name].append(once(checkout, args.rows, Path(tmp)))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# catalogue_checksums  {stamp}  {args.rows:,} rows, {args.repeats} alternating repeats; "
          f"this = {ROOT}, other = {args.other}")
    print("| | this (median) | other (median) | this / other |")
    print("|---|---:|---:|---:|")
    for key, what, unit in (("write", "write the rows (one transaction), s", 1), ("read_codes", "read the codes back, s", 1),
                            ("hits", "read the rows of 10 hits (median of 1,000), ms", 1e3)):
        a = statistics.median(r[key] for r in runs["this"]) * unit
        b = statistics.median(r[key] for r in runs["other"]) * unit
        print(f"| {what} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
