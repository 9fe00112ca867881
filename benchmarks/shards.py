"""Search latency of a ShardedIndex (1, 2, 4 shards as Ray actors) against one in-process SiloIndex.

    .venv/bin/python benchmarks/shards.py                              # 1M codes, k=10 (benchmarks/results/shards.md)
    .venv/bin/python benchmarks/shards.py --n 50000 --repeats 30       # smoke run

It starts its own one-machine Ray cluster (hashing.shards.LocalCluster: ``ray start --head --block`` in a
session of its own, stopped by process id afterwards), adds ``--n`` random 64-bit codes, and times
``search`` of a batch of 1 and of 100 random queries: each timing is one call's wall time on the driver
(sending the queries, every shard's FAISS search, the answers back, the merge), ``--repeats`` calls per
batch size after 5 warm-up calls; the table gives the median and the 99th percentile, and how many CPU seconds other processes on the
machine used meanwhile (the machine's busy time less this process's and the cluster's). The in-process
SiloIndex runs at 1 FAISS thread and at ``--threads`` threads; each shard at ``--shard-threads``
(Ray sets OMP_NUM_THREADS=1 in an actor that asks for no CPU). Every sharded result is checked against
the SiloIndex's distances before it is timed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hashing.index import SiloIndex, set_num_threads  # noqa: E402
from hashing.shards import LocalCluster, ShardedIndex  # noqa: E402

V = "bench-shards"


def _time(fn, queries: list[np.ndarray], warmup: int = 5) -> np.ndarray:
    for q in queries[:warmup]:
        fn(q)
    out = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        out.append(time.perf_counter() - t0)
    return np.array(out) * 1e3


class Others:
    """CPU seconds the rest of the machine used while a row was timed: the machine's busy time minus
    that of this process and of the cluster's processes. Well above 0: something else ran, distrust the row."""

    def __init__(self, cluster: LocalCluster | None = None):
        self.cluster = cluster

    def _ours(self) -> float:
        import psutil

        procs = [psutil.Process()] + (self.cluster.processes() if self.cluster else [])
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)

    def __enter__(self) -> "Others":
        self.b0, self.o0 = self._busy(), self._ours()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = max(0.0, (self._busy() - self.b0) - (self._ours() - self.o0))


def _row(name: str, t1: np.ndarray, t100: np.ndarray, others: float, extra: str = "") -> str:
    return (f"| {name} | {np.median(t1):.2f} | {np.percentile(t1, 99):.2f} | {np.median(t100):.2f} | "
            f"{np.percentile(t100, 99):.2f} | {others:.1f} | {extra} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per batch size and configuration")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--shard-threads", type=int, default=1)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="CPUs the local Ray node offers")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    nb = args.bits // 8
    db = rng.integers(0, 256, (args.n, nb), dtype=np.uint8)
    ids = rng.permutation(np.int64(4) * args.n)[: args.n].astype(np.int64)
    q1 = [rng.integers(0, 256, (1, nb), dtype=np.uint8) for _ in range(args.repeats + 5)]
    q100 = [rng.integers(0, 256, (100, nb), dtype=np.uint8) for _ in range(args.repeats + 5)]
    check = rng.integers(0, 256, (100, nb), dtype=np.uint8)
    print(f"# {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}  {platform.node()}  "
          f"{os.cpu_count()} CPUs  load {os.getloadavg()[0]:.2f}  n={args.n} bits={args.bits} k={args.k} "
          f"repeats={args.repeats}", flush=True)

    rows = []
    one = SiloIndex(args.bits, V)
    one.add(db, ids)
    ref_d = None
    for threads in sorted({1, args.threads}):
        set_num_threads(threads)
        ref_d = one.search(check, args.k, model_version=V)[0]
        with Others() as others:
            t1 = _time(lambda q: one.search(q, args.k, model_version=V), q1)
            t100 = _time(lambda q: one.search(q, args.k, model_version=V), q100)
        rows.append(_row(f"SiloIndex in this process, {threads} FAISS thread(s)", t1, t100, others.seconds))
        print(rows[-1], flush=True)
    del one

    import psutil
    import ray

    cluster = LocalCluster(num_cpus=args.num_cpus)
    t0 = time.perf_counter()
    cluster.start()
    try:
        cluster.connect()
        print(f"# local Ray cluster up in {time.perf_counter() - t0:.1f} s", flush=True)
        for n_shards in [int(s) for s in args.shards.split(",")]:
            t0 = time.perf_counter()
            sh = ShardedIndex(args.bits, V, n_shards, address=cluster.address, threads=args.shard_threads)
            t_start = time.perf_counter() - t0
            t0 = time.perf_counter()
            sh.add(db, ids, model_version=V)
            t_add = time.perf_counter() - t0
            try:
                D, _ = sh.search(check, args.k, model_version=V)
                assert np.array_equal(D, ref_d), "sharded distances differ from the SiloIndex's"
                assert sh.ntotal == args.n
                with Others(cluster) as others:
                    t1 = _time(lambda q: sh.search(q, args.k, model_version=V), q1)
                    t100 = _time(lambda q: sh.search(q, args.k, model_version=V), q100)
                rss = [psutil.Process(w["pid"]).memory_info().rss / 2**20 for w in sh.placement()]
                rows.append(_row(f"ShardedIndex, {n_shards} shard(s) x {args.shard_threads} thread(s)", t1, t100,
                                 others.seconds,
                                 f"start {t_start:.1f} s, add {t_add:.2f} s, RSS/shard {np.mean(rss):.0f} MiB"))
                print(rows[-1], flush=True)
            finally:
                sh.close()
    finally:
        ray.shutdown()
        cluster.stop()
        left = cluster.alive()
        if left:
            print(f"# WARNING: Ray processes left: {[p.pid for p in left]}", flush=True)

    print()
    print(f"| index ({args.n:,} codes, {args.bits} bits, k={args.k}) | 1 query: median ms | p99 ms | "
          "100 queries: median ms | p99 ms | others' CPU s | notes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    print(f"\n# load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
