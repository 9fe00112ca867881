"""Feature-extraction speed of the default backbone (tf_efficientnet_lite0, bundled weights) on CPU.

Images/s at several input sizes, in the default (NCHW-contiguous) and channels_last memory
formats, median over timed batches after warm-up. Prints a markdown table.

    .venv/bin/python benchmarks/bench_backbone.py [--threads 2] [--sizes 64 96 112 224] [--batch 128]

Wall-clock rates suffer when other processes share the cores; the "images per CPU-second"
column (process CPU time) is much less sensitive to that, and the format comparison uses it.
Peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: a high-water mark for the
whole process, so each row shows the peak *so far* (rows run in table order); "RSS now"
is the resident size read from /proc right after the row.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hashing.backbones import create_backbone  # noqa: E402


def rss_now_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench(model, size: int, batch: int, channels_last: bool, warmup: int, repeats: int):
    """Wall seconds and process CPU seconds of each timed batch."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times, cpu = [], []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(x)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= warmup:
                times.append(dt)
                cpu.append(dc)
    assert out.shape == (batch, 1280)
    return times, cpu


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 112, 224])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batch-224", type=int, default=64, help="batch at input size >= 224")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, dim = create_backbone()
    model_cl, _ = create_backbone()
    model_cl = model_cl.to(memory_format=torch.channels_last)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"os.cpu_count()={os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}")
    print(f"tf_efficientnet_lite0, num_classes=0, eval, inference_mode, feature dim {dim}; "
          f"median of {args.repeats} timed batches after {args.warmup} warm-up\n")
    rows = []
    for size in args.sizes:
        batch = args.batch_224 if size >= 224 else args.batch
        res = {}
        for fmt, m, cl in (("contiguous", model, False), ("channels_last", model_cl, True)):
            times, cpu = bench(m, size, batch, cl, args.warmup, args.repeats)
            med = statistics.median(times)
            cpu_med = statistics.median(cpu)
            res[fmt] = batch / cpu_med  # compare on CPU time: robust to other processes on the machine
            rows.append((size, batch, fmt, batch / med, batch / min(times), batch / cpu_med, med * 1000,
                         rss_now_mib(), peak_rss_mib()))
        rows.append((size, batch, "faster", "channels_last" if res["channels_last"] > res["contiguous"] else "contiguous",
                     res["channels_last"] / res["contiguous"]))
    print("| size | batch | format | images/s (median) | images/s (best batch) | images per CPU-second | "
          "median ms/batch | RSS now MiB | peak RSS so far MiB |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r[2] == "faster":
            print(f"| {r[0]} | {r[1]} | **faster: {r[3]}** (channels_last / contiguous CPU-time ratio "
                  f"{r[4]:.2f}x) | | | | | | |")
        else:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.0f} | {r[7]:.0f} | "
                  f"{r[8]:.0f} |")
    tuned_section(args, model_cl, {r[0]: r[3] for r in rows if r[2] == "channels_last"})
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (wall-clock rates are only meaningful near "
          f"{args.threads} or below; 'images per CPU-second' x threads is the uncontended ceiling)")


def tuned_section(args, model_cl, untuned: dict) -> None:
    """fedhash's own path, timed after the rows above in the same process (the malloc tuning cannot be undone)."""
    import numpy as np

    from hashing.data import load_dataset
    from hashing.features import extract, micro_batch, tune_malloc

    tune_malloc()
    ds = load_dataset("fashion-mnist")
    n = 512
    print("\n### fedhash's extraction path: `tune_malloc()` + micro-batches (same process, after the rows above)\n")
    print("| size | micro-batch | backbone images/s (median) | vs channels_last batch above | "
          "`extract` clean view, Fashion-MNIST img/s | `extract` augmented view img/s | peak RSS so far MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        mb = micro_batch(size)
        x = torch.randn(mb, 3, size, size).contiguous(memory_format=torch.channels_last)
        times = []
        with torch.inference_mode():
            for _ in range(args.warmup):
                model_cl(x)
            for _ in range(max(args.repeats, 5)):
                t = time.perf_counter()
                model_cl(x)
                times.append(time.perf_counter() - t)
        rate = mb / statistics.median(times)
        idx = np.arange(n if size < 224 else n // 4)
        extract(model_cl, ds, idx[:64], size=size)  # warm-up
        t = time.perf_counter()
        extract(model_cl, ds, idx, size=size)
        clean = len(idx) / (time.perf_counter() - t)
        t = time.perf_counter()
        extract(model_cl, ds, idx, size=size, views=1, seed=0)
        aug = len(idx) / (time.perf_counter() - t)
        print(f"| {size} | {mb} | {rate:.1f} | {rate / untuned[size]:.2f}x | {clean:.1f} | {aug:.1f} | "
              f"{peak_rss_mib():.0f} |", flush=True)


if __name__ == "__main__":
    main()
