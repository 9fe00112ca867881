"""A silo's retrieval, timed: image -> top-10 on a silo of 1M codes, and the throughput of ``index build``.

    .venv/bin/python benchmarks/bench_retrieval.py                       # 1M codes, 200 queries, 5,000 images
    .venv/bin/python benchmarks/bench_retrieval.py --n 20000 --queries 20 --build-images 500   # smoke run

**Latency.** A real model (``fedhash train --data fashion-mnist --bits 64 --limit 6000``, input 96 px, trained
here unless ``--model`` is given) encodes real query images (Fashion-MNIST test images written as PNG files);
the index holds ``--n`` codes in its catalogue and FAISS file (random 64-bit codes: a flat index scans all of
them whatever they are). Each query is timed in four parts: decode (PIL reads the PNG), backbone, hash (the
head), search (FAISS and the catalogue rows of the 10 hits). Then the index's search of the same query codes
against raw FAISS (``IndexBinaryFlat`` over the same codes, no id map, no catalogue), round-robin in one
process: the ratio of the medians.

**Build throughput.** ``--build-images`` Fashion-MNIST images as PNG files in class folders; side by side,
alternating, ``--repeats`` times: the backbone's own extraction rate on those files
(``hashing.features.extract``: decode, resize, backbone) and ``hashing.retrieval.build`` of an index from
the same folder with an empty feature cache (load and check the files, content ids, extraction, head,
catalogue, FAISS). Medians of images/s and their ratio.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from hashing import retrieval as R  # noqa: E402
from hashing.catalogue import NewItem  # noqa: E402
from hashing.data import load_dataset  # noqa: E402
from hashing.features import extract  # noqa: E402


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1000, q))


def train_model(work: Path) -> Path:
    runs = work / "runs"
    subprocess.run([str(ROOT / ".venv" / "bin" / "fedhash"), "train", "--data", "fashion-mnist", "--bits", "64",
                    "--limit", "6000", "--epochs", "3", "--views", "2", "--runs-dir", str(runs)], check=True,
                   stdout=subprocess.DEVNULL)
    return next(runs.iterdir())


def write_pngs(ds, idx, folder: Path) -> list[Path]:
    out = []
    for i in idx:
        d = folder / ds.classes[int(ds.labels[i])].replace("/", "-")
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i}.png"
        Image.fromarray(ds.images[i]).save(p)
        out.append(p)
    return out


def big_index(work: Path, model: Path, n: int, rng) -> R.SearchIndex:
    idx = R.create(work / "big", model)
    codes = rng.integers(0, 256, size=(n, 8), dtype=np.uint8)
    ids = np.unique(rng.integers(0, 2 ** 63 - 1, size=n + 1000, dtype=np.int64))[:n]
    items = [NewItem(int(i), f"{int(i):064x}", f"/data/images/{j:07d}.png", ("class",)) for j, i in enumerate(ids)]
    t0 = time.perf_counter()
    with idx.cat.transaction():
        idx.cat.insert(items, codes, idx.model_version)
        idx.cat.log("build", n, idx.model_version, {"synthetic": True}, "bench_retrieval.py")
        idx.cat.bump()
    t1 = time.perf_counter()
    idx.close()
    idx = R.open_index(work / "big")  # rebuilds the FAISS file from the catalogue's codes
    t2 = time.perf_counter()
    idx.close()
    idx = R.open_index(work / "big")  # reads the FAISS file
    t3 = time.perf_counter()
    print(f"catalogue of {n:,} rows written in {t1 - t0:.1f} s; first open (FAISS built from the catalogue) "
          f"{t2 - t1:.1f} s; later open (FAISS file) {t3 - t2:.2f} s")
    return idx


def latency(idx: R.SearchIndex, queries: list[Path], repeats: int) -> dict:
    enc = idx.encoder()
    enc.backbone()
    parts = {"decode": [], "backbone": [], "hash": [], "search": [], "total": []}
    for r in range(repeats):
        q = queries[r % len(queries)]
        t0 = time.perf_counter()
        px = R.read_query(q)
        t1 = time.perf_counter()
        t: dict[str, float] = {}
        hits = idx.search([px], 10, timings=t)
        t2 = time.perf_counter()
        assert len(hits[0]) == 10
        parts["decode"].append(t1 - t0)
        for k in ("backbone", "hash", "search"):
            parts[k].append(t[k])
        parts["total"].append(t2 - t0)
    return parts


def index_vs_faiss(idx: R.SearchIndex, queries: list[Path], repeats: int) -> tuple[list, list, list]:
    ids, codes = idx.cat.codes(idx.model_version)
    raw = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    raw.add(codes)
    enc = idx.encoder()
    qcodes = enc.codes(R.query_set([R.read_query(q) for q in queries]))
    silo = idx._sync()
    v = idx.model_version
    full, ours, theirs = [], [], []
    for r in range(repeats):
        q = qcodes[r % len(qcodes)][None]
        t0 = time.perf_counter()
        hits = idx.search_codes(q, 10, model_version=v)
        t1 = time.perf_counter()
        D2, _ = silo.search(q, 10, model_version=v)
        t2 = time.perf_counter()
        D, _ = raw.search(q, 10)
        t3 = time.perf_counter()
        assert [h.distance for h in hits[0]] == D[0].tolist() == D2[0].tolist()
        full.append(t1 - t0)
        ours.append(t2 - t1)
        theirs.append(t3 - t2)
    return full, ours, theirs


def build_throughput(work: Path, model: Path, folder: Path, n: int, repeats: int) -> tuple[list, list]:
    enc = R.open_index(work / "big").encoder()
    backbone = enc.backbone()
    ds = R.load_images(folder)
    ext, bld = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        extract(backbone, ds, np.arange(len(ds)), size=enc.size)
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=work) as cache:
            idx, rep = R.build(work / f"built-{r}", model, folder, cache_dir=cache)
            t2 = time.perf_counter()
            assert rep.added == n, rep.summary()
            idx.close()
        ext.append(n / (t1 - t0))
        bld.append(n / (t2 - t1))
    return ext, bld


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="codes in the big index")
    ap.add_argument("--queries", type=int, default=200, help="timed image queries (and code queries)")
    ap.add_argument("--build-images", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3, help="build-throughput repeats")
    ap.add_argument("--model", default=None, help="a model file or run folder (default: train one here)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"# bench_retrieval  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, faiss {faiss.__version__}, {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = Path(args.model) if args.model else train_model(work)
        fm = load_dataset("fashion-mnist")
        test = np.arange(60000, 70000)
        queries = write_pngs(fm, rng.choice(test, 50, replace=False), work / "queries")
        idx = big_index(work, model, args.n, rng)
        print(f"model {idx.model_version}: {idx.encoder().backbone_name} @ {idx.encoder().size} px, {idx.bits} bits")

        parts = latency(idx, queries, args.queries)
        print(f"\n## image -> top-10 on {args.n:,} codes ({args.queries} queries, one at a time)\n")
        print("| part | median ms | p99 ms |\n|---|---:|---:|")
        for k, v in parts.items():
            print(f"| {k} | {pct(v, 50):.2f} | {pct(v, 99):.2f} |")

        full, ours, theirs = index_vs_faiss(idx, queries, 5 * args.queries)
        print(f"\n## the index's search against raw FAISS, same query codes ({5 * args.queries} round-robin)\n")
        print("| | median ms | p99 ms | / raw FAISS (medians) |\n|---|---:|---:|---:|")
        base = statistics.median(theirs)
        for name, xs in (("raw faiss.IndexBinaryFlat.search", theirs),
                         ("SiloIndex.search (the index: id map, version and code checks)", ours),
                         ("SearchIndex.search_codes (the index + the catalogue rows of the hits)", full)):
            print(f"| {name} | {pct(xs, 50):.3f} | {pct(xs, 99):.3f} | {statistics.median(xs) / base:.3f}x |")
        idx.close()

        folder = work / "build-set"
        write_pngs(fm, rng.choice(test, args.build_images, replace=False), folder)
        ext, bld = build_throughput(work, model, folder, args.build_images, args.repeats)
        print(f"\n## index build against the backbone's own extraction, {args.build_images:,} PNG files "
              f"({args.repeats} alternating repeats)\n")
        print("| | images/s (median) | each run |\n|---|---:|---|")
        print(f"| hashing.features.extract (decode, resize, backbone) | {statistics.median(ext):.0f} | "
              f"{', '.join(f'{x:.0f}' for x in ext)} |")
        print(f"| hashing.retrieval.build (fresh feature cache) | {statistics.median(bld):.0f} | "
              f"{', '.join(f'{x:.0f}' for x in bld)} |")
        print(f"\nratio of medians: **{statistics.median(bld) / statistics.median(ext):.3f}x**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
