"""The federated layer end to end, on Flower's simulation engine (Ray), on real data.

scikit-learn's digits (1,797 8x8 images) cut into 3 Dirichlet(0.3) silos, the embedded
EfficientNet-Lite0 backbone at 32 px, 2 views, 16-bit codes. Every Flower simulation costs
10-20 s of Ray start-up, so the fast suite runs four of them and packs the assertions in:
``fedhash simulate`` end to end; a run stopped by an injected failure and its resume (two);
one simulation whose ServerApp runs a federation per strategy and one in LoRA mode.
The bad-input and checkpoint-refusal tests need no Ray. Extra simulations are marked slow.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from importlib import metadata
from pathlib import Path

import flwr.simulation  # noqa: F401 - Flower's log handler binds sys.stderr at import: not a test's capsys stream
import numpy as np
import psutil
import pytest
import torch

from client import site
from hashing import backbones, model
from hashing.config import STRATEGIES, Config
from hashing.errors import ConfigError, ModelVersionError, TrainingError
from hashing import catalogue, retrieval
from hashing.index import SiloIndex
from hashing.silos import make_silos
from server import checkpoint as ckpt
from hashing.federated.search import brute_force
from simulations import cross_silo, federated_search
from simulations.cli import main

from .conftest import toml_text, write_png

FedConfig = Config

NUM_SILOS = 3
ROUNDS = 2
SCENARIO = {
    "data": "digits", "n-images": 0, "partitioner": "dirichlet", "alpha": 0.3, "num-silos": NUM_SILOS, "seed": 0,
    "bits": 16, "size": 32, "views": 2, "batch-size": 64, "num-server-rounds": ROUNDS, "min-train-nodes": NUM_SILOS,
    "supervised": True, "mode": "probe", "client-threads": 1,
}


# --------------------------------------------------------------------------- helpers and fixtures


@pytest.fixture(scope="module", autouse=True)
def _env(cache_dir):
    """Features into the session's tmp cache (the scenario's client-threads = 1: one torch thread per
    simulated silo, what fedhash simulate sets)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDHASH_CACHE", str(cache_dir))
        yield


@pytest.fixture(scope="module")
def cfg(cache_dir) -> FedConfig:
    return FedConfig.from_dict(SCENARIO | {"cache-dir": str(cache_dir)}, source="test")


@pytest.fixture(scope="module")
def silos(cfg, digits):
    return make_silos(digits, cfg)


@pytest.fixture(scope="module")
def features(cfg, silos):
    """Every silo's features in the cache before a simulation starts (as fedhash simulate does)."""
    return [site.silo_features(cfg, s) for s in silos]


def _nbytes(state) -> int:
    return int(sum(v.detach().cpu().numpy().nbytes for v in state.values()))


def _backbone_bytes(cfg: FedConfig) -> int:
    net, _, _ = backbones.backbone_for(cfg.backbone, cfg.weights or None)
    return int(sum(p.numel() * p.element_size() for p in net.parameters()))


def _descendants() -> list[psutil.Process]:
    """Live processes whose parent chain leads to this test process (Ray's raylet, GCS, workers, ...)."""
    out = []
    try:
        kids = psutil.Process(os.getpid()).children(recursive=True)
    except psutil.Error:
        return out
    for p in kids:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _assert_no_new_children(before: set[int], wait: float = 20.0) -> None:
    """Nothing started during the simulation is left running (waits a little for Ray to wind down)."""
    deadline = time.time() + wait
    while True:
        left = [p for p in _descendants() if p.pid not in before]
        if not left or time.time() > deadline:
            break
        time.sleep(0.5)
    desc = []
    for p in left:
        try:
            desc.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
    assert not desc, "processes left running after the simulation:\n" + "\n".join(desc)


def _write_scenario(path: Path, values: dict) -> Path:
    path.write_text(toml_text(values))
    return path


def _backend(num_silos: int) -> dict:
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": max(1, os.cpu_count() or 1), "num_gpus": 0, "include_dashboard": False}}


# --------------------------------------------------------------------------- a. fedhash simulate, end to end


def test_simulate_cli_end_to_end(cfg, silos, features, cache_dir, tmp_path, capsys):
    scn = _write_scenario(tmp_path / "three.toml", {
        "name": "three-silos", "description": "3 silos, Dirichlet 0.3 on digits",
        "references": ["local-only", "centralized", "itq"], "also-unsupervised": False,
        **SCENARIO, "cache-dir": str(cache_dir)})
    runs = tmp_path / "runs"
    before = {p.pid for p in _descendants()}
    t0 = time.perf_counter()
    rc = main(["simulate", str(scn), "--runs-dir", str(runs)])
    t1 = time.perf_counter()
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, captured.err.splitlines()[-1:]
    _assert_no_new_children(before)
    # a quiet console: fedhash's own progress and results; the libraries' chatter is in the run's log.txt
    for noise in ("alembic", "DEPRECATED", "fraction_evaluate", "Manually terminating", "FutureWarning"):
        assert noise not in captured.err and noise not in out, noise
    t2 = time.perf_counter()

    (run,) = list(runs.iterdir())
    for f in ("report.md", "table.md", "rounds.csv", "map_rounds.png", "partition.png", "summary.json", "log.txt"):
        assert (run / f).is_file() and (run / f).stat().st_size > 0, f
    log_txt = (run / "log.txt").read_text()
    assert "run_simulation" in log_txt and "DEPRECATED" in log_txt  # Flower's notice went to the log
    with open(run / "rounds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [1, 2]
    table = (run / "table.md").read_text()
    for method in ("federated", "local-only", "centralized", "itq"):
        assert method in table and method in out
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["final"]) == {"federated", "local-only", "centralized", "itq"}
    assert [(s["name"], s["n_db"], s["content_fingerprint"]) for s in summary["silos"]] == \
        [(s.name, len(s.splits.database), s.content_fingerprint()) for s in silos]

    fed = run / "federated"
    status = json.loads((fed / "federation.json").read_text())
    assert status["status"] == "done" and status["failures"] == []
    version = status["model_version"]
    rounds = status["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[-1]["model_version"] == version
    assert all(r["clients_ok"] == NUM_SILOS and r["clients_failed"] == 0 for r in rounds)
    assert all(0 < r["mean_map"] <= 1 and set(r["map"]) == {s.name for s in silos} for r in rounds)
    # the pooled statistics counted every (clean) training image of every silo, once
    n_train = sum(len(s.splits.train) for s in silos)
    assert all(r["pooled_count"] == n_train for r in rounds)

    # each silo's index: the global function's version, exactly that silo's database
    assert sorted(status["indexes"]) == sorted(s.name for s in silos)
    for s in silos:
        path = fed / "silos" / s.name
        assert Path(status["indexes"][s.name]["index"]).resolve() == path.resolve()
        with retrieval.open_index(path) as idx:
            assert idx.model_version == version and idx.bits == 16
            assert len(idx) == len(s.splits.database) == status["indexes"][s.name]["n"]
            # the catalogue holds the database images by content id, with their labels
            db_ids = s.content_ids()[s.splits.database]
            ids, codes = idx.cat.codes(version)
            assert np.array_equal(ids, np.sort(db_ids))
            it = idx.item(int(db_ids[0]))
            assert it.labels == (s.ds.classes[int(s.ds.labels[s.splits.database[0]])],)
            assert np.array_equal(idx.image(int(db_ids[0])), catalogue.canonical_pixels(s.ds.image(int(s.splits.database[0]))))
    assert len({s.content_fingerprint() for s in silos}) == len(silos)
    # a user searches a silo's index with one of its images exported to PNG
    s = silos[0]
    png = tmp_path / "query.png"
    write_png(png, s.ds.image(int(s.splits.database[5])))
    assert main(["search", "--index", str(fed / "silos" / s.name), "--image", str(png), "-k", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["queries"][0]["results"]
    assert res[0]["distance"] == 0
    assert catalogue.fmt_id(int(s.content_ids()[s.splits.database[5]])) in [h["id"] for h in res if h["distance"] == 0]

    # across silos (the report's second table): every silo's queries went through the fan-out to every
    # silo's index; the figures equal the same ranking over the pooled codes of the final model
    cross = summary["cross_silo"]
    assert {"federated", "centralized", "best single silo", "single silo (mean over models)", "itq"} <= set(cross)
    names = sorted(x.name for x in silos)
    assert cross["federated"]["answered"] == {n: names for n in names} and cross["federated"]["failed"] == []
    assert cross["best single silo"]["model_of"] in names
    assert "across silos" in table and "across silos" in (run / "report.md").read_text() and "across silos" in out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the simulated silos
    try:
        final_model, _ = model.load_model(fed / "model.pt")
        ref = cross_silo.pooled_row(cross_silo.hasher_encoder(final_model), features)
    finally:
        torch.set_num_threads(threads)
    assert ref["per_silo"] == pytest.approx(cross["federated"]["per_silo"], abs=1e-12)
    assert all(0 < v <= 1 for v in ref["per_silo"].values())

    # a user searches every silo of the run with one image: the merged top-k is brute force over the union
    union = {}
    for x in silos:
        with retrieval.open_index(fed / "silos" / x.name) as idx:
            union[x.name] = idx.cat.codes(version)
    qcode = federated_search.encode_queries(federated_search.query_encoder(fed), [png])
    assert main(["search", "--run", str(run), "--image", str(png), "-k", "25", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["answered"] == names and got["failed"] == [] and got["model_version"] == version
    want = brute_force(union, qcode, 25)
    assert [(h["silo"], h["id"], h["distance"]) for h in got["queries"][0]["results"]] == \
        [(h["silo"], h["id"], h["distance"]) for h in want.hits(0)]
    assert all("labels" not in h for h in got["queries"][0]["results"])  # ids and distances only
    # a silo that fails and one that stalls: the others answer, within the timeout, and the answer says who did not
    # (10 s: a cold simulated ClientApp on a busy 2-core machine takes a few seconds to answer its first message)
    t_fail = time.perf_counter()
    ans = federated_search.search_simulation(
        run, qcode, 25, version, settings={"inject-failures": f"{names[1]}@search,{names[2]}@search-stall",
                                           "round-timeout": 10})
    t_fail = time.perf_counter() - t_fail
    assert ans["answered"] == [names[0]] and ans["asked"] == NUM_SILOS and len(ans["failed"]) == 2, ans
    reasons = " | ".join(f["reason"] for f in ans["failed"])
    assert f"injected failure of {names[1]}" in reasons and "no reply within round-timeout=10 s" in reasons
    assert ans["latencies"][0] < 10 + 2.0, ans["latencies"]
    alone = brute_force({names[0]: union[names[0]]}, qcode, 25)
    assert [(h["silo"], h["id"], h["distance"]) for h in ans["queries"][0]] == \
        [(h["silo"], h["id"], h["distance"]) for h in alone.hits(0)]

    # checkpoints with provenance
    ck = {r: fed / "checkpoints" / f"round-{r:04d}.pt" for r in (1, 2)}
    assert all(p.is_file() for p in ck.values())
    assert ckpt.latest_checkpoint(fed) == ck[2]
    for r, path in ck.items():
        rec = ckpt.load_checkpoint(path)
        assert rec["round"] == r and rec["model_version"] == rounds[r - 1]["model_version"]
        fc = rec["identity"]
        assert fc["bits"] == 16 and fc["backbone"] == cfg.backbone and fc["size"] == 32 and fc["kind"] == "probe"
        assert fc["weights_id"] == features[0].weights_id
        assert rec["silos"] == {s.name: s.content_fingerprint() for s in silos}
        libs = rec["libraries"]
        assert libs["flwr"] == metadata.version("flwr") and libs["torch"] == metadata.version("torch")
        assert rec["config"]["bits"] == 16 and rec["config"]["num-server-rounds"] == ROUNDS
        assert rec["config"]["data"] == "digits" and rec["data_config"]["alpha"] == 0.3
        assert [h["round"] for h in rec["history"]] == list(range(1, r + 1))
        assert np.isfinite(np.concatenate([v.ravel() for v in rec["params"].values()])).all()
    # each round's mAP (piggybacked on the next round's training, or the index phase after the
    # last) is that round's checkpointed global model, scored on each silo's query split
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the simulated silos
    try:
        for r, path in ck.items():
            rec = ckpt.load_checkpoint(path)
            hasher = site.global_model(cfg, features[0].feature_dim)
            hasher.load_state(rec["params"], rec["buffers"])
            for d in features:
                assert rounds[r - 1]["map"][d.name] == pytest.approx(site.evaluate(cfg, d, hasher).map,
                                                                     abs=1e-9), (r, d.name)
    finally:
        torch.set_num_threads(threads)
    assert status["rounds"][-1]["map"] == {k: v["map"] for k, v in status["indexes"].items()}
    # the last checkpoint's state is the model the indexes were built with
    rec = ckpt.load_checkpoint(ck[2])
    params = {k: torch.from_numpy(v) for k, v in rec["params"].items()}
    bufs = {k: torch.from_numpy(v) for k, v in rec["buffers"].items()}
    assert model.version_of(params, bufs, rec["identity"]) == version
    fresh = site.global_model(cfg, features[0].feature_dim)
    assert rec["identity"] == model.identity(fresh, backbone=cfg.backbone, weights_id=features[0].weights_id, size=32)
    assert rec["prototypes"].shape == (10, 16)
    # the final model is written in the one model format: load_model reads it (and the checkpoint) alike
    final, mrec = model.load_model(fed / "model.pt")
    assert mrec["model_version"] == version and mrec["privacy"] == {"unit": "none", "epsilon": math.inf}
    assert model.load_model(ck[2])[1]["model_version"] == version
    d0 = features[0]
    assert np.array_equal(final.encode(d0.inputs, d0.silo.splits.query), hasher.encode(d0.inputs, d0.silo.splits.query))

    # the bytes: only the trainable head travels, never the frozen backbone
    p, b = fresh.state()
    assert set(p) == set(rec["params"]) and not any("backbone" in k for k in p)
    up = _nbytes(p)
    down = up + _nbytes(b) + 10 * 16 * 4  # parameters + BatchNorm buffers + (10 classes x 16 bits) float32 prototypes
    backbone = _backbone_bytes(cfg)
    for r in rounds:
        assert r["bytes_up"] == NUM_SILOS * up, r["round"]
        assert r["bytes_down"] == NUM_SILOS * down, r["round"]
        # the small head at d=1280 is ~0.49x the backbone: shipping the backbone would at least double the bytes
        assert r["bytes_up"] / NUM_SILOS < backbone and r["bytes_down"] / NUM_SILOS < backbone
    print(f"per silo per round: {up} bytes up, {down} down; backbone {backbone} bytes "
          f"({up / backbone:.2f}x); round seconds {[round(r['seconds'], 2) for r in rounds]}; "
          f"simulate {t1 - t0:.1f} s {({k: round(v, 1) for k, v in summary['timings'].items()})}, "
          f"children gone after {t2 - t1:.1f} s; fan-out with a failing and a stalling silo {t_fail:.1f} s")


# --------------------------------------------------------------------------- b. failures and resume


def test_failure_stops_run_then_resume_finishes(cfg, features, tmp_path, monkeypatch):
    from simulations.runner import run_federated

    out = tmp_path / "fed"
    fcfg = cfg.replace(out_dir=str(out), min_train_nodes=3, inject_failures="silo-1@2")
    before = {p.pid for p in _descendants()}
    with pytest.raises(TrainingError) as ei:
        run_federated(fcfg, {}, label="fail", progress=False)
    msg = str(ei.value)
    assert "round 2" in msg and "fewer than min-train-nodes=3" in msg
    first = out / "checkpoints" / "round-0001.pt"
    assert str(first) in msg and "resume" in msg
    assert first.is_file() and not (out / "checkpoints" / "round-0002.pt").exists()
    status = json.loads((out / "federation.json").read_text())
    assert status["status"] == "failed" and "min-train-nodes" in status["error"]
    assert [r["round"] for r in status["rounds"]] == [1]
    fails = status["failures"]
    assert len(fails) == 1 and fails[0]["round"] == 2 and fails[0]["phase"] == "train"
    assert "injected failure of silo-1" in fails[0]["reason"]
    ck1 = first.read_bytes()
    round1 = status["rounds"][0]

    # resume: the failure is gone (the config travels with every message)
    status = run_federated(fcfg.replace(resume=True, inject_failures=""), {}, label="resume", progress=False)
    _assert_no_new_children(before)
    assert status["status"] == "done" and status["failures"] == []
    assert [r["round"] for r in status["rounds"]] == [1, 2]
    # round 1 came from the checkpoint, not retrained; its evaluation (due with round 2's training) was added
    assert "mean_map" not in round1 and {k: status["rounds"][0][k] for k in round1} == round1
    assert set(status["rounds"][0]["map"]) == {"silo-0", "silo-1", "silo-2"}
    assert first.read_bytes() == ck1                            # and its checkpoint was not rewritten
    assert status["rounds"][1]["clients_ok"] == 3 and status["rounds"][1]["model_version"] == status["model_version"]
    rec2 = ckpt.load_checkpoint(out / "checkpoints" / "round-0002.pt")
    assert rec2["round"] == 2 and len(rec2["history"]) == 2 and rec2["model_version"] == status["model_version"]
    assert len(status["indexes"]) == 3


@pytest.mark.slow
def test_failure_tolerated_above_min_train_nodes(cfg, features, tmp_path, monkeypatch):
    from simulations.runner import run_federated

    out = tmp_path / "fed"
    status = run_federated(cfg.replace(out_dir=str(out), min_train_nodes=2, inject_failures="silo-1@2"), {},
                           label="tolerant", progress=False)
    assert status["status"] == "done"
    fails = status["failures"]
    assert [(f["round"], f["phase"]) for f in fails] == [(2, "train")] and "silo-1" in fails[0]["reason"]
    r1, r2 = status["rounds"]
    assert r1["clients_ok"] == 3 and r2["clients_ok"] == 2 and r2["clients_failed"] == 1
    assert sorted(r2["trained"]) == ["silo-0", "silo-2"]
    # the failed silo still took part in the statistics, the evaluation and the index
    assert r2["stats_silos"] == 3 and len(r2["map"]) == 3 and len(status["indexes"]) == 3
    assert (out / "checkpoints" / "round-0002.pt").is_file()


def test_resume_with_other_settings_is_refused(cfg, tmp_path):
    from server.federation import Federation

    out = tmp_path / "fed"
    _, wid, dim = backbones.backbone_for(cfg.backbone, None)
    hasher = site.global_model(cfg, dim)
    ident = model.identity(hasher, backbone=cfg.backbone, weights_id=wid, size=cfg.size)
    path = ckpt.save_checkpoint(out, server_round=1, model=model.record(*hasher.state(), ident), cfg=cfg,
                                prototypes=None, strategy_state={}, silos={"silo-0": "0" * 16},
                                history=[{"round": 1}], ledger={})
    assert path == out / "checkpoints" / "round-0001.pt"
    rec = ckpt.load_checkpoint(path)

    def ident_of(c: Config, weights_id: str = wid) -> dict:
        return model.identity(site.global_model(c, dim), backbone=c.backbone, weights_id=weights_id, size=c.size)

    ckpt.check_resume(rec, cfg, ident_of(cfg), path)  # same settings: fine
    with pytest.raises(ModelVersionError, match=r"bits=16 \(now 32\)"):
        ckpt.check_resume(rec, cfg.replace(bits=32), ident_of(cfg.replace(bits=32)), path)
    with pytest.raises(ModelVersionError, match="size"):
        ckpt.check_resume(rec, cfg.replace(size=48), ident_of(cfg.replace(size=48)), path)
    with pytest.raises(ModelVersionError, match="weights_id"):
        ckpt.check_resume(rec, cfg, ident_of(cfg, "f" * 16), path)
    with pytest.raises(ModelVersionError, match="alpha"):
        ckpt.check_resume(rec, cfg.replace(alpha=1.0), ident_of(cfg), path)
    # the server refuses it before any message is sent (no grid needed to get there)
    with pytest.raises(ModelVersionError, match="bits"):
        Federation(None, cfg.replace(bits=32, out_dir=str(out), resume=True))
    fed = Federation(None, cfg.replace(out_dir=str(out), resume=True))
    assert fed.start_round == 2 and fed.history == [{"round": 1}]


# --------------------------------------------------------------------------- c. strategies


def test_make_strategy_classes(cfg):
    from flwr.serverapp import strategy as fl

    from server.strategies import make_strategy

    want = {"fedavg": fl.FedAvg, "fedavgm": fl.FedAvgM, "fedprox": fl.FedProx, "fedadam": fl.FedAdam, "fedyogi": fl.FedYogi,
            "fedadagrad": fl.FedAdagrad, "fedmedian": fl.FedMedian, "fedtrimmedavg": fl.FedTrimmedAvg, "krum": fl.Krum}
    assert set(want) == set(STRATEGIES)
    for name, cls in want.items():
        s = make_strategy(cfg.replace(strategy=name, min_train_nodes=2))
        assert type(s) is cls, name
        assert s.fraction_evaluate == 0.0 and s.min_train_nodes == 2 and s.fraction_train == 1.0
    c = cfg.replace(proximal_mu=0.3, server_lr=0.05, server_tau=1e-4, trimmed_beta=0.1, krum_malicious=1)
    assert make_strategy(c.replace(strategy="fedprox")).proximal_mu == 0.3
    adam = make_strategy(c.replace(strategy="fedadam"))
    assert adam.eta == 0.05 and adam.tau == 1e-4 and adam.eta_l == cfg.lr
    assert make_strategy(cfg.replace(strategy="fedadam")).eta == 0.1  # server-lr 0: the strategy's default
    avgm = make_strategy(cfg.replace(strategy="fedavgm", server_lr=3.0, server_momentum=0.5))
    assert avgm.server_learning_rate == 3.0 and avgm.server_momentum == 0.5
    assert make_strategy(cfg.replace(strategy="fedavgm")).server_learning_rate == 1.0
    from server.strategies import restore_strategy_state, strategy_state
    avgm.momentum_vector = [np.full((2, 3), 0.5), np.arange(4.0)]
    again = make_strategy(cfg.replace(strategy="fedavgm", server_lr=3.0, server_momentum=0.5))
    restore_strategy_state(again, strategy_state(avgm))  # as --resume restores it from the checkpoint
    assert [a.tolist() for a in again.momentum_vector] == [a.tolist() for a in avgm.momentum_vector]
    assert make_strategy(c.replace(strategy="fedtrimmedavg")).beta == 0.1
    assert make_strategy(c.replace(strategy="krum")).num_malicious_nodes == 1
    with pytest.raises(ConfigError, match="strategy"):
        cfg.replace(strategy="fedsgd")


@pytest.fixture(scope="module")
def one_simulation(cfg, features, cache_dir, tmp_path_factory):
    """ONE Flower simulation (3 SuperNodes) whose ServerApp runs, one after the other on the same silos,
    a 1-round federation per strategy (probe mode, full digits) and then a 1-round LoRA-mode federation
    (the first 300 digits): one Ray start for nine federations."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from server.federation import Federation
    from simulations.console import quiet_flower

    root = tmp_path_factory.mktemp("one-simulation")
    runs = {name: cfg.replace(strategy=name, num_server_rounds=1, out_dir=str(root / name)) for name in STRATEGIES}
    runs["lora"] = FedConfig.from_dict(SCENARIO | {
        "n-images": 300, "mode": "lora", "batch-size": 32, "num-server-rounds": 1, "cache-dir": str(cache_dir),
        "out-dir": str(root / "lora")}, source="test")
    dp_base = SCENARIO | {"supervised": False, "num-server-rounds": 1, "cache-dir": str(cache_dir), "lr": 3e-3}
    runs["dp-sample"] = FedConfig.from_dict(dp_base | {"dp": "sample", "dp-epsilon": 20.0,
                                                       "out-dir": str(root / "dp-sample")}, source="test")
    runs["secagg"] = cfg.replace(secagg=True, num_server_rounds=1, out_dir=str(root / "secagg"))
    runs["secagg-dp-client"] = FedConfig.from_dict(dp_base | {
        "dp": "client", "dp-noise": 1.0, "dp-clip": 0.05, "dp-clipping": "client-fixed", "secagg": True,
        "out-dir": str(root / "secagg-dp-client")}, source="test")
    for clip in ("server-fixed", "client-fixed", "client-adaptive"):
        runs[f"dp-{clip}"] = FedConfig.from_dict(dp_base | {"dp": "client", "dp-noise": 1.0, "dp-clip": 0.05,
                                                            "dp-clipping": clip, "out-dir": str(root / f"dp-{clip}")},
                                                 source="test")
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    during: list[int] = []
    app = ServerApp()

    @app.main()
    def _main(grid, context):
        for name, c in runs.items():
            try:
                fed = Federation(grid, c)
                out = fed.run()
                results[name] = {"out": out, "history": fed.history, "cfg": c,
                                 "params": {k: v.clone() for k, v in fed.params.items()}}
            except Exception as e:  # noqa: BLE001 - reported by the tests, per run
                errors[name] = f"{type(e).__name__}: {e}"
            if not during:  # Ray's processes (GCS, raylet, actors) while the simulation runs
                during.extend(p.pid for p in _descendants())

    before = {p.pid for p in _descendants()}
    t0 = time.perf_counter()
    with quiet_flower(None, False):
        run_simulation(app, client_app, num_supernodes=NUM_SILOS, backend_config=_backend(NUM_SILOS))
    seconds = time.perf_counter() - t0
    _assert_no_new_children(before)
    return {"results": results, "errors": errors, "during": set(during) - before, "seconds": seconds}


def test_every_strategy_in_one_simulation(one_simulation, cfg, features):
    sim = one_simulation
    results = sim["results"]
    assert not {k: v for k, v in sim["errors"].items() if k in STRATEGIES}, sim["errors"]
    assert set(STRATEGIES) <= set(results)
    # the no-children check of the fixture was not vacuous: Ray's processes were our descendants while it ran
    assert sim["during"], "no Ray processes seen while the simulation ran"

    init = site.global_model(cfg, features[0].feature_dim).state()[0]
    for name in STRATEGIES:
        res = results[name]
        (h,) = res["history"]
        assert h["round"] == 1 and h["clients_ok"] == NUM_SILOS and math.isfinite(h["train_loss"])
        assert h["mean_map"] > 0, name
        params = res["params"]
        assert set(params) == set(init)
        assert all(torch.isfinite(v).all() for v in params.values()), name
        # aggregation moved the global model away from its (seeded, identical on every node) start
        assert any(not torch.equal(params[k], init[k]) for k in init), name
        assert sorted(res["out"]["indexes"]) == [f"silo-{i}" for i in range(NUM_SILOS)]
        with retrieval.open_index(Path(res["cfg"].out_dir) / "silos" / "silo-0") as idx:
            assert idx.model_version == res["out"]["model_version"]
        # the checkpoint holds the strategy's global model
        rec = ckpt.load_checkpoint(Path(res["cfg"].out_dir) / "checkpoints" / "round-0001.pt")
        assert all(np.array_equal(rec["params"][k], params[k].numpy()) for k in params)
        assert rec["config"]["strategy"] == name
    # the server optimisers keep their moments for resume
    assert set(ckpt.load_checkpoint(Path(results["fedadam"]["cfg"].out_dir) / "checkpoints" / "round-0001.pt")
               ["strategy_state"]) == {"m_t", "v_t"}
    # different rules, different global models
    w = {n: results[n]["params"]["net.2.weight"] for n in STRATEGIES}
    assert not torch.equal(w["fedavg"], w["fedadam"]) and not torch.equal(w["fedavg"], w["fedmedian"])
    assert not torch.equal(w["fedavg"], w["krum"])
    print(f"\none simulation, 8 strategies + LoRA: {sim['seconds']:.1f} s; mAP "
          + ", ".join(f"{n} {results[n]['history'][0]['mean_map']:.3f}" for n in STRATEGIES))


def test_secure_aggregation_on_the_simulation_engine(one_simulation):
    """secagg = true on Flower's engine: the silos' keys live in their node state between messages (Ray
    actors), and the securely summed round lands where FedAvg's plain one does."""
    assert "secagg" not in one_simulation["errors"], one_simulation["errors"]["secagg"]
    res, plain = one_simulation["results"]["secagg"], one_simulation["results"]["fedavg"]
    (h,) = res["history"]
    assert h["clients_ok"] == NUM_SILOS and h["secagg_silos"] == NUM_SILOS and h["secagg_dropped"] == []
    assert h["stats_secagg_silos"] == NUM_SILOS
    # the same silos, seeds and start: only the fixed point (~1e-7, in the round-0 statistics) and what one
    # round of training makes of it differ. AdamW steps every parameter by about lr whatever its gradient's
    # size, so an entry whose gradient is near 0 can step the other way (measured: up to 2.2e-3, lr is 1e-3)
    for k, v in plain["params"].items():
        assert float((res["params"][k] - v).abs().max()) < 10 * plain["cfg"].lr, k
    assert h["mean_map"] == pytest.approx(plain["history"][0]["mean_map"], abs=0.01)
    # distributed client-level DP on the engine: the silos' noise shares, accounted at z per round
    from server import privacy

    assert "secagg-dp-client" not in one_simulation["errors"], one_simulation["errors"]["secagg-dp-client"]
    res = one_simulation["results"]["secagg-dp-client"]
    (h,) = res["history"]
    assert h["secagg_silos"] == NUM_SILOS  # (the DP head's statistics are the one moments release, round 0)
    priv = json.loads((Path(res["cfg"].out_dir) / "federation.json").read_text())["privacy"]
    assert priv["mechanism"].startswith("distributed") and priv["ledger"]["federation"] == [[1.0, 1.0, 1], [1.0, 1.0, 1]]
    assert priv["epsilon"] == pytest.approx(privacy.client_level_epsilon([(1.0, 1.0, 1)] * 2, 1e-5, NUM_SILOS))


# --------------------------------------------------------------------------- d. LoRA mode


def test_lora_mode_end_to_end(one_simulation):
    assert "lora" not in one_simulation["errors"], one_simulation["errors"]["lora"]
    res = one_simulation["results"]["lora"]
    lcfg = res["cfg"]
    (r,) = res["history"]
    print(f"\nLoRA mode: {r['seconds']:.1f} s per round ({NUM_SILOS} silos, 300 images, 32 px)")
    assert r["clients_ok"] == NUM_SILOS and r["mean_map"] > 0 and math.isfinite(r["train_loss"])

    _, wid, dim = backbones.backbone_for(lcfg.backbone, None)
    p, b = site.global_model(lcfg, dim).state()
    lora = [k for k in p if "lora_A" in k or "lora_B" in k]
    head = [k for k in p if k.startswith("head.")]
    assert any("lora_A" in k for k in p) and any("lora_B" in k for k in p) and head
    assert set(lora) | set(head) == set(p) and set(res["params"]) == set(p)
    assert set(b) == {f"head.net.3.{n}" for n in ("running_mean", "running_var", "num_batches_tracked")}
    assert all(torch.isfinite(v).all() for v in res["params"].values())
    # only the adapters and the head travel
    up = _nbytes(p)
    assert r["bytes_up"] == NUM_SILOS * up
    assert r["bytes_down"] == NUM_SILOS * (up + _nbytes(b) + 10 * 16 * 4)
    backbone = _backbone_bytes(lcfg)
    assert _nbytes({k: p[k] for k in lora}) < backbone / 10  # the adapters are a sliver of the backbone
    assert r["bytes_up"] / NUM_SILOS < backbone
    # training moved the adapters (LoRA B starts at zero)
    assert any(res["params"][k].abs().sum() > 0 for k in lora if "lora_B" in k)
    out = Path(lcfg.out_dir)
    rec = ckpt.load_checkpoint(out / "checkpoints" / "round-0001.pt")
    assert set(rec["params"]) == set(p) and rec["identity"]["kind"] == "lora"
    assert rec["identity"]["lora_r"] == lcfg.lora_r and rec["identity"]["weights_id"] == wid
    assert rec["model_version"] == res["out"]["model_version"]
    for name, info in res["out"]["indexes"].items():
        with retrieval.open_index(out / "silos" / name) as idx:
            assert idx.model_version == res["out"]["model_version"] and len(idx) == info["n"] > 0
    assert sum(info["n"] for info in res["out"]["indexes"].values()) < 300



# --------------------------------------------------------------------------- d2. differential privacy


def test_sample_level_dp_end_to_end(one_simulation, capsys):
    """dp = "sample": Opacus DP-SGD on the DP head in a real Flower run; ε on the server's ledger is Opacus's
    RDP over what the silos recorded, never above the target, and every artifact carries the guarantee."""
    from hashing.privacy import accountant

    assert "dp-sample" not in one_simulation["errors"], one_simulation["errors"]["dp-sample"]
    res = one_simulation["results"]["dp-sample"]
    c = res["cfg"]
    (r,) = res["history"]
    assert r["clients_ok"] == NUM_SILOS and r["mean_map"] > 0.2 and r["bit_balance"] > 0.5
    out = Path(c.out_dir)
    st = json.loads((out / "federation.json").read_text())
    priv = st["privacy"]
    assert priv["unit"].startswith("sample") and priv["delta"] == c.dp_delta
    assert sorted(priv["epsilon_per_silo"]) == [f"silo-{i}" for i in range(NUM_SILOS)]
    for name, hist in priv["ledger"].items():
        # the moments release, then the DP-SGD steps Opacus took in the one round
        assert hist[0][1] == 1.0 and hist[0][2] == 1 and len(hist) == 2
        eps = accountant.epsilon(hist, c.dp_delta)
        assert priv["epsilon_per_silo"][name] == pytest.approx(eps)
        # one round of a run planned for one round: the whole target is spent, not more
        assert 0.95 * c.dp_epsilon <= eps <= c.dp_epsilon * 1.001
    assert r["epsilon"] == pytest.approx(max(priv["epsilon_per_silo"].values()))
    # only the rotation is trained and exchanged; the frozen projection is a server-set global
    assert set(res["params"]) == {"net.1.weight"}
    rec = ckpt.load_checkpoint(out / "checkpoints" / "round-0001.pt")
    assert rec["privacy"]["epsilon"] == pytest.approx(priv["epsilon"])
    assert set(rec["buffers"]) == {"net.0.center", "net.0.basis", "net.0.basis_cov", "net.2.running_mean",
                                   "net.2.running_var"} and rec["prototypes"] is None
    idx = SiloIndex.load(next((out / "silos" / "silo-0" / "faiss").glob("*.faiss")))
    assert idx.privacy["unit"].startswith("sample") and idx.privacy["epsilon"] == pytest.approx(priv["epsilon"])
    assert main(["eval", "--run", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"ε = {priv['epsilon']:.3f} at δ = 1e-05" in printed and "silo-2 ε=" in printed


@pytest.mark.parametrize("clip", ["server-fixed", "client-fixed", "client-adaptive"])
def test_client_level_dp_end_to_end(one_simulation, clip):
    """dp = "client": Flower's wrappers clip and noise the silos' updates; ε per federation from the rounds."""
    from server import privacy

    key = f"dp-{clip}"
    assert key not in one_simulation["errors"], one_simulation["errors"][key]
    res = one_simulation["results"][key]
    c = res["cfg"]
    (r,) = res["history"]
    assert r["clients_ok"] == NUM_SILOS and math.isfinite(r["train_loss"])
    st = json.loads((Path(c.out_dir) / "federation.json").read_text())
    priv = st["privacy"]
    assert priv["unit"].startswith("client") and priv["clipping"] == clip
    hist = priv["ledger"]["federation"]
    assert len(hist) == 2  # the moments release, one round
    assert priv["epsilon"] == pytest.approx(privacy.client_level_epsilon(hist, c.dp_delta, NUM_SILOS))
    assert priv["epsilon"] > 5  # one silo is the unit: noise 1 over 3 silos, one round, is already a weak guarantee


# --------------------------------------------------------------------------- e. bad input, no Ray


def _simulate_err(tmp_path, capsys, values: dict) -> tuple[int, str, Path]:
    scn = _write_scenario(tmp_path / "bad.toml", values)
    rc = main(["simulate", str(scn), "--runs-dir", str(tmp_path / "runs")])
    return rc, capsys.readouterr().err, scn


def test_bad_scenarios_exit_2_naming_the_problem(tmp_path, capsys, cache_dir):
    base = {"name": "bad", **SCENARIO, "cache-dir": str(cache_dir)}
    rc, err, scn = _simulate_err(tmp_path, capsys, base | {"num-silo": 3})
    assert rc == 2 and "num-silo" in err and str(scn) in err and "fedhash: error" in err

    scn.write_text('name = "bad"\nbits = 16\nnum-silos = = 3\n')
    rc = main(["simulate", str(scn), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and str(scn) in err and "TOML" in err

    rc, err, _ = _simulate_err(tmp_path, capsys, base | {"bits": 12})
    assert rc == 2 and "'bits'" in err and "12" in err and "multiple of 8" in err

    rc, err, _ = _simulate_err(tmp_path, capsys, base | {"bits": "sixteen"})
    assert rc == 2 and "'bits'" in err and "int" in err

    rc, err, _ = _simulate_err(tmp_path, capsys, base | {"references": ["local-only", "oracle"]})
    assert rc == 2 and "references" in err

    rc, err, _ = _simulate_err(tmp_path, capsys, base | {"unsupervised-alpha": 1.0})
    assert rc == 2 and "'unsupervised-alpha'" in err and "share the silos" in err
    rc, err, _ = _simulate_err(tmp_path, capsys, base | {"unsupervised-server-lr": "fast"})
    assert rc == 2 and "'unsupervised-server-lr'" in err and "float" in err

    rc, err, _ = _simulate_err(tmp_path, capsys, base | {"num-silos": 50, "n-images": 100})
    assert rc == 2 and "silo-49" in err and "100" in err

    rc = main(["simulate", str(tmp_path / "nope.toml"), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope" in err and "demo" in err

    _write_scenario(scn, base)
    rc = main(["simulate", str(scn), "--set", "bits=20", "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "bits" in err
    # nothing heavy ran: no Ray, no silo indexes
    assert not list(tmp_path.rglob("*.faiss")) and not list(tmp_path.rglob("catalogue.sqlite"))


def test_resolve_and_demo_scenario():
    from simulations.cli import build_parser
    from simulations.scenario import SCENARIO_DIR, load_scenario, resolve

    with pytest.raises(ConfigError) as ei:
        resolve("nope")
    shipped = sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
    assert "demo" in shipped and all(n in str(ei.value) for n in shipped) and "nope" in str(ei.value)
    assert resolve("demo") == SCENARIO_DIR / "demo.toml"
    args = build_parser().parse_args(["demo", "--set", "num-server-rounds=1"])
    assert args.scenario == "demo" and args.resume is None
    scn = load_scenario("demo", overrides={"num-server-rounds": 1})
    assert scn.cfg.num_server_rounds == 1 and scn.cfg.num_silos == 5 and scn.cfg.bits == 64 and scn.also_unsupervised
    # both modes: FedAvg, local batches renormalised against the pooled statistics
    sup, unsup = scn.config_for(True), scn.config_for(False)
    assert (sup.strategy, sup.supervised, sup.batch_renorm) == ("fedavg", True, True)
    assert (unsup.strategy, unsup.supervised, unsup.batch_renorm) == ("fedavg", False, True)
    # per-mode knobs (unsupervised-<key>) reach one mode only
    scn = load_scenario("demo", overrides={"num-server-rounds": 1, "unsupervised-strategy": "fedavgm",
                                           "unsupervised-server-lr": 3.0})
    sup, unsup = scn.config_for(True), scn.config_for(False)
    assert (sup.strategy, sup.supervised) == ("fedavg", True)
    assert (unsup.strategy, unsup.server_lr, unsup.supervised, unsup.num_server_rounds) == ("fedavgm", 3.0, False, 1)
    assert {k: v for k, v in unsup.to_dict().items() if k not in ("strategy", "server-lr", "supervised")} == \
        {k: v for k, v in sup.to_dict().items() if k not in ("strategy", "server-lr", "supervised")}
