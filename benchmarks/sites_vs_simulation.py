#!/usr/bin/env python3
"""Real sites on loopback against Flower's simulation, side by side in one run, on the same silos.

    .venv/bin/python benchmarks/sites_vs_simulation.py [--sites 2] [--n-images 3000] [--rounds 3]
        [--superlink-state file,memory] [--out DIR]

The same silos: partition i of ``--data`` as the simulation cuts it, held by simulated silo i and by a real
SuperNode whose node config says ``data=... partition-id=i num-partitions=N`` (``fedhash-supernode``, TLS,
SuperNode authentication, one warm ClientApp process each). The same run config for both. It reports the
median per-round wall time of each (federation.json's ``seconds`` per round), their ratio, the start-up
(the server's wait for nodes plus the round-0 statistics; and the whole call), each silo's feature
extraction time (measured first, on a cold cache), and whether the final model versions are equal. With
``--superlink-state file,memory`` the loopback runs twice, one after the other in the same call: the SuperLink
on a ``--database`` file (the README's command) and on Flower's in-memory state.
Writes ``results/sites_vs_simulation.md`` (and ``.json``) under --out (default: benchmarks/).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts" / "sites"))
import run_loopback as lb  # noqa: E402

from hashing.config import Config  # noqa: E402


def _rounds(fed: dict) -> list[float]:
    return [float(r["seconds"]) for r in fed["rounds"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--n-images", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--settings", default="bits=64 size=64 views=2 local-epochs=1 partitioner=\"iid\"",
                   help="run-config keys for both (beyond rounds, silos, n-images)")
    p.add_argument("--superlink-state", default="file",
                   help="comma-separated: file (--database, as the README runs it), memory (Flower's in-memory state)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fedhash-sites-bench-"))
    cache = work / "cache"
    os.environ["FEDHASH_CACHE"] = str(cache)  # cold: feature extraction is measured, then shared by both
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_config = (f"num-server-rounds={args.rounds} num-silos={args.sites} min-train-nodes={args.sites} "
                  f"n-images={args.n_images} data=\"{args.data}\" {args.settings}")
    import tomllib

    cfg = Config.from_dict(tomllib.loads("\n".join(run_config.split())), source="the benchmark's run config")

    # feature extraction on a cold cache: what a site's start-up must pay once
    from client import site

    t_feat = {}
    for i in range(args.sites):
        node = {"data": args.data, "partition-id": i, "num-partitions": args.sites, "silo": f"silo-{i}",
                "out-dir": str(work / "probe")}
        t0 = time.perf_counter()
        site.silo_data(site.own_settings(cfg, node), node)
        t_feat[f"silo-{i}"] = time.perf_counter() - t0

    # the simulation
    from simulations.runner import run_federated

    t0 = time.perf_counter()
    sim = run_federated(cfg.replace(out_dir=str(work / "sim"), client_threads=1), {"name": "bench"}, label="sim",
                        progress=False)
    sim_wall = time.perf_counter() - t0

    # real sites on loopback
    sites = {f"silo-{i}": args.data for i in range(args.sites)}
    extra = {f"silo-{i}": f"partition-id={i} num-partitions={args.sites} threads=1" for i in range(args.sites)}
    sim_r = _rounds(sim)
    res = {
        "date": time.strftime("%Y-%m-%d"), "run_config": run_config, "sites": args.sites,
        "feature_extraction_s": {k: round(v, 2) for k, v in t_feat.items()},
        "simulation": {"round_s": [round(x, 2) for x in sim_r], "median_round_s": round(statistics.median(sim_r), 2),
                       "startup_s": round(sim.get("seconds_startup", 0.0), 2), "wall_s": round(sim_wall, 1),
                       "model_version": sim["model_version"]},
    }
    states = [x.strip() for x in args.superlink_state.split(",") if x.strip()]
    if not states or set(states) - {"file", "memory"}:
        p.error(f"--superlink-state {args.superlink_state!r}: name file and/or memory, comma-separated")
    for state in states:
        t0 = time.perf_counter()
        s = lb.run_loopback(work / f"loopback-{state}", sites, run_config, app=REPO, timeout=3600, intruder=False,
                            node_extra=extra, superlink_database=state == "file")
        lb_wall = time.perf_counter() - t0
        if not s.get("ok"):
            print(json.dumps(s, indent=2))
            return 1
        fed = json.loads((Path(s["server_out_dir"]) / "federation.json").read_text())
        lb_r = _rounds(fed)
        key = "loopback" if state == "file" else f"loopback_{state}"
        res[key] = {"superlink_state": state, "round_s": [round(x, 2) for x in lb_r],
                    "median_round_s": round(statistics.median(lb_r), 2),
                    "startup_s": round(fed.get("seconds_startup", 0.0), 2), "wall_s": round(lb_wall, 1),
                    "run_s": s.get("run_seconds"), "model_version": fed["model_version"],
                    "ratio_median_round": round(statistics.median(lb_r) / statistics.median(sim_r), 2),
                    "same_final_model": fed["model_version"] == sim["model_version"]}
    out = args.out / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sites_vs_simulation.json").write_text(json.dumps(res, indent=2))
    sm = res["simulation"]
    md = [f"# Real sites on loopback vs the simulation ({res['date']})", "",
          f"`{run_config}`, {args.sites} sites; one 2-core machine runs the SuperLink, every SuperNode and the "
          "ServerApp.", "",
          "| | median round (s) | rounds (s) | start-up in the run (s) | whole call (s) | final model | ratio of median rounds |",
          "|---|---|---|---|---|---|---|",
          f"| simulation | {sm['median_round_s']} | {sm['round_s']} | {sm['startup_s']} | {sm['wall_s']} | "
          f"{sm['model_version']} | 1 |"]
    for key in (k for k in res if k.startswith("loopback")):
        lo = res[key]
        md.append(f"| loopback (TLS, auth; SuperLink state: {lo['superlink_state']}) | {lo['median_round_s']} | "
                  f"{lo['round_s']} | {lo['startup_s']} | {lo['wall_s']} | {lo['model_version']} "
                  f"({'the same' if lo['same_final_model'] else 'DIFFERENT'}) | {lo['ratio_median_round']}x |")
    md += ["", f"feature extraction per silo (cold cache, s): {res['feature_extraction_s']}"]
    (out / "sites_vs_simulation.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
