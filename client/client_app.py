"""The fedhash ClientApp: one silo's side of every round, on Flower's Message API.

- ``train``: load the global state; when the config says ``evaluate``, score it first
  (the previous round's global model: mAP@1000 of the query split against the silo's
  own database); run the local epochs of CroVCA; reply with the trainable state and
  metrics (loss, examples, bit balance, seconds, bytes, and the evaluation).
- ``query.stats``: count / sum / sum of squares of the head's pre-BatchNorm
  activations and per-class sums of the clean training images under the new global
  model (exact pooled BatchNorm statistics and global prototypes on the server).
- ``evaluate``: the same evaluation alone, for silos a round did not sample.
- ``query.index``: encode the database with the global function, save the silo's
  SiloIndex stamped with the model version, and evaluate the final model.

The silo's data comes from the node config: ``partition-id`` in simulation,
``data`` (a folder or manifest) and ``silo`` at a real site.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hashing import fedmodel
from hashing.backbones import weights_fingerprint
from hashing.errors import FedhashError
from hashing.fedconfig import FedConfig

from . import task
from .dp_mods import train_clipping_mod

app = ClientApp()


_warm = False


def _warm_up() -> None:
    """Once per process: one AdamW step on a dummy parameter. torch's optimizers import
    torch._dynamo (and sympy) on their first step, ~2 s; paid here, it lands in the engine's
    start-up (the first message a node gets is the round-0 statistics) instead of round 1."""
    global _warm
    if not _warm:
        p = torch.nn.Parameter(torch.zeros(1))
        p.grad = torch.zeros(1)
        torch.optim.AdamW([p]).step()
        _warm = True


def _setup(msg: Message, context: Context):
    threads = os.environ.get("FEDHASH_CLIENT_THREADS")  # set by fedhash simulate: one core per simulated silo
    if threads and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))
    _warm_up()
    cfg = FedConfig.from_json(str(msg.content["config"]["fedconfig"]))
    node = context.node_config
    if "cache-dir" in node:
        cfg = dataclasses.replace(cfg, cache_dir=str(node["cache-dir"]))
    data = task.silo_data(cfg, node)
    task.check_silo(data)
    model = task.fresh_model(cfg, data.feature_dim)
    params = msg.content["arrays"].to_torch_state_dict()
    glob = msg.content["globals"].to_torch_state_dict() if "globals" in msg.content.array_records else {}
    fedmodel.load_state(model, params, glob)
    down = fedmodel.state_nbytes(params) + fedmodel.state_nbytes(glob)
    protos = glob.get(fedmodel.PROTOTYPES)
    return cfg, data, model, None if protos is None else protos.numpy(), down, weights_fingerprint(params)


def _silo_record(data) -> ConfigRecord:
    return ConfigRecord({"name": data.name, "ids": data.silo.ids_fingerprint(), "domain": data.silo.domain})


def _maybe_fail(data, server_round: int) -> None:
    """Fault injection for tests: FEDHASH_FAIL="<silo name>@<round>[,...]" makes that silo raise."""
    for item in os.environ.get("FEDHASH_FAIL", "").split(","):
        if "@" in item:
            name, rnd = item.rsplit("@", 1)
            if name == data.name and int(rnd) == server_round:
                raise RuntimeError(f"injected failure of {data.name} in round {server_round} (FEDHASH_FAIL)")


def _report_releases(metrics: MetricRecord, history, planned_epsilon: float) -> None:
    """Sample-level DP: the (noise multiplier, sample rate, steps) of the mechanisms this message ran on
    the silo's data, as metric lists the server's ledger reads (Federation._record_releases)."""
    metrics["dp-noise"] = [float(h[0]) for h in history]
    metrics["dp-sample-rate"] = [float(h[1]) for h in history]
    metrics["dp-steps"] = [int(h[2]) for h in history]
    metrics["dp-epsilon-planned"] = float(planned_epsilon)


@app.train(mods=[train_clipping_mod])  # client-level DP with client-side clipping; a no-op otherwise
def train(msg: Message, context: Context) -> Message:
    cfg, data, model, prototypes, down, digest = _setup(msg, context)
    rnd = int(msg.content["config"]["server-round"])
    _maybe_fail(data, rnd)
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    t0 = time.perf_counter()
    ev = task.local_evaluate(cfg, data, model, digest) if bool(msg.content["config"].get("evaluate", False)) else None
    m = task.local_train(cfg, data, model, rnd, prototypes=prototypes, prox_mu=mu)
    params, _ = fedmodel.split_state(model)
    up = fedmodel.state_nbytes(params)
    metrics = MetricRecord({"num-examples": int(len(data.silo.splits.train)), "train-loss": m["train-loss"],
                            "bit-balance": m["bit-balance"], "seconds": time.perf_counter() - t0,
                            "bytes-down": down, "bytes-up": up})
    if ev is not None:
        metrics["map"], metrics["eval-bit-balance"] = ev["map"], ev["bit-balance"]
    if "dp-history" in m:  # sample-level DP: Opacus's record of this round's steps, for the server's ledger
        _report_releases(metrics, m["dp-history"], m["dp-epsilon-planned"])
    return Message(RecordDict({"arrays": ArrayRecord(params), "metrics": metrics, "silo": _silo_record(data)}),
                   reply_to=msg)


@app.query("stats")
def stats(msg: Message, context: Context) -> Message:
    cfg, data, model, _, down, digest = _setup(msg, context)
    plan = None
    if cfg.dp != "none":  # the DP head's one release of feature moments (round 0), not activation statistics
        moments, plan = task.release_moments(cfg, data)
        s = {k: torch.from_numpy(v) for k, v in moments.items()}
    else:
        s = {k: torch.from_numpy(v) for k, v in task.local_stats(cfg, data, model, digest).items()}
    metrics = MetricRecord({"num-examples": int(len(data.silo.splits.train)), "bytes-down": down,
                            "bytes-up": fedmodel.state_nbytes(s)})
    if plan is not None:
        _report_releases(metrics, [(plan.moments_noise, 1.0, 1)], plan.epsilon)
    return Message(RecordDict({"stats": ArrayRecord(s), "metrics": metrics, "silo": _silo_record(data)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, data, model, _, _, digest = _setup(msg, context)
    m = task.local_evaluate(cfg, data, model, digest)
    metrics = MetricRecord({"num-examples": m["n-query"], "map": m["map"], "bit-balance": m["bit-balance"],
                            "n-db": m["n-db"]})
    return Message(RecordDict({"metrics": metrics, "silo": _silo_record(data)}), reply_to=msg)


@app.query("index")
def index(msg: Message, context: Context) -> Message:
    cfg, data, model, _, _, digest = _setup(msg, context)
    version = str(msg.content["config"]["model-version"])
    out = task.node_out_dir(cfg, context.node_config)
    try:
        privacy = json.loads(str(msg.content["config"].get("privacy", '{"unit": "none"}')))
        path, n = task.build_index(cfg, data, model, version, out, privacy)
    except OSError as e:
        raise FedhashError(f"silo {data.name}: cannot write its index under {out} ({e}); "
                           "set the node's out-dir to a writable folder") from e
    ev = task.local_evaluate(cfg, data, model, digest)
    rec = _silo_record(data)
    rec["index"] = str(path)
    metrics = MetricRecord({"num-examples": n, "map": ev["map"], "bit-balance": ev["bit-balance"]})
    return Message(RecordDict({"metrics": metrics, "silo": rec}), reply_to=msg)
