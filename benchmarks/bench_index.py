"""Benchmark SiloIndex search against raw FAISS and a NumPy brute force; prints a markdown table.

    .venv/bin/python benchmarks/bench_index.py                      # 1M codes, 1000 queries, k=100
    .venv/bin/python benchmarks/bench_index.py --n 20000 --queries 100 --repeats 3   # smoke run

Every timing is the median of ``--repeats`` runs, all in one process, methods timed round-robin, FAISS set to ``--threads`` threads.
Memory is the peak resident-set growth during one call: VmHWM - VmRSS-before, with the peak reset
through /proc/self/clear_refs before the call (Linux). Where that is unavailable it falls back to
the growth of getrusage's ru_maxrss (which only shows growth beyond the process's earlier peak).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402

from hashing import codes  # noqa: E402
from hashing.index import SiloIndex, set_num_threads  # noqa: E402

VERSION = "bench"


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0])  # kB
    return out


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM" in _status()
    except OSError:
        return False


RESET_PEAK = _can_reset_peak()
MEM_LABEL = ("peak RSS growth, MiB (VmHWM reset via /proc/self/clear_refs)" if RESET_PEAK
             else "peak RSS growth, MiB (ru_maxrss growth; lower bound)")


def peak_mem_mib(fn) -> float:
    """Run ``fn`` once and return its peak RSS growth in MiB."""
    if RESET_PEAK:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status()["VmRSS"]
        fn()
        return (_status()["VmHWM"] - before) / 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="database codes")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--numpy-queries", type=int, default=20,
                    help="queries the NumPy brute force runs on (it is slow); its qps is per query")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    nbytes = args.bits // 8
    db = rng.integers(0, 256, (args.n, nbytes), dtype=np.uint8)
    q_logits = rng.standard_normal((args.queries, args.bits)).astype(np.float32)
    q = codes.logits_to_codes(q_logits)
    ids = np.arange(args.n, dtype=np.int64)
    k = args.k

    holder = {}
    rss0 = _status()["VmRSS"] if RESET_PEAK else 0
    mem_build_raw = peak_mem_mib(lambda: holder.update(raw=_build_raw(args.bits, db)))
    rss1 = _status()["VmRSS"] if RESET_PEAK else 0
    mem_build_silo = peak_mem_mib(lambda: holder.update(silo=_build_silo(args.bits, db, ids)))
    rss2 = _status()["VmRSS"] if RESET_PEAK else 0
    silo, raw = holder["silo"], holder["raw"]

    # sanity: SiloIndex (ids = rows) and raw FAISS agree on distances
    Ds, _ = silo.search(q[:50], k, model_version=VERSION)
    Dr, _ = raw.search(q[:50], k)
    assert np.array_equal(Ds, Dr), "SiloIndex and raw FAISS disagree"

    nq_np = min(args.numpy_queries, args.queries)

    def numpy_bf():
        for start in range(0, nq_np, 5):  # 5 queries at a time keeps the (nq, n) matrix small
            d = codes.hamming(q[start:start + 5], db)
            part = np.argpartition(d, k - 1, axis=1)[:, :k]
            pd = np.take_along_axis(d, part, 1)
            np.take_along_axis(part, np.argsort(pd, 1, kind="stable"), 1)

    runs = [
        ("raw faiss.IndexBinaryFlat.search", args.queries, lambda: raw.search(q, k)),
        ("SiloIndex.search (flat)", args.queries, lambda: silo.search(q, k, model_version=VERSION)),
        (f"NumPy brute force (codes.hamming + argpartition, {nq_np} queries)", nq_np, numpy_bf),
    ]
    for R in (100, 1000):
        if R >= k:
            runs.append((f"SiloIndex.search_asymmetric (flat, rerank={R})", args.queries,
                         lambda R=R: silo.search_asymmetric(q_logits, k, rerank=R, model_version=VERSION)))

    # round-robin: each repeat times every method once, so load drift on a shared machine hits all alike
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for _, _, fn in runs:
        fn()  # warm-up
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, _, fn in runs:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    load_after = os.getloadavg()[0]
    rows = []
    for name, nq, fn in runs:
        t = statistics.median(times[name])
        rows.append((name, nq, t, nq / t, peak_mem_mib(fn), min(times[name])))

    qps = {name: r for name, _, _, r, _, _ in rows}
    best = {name: b for name, _, _, _, _, b in rows}
    raw_qps = qps["raw faiss.IndexBinaryFlat.search"]
    silo_qps = qps["SiloIndex.search (flat)"]

    print(f"## SiloIndex benchmark: {args.n:,} random {args.bits}-bit codes, k={k}, "
          f"FAISS threads={args.threads}, median of {args.repeats} repeats")
    print()
    print(f"faiss {faiss.__version__}, numpy {np.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, 1-min load average {load_before:.1f} -> {load_after:.1f}")
    print()
    print(f"| method | queries timed | median s | min s | queries/s (median) | qps vs SiloIndex.search | {MEM_LABEL} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, nq, t, r, mem, b in rows:
        rel = f"{r / silo_qps:.2f}x" if r >= silo_qps else f"1/{silo_qps / r:.1f}x"
        print(f"| {name} | {nq} | {t:.4f} | {b:.4f} | {r:,.0f} | {rel} | {mem:.1f} |")
    print()
    b_raw, b_silo = best["raw faiss.IndexBinaryFlat.search"], best["SiloIndex.search (flat)"]
    print(f"- SiloIndex.search / raw FAISS qps ratio: **{silo_qps / raw_qps:.3f}** from medians, "
          f"{b_raw / b_silo:.3f} from best times (target >= 0.9)")
    for R in (100, 1000):
        name = f"SiloIndex.search_asymmetric (flat, rerank={R})"
        if name in qps:
            print(f"- search_asymmetric rerank={R}: {silo_qps / qps[name]:.2f}x the time of SiloIndex.search")
    print(f"- NumPy brute force timed on {nq_np} queries; its queries/s is per query, extrapolated linearly")
    print(f"- index build memory ({MEM_LABEL}): raw IndexBinaryFlat {mem_build_raw:.1f} (built first), "
          f"SiloIndex flat {mem_build_silo:.1f}; RSS retained after build, MiB: raw {(rss1 - rss0) / 1024:.1f}, "
          f"SiloIndex {(rss2 - rss1) / 1024:.1f} (codes alone: {db.nbytes / 2**20:.1f}; SiloIndex adds the "
          f"IDMap2 id_map and its rev_map hash table)")


def _build_silo(bits, db, ids):
    s = SiloIndex(bits, VERSION, kind="flat")
    s.add(db, ids)
    return s


def _build_raw(bits, db):
    r = faiss.IndexBinaryFlat(bits)
    r.add(db)
    return r


if __name__ == "__main__":
    main()
