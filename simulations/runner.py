"""Run a scenario: silos, Flower simulation, the references beside it, and the report.

1. Partition the data into silos (``hashing.silos``) and extract each silo's features into the cache
   once, here, with a progress bar; the simulated ClientApps then find them in the cache.
2. Run the federation on Flower's simulation engine (Ray; ``simulations.engine`` holds fedhash's
   tweaks of it), once per CroVCA mode asked for. The ServerApp writes checkpoints, per-round metrics,
   each silo's index and the final ``model.pt`` under ``runs/<id>/federated[-unsupervised]/``.
3. Train the references on the same silos and splits (``simulations.references``).
4. Write ``runs/<id>/`` (``simulations.report``): rounds.csv/json, table.md, plots, report.md; the
   libraries' chatter is in ``runs/<id>/log.txt``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from client import site
from hashing import atomic, plots
from hashing.config import Config
from hashing.errors import TrainingError
from hashing.silos import label_histogram, make_silos, source_dataset
from server.link import gist

from . import console, cross_silo, engine, references
from . import resume as resume_checks
from .report import cross_silo_notes, format_table, write_report
from .runs import new_run_dir, read_status
from .scenario import Scenario

log = logging.getLogger("fedhash.simulate")


def run_federated(cfg: Config, scenario: dict[str, Any], *, label: str, progress: bool = True,
                  verbose: bool = False, log_path: Path | None = None) -> dict[str, Any]:
    """One Flower simulation of ``cfg``; returns its federation.json (rounds, silos, indexes, failures)."""
    return run_federations([cfg], scenario, labels=[label], progress=progress, verbose=verbose, log_path=log_path)[0]


def run_federations(cfgs: list[Config], scenario: dict[str, Any], *, labels: list[str], progress: bool = True,
                    verbose: bool = False, log_path: Path | None = None,
                    after_run: Callable[[Any, Any], None] | None = None) -> list[dict[str, Any]]:
    """One Flower simulation that runs each of ``cfgs`` in turn on the same simulated silos
    (one Ray start, SuperNodes that load their silo once); returns each run's federation.json.
    ``after_run(grid, federation)`` runs after each, on the same simulated silos (the cross-silo evaluation).

    A simulated silo gets one core (``client-threads`` 1 unless set): one single-threaded actor per core."""
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from server.server_app import make_server_app

    cfgs = [c if c.client_threads else dataclasses.replace(c, client_threads=1) for c in cfgs]
    cfgs = [engine.for_cluster(c) for c in cfgs]
    cpus = max(1, os.cpu_count() or 1)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    try:
        with console.quiet_flower(log_path, verbose) as terminal:
            bars = {c.out_dir: tqdm(total=c.num_server_rounds, desc=f"federated ({lab})", unit="round",
                                    disable=not progress, position=i, file=terminal)
                    for i, (c, lab) in enumerate(zip(cfgs, labels))}

            def on_round(rec: dict) -> None:
                bar = bars[rec["out_dir"]]
                bar.n = rec["round"]
                bar.set_postfix({"loss": f"{rec['train_loss']:.3f}",
                                 "mAP(prev)": f"{rec['last_map']:.3f}" if rec.get("last_map") is not None else "-",
                                 "silos": f"{rec['clients_ok']}/{rec['clients_sent']}"}, refresh=False)
                bar.refresh()

            try:
                engine.start_ray(cpus, cfgs[0].ray_address)
                engine.fast_feeder(cfgs[0].feed_interval)
                run_simulation(make_server_app(cfgs, scenario=scenario, on_round=on_round, on_grid=engine.tune_grid,
                                               after_run=after_run),
                               client_app, num_supernodes=cfgs[0].num_silos, backend_config=backend,
                               verbose_logging=verbose)
            finally:
                for bar in bars.values():
                    bar.close()
                engine.stop_ray()
    except RuntimeError as e:
        errors = [s.get("error") for s in map(read_status, (c.out_dir for c in cfgs)) if s.get("error")]
        raise TrainingError(errors[0] if errors else f"the Flower simulation failed: {e}") from e
    out = []
    for c in cfgs:
        status = read_status(c.out_dir)
        if status.get("status") != "done":
            raise TrainingError(status.get("error") or f"the federated run did not finish; see {c.out_dir}/federation.json")
        out.append(status)
    return out


def check_privacy_plans(cfgs: list[Config], data: list[site.SiloData]) -> None:
    """Refuse, before anything trains, a sample-level DP config some silo cannot keep: δ of 1/N or more,
    or a target ε it cannot reach in the configured rounds (the error names the smallest reachable ε)."""
    for c in cfgs:
        if c.dp == "sample":
            for d in data:
                site.dp_plan(c, d)


def _federated_row(status: dict[str, Any]) -> dict[str, Any]:
    last = status["rounds"][-1]
    return {"per_silo": dict(last.get("map", {})), "mean": float(last.get("mean_map", float("nan"))),
            "bit_balance": float(last.get("bit_balance", float("nan"))), "seconds": float(status.get("seconds", 0.0))}


def silo_features_for_references(cfg: Config, silos, progress: bool) -> list[site.SiloData]:
    """Every silo's cached features (extracted here, once, with a progress bar): the references train on
    them, and the simulated silos find them in the cache. LoRA runs extract them for the references too."""
    feat_cfg = cfg if cfg.mode == "probe" else dataclasses.replace(cfg, mode="probe")
    return [site.silo_features(feat_cfg, s) for s in tqdm(silos, desc="silo features", unit="silo", disable=not progress)]


# --------------------------------------------------------------------------- the scenario


def simulate(scn: Scenario, *, runs_dir: str | Path = "runs", resume: str | Path | None = None,
             progress: bool = True, verbose: bool = False) -> tuple[Path, dict[str, Any]]:
    """Run ``scn`` end to end; returns (run folder, summary)."""
    t_start = time.perf_counter()
    cfg = scn.cfg
    modes = [cfg.supervised] + ([not cfg.supervised] if scn.also_unsupervised else [])
    tags = ["supervised" if sup else "unsupervised" for sup in modes]
    suffixes = ["" if sup == cfg.supervised else f" ({tag})" for sup, tag in zip(modes, tags)]
    subs = ["federated" if sup == cfg.supervised else f"federated-{tag}" for sup, tag in zip(modes, tags)]

    def federation_configs(run_dir: Path) -> list[Config]:
        return [dataclasses.replace(scn.config_for(sup), out_dir=str(run_dir / sub), resume=bool(resume))
                for sup, sub in zip(modes, subs)]

    if resume:  # a resume that does not continue this run is refused before anything is written
        resume_checks.check_resume_run(Path(resume), scn.to_dict(), federation_configs(Path(resume)))
    if cfg.ray_address:  # a cluster that does not answer fails before any work
        engine.probe_cluster(cfg.ray_address)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    silos = make_silos(source_dataset(cfg), cfg)  # bad silos fail before a run folder exists
    run_dir = Path(resume) if resume else new_run_dir(runs_dir, scn.name)
    fcfgs = federation_configs(run_dir)
    for c in fcfgs:
        c.check()
    with console.run_log(run_dir / "log.txt") as log_path:
        if cfg.mode == "lora" and scn.references:
            log.info("LoRA mode: the references train on cached features (probe mode) for comparison")
        hist = label_histogram(silos)
        data = silo_features_for_references(cfg, silos, progress)
        timings["features"] = time.perf_counter() - t0
        check_privacy_plans(fcfgs, data)
        if resume:
            resume_checks.drop_stale_report(run_dir)
        atomic.write_json(run_dir / "scenario.json", scn.to_dict())
        plots.plot_partition(hist, [s.name for s in silos], list(silos[0].ds.classes), run_dir / "partition.png")
        t0 = time.perf_counter()
        fanned: dict[str, dict[str, Any]] = {}  # out-dir -> the federated model's cross-silo row, through the fan-out
        truth = cross_silo.Truth(data)
        statuses = run_federations(fcfgs, scn.to_dict(), labels=tags, progress=progress, verbose=verbose,
                                   log_path=log_path, after_run=functools.partial(_cross_silo, data, truth, fanned))
        timings["federated (all modes, one simulation)"] = time.perf_counter() - t0
        final, refs, artifacts, rounds_by_mode = {}, {}, {}, {}
        head_ref_cfg: Config | None = None
        jobs: list[tuple[tuple[str, str | None], Callable[[], dict[str, Any]]]] = []  # ((row, silo), job)
        for sup, tag, suffix, sub, status, fcfg in zip(modes, tags, suffixes, subs, statuses, fcfgs):
            final[f"federated{suffix}"] = _federated_row(status)
            timings[f"federated{suffix}"] = float(status.get("seconds", 0.0))
            timings[f"federated{suffix}: start-up (nodes, silo loading, round-0 statistics)"] = \
                float(status.get("seconds_startup", 0.0))
            timings[f"federated{suffix}: training rounds"] = float(status.get("seconds_rounds", 0.0))
            rounds_by_mode[tag] = status["rounds"]
            artifacts[sub] = {"checkpoints": f"{sub}/checkpoints/", "model": f"{sub}/model.pt",
                              "model_version": status.get("model_version"),
                              "indexes": {k: os.path.relpath(v["index"], run_dir)
                                          for k, v in status.get("indexes", {}).items()},
                              "failures": status.get("failures", [])}
            ref_cfg = dataclasses.replace(fcfg, mode="probe")  # the mode's own knobs: same schedule as its federation
            if "local-only" in scn.references:
                for d in data:  # one job per silo: small jobs balance the cores
                    jobs.append(((f"local-only{suffix}", d.name),
                                 functools.partial(references.local_only_silo, ref_cfg, d, data)))
            if "centralized" in scn.references:
                if suffix:
                    jobs.insert(0, ((f"centralized{suffix}", None), functools.partial(references.centralized, ref_cfg, data)))
                else:
                    head_ref_cfg = ref_cfg
        if "itq" in scn.references:
            jobs.append((("itq", None), functools.partial(references.itq, cfg, data)))
        done = references.side_by_side(jobs, progress)
        if head_ref_cfg is not None:
            # The headline mode's centralized training runs alone on every core, last (well after the
            # simulation engine's processes have exited): the federation's training rounds are timed against it.
            t0 = time.perf_counter()
            refs["centralized"] = references.centralized(head_ref_cfg, data)
            timings["centralized"] = time.perf_counter() - t0
        cross = {f"federated{suffix}": fanned[c.out_dir] for suffix, c in zip(suffixes, fcfgs) if c.out_dir in fanned}
        for (key, silo), (res, seconds) in done.items():
            if silo is None:
                refs[key] = res
                timings[key] = seconds
        for key in dict.fromkeys(k for k, silo in done if silo is not None):  # local-only: its silos in order
            parts = [(d.name, done[(key, d.name)]) for d in data]
            refs[key] = references.row([(name, score) for name, ((score, _), _) in parts], 0.0) | \
                {"seconds": sum(t for _, (_, t) in parts)}
            timings[key] = refs[key]["seconds"]
            suffix = key[len("local-only"):]
            cross |= {f"{k}{suffix}": v for k, v in
                      references.single_silo_rows({name: c for name, ((_, c), _) in parts}).items()}
        for key, r in refs.items():
            if "cross_silo" in r:
                cross[key] = r.pop("cross_silo")
        order = ["local-only", "centralized", "itq"]
        final |= {k: refs[k] for k in sorted(refs, key=lambda k: (" (" in k, order.index(k.split(" (")[0]), k))}
        timings["cross-silo evaluation (fan-outs)"] = sum(r["seconds"] for r in fanned.values())
        timings["total"] = time.perf_counter() - t_start

        head = "supervised" if cfg.supervised else "unsupervised"
        summary = {
            "run_id": run_dir.name, "scenario": scn.to_dict(), "bits": cfg.bits, "mode": cfg.mode,
            "supervised": cfg.supervised, "strategy": "; ".join(
                (f"{tag}: " if len(fcfgs) > 1 else "") + _strategy_label(c) for tag, c in zip(tags, fcfgs)),
            "silos": [{"id": s.id, "name": s.name, "n_train": int(len(s.splits.train)),
                       "n_query": int(len(s.splits.query)), "n_db": int(len(s.splits.database)),
                       "label_hist": hist[i].tolist(), "domain": s.domain, "content_fingerprint": s.content_fingerprint()}
                      for i, s in enumerate(silos)],
            "rounds": rounds_by_mode[head], "rounds_by_mode": rounds_by_mode, "final": final,
            "cross_silo": cross, "timings": timings, "ray": dict(engine.cluster),
            "artifacts": artifacts, "partition_plot": "partition.png", "log": "log.txt",
            "references_note": (f"Rows without a suffix are {head} CroVCA; '(unsupervised)'/'(supervised)' rows are "
                                "the other mode on the same silos. Every row trains for the same number of epochs "
                                f"({cfg.num_server_rounds * cfg.local_epochs}) on the same cached features. "
                                f"The {head} centralized row trains alone on every core (the federation's training "
                                "rounds are timed against it); the other references run side by side, one core "
                                "each, so their seconds are wall times on a shared machine."),
        }
        write_report(run_dir, summary)
    return run_dir, summary


def _cross_silo(data: list[site.SiloData], truth: cross_silo.Truth, out: dict[str, dict[str, Any]],
                grid, fed) -> None:
    """After a federation, on its simulated silos: every silo's queries through the fan-out to every silo's
    index (``after_run`` of the ServerApp)."""
    from server.search import fan_out

    hasher = fed.model.hasher
    hasher.load_state(fed.model.params, fed.model.buffers)
    last = fed.history[-1]["round"] if fed.history else 0
    out[fed.cfg.out_dir] = cross_silo.fanout_row(
        lambda req: fan_out(fed.link, req, server_round=last), cross_silo.hasher_encoder(hasher), fed.model.version(),
        data, fed.cfg.to_json(), truth)


def _strategy_label(c: Config) -> str:
    knobs = [f"server-lr {c.server_lr:g}"] if c.server_lr else []
    knobs += [f"server-momentum {c.server_momentum:g}"] if c.strategy == "fedavgm" and c.server_momentum else []
    return c.strategy + (f" ({', '.join(knobs)})" if knobs else "")


def print_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    print()
    print(f"mAP@1000 per silo ({summary['bits']} bits, {summary['mode']} mode, {summary['strategy']}):")
    print(format_table(summary["final"], summary["silos"]))
    if summary.get("cross_silo"):
        print("mAP@1000 across silos (each silo's queries against every silo's database; federated rows through "
              "the fan-out):")
        print(format_table(summary["cross_silo"], summary["silos"], csv_name="cross_silo.csv"))
        for line in cross_silo_notes(summary["cross_silo"]):
            print(line[2:])
    for sub, art in summary.get("artifacts", {}).items():
        idx = art.get("indexes", {})
        print(f"{sub}: model {art.get('model_version')}, {len(idx)} silo indexes under {run_dir / sub / 'silos'}")
        for f in art.get("failures", []):
            print(f"  failure: round {f['round']} {f['phase']} node {f['node']}: {gist(f['reason'])}")
    print(f"report: {run_dir / 'report.md'}")
