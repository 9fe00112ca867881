#!/usr/bin/env python3
"""What secure aggregation costs on the demo's silos: the demo's federated runs with and without
``secagg = true``, side by side in one Flower simulation (the same simulated silos, one Ray start), in
both CroVCA modes.

    .venv/bin/python benchmarks/secagg_cost.py [--scenario demo] [--rounds 10] [--modes sup,unsup] [--out DIR]

A third run per mode, ``plain-reversed``, is the plain one with the server receiving the same replies in the
reverse silo order (the server runs in this process, so the benchmark patches ``server.link.Link.send`` for
that run only). A plain run sums in secure aggregation's fixed point (``server.secagg.plain_sum``), so all
three runs of a mode must end on the same model; before that, a float sum's reversed order moved the
demo's unsupervised per-silo figures by up to 0.0124, the yardstick then for secagg's fixed point (~1e-8).

For each run: the median seconds per round (federation.json's ``seconds``: train + unmask + statistics +
unmask) over rounds 2.. (round 1 also pays the key setup, reported on its own), the bytes per round (the
silos' replies and the global model sent to them; under secagg also the unmasking's messages and the key
setup spread over the run), the final own-silo mAP@1000 per silo, and each ratio against the plain run.
Writes ``results/secagg_cost.md`` and ``.json`` under --out (default: benchmarks/).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from simulations.scenario import load_scenario  # noqa: E402


def _summary(fed: dict) -> dict:
    rounds = fed["rounds"]
    setup = max((int(r.get("secagg_setup_bytes", 0)) for r in rounds), default=0)  # cumulative in the records
    later = [float(r["seconds"]) for r in rounds[1:]] or [float(rounds[0]["seconds"])]
    n = len(rounds)
    down = sum(int(r["bytes_down"]) + int(r.get("secagg_bytes_down", 0)) + int(r.get("stats_secagg_bytes_down", 0))
               for r in rounds)
    up = sum(int(r["bytes_up"]) + int(r.get("stats_bytes_up", 0)) + int(r.get("secagg_bytes_up", 0))
             + int(r.get("stats_secagg_bytes_up", 0)) for r in rounds) + setup
    last = rounds[-1]
    return {"median_round_s": statistics.median(later), "round1_s": float(rounds[0]["seconds"]),
            "bytes_per_round": (down + up) / n, "bytes_up_per_round": up / n, "bytes_down_per_round": down / n,
            "map": last.get("map", {}), "mean_map": last.get("mean_map"), "model_version": fed.get("model_version"),
            "dropped": sum(len(r.get("secagg_dropped", [])) for r in rounds)}


def _reverse_for(out_dirs: list[str]) -> None:
    """The ServerApp (this process) aggregates the runs in ``out_dirs`` in the reverse silo order."""
    from server import link

    send = link.Link.send
    reversed_links: set[int] = set()

    def patched(self, messages, what, server_round, **kw):
        ok = send(self, messages, what, server_round, **kw)
        return ok[::-1] if id(self) in reversed_links else ok

    init = link.Link.__init__

    def init_patched(self, grid, **kw):
        init(self, grid, **kw)
        try:
            out = str(kw["kept"].__self__.out)
        except AttributeError:
            out = ""
        if out in out_dirs:
            reversed_links.add(id(self))

    link.Link.send, link.Link.__init__ = patched, init_patched


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="demo")
    p.add_argument("--rounds", type=int, default=0, help="0: the scenario's")
    p.add_argument("--modes", default="sup,unsup")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = p.parse_args(argv)
    from hashing.silos import make_silos, source_dataset
    from simulations.runner import run_federations, silo_features_for_references

    scn = load_scenario(args.scenario)
    # the features as `fedhash simulate` extracts them (here, before the simulation): the plain runs are the
    # scenario's own federated runs, figure for figure
    silo_features_for_references(scn.cfg, make_silos(source_dataset(scn.cfg), scn.cfg), True)
    work = Path(tempfile.mkdtemp(prefix="fedhash-secagg-bench-"))
    cfgs, labels = [], []
    for mode in args.modes.split(","):
        base = scn.config_for(mode == "sup")
        if args.rounds:
            base = base.replace(num_server_rounds=args.rounds)
        for kind in ("plain", "secagg", "plain-reversed"):
            cfgs.append(base.replace(secagg=kind == "secagg", out_dir=str(work / f"{mode}-{kind}")))
            labels.append(f"{mode}-{kind}")
    _reverse_for([c.out_dir for c, lab in zip(cfgs, labels) if lab.endswith("reversed")])
    t0 = time.perf_counter()
    feds = run_federations(cfgs, scn.to_dict(), labels=labels, progress=True)
    wall = time.perf_counter() - t0
    runs = {lab: _summary(f) for lab, f in zip(labels, feds)}
    lines = [f"# Secure aggregation's cost on the {args.scenario} silos", "",
             f"`{' '.join(['.venv/bin/python', 'benchmarks/secagg_cost.py'] + (argv or sys.argv[1:]))}`, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, one simulation of {len(cfgs)} runs, "
             f"{wall:.0f} s", "",
             "| run | median round (s) | round 1 (s) | bytes / round | mean mAP@1000 | ratio s | ratio bytes | "
             "largest per-silo mAP change | model |", "|---|---|---|---|---|---|---|---|---|"]
    for mode in args.modes.split(","):
        a = runs[f"{mode}-plain"]
        for kind in ("plain", "secagg", "plain-reversed"):
            r = runs[f"{mode}-{kind}"]
            diff = max((abs(r["map"][s] - a["map"][s]) for s in a["map"]), default=float("nan"))
            lines.append(f"| {mode}-{kind} | {r['median_round_s']:.2f} | {r['round1_s']:.2f} | "
                         f"{r['bytes_per_round'] / 1e6:.2f} MB | {r['mean_map']:.4f} | "
                         f"{r['median_round_s'] / a['median_round_s']:.2f}x | "
                         f"{r['bytes_per_round'] / a['bytes_per_round']:.3f}x | {diff:.4f} | {r['model_version']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "secagg_cost.md").write_text(text)
    (out / "secagg_cost.json").write_text(json.dumps({"wall_s": wall, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
