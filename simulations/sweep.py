"""The privacy–utility study: ``fedhash privacy-sweep --scenario dp-demo --epsilons inf,8,4,1``.

On one scenario's silos (unsupervised CroVCA), in one Flower simulation:

* sample-level DP (the privacy unit is one image) at each target ε; ``inf`` is the published CroVCA
  federation without DP, the figure DP is measured against;
* client-level DP (the unit is one silo's whole update) at each ``--client-noise`` multiplier, with
  the scenario's ``dp-clipping`` wrapper and ``--client-clip``;
* beside every finite ε, the two baselines a DP-trained hash must beat, at the same ε per silo:
  LSH (random projection, centred on a released mean) and DP-ITQ (PCA plus ITQ from released moments).

Writes ``sweep.json``, ``table.md`` and ``privacy_utility.png`` to the run folder.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from client import site
from hashing import atomic, plots
from hashing.config import Config
from hashing.errors import ConfigError
from hashing.privacy import baselines
from hashing.silos import make_silos, source_dataset

from . import console
from .references import score_encoder
from .runner import check_privacy_plans, run_federations, silo_features_for_references
from .runs import new_run_dir
from .scenario import Scenario


def parse_epsilons(text: str, name: str = "--epsilons") -> list[float]:
    """Target ε values, comma-separated (``inf``: no DP); ``name`` is what an error calls them."""
    out = []
    for item in str(text).split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            v = math.inf if item in ("inf", "infinity", "∞") else float(item)
        except ValueError:
            raise ConfigError(f"{name}: {item!r} is not a number; write e.g. inf,8,4,1") from None
        if not v > 0:
            raise ConfigError(f"{name}: ε = {item} must be > 0 (inf for no DP)")
        out.append(v)
    if not out:
        raise ConfigError(f"{name} is empty; write e.g. inf,8,4,1")
    return out


def parse_noises(text: str) -> list[float]:
    out = []
    for item in str(text).split(","):
        if item.strip():
            try:
                v = float(item)
            except ValueError:
                raise ConfigError(f"--client-noise: {item!r} is not a number; write e.g. --client-noise 0.5,1,2") from None
            if not v > 0:
                raise ConfigError(f"--client-noise: {item} must be > 0")
            out.append(v)
    return out


def _baseline_rows(data: list[site.SiloData], bits: int, eps: float, delta: float, seed: int,
                   axes: int) -> list[dict[str, Any]]:
    feats = [np.asarray(d.clean[d.silo.splits.train]) for d in data]
    rows = []
    fits = (("LSH", baselines.dp_lsh_baseline),
            ("DP-ITQ", lambda *a: baselines.dp_itq_baseline(*a, axes=axes)))
    for name, fit in fits:
        t0 = time.perf_counter()
        model, sigma = fit(feats, bits, eps, delta, seed)
        scores = [res for _, res in score_encoder(model, data)]
        rows.append({"method": name, "unit": "sample" if math.isfinite(eps) else "none", "target": eps,
                     "epsilon": eps, "noise": sigma, "map": float(np.mean([s.map for s in scores])),
                     "bit_balance": float(np.mean([s.bit_balance for s in scores])),
                     "seconds": time.perf_counter() - t0})
    return rows


def sweep(scn: Scenario, epsilons: list[float], client_noises: list[float], *, client_clip: float,
          nodp_lr: float, runs_dir: str | Path = "runs", progress: bool = True) -> tuple[Path, dict[str, Any]]:
    base = scn.config_for(False) if scn.cfg.supervised else scn.cfg
    if base.supervised:
        raise ConfigError("the privacy sweep runs unsupervised CroVCA; set supervised = false in the scenario")
    silos = make_silos(source_dataset(base), base)
    run_dir = new_run_dir(runs_dir, f"{scn.name}-privacy-sweep")
    with console.run_log(run_dir / "log.txt") as log_path:
        return _sweep(scn, base, silos, run_dir, log_path, epsilons, client_noises, client_clip=client_clip,
                      nodp_lr=nodp_lr, progress=progress)


def _sweep(scn: Scenario, base: Config, silos, run_dir: Path, log_path: Path, epsilons: list[float],
           client_noises: list[float], *, client_clip: float, nodp_lr: float, progress: bool):
    data = silo_features_for_references(dataclasses.replace(base, dp="none"), silos, progress)
    cfgs: list[Config] = []
    labels: list[str] = []
    points: list[dict[str, Any]] = []
    for eps in epsilons:
        if math.isinf(eps):
            c = Config.from_dict({"dp": "none", "lr": nodp_lr}, source="privacy-sweep", base=base)
            points.append({"method": "CroVCA (published)", "unit": "none", "target": eps})
            cfgs.append(c)
            labels.append("no DP")
            # the DP-CroVCA curve's own end: the DP head and its training, almost without noise
            c = Config.from_dict({"dp": "sample", "dp-epsilon": 0.0, "dp-noise": NOISELESS}, source="privacy-sweep",
                                 base=base)
            points.append({"method": NOISELESS_METHOD, "unit": "sample", "target": eps})
        else:
            c = Config.from_dict({"dp": "sample", "dp-epsilon": eps, "dp-noise": 0.0}, source="privacy-sweep", base=base)
            points.append({"method": "DP-CroVCA", "unit": "sample", "target": eps})
        cfgs.append(c)
        labels.append(f"ε={eps:g}")
    for z in client_noises:
        cfgs.append(Config.from_dict({"dp": "client", "dp-noise": z, "dp-clip": client_clip}, source="privacy-sweep",
                                        base=base))
        points.append({"method": f"client-level DP ({base.dp_clipping})", "unit": "client", "target": z})
        labels.append(f"client σ={z:g}")
    check_privacy_plans([c for c in cfgs if c.dp == "sample"], data)  # refused before anything trains
    cfgs = [dataclasses.replace(c, out_dir=str(run_dir / f"point-{i:02d}")) for i, c in enumerate(cfgs)]
    t0 = time.perf_counter()
    statuses = run_federations(cfgs, scn.to_dict(), labels=labels, progress=progress, log_path=log_path)
    rows = []
    for pt, c, st in zip(points, cfgs, statuses):
        last = st["rounds"][-1]
        priv = st.get("privacy", {})
        rows.append(pt | {"epsilon": float(priv.get("epsilon", math.inf)), "delta": c.dp_delta if c.dp != "none" else 0.0,
                          "noise": priv.get("noise_multiplier"), "map": float(last.get("mean_map", float("nan"))),
                          "bit_balance": float(last.get("bit_balance", float("nan"))),
                          "seconds": float(st.get("seconds_rounds", 0.0)), "folder": Path(c.out_dir).name,
                          "privacy": priv})
    for eps in epsilons:
        rows.extend(_baseline_rows(data, base.bits, eps, base.dp_delta, base.seed, base.dp_axes))
    summary = {"scenario": scn.to_dict(), "bits": base.bits, "delta": base.dp_delta, "rows": rows,
               "silos": [d.name for d in data], "seconds": time.perf_counter() - t0}
    atomic.write_json(run_dir / "sweep.json", summary)
    table = format_sweep(rows)
    atomic.write_text(run_dir / "table.md", f"# Privacy–utility sweep: {scn.name}, {base.bits} bits, δ = {base.dp_delta:g}\n\n"
                      + table + "\n\n" + NOTE + "\n")
    plot_sweep(rows, run_dir / "privacy_utility.png", base.bits, base.dp_delta)
    return run_dir, summary


NOISELESS = 0.01  # the noise multiplier of DP-CroVCA's "no noise" point (DP-SGD and the moments release)
NOISELESS_METHOD = f"DP-CroVCA, noise {NOISELESS:g}"

NOTE = ("ε is per silo for sample-level DP (each silo's own accountant, the largest shown) and per federation for "
        "client-level DP; Opacus's PRV accountant (RDP as a cross-check). Client-level DP with 5 silos protects a whole silo's update only "
        "weakly: ε stays large unless the noise drowns the update. LSH and DP-ITQ spend the whole ε of each silo on "
        "one release (the feature mean; the mean and covariance). " f"{NOISELESS_METHOD}: the DP head trained as "
        "under DP but at noise multiplier " f"{NOISELESS:g} (its ε is no protection): the DP-CroVCA curve's end.")


def _fmt_eps(v) -> str:
    return "∞" if v is None or (isinstance(v, float) and math.isinf(v)) else f"{float(v):.3g}"


def format_sweep(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | unit | target | ε spent | noise | mAP@1000 | bit balance | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        noise = r.get("noise")
        if isinstance(noise, dict):
            noise = max(noise.values()) if noise else None
        target = _fmt_eps(r["target"]) if r["unit"] != "client" else f"σ {r['target']:g}"
        lines.append(f"| {r['method']} | {r['unit']} | {target} | {_fmt_eps(r['epsilon'])} | "
                     f"{'' if noise is None else f'{float(noise):.3g}'} | {r['map']:.4f} | {r['bit_balance']:.3f} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], path: Path, bits: int, delta: float = 1e-5) -> None:
    """The privacy-utility figure: mAP against ε per method, the no-DP mAP, client-level DP beside them."""
    curves = {}
    for method in ("DP-CroVCA", "DP-ITQ", "LSH"):
        pts = sorted((r["target"], r["map"]) for r in rows if r["method"] == method and math.isfinite(r["target"]))
        curves[method] = (tuple(p[0] for p in pts), tuple(p[1] for p in pts))
    no_dp = next((r["map"] for r in rows if r["unit"] == "none" and r["method"].startswith("CroVCA")), None)
    noiseless = next((r["map"] for r in rows if r["method"] == NOISELESS_METHOD), None)
    cl = sorted((r["epsilon"], r["map"]) for r in rows if r["unit"] == "client" and math.isfinite(r["epsilon"]))
    ticks = sorted({r["target"] for r in rows if r["unit"] != "client" and math.isfinite(r["target"])})
    plots.plot_privacy_utility(curves, path, no_dp=no_dp, dp_head_noiseless=noiseless,
                               client_level=(tuple(c[0] for c in cl), tuple(c[1] for c in cl)),
                               ticks=ticks, bits=bits, delta=delta)
