"""Run a scenario: silos, Flower simulation, the references beside it, and the report.

1. Partition the data into silos (client.partitions) and extract each silo's
   features into the cache once, here, with a progress bar; the simulated
   ClientApps then find them in the cache.
2. Run the federation on Flower's simulation engine (Ray), once per CroVCA mode
   asked for. The ServerApp writes checkpoints, per-round metrics and each silo's
   index under ``runs/<id>/federated[-unsupervised]/``.
3. Train the references on the same silos and splits: local-only (each silo
   alone, scored on its own data), centralized (all silos' training data pooled,
   the upper bound), and ITQ fitted on the pooled features.
4. Write ``runs/<id>/`` (simulations.report): rounds.csv/json, table.md, plots, report.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from client import task
from client.partitions import label_histogram, make_silos, plot_partition
from hashing import atomic
from hashing.baselines import fit_baseline
from hashing.errors import ConfigError, TrainingError
from hashing.fedconfig import FedConfig
from hashing.train import train_head

from .cli import new_run_dir
from .report import format_table, write_report
from .scenario import Scenario

log = logging.getLogger("fedhash.simulate")


@contextlib.contextmanager
def _quiet_flower(verbose: bool):
    """Flower and Ray log every message at INFO; keep the terminal to our progress bars."""
    names = ("flwr", "ray")
    old = {n: logging.getLogger(n).level for n in names}
    if not verbose:
        for n in names:
            logging.getLogger(n).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for n, lvl in old.items():
            logging.getLogger(n).setLevel(lvl)


def run_federated(cfg: FedConfig, scenario: dict[str, Any], *, label: str, progress: bool = True,
                  verbose: bool = False) -> dict[str, Any]:
    """One Flower simulation of ``cfg``; returns its federation.json (rounds, silos, indexes, failures)."""
    return run_federations([cfg], scenario, labels=[label], progress=progress, verbose=verbose)[0]


def run_federations(cfgs: list[FedConfig], scenario: dict[str, Any], *, labels: list[str], progress: bool = True,
                    verbose: bool = False) -> list[dict[str, Any]]:
    """One Flower simulation that runs each of ``cfgs`` in turn on the same simulated silos
    (one Ray start, SuperNodes that load their silo once); returns each run's federation.json."""
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from server.server_app import make_server_app

    bars = {c.out_dir: tqdm(total=c.num_server_rounds, desc=f"federated ({lab})", unit="round", disable=not progress,
                            position=i) for i, (c, lab) in enumerate(zip(cfgs, labels))}

    def on_round(rec: dict) -> None:
        bar = bars[rec["out_dir"]]
        bar.n = rec["round"]
        bar.set_postfix({"loss": f"{rec['train_loss']:.3f}",
                         "mAP(prev)": f"{rec['last_map']:.3f}" if rec.get("last_map") is not None else "-",
                         "silos": f"{rec['clients_ok']}/{rec['clients_sent']}"})
        bar.refresh()

    cpus = max(1, os.cpu_count() or 1)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False}}
    os.environ.setdefault("FEDHASH_CLIENT_THREADS", "1")
    num_silos = cfgs[0].num_silos
    try:
        with _quiet_flower(verbose):
            _start_ray(backend["init_args"])
            _fast_feeder()
            run_simulation(make_server_app(cfgs, scenario=scenario, on_round=on_round), client_app,
                           num_supernodes=num_silos, backend_config=backend, verbose_logging=verbose)
    except RuntimeError as e:
        errors = [s.get("error") for s in map(_read_status, (c.out_dir for c in cfgs)) if s.get("error")]
        raise TrainingError(errors[0] if errors else f"the Flower simulation failed: {e}") from e
    finally:
        for bar in bars.values():
            bar.close()
        _stop_ray()
    out = []
    for c in cfgs:
        status = _read_status(c.out_dir)
        if status.get("status") != "done":
            raise TrainingError(status.get("error") or f"the federated run did not finish; see {c.out_dir}/federation.json")
        out.append(status)
    return out


def check_privacy_plans(cfgs: list[FedConfig], data: list[task.SiloData]) -> None:
    """Refuse, before anything trains, a sample-level DP config some silo cannot keep: δ of 1/N or more,
    or a target ε it cannot reach in the configured rounds (the error names the smallest reachable ε)."""
    for c in cfgs:
        if c.dp == "sample":
            for d in data:
                task.dp_plan(c, d)


def _start_ray(init_args: dict[str, Any]) -> None:
    """Start Ray before Flower's simulation engine does, which it then uses as it is.

    The engine would start it with a runtime environment that only sets PYTHONPATH, and a runtime
    environment makes Ray set up every worker through its agent: about 1.2 s more before the
    simulated silos start. Exporting PYTHONPATH gives the workers the same path without one."""
    import ray

    if ray.is_initialized():
        return
    paths = os.pathsep.join(p for p in sys.path if p)
    os.environ["PYTHONPATH"] = paths + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    ray.init(**init_args, logging_level=logging.ERROR)


# How often the simulation engine's feeder moves new messages to the simulated silos (flwr: 0.1 s);
# FEDHASH_FEED_INTERVAL overrides it (benchmarks/bench_demo.py feeder compares the two).
FEED_INTERVAL = 0.01


def _fast_feeder() -> bool:
    """Make Flower's simulation engine hand new messages to the simulated silos every 10 ms.

    flwr 1.41's engine (``vce_api.add_messages_to_queue``) moves messages from its LinkState to the
    actors' queue in a loop that sleeps 0.1 s between passes, so every phase of a round (train,
    statistics) waited 0-0.1 s before any silo started, in a round of about 1.7 s on 2 cores
    (BENCHMARKS.md, "With the 10 ms message feeder"). This installs the same loop with a 10 ms
    pause. It is installed only while Flower's function has the signature it was written against;
    otherwise Flower's own stays, and the simulation is only slower. Returns whether the fast loop
    is in place."""
    import inspect

    from flwr.server.superlink.fleet.vce import vce_api

    current = getattr(vce_api, "flwr_add_messages_to_queue", vce_api.add_messages_to_queue)
    if list(inspect.signature(current).parameters) != ["state", "queue", "nodes_mapping", "f_stop"]:
        logging.getLogger("fedhash").warning("flwr's simulation feeder changed (%s); keeping its 0.1 s poll",
                                             inspect.signature(current))
        return False

    raw = os.environ.get("FEDHASH_FEED_INTERVAL", str(FEED_INTERVAL))
    try:
        interval = float(raw)
        if not 0 < interval <= 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"FEDHASH_FEED_INTERVAL={raw!r} is not a number of seconds in (0, 1]; "
                          "unset it or give one, e.g. 0.01") from None

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
        while not f_stop.is_set():
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(interval)

    vce_api.flwr_add_messages_to_queue = current  # type: ignore[attr-defined]
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True


def _stop_ray() -> None:
    """Flower's engine shuts Ray down when it ends; this covers a run that failed before it did."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _read_status(out_dir: str) -> dict[str, Any]:
    p = Path(out_dir) / "federation.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# --------------------------------------------------------------------------- references


def _reference_config(cfg: FedConfig):
    """One cosine schedule over as many epochs as the federation ran in all (rounds x local epochs).

    Plain BatchNorm: a reference sees the data it trains on whole (centralized: batches mixed over all
    silos; local-only: one silo), so its batches need no outside statistics."""
    return dataclasses.replace(task.train_config(cfg, 1), epochs=cfg.num_server_rounds * cfg.local_epochs,
                               lr=cfg.lr, lr_min=cfg.lr_min, renorm=False)


def _row(scores: list[tuple[str, dict[str, float]]], t0: float) -> dict[str, Any]:
    """A table row from (silo name, silo_map result) pairs."""
    per = {name: m["map"] for name, m in scores}
    return {"per_silo": per, "mean": float(np.mean(list(per.values()))),
            "bit_balance": float(np.mean([m["bit-balance"] for _, m in scores])), "seconds": time.perf_counter() - t0}


def _run_side_by_side(jobs: list[tuple[Any, Callable[[], dict[str, Any]]]],
                      progress: bool) -> dict[Any, tuple[dict[str, Any], float]]:
    """Run reference jobs as many at a time as there are cores, each on one core (torch ops release
    the GIL; one training loop per core uses the cores better than one loop on all of them).
    Returns {key: (row, seconds)}; a job's seconds are its own wall time, shared cores included."""
    import torch

    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    threads = torch.get_num_threads()
    out: dict[Any, tuple[dict[str, Any], float]] = {}

    def timed(fn):
        t0 = time.perf_counter()
        return fn(), time.perf_counter() - t0

    torch.set_num_threads(max(1, threads // workers))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool, \
                tqdm(total=len(jobs), desc="references", unit="run", disable=not progress) as bar:
            futures = {pool.submit(timed, fn): key for key, fn in jobs}
            for fut in as_completed(futures):
                out[futures[fut]] = fut.result()
                bar.update(1)
    finally:
        torch.set_num_threads(threads)
    return out


def _local_only_silo(cfg: FedConfig, d: task.SiloData) -> dict[str, float]:
    """One silo trains alone for as many epochs as the federation ran, scored on its own data."""
    coder, _ = train_head(d.train_views, d.train_labels if cfg.supervised else None, _reference_config(cfg),
                          progress=False)
    return task.local_evaluate(cfg, d, coder)


def centralized(cfg: FedConfig, silos: list[task.SiloData]) -> dict[str, Any]:
    """All silos' training views pooled (the upper bound), scored per silo."""
    t0 = time.perf_counter()
    feats = np.concatenate([np.asarray(d.train_views) for d in silos])
    labels = np.concatenate([d.train_labels for d in silos]) if cfg.supervised else None
    coder, _ = train_head(feats, labels, _reference_config(cfg), progress=False)
    return _row([(d.name, task.local_evaluate(cfg, d, coder)) for d in silos], t0)


def itq(cfg: FedConfig, silos: list[task.SiloData]) -> dict[str, Any]:
    """ITQ fitted on the pooled clean features of every silo's training split."""
    t0 = time.perf_counter()
    train = np.concatenate([np.asarray(d.clean[d.silo.splits.train], dtype=np.float32) for d in silos])
    model = fit_baseline("itq", train, cfg.bits, seed=cfg.seed)
    return _row(score_encoder(model, silos), t0)


def score_encoder(model, silos: list[task.SiloData]) -> list[tuple[str, dict[str, float]]]:
    """(silo name, silo_map result) of each silo's query split against its own database, coded by a
    fitted hash whose ``encode`` maps clean features to packed codes (ITQ, the DP baselines)."""
    scores = []
    for d in silos:
        sp = d.silo.splits
        q = model.encode(np.asarray(d.clean[sp.query], np.float32))
        db = model.encode(np.asarray(d.clean[sp.database], np.float32))
        scores.append((d.name, task.silo_map(d, q, db)))
    return scores


def _federated_row(status: dict[str, Any]) -> dict[str, Any]:
    last = status["rounds"][-1]
    return {"per_silo": dict(last.get("map", {})), "mean": float(last.get("mean_map", float("nan"))),
            "bit_balance": float(last.get("bit_balance", float("nan"))), "seconds": float(status.get("seconds", 0.0))}


# --------------------------------------------------------------------------- the scenario


def simulate(scn: Scenario, *, runs_dir: str | Path = "runs", resume: str | Path | None = None,
             progress: bool = True, verbose: bool = False) -> tuple[Path, dict[str, Any]]:
    """Run ``scn`` end to end; returns (run folder, summary)."""
    t_start = time.perf_counter()
    cfg = scn.cfg
    if cfg.mode == "lora" and any(r in scn.references for r in ("local-only", "centralized", "itq")):
        log.info("LoRA mode: the references train on cached features (probe mode) for comparison")
    if resume and not (Path(resume) / "scenario.json").exists():
        raise ConfigError(f"--resume {resume}: not a fedhash simulate run folder (no scenario.json)")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ds = task.load_source(cfg)
    # bad silos fail before a run folder exists
    silos = make_silos(ds, task.partition_spec(cfg, cfg.num_silos), cache_dir=cfg.cache_dir or None)
    run_dir = Path(resume) if resume else new_run_dir(runs_dir, scn.name)
    atomic.write_json(run_dir / "scenario.json", scn.to_dict())
    plot_partition(silos, run_dir / "partition.png")
    feat_cfg = cfg if cfg.mode == "probe" else dataclasses.replace(cfg, mode="probe")
    data = []
    for s in tqdm(silos, desc="silo features", unit="silo", disable=not progress):
        data.append(task.silo_features(feat_cfg, s))
    timings["features"] = time.perf_counter() - t0

    modes = [cfg.supervised] + ([not cfg.supervised] if scn.also_unsupervised else [])
    tags = ["supervised" if sup else "unsupervised" for sup in modes]
    suffixes = ["" if sup == cfg.supervised else f" ({tag})" for sup, tag in zip(modes, tags)]
    subs = ["federated" if sup == cfg.supervised else f"federated-{tag}" for sup, tag in zip(modes, tags)]
    fcfgs = [dataclasses.replace(scn.config_for(sup), out_dir=str(run_dir / sub), resume=bool(resume))
             for sup, sub in zip(modes, subs)]
    for c in fcfgs:
        c.check()
    check_privacy_plans(fcfgs, data)
    t0 = time.perf_counter()
    statuses = run_federations(fcfgs, scn.to_dict(), labels=tags, progress=progress, verbose=verbose)
    timings["federated (all modes, one simulation)"] = time.perf_counter() - t0
    final: dict[str, Any] = {}
    refs: dict[str, Any] = {}
    head_ref_cfg: FedConfig | None = None
    jobs: list[tuple[tuple[str, str | None], Callable[[], dict[str, Any]]]] = []  # ((row, silo), job)
    rounds_by_mode: dict[str, list] = {}
    artifacts: dict[str, Any] = {}
    for sup, tag, suffix, sub, status, fcfg in zip(modes, tags, suffixes, subs, statuses, fcfgs):
        final[f"federated{suffix}"] = _federated_row(status)
        timings[f"federated{suffix}"] = float(status.get("seconds", 0.0))
        timings[f"federated{suffix}: start-up (nodes, silo loading, round-0 statistics)"] = \
            float(status.get("seconds_startup", 0.0))
        timings[f"federated{suffix}: training rounds"] = float(status.get("seconds_rounds", 0.0))
        rounds_by_mode[tag] = status["rounds"]
        artifacts[sub] = {"checkpoints": f"{sub}/checkpoints/", "model_version": status.get("model_version"),
                          "indexes": {k: os.path.relpath(v["index"], run_dir) for k, v in status.get("indexes", {}).items()},
                          "failures": status.get("failures", [])}
        ref_cfg = dataclasses.replace(fcfg, mode="probe")  # the mode's own knobs: same schedule as its federation
        if "local-only" in scn.references:
            for d in data:  # one job per silo: small jobs balance the cores
                jobs.append(((f"local-only{suffix}", d.name), functools.partial(_local_only_silo, ref_cfg, d)))
        if "centralized" in scn.references:
            if suffix:
                jobs.insert(0, ((f"centralized{suffix}", None), functools.partial(centralized, ref_cfg, data)))
            else:
                head_ref_cfg = ref_cfg
    if "itq" in scn.references:
        jobs.append((("itq", None), functools.partial(itq, feat_cfg, data)))
    done = _run_side_by_side(jobs, progress)
    if head_ref_cfg is not None:
        # The headline mode's centralized training runs alone on every core, last (well after the
        # simulation engine's processes have exited): the federation's training rounds are timed against it.
        t0 = time.perf_counter()
        refs["centralized"] = centralized(head_ref_cfg, data)
        timings["centralized"] = time.perf_counter() - t0
    for (key, silo), (res, seconds) in done.items():
        if silo is None:
            refs[key] = res
            timings[key] = seconds
    for key in dict.fromkeys(k for k, silo in done if silo is not None):  # local-only: its silos in order
        parts = [(d.name, done[(key, d.name)]) for d in data]
        refs[key] = _row([(name, res) for name, (res, _) in parts], 0.0) | {"seconds": sum(t for _, (_, t) in parts)}
        timings[key] = refs[key]["seconds"]
    order = ["local-only", "centralized", "itq"]
    final |= {k: refs[k] for k in sorted(refs, key=lambda k: (" (" in k, order.index(k.split(" (")[0]), k))}
    timings["total"] = time.perf_counter() - t_start

    head = "supervised" if cfg.supervised else "unsupervised"
    hist = label_histogram(silos)
    summary = {
        "run_id": run_dir.name, "scenario": scn.to_dict(), "bits": cfg.bits, "mode": cfg.mode,
        "supervised": cfg.supervised, "strategy": "; ".join(
            (f"{tag}: " if len(fcfgs) > 1 else "") + _strategy_label(c) for tag, c in zip(tags, fcfgs)),
        "silos": [{"id": s.id, "name": s.name, "n_train": int(len(s.splits.train)), "n_query": int(len(s.splits.query)),
                   "n_db": int(len(s.splits.database)), "label_hist": hist[i].tolist(), "domain": s.domain,
                   "ids_fingerprint": s.ids_fingerprint()} for i, s in enumerate(silos)],
        "rounds": rounds_by_mode[head], "rounds_by_mode": rounds_by_mode, "final": final, "timings": timings,
        "artifacts": artifacts, "partition_plot": "partition.png",
        "references_note": (f"Rows without a suffix are {head} CroVCA; '(unsupervised)'/'(supervised)' rows are the "
                            "other mode on the same silos. Every row trains for the same number of epochs "
                            f"({cfg.num_server_rounds * cfg.local_epochs}) on the same cached features. "
                            f"The {head} centralized row trains alone on every core (the federation's training "
                            "rounds are timed against it); the other references run side by side, one core "
                            "each, so their seconds are wall times on a shared machine."),
    }
    write_report(run_dir, summary)
    return run_dir, summary


def _strategy_label(c: FedConfig) -> str:
    knobs = [f"server-lr {c.server_lr:g}"] if c.server_lr else []
    knobs += [f"server-momentum {c.server_momentum:g}"] if c.strategy == "fedavgm" and c.server_momentum else []
    return c.strategy + (f" ({', '.join(knobs)})" if knobs else "")


def print_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    print()
    print(f"mAP@1000 per silo ({summary['bits']} bits, {summary['mode']} mode, {summary['strategy']}):")
    print(format_table(summary["final"], summary["silos"]))
    for sub, art in summary.get("artifacts", {}).items():
        idx = art.get("indexes", {})
        print(f"{sub}: model {art.get('model_version')}, {len(idx)} silo indexes under {run_dir / sub / 'silos'}")
        for f in art.get("failures", []):
            print(f"  failure: round {f['round']} {f['phase']} node {f['node']}: {f['reason'][:160]}")
    print(f"report: {run_dir / 'report.md'}")
