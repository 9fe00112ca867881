"""``fedhash search --federation`` and ``--run``: search every silo of a federation by code only.

The querying site encodes its images here, with its own copy of the federation's hash function (a
model file, a run folder, or its own index folder), and sends only the packed codes: to a SuperLink as a
Flower run (deployment: ``flwr run`` with the run config's ``search.*`` keys; the ServerApp fans the codes
out and prints the merged answer into the run's log, which ``flwr log`` brings back), or to the silos of a
``fedhash simulate`` run folder (a Flower simulation whose silos search the index folders the run left).

    answer = search_federation(["q.png"], federation="fedhash", model="/var/lib/fedhash/silos/hospital-a", k=20)
    answer = search_federation(["q.png"], run="runs/20261202-demo", k=20)

``answer`` is ``hashing.federated.search.Answer.to_json()``: per query its hits (rank, silo, content id,
Hamming distance, and labels where a silo's node config shares them), ``answered`` (the silos that
replied) and ``failed`` (the nodes that failed or did not reply within round-timeout, and why).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hashing import retrieval as R
from hashing.config import Config
from hashing.encoder import Encoder
from hashing.errors import ConfigError, FedhashError
from hashing.federated import protocol as P
from hashing.federated.search import read_answer

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the query, encoded here


def query_encoder(model: str | os.PathLike, *, weights: str | None = None,
                  cache_dir: str | os.PathLike | None = None) -> Encoder:
    """The site's copy of the federation's hash function: an index folder (the model it holds), a model
    file, a federated checkpoint or a run folder."""
    path = Path(model)
    if (path / R.CATALOGUE).is_file():
        with R.open_index(path, weights=weights, cache_dir=cache_dir) as idx:
            return idx.encoder()
    return Encoder.load(path, weights=weights, cache_dir=cache_dir)


def encode_queries(encoder: Encoder, images: Sequence[np.ndarray | str | os.PathLike]) -> np.ndarray:
    """Packed codes (uint8 (n, bits/8)) of query images (pixels or image files), computed here."""
    pixels = [R.read_query(x) if isinstance(x, (str, os.PathLike)) else np.asarray(x) for x in images]
    if not pixels:
        raise FedhashError("no query image: give at least one")
    return np.asarray(encoder.codes(R.query_set(pixels)))


# --------------------------------------------------------------------------- a simulation's silos


def run_config(run: str | os.PathLike, mode: str | None = None) -> tuple[Config, Path]:
    """(the federation's config, with out-dir at its folder; that folder) of a ``fedhash simulate`` run."""
    run = Path(run)
    subs = {p.parent: json.loads(p.read_text()) for p in sorted(run.glob("federated*/federation.json"))}
    if not subs:
        raise FedhashError(f"{run} holds no federation (no federated*/federation.json); pass a fedhash simulate run "
                           "folder")
    if mode is None:
        sub = run / "federated" if run / "federated" in subs else next(iter(subs))
    else:
        sub = next((s for s, st in subs.items()
                    if ("supervised" if st.get("config", {}).get("supervised") else "unsupervised") == mode), None)
        if sub is None:
            raise FedhashError(f"{run} holds no {mode} federation (it holds {', '.join(s.name for s in subs)})")
    status = subs[sub]
    if status.get("status") != "done":
        raise FedhashError(f"the federation in {sub} did not finish (status {status.get('status')}); its silos hold "
                           "no index to search")
    cfg = Config.from_dict(status["config"]).replace(out_dir=str(sub.resolve()), min_train_nodes=1)
    return cfg, sub


def search_simulation(run: str | os.PathLike, codes: np.ndarray, k: int, model_version: str, *,
                      mode: str | None = None, repeat: int = 1, verbose: bool = False,
                      settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fan ``codes`` out to the simulated silos of run folder ``run`` (a Flower simulation of its silos,
    each searching the index folder the run left). ``repeat`` > 1 fans the same batch out that many times
    in the one simulation (latency measurements): ``answer["latencies"]`` holds each fan-out's seconds.
    ``settings`` overrides config keys of the search (``round-timeout``; ``inject-failures`` with
    ``<silo>@search`` or ``<silo>@search-stall``, to see the fan-out tolerate them)."""
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from server.link import Link
    from server.search import fan_out
    from server.server_app import make_server_app

    from . import console, engine

    cfg, sub = run_config(run, mode)
    if settings:
        cfg = Config.from_dict(settings, source="search settings", base=cfg)
    cfg = engine.for_cluster(cfg)
    codes, k, model_version = P.check_search(codes, k, model_version)
    req = P.SearchRequest(codes, k, model_version, cfg.to_json())

    def job(grid) -> dict[str, Any]:
        link = Link(grid, round_timeout=cfg.round_timeout, min_nodes=cfg.num_silos,
                    kept=lambda: "nothing is kept: a search changes no state")
        link.wait_for_nodes()
        answers = [fan_out(link, req) for _ in range(max(1, int(repeat)))]
        out = answers[-1].to_json()
        out["latencies"] = [a.seconds for a in answers]
        return out

    result: dict[str, Any] = {}
    with console.quiet_flower(Path(sub) / "search-log.txt", verbose):
        try:
            engine.start_ray(max(1, os.cpu_count() or 1), cfg.ray_address)
            engine.fast_feeder(cfg.feed_interval)
            run_simulation(make_server_app(cfg, job=job, result=result, on_grid=engine.tune_grid), client_app,
                           num_supernodes=cfg.num_silos,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
                           verbose_logging=verbose)
        finally:
            engine.stop_ray()
    if "job" not in result:
        raise FedhashError(f"the search simulation of {sub} ended without an answer; see {sub / 'search-log.txt'}")
    return result["job"]


# --------------------------------------------------------------------------- a real federation


def _flwr() -> str:
    here = Path(sys.executable).parent / "flwr"
    return str(here) if here.exists() else "flwr"


def _flwr_json(args: list[str], env: dict, timeout: float) -> dict[str, Any]:
    r = subprocess.run([_flwr(), *args, "--format", "json"], env=env, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    out = r.stdout
    try:
        return json.loads(out[out.index("{"):])
    except ValueError:
        raise FedhashError(f"flwr {' '.join(args[:3])} failed (exit {r.returncode}): "
                           f"{(out + r.stderr).strip()[-500:]}") from None


def search_deployment(federation: str, codes: np.ndarray, k: int, model_version: str, *,
                      app: str | os.PathLike | None = None, timeout: float = 120.0,
                      env: dict | None = None, repeat: int = 1) -> dict[str, Any]:
    """Fan ``codes`` out to every SuperNode connected to the SuperLink ``federation`` (a connection of the
    Flower config, ``flwr run``'s second argument) as one Flower run, and read its answer from the run's log.

    ``timeout`` bounds each silo's reply (the run's round-timeout) and, with a margin for the run's start,
    the whole call; a run still going then is stopped (``flwr stop``). ``repeat`` > 1 fans the batch out that
    many times in the one run (latency measurements: ``answer["latencies"]``)."""
    app = Path(app) if app is not None else REPO
    if not (app / "pyproject.toml").is_file():
        raise ConfigError(f"{app} is not the fedhash Flower app (no pyproject.toml); give --app, the folder fedhash "
                          "was installed from")
    env = dict(os.environ if env is None else env)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # the SuperLink would install a second torch
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    job = P.search_job(codes, k, model_version, repeat)
    with tempfile.TemporaryDirectory(prefix="fedhash-search-") as tmp:
        toml = Path(tmp) / "search.toml"
        toml.write_text(_toml(job | {"round-timeout": float(timeout), "min-train-nodes": 1}))
        t0 = time.monotonic()
        res = _flwr_json(["run", str(app), federation, "--run-config", str(toml)], env, timeout=180)
    if not res.get("success"):
        raise FedhashError(f"flwr run refused the search: {res.get('error-message', res)}")
    run_id = str(res["run-id"])
    deadline = t0 + float(timeout) * max(1, int(repeat)) + 120.0  # each fan-out waits up to timeout
    status = "pending"
    while not status.startswith("finished"):
        if time.monotonic() > deadline:
            subprocess.run([_flwr(), "stop", run_id, federation], env=env, capture_output=True, timeout=60)
            raise FedhashError(f"search run {run_id} on {federation} did not finish within {deadline - t0:.0f} s "
                               f"(status {status}); it was stopped")
        time.sleep(0.5)
        runs = _flwr_json(["ls", federation, "--run-id", run_id], env, timeout=60).get("runs", [])
        status = str(runs[0]["status"]) if runs else status
    log = subprocess.run([_flwr(), "log", run_id, federation, "--show"], env=env, capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    answer = read_answer(log.stdout + log.stderr)
    if answer is None:
        tail = " | ".join((log.stdout + log.stderr).strip().splitlines()[-5:])[-600:]
        raise FedhashError(f"search run {run_id} on {federation} ended {status} without an answer; its log ends: {tail}")
    answer["run_id"] = int(run_id)
    return answer


def _toml(values: dict[str, Any]) -> str:
    """A flat run config as TOML (``search.codes`` -> table [search])."""
    top, tables = [], {}
    for key, v in values.items():
        table, _, name = key.rpartition(".")
        (tables.setdefault(table, []) if table else top).append(f"{name} = {json.dumps(v)}")
    return "\n".join(top + [f"\n[{t}]\n" + "\n".join(lines) for t, lines in tables.items()]) + "\n"


# --------------------------------------------------------------------------- the door


def search_federation(images: Sequence[np.ndarray | str | os.PathLike], *, federation: str | None = None,
                      run: str | os.PathLike | None = None, model: str | os.PathLike | None = None, k: int = 20,
                      mode: str | None = None, weights: str | None = None, cache_dir: str | None = None,
                      app: str | os.PathLike | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """Encode ``images`` here and search every silo of a federation with their codes (module docstring).

    ``federation``: a SuperLink connection (deployment; ``model`` is this site's copy of the federation's
    function). ``run``: a ``fedhash simulate`` run folder (its silos in a simulation; ``model`` defaults
    to the run's federated model)."""
    if (federation is None) == (run is None):
        raise ConfigError("name one federation to search: a SuperLink connection (--federation) or a fedhash "
                          "simulate run folder (--run)")
    if run is not None and model is None:
        model = run_config(run, mode)[1]
    if model is None:
        raise ConfigError("--federation needs --model: this site's copy of the federation's hash function (its "
                          "index folder, model.pt or run folder), which encodes the query here")
    enc = query_encoder(model, weights=weights, cache_dir=cache_dir)
    codes = encode_queries(enc, images)
    if run is not None:
        return search_simulation(run, codes, k, enc.version, mode=mode)
    return search_deployment(federation, codes, k, enc.version, app=app, timeout=timeout)
