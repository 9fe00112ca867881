"""The default demo (`fedhash demo`, the README's main command) on 2 cores: wall time cold and
warm, the federation's overhead against centralized training, and the demo's table.

    python benchmarks/bench_demo.py                 # 1 cold run (empty feature cache), then 2 warm runs
    python benchmarks/bench_demo.py --warm 3 --no-cold
    python benchmarks/bench_demo.py lora            # LoRA mode, federated, on a small slice: seconds per round
    python benchmarks/bench_demo.py feeder --pairs 4 --cache ~/.cache/fedhash/features
                                                    # the demo's supervised federation alone, Flower's 0.1 s
                                                    # message feeder against fedhash's 10 ms one, alternating

Each run is the real command in a subprocess (interpreter start, imports, Ray start
included). The overhead ratio compares, inside one run, the wall time of the federated
supervised run's training rounds (Flower simulation: each round's train messages with the
piggybacked evaluation and its statistics phase, 10 rounds of 1 local epoch) with
centralized training of the same number of epochs on the pooled silos (plus its final
evaluation); medians over the warm runs. Engine start-up (SuperNodes loading their silo,
round-0 statistics) and the whole federated run are reported beside it.
"""
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
FEDHASH = str(ROOT / ".venv" / "bin" / "fedhash")


def run_demo(runs_dir: Path, cache: Path, extra: list[str]) -> tuple[float, dict]:
    env = os.environ | {"FEDHASH_CACHE": str(cache)}
    t0 = time.perf_counter()
    out = subprocess.run([FEDHASH, "demo", "--runs-dir", str(runs_dir), *extra], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"fedhash demo failed ({out.returncode}):\n{out.stdout[-3000:]}")
    run = sorted(p for p in runs_dir.iterdir() if (p / "summary.json").exists())[-1]
    return wall, json.loads((run / "summary.json").read_text()) | {"_stdout": out.stdout, "_run": str(run)}


def demo(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fedhash-bench-demo-"))
    cache = Path(args.cache) if args.cache else tmp / "cache"
    runs = tmp / "runs"
    runs.mkdir()
    rows = []
    if not args.no_cold:
        wall, s = run_demo(runs, cache, args.set)
        rows.append(("cold", wall, s))
        print(f"cold: {wall:.1f} s", flush=True)
    for i in range(args.warm):
        wall, s = run_demo(runs, cache, args.set)
        rows.append(("warm", wall, s))
        print(f"warm {i + 1}: {wall:.1f} s", flush=True)
    print()
    print("| run | wall s | features s | Ray + both federations s | fed sup: start-up s | fed sup: rounds s | "
          "fed sup: all s | fed unsup: all s | centralized sup s | rounds / centralized | all / centralized |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ratios, whole = [], []
    nan = float("nan")
    for kind, wall, s in rows:
        t = s["timings"]
        fed, cen = t.get("federated", nan), t.get("centralized", nan)
        start = next((v for k, v in t.items() if k.startswith("federated: start-up")), nan)
        rounds = t.get("federated: training rounds", nan)
        if kind == "warm":
            ratios.append(rounds / cen)
            whole.append(fed / cen)
        print(f"| {kind} | {wall:.1f} | {t.get('features', 0):.1f} | "
              f"{t.get('federated (all modes, one simulation)', nan):.1f} | {start:.1f} | {rounds:.1f} | {fed:.1f} | "
              f"{t.get('federated (unsupervised)', nan):.1f} | {cen:.1f} | {rounds / cen:.2f}x | {fed / cen:.2f}x |")
    warm = [w for k, w, _ in rows if k == "warm"]
    if warm:
        print(f"\nwarm wall time, median of {len(warm)}: {statistics.median(warm):.1f} s; federated training rounds / "
              f"centralized training, median: {statistics.median(ratios):.2f}x (whole federated run incl. start-up "
              f"and indexes: {statistics.median(whole):.2f}x)")
    last = rows[-1][2]
    print("\nthe demo's table (last run):\n")
    from simulations.report import format_table

    print(format_table(last["final"], last["silos"], markdown=True))


def lora(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fedhash-bench-lora-"))
    scenario = tmp / "lora.toml"
    scenario.write_text(
        'name = "lora-slice"\nreferences = []\ndata = "fashion-mnist"\nn-images = 1000\nnum-silos = 2\n'
        'partitioner = "dirichlet"\nalpha = 0.3\nmode = "lora"\nsupervised = false\nbits = 64\nsize = 64\n'
        'views = 2\nbatch-size = 64\nnum-server-rounds = 2\nlocal-epochs = 1\nmin-train-nodes = 2\n')
    env = os.environ | {"FEDHASH_CACHE": str(tmp / "cache")}
    t0 = time.perf_counter()
    out = subprocess.run([FEDHASH, "simulate", str(scenario), "--runs-dir", str(tmp / "runs")], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if out.returncode:
        sys.exit(f"fedhash simulate (lora) failed:\n{out.stdout[-3000:]}")
    run = next((tmp / "runs").iterdir())
    s = json.loads((run / "summary.json").read_text())
    print(f"LoRA mode, 2 silos x ~450 training images, 64 px, 64 bits: wall {time.perf_counter() - t0:.1f} s")
    print("| round | seconds | train loss | mean mAP | bytes up (all silos) |")
    print("|---|---|---|---|---|")
    for r in s["rounds"]:
        print(f"| {r['round']} | {r['seconds']:.1f} | {r['train_loss']:.4f} | {r.get('mean_map', float('nan')):.4f} | {r['bytes_up']:,} |")


def feeder(args) -> None:
    """The demo's supervised federation alone (no references, no unsupervised run), alternating
    Flower's feeder poll, 0.1 s (``--set feed-interval=0.1``), with fedhash's 0.01 s: per-phase medians."""
    tmp = Path(tempfile.mkdtemp(prefix="fedhash-bench-feeder-"))
    cache = Path(args.cache) if args.cache else tmp / "cache"
    src = (ROOT / "simulations" / "scenarios" / "demo.toml").read_text()
    lines = [ln for ln in src.splitlines() if not ln.startswith(("references", "also-unsupervised"))]
    scenario = tmp / "demo-federation.toml"
    scenario.write_text("\n".join(lines[:1] + ['references = []', "also-unsupervised = false"] + lines[1:]) + "\n")
    rows = []
    for i in range(args.pairs):
        for interval in ("0.1", "0.01"):
            env = os.environ | {"FEDHASH_CACHE": str(cache)}
            runs = tmp / f"runs-{i}-{interval}"
            out = subprocess.run([FEDHASH, "simulate", str(scenario), "--runs-dir", str(runs),
                                  "--set", f"feed-interval={interval}"], env=env, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            if out.returncode:
                sys.exit(f"fedhash simulate failed ({out.returncode}):\n{out.stdout[-3000:]}")
            fed = json.loads(next(runs.glob("*/federated/federation.json")).read_text())
            r = fed["rounds"]
            rows.append((interval, fed["seconds_rounds"], statistics.median(x["seconds_train"] for x in r),
                         statistics.median(x["seconds_stats"] for x in r)))
            print(f"pair {i + 1}, feeder {interval} s: rounds {rows[-1][1]:.2f} s", flush=True)
    print("\n| feeder poll | runs | training rounds s (median) | train phase s (median of medians) | "
          "statistics phase s (median of medians) |")
    print("|---|---|---|---|---|")
    for interval in ("0.1", "0.01"):
        sel = [r for r in rows if r[0] == interval]
        print(f"| {interval} s | {len(sel)} | {statistics.median(r[1] for r in sel):.2f} | "
              f"{statistics.median(r[2] for r in sel):.3f} | {statistics.median(r[3] for r in sel):.3f} |")
    ratio = [b[1] / a[1] for a, b in zip(rows[::2], rows[1::2])]
    print(f"\ntraining rounds, 10 ms feeder / 0.1 s feeder, per pair: {', '.join(f'{x:.3f}' for x in ratio)}; "
          f"median {statistics.median(ratio):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="demo", choices=("demo", "lora", "feeder"))
    p.add_argument("--pairs", type=int, default=4, help="feeder: runs of each setting, alternating")
    p.add_argument("--warm", type=int, default=2)
    p.add_argument("--no-cold", action="store_true")
    p.add_argument("--cache", default=None, help="feature cache folder (default: a fresh temporary one)")
    p.add_argument("--set", action="append", default=[], help="passed to fedhash demo as --set KEY=VALUE")
    args = p.parse_args()
    args.set = [x for kv in args.set for x in ("--set", kv)]
    {"demo": demo, "lora": lora, "feeder": feeder}[args.what](args)


if __name__ == "__main__":
    main()
