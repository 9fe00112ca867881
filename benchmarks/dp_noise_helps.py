#!/usr/bin/env python3
"""The noise-helps mystery, DP-CroVCA's half (issue 18, item 5): dp-demo's federation under sample-level DP
at several noise levels, with the DP head's basis as plain PCA of the release (``dp-axes = dp-dims``: the
behaviour before the fix) and with the fix (``dp-axes = 8``, the default: where the release left PCA's tail
as it is, the top 8 principal axes kept and the rest random directions of their complement; where its noise
has mixed the tail already, PCA of the release; ``hashing.privacy.release.principal_basis``).

    .venv/bin/python benchmarks/dp_noise_helps.py [--scenario dp-demo] [--axes 8] [--draws 3]
        [--levels inf,32,16,8,4,1] [--split] [--out benchmarks/results/dp_noise_helps.md]

Every arm runs in one Flower simulation (one Ray start, the same simulated silos). ``inf`` is the issue's
low-noise run (``dp-epsilon = 0``, ``dp-noise = 0.01``: DP-SGD and the moments release both almost
noiseless); a number is a target ε per silo (δ of the scenario), calibrated as ``fedhash simulate`` does.
The fix's random directions (and ITQ's starting draws) depend on a seed: ``--draws K`` runs each fix arm
with K draws (the server's ``init_dp_head`` seed offset by 1000 per draw; the silos, their noise and DP-SGD
keep the scenario's seed) and reports each, their median, and whether the basis had PCA's tail replaced, so that a difference between levels can be told from
the draw's own spread. ``--split`` adds the two arms that put the noise on one part only (DP-SGD noise of
ε = 8 with an almost noiseless release, and the reverse), on the fix's first draw.
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

LOW = 0.01  # the "almost no noise" multiplier


replaced: dict[str, bool] = {}  # out_dir -> whether the run's basis had PCA's tail replaced (release.tail_replaced)


def _draws_by_run(draw_of: dict[str, int]) -> None:
    """The server (this process) starts the DP head of the run in ``out_dir`` with basis draw ``draw_of[out_dir]``."""
    from hashing.privacy import release
    from server import pooling

    current: dict = {"draw": 0, "out": ""}
    start, init = pooling.MomentsPooling.start, release.init_dp_head

    def start_patched(self, link, model, node_ids):
        current["draw"], current["out"] = draw_of.get(self.cfg.out_dir, 0), self.cfg.out_dir
        return start(self, link, model, node_ids)

    def init_patched(head, mean, cov, seed=0, axes=None):
        replaced[current["out"]] = axes is not None and release.tail_replaced(cov, head.hidden, axes)
        return init(head, mean, cov, seed=seed + 1000 * current["draw"], axes=axes)

    pooling.MomentsPooling.start, release.init_dp_head = start_patched, init_patched


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="dp-demo")
    p.add_argument("--axes", type=int, default=8, help="the fix's kept principal axes")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--levels", default="inf,32,16,8,4,1")
    p.add_argument("--split", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dp_noise_helps.md")
    args = p.parse_args(argv)
    from hashing.privacy.accountant import silo_plan
    from hashing.silos import make_silos, source_dataset
    from simulations.runner import run_federations, silo_features_for_references

    scn = load_scenario(args.scenario)
    base = scn.cfg
    silos = make_silos(source_dataset(base), base)
    silo_features_for_references(base, silos, True)  # extracted here, as `fedhash simulate` does
    work = Path(tempfile.mkdtemp(prefix="fedhash-noise-helps-"))
    arms: list[tuple[str, str, str, int, object]] = []  # (label, basis, level, draw, cfg)

    def level_cfg(level: str):
        if level == "inf":
            return base.replace(dp_epsilon=0.0, dp_noise=LOW)
        return base.replace(dp_epsilon=float(level), dp_noise=0.0)

    levels = [x.strip() for x in args.levels.split(",") if x.strip()]
    for level in levels:
        arms.append((f"pca-{level}", "PCA (dp-axes = dp-dims)", level, 0, level_cfg(level).replace(dp_axes=base.dp_dims)))
        for k in range(args.draws):
            arms.append((f"fix-{level}-d{k}", f"dp-axes = {args.axes}", level, k,
                         level_cfg(level).replace(dp_axes=args.axes)))
    if args.split:
        n8 = silo_plan(level_cfg("8"), max(len(s.splits.train) for s in silos)).noise_multiplier
        arms.append(("fix-sgd8-release0", f"dp-axes = {args.axes}", f"DP-SGD {n8:.2f}, release {LOW}", 0,
                     base.replace(dp_axes=args.axes, dp_epsilon=0.0, dp_noise=n8, dp_moments_ratio=LOW / n8)))
        arms.append(("fix-sgd0-release8", f"dp-axes = {args.axes}", f"DP-SGD {LOW}, release {n8:.2f}", 0,
                     base.replace(dp_axes=args.axes, dp_epsilon=0.0, dp_noise=LOW, dp_moments_ratio=n8 / LOW)))
    cfgs = [c.replace(out_dir=str(work / lab)) for lab, _, _, _, c in arms]
    _draws_by_run({c.out_dir: draw for c, (_, _, _, draw, _) in zip(cfgs, arms)})
    t0 = time.perf_counter()
    feds = run_federations(cfgs, scn.to_dict(), labels=[a[0] for a in arms], progress=True)
    wall = time.perf_counter() - t0
    res = {}
    for (lab, basis, level, draw, _), fed in zip(arms, feds):
        last = fed["rounds"][-1]
        res[lab] = {"basis": basis, "level": level, "draw": draw, "mean_map": float(last["mean_map"]),
                    "map": last.get("map", {}), "model_version": fed.get("model_version"),
                    "tail_replaced": replaced.get(str(work / lab))}
    lines = [f"# The noise-helps mystery, DP-CroVCA ({args.scenario}: {len(silos)} silos, {base.bits} bits)", "",
             f"`{' '.join(['.venv/bin/python', 'benchmarks/dp_noise_helps.py'] + (argv or sys.argv[1:]))}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, one simulation of {len(arms)} runs, {wall:.0f} s)",
             "", "Federated mean mAP@1000 (own silo). `inf`: DP-SGD and the release at noise multiplier "
             f"{LOW}; a number: the target ε per silo (δ = {base.dp_delta:g}).", "",
             "| noise | PCA basis | " + f"dp-axes = {args.axes}, each draw | median of the draws | the basis |",
             "|---|---|---|---|---|"]
    for level in levels:
        fix = [res[f"fix-{level}-d{k}"]["mean_map"] for k in range(args.draws)]
        med = f"{statistics.median(fix):.4f}" if fix else ""
        kind = {res[f"fix-{level}-d{k}"]["tail_replaced"] for k in range(args.draws)}
        kind = " / ".join("tail replaced" if r else "PCA of the release" for r in sorted(kind))
        lines.append(f"| {'ε = ' + level if level != 'inf' else 'inf (≈ no noise)'} | "
                     f"{res[f'pca-{level}']['mean_map']:.4f} | {' / '.join(f'{m:.4f}' for m in fix)} | {med} | {kind} |")
    if args.split:
        lines += ["", "| noise on one part only (dp-axes, draw 0; the basis) | mean mAP@1000 |", "|---|---|"]
        blur = {True: "tail replaced", False: "PCA of the release", None: ""}
        lines += [f"| {res[k]['level']} ({blur[res[k]['tail_replaced']]}) | {res[k]['mean_map']:.4f} |"
                  for k in ("fix-sgd8-release0", "fix-sgd0-release8")]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"wall_s": wall, "runs": res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
