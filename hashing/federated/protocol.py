"""The fedhash message protocol: every message type, record key and metric key that travels between
the server and a silo, and the functions that pack and unpack them. Flower-free, so both sides import
it; they wrap what these functions return in Flower records (``ArrayRecord``, ``MetricRecord``,
``ConfigRecord``) and hand Flower's records back to them (records are mappings).

A round, by message type (server -> every silo -> server):

``train``          down: ARRAYS (the global parameters), GLOBALS (server-set buffers, prototypes), CONFIG
                   up:   ARRAYS (the silo's parameters), METRICS (:func:`train_metrics`), SILO
``query.stats``    down: ARRAYS, GLOBALS, CONFIG;  up: STATS (activation sums, :mod:`.pooling`), METRICS, SILO
``query.moments``  down: CONFIG (round 0 under DP); up: MOMENTS (the released feature moments), METRICS, SILO
``evaluate``       down: ARRAYS, GLOBALS, CONFIG;  up: METRICS (:func:`evaluation`), SILO
``query.index``    down: ARRAYS, GLOBALS, CONFIG (with the model version and the privacy guarantee)
                   up:   METRICS (the final model's evaluation), SILO (with the index's path)
"""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# --------------------------------------------------------------------------- message types

MSG_TRAIN = "train"             # Flower's MessageType.TRAIN
MSG_EVALUATE = "evaluate"       # Flower's MessageType.EVALUATE
MSG_STATS = "query.stats"
MSG_MOMENTS = "query.moments"
MSG_INDEX = "query.index"


def query_action(message_type: str) -> str:
    """The action a ClientApp registers a query message type under (``@app.query(...)``)."""
    kind, _, action = message_type.partition(".")
    if kind != "query" or not action:
        raise ValueError(f"{message_type!r} is not a query message type")
    return action


# --------------------------------------------------------------------------- record keys

ARRAYS = "arrays"     # the trainable parameters (Flower strategies' default ArrayRecord key)
GLOBALS = "globals"   # buffers the server sets (pooled BatchNorm statistics, the DP projection) and prototypes
CONFIG = "config"     # the round's configuration (Flower strategies' default ConfigRecord key)
METRICS = "metrics"   # the silo's report
SILO = "silo"         # who the silo is (name, content-ids fingerprint, domain, index folder)
STATS = "stats"       # activation sums for the pooled statistics
MOMENTS = "moments"   # released feature moments

PROTOTYPES = "prototypes"  # the global class prototypes, an entry of GLOBALS (never part of the hash function)

# config keys
FEDCONFIG = "fedconfig"
SERVER_ROUND = "server-round"
EVALUATE_PREVIOUS = "evaluate"
MODEL_VERSION = "model-version"
PRIVACY = "privacy"
PROXIMAL_MU = "proximal-mu"   # set by Flower's FedProx strategy in the train config

# metric keys
NUM_EXAMPLES = "num-examples"  # Flower strategies' default weighting key
TRAIN_LOSS = "train-loss"
BIT_BALANCE = "bit-balance"
SECONDS = "seconds"
BYTES_DOWN = "bytes-down"
BYTES_UP = "bytes-up"
MAP = "map"
EVAL_BIT_BALANCE = "eval-bit-balance"
N_DB = "n-db"
DP_NOISE = "dp-noise"
DP_SAMPLE_RATE = "dp-sample-rate"
DP_STEPS = "dp-steps"
DP_EPSILON_PLANNED = "dp-epsilon-planned"
UNIT_WEIGHT = "dp-unit-weight"  # client-level DP: every reply weighs 1, so FedAvg averages the updates equally

# silo record keys
SILO_NAME, SILO_IDS, SILO_DOMAIN, SILO_INDEX = "name", "ids", "domain", "index"


# --------------------------------------------------------------------------- server -> silo


@dataclass(frozen=True)
class RoundConfig:
    """What a silo reads of a message's CONFIG record."""

    fedconfig: str           # the run's Config as JSON (hashing.config.Config.from_json)
    server_round: int
    evaluate: bool = False   # train: score the received model first (the previous round's global model)
    proximal_mu: float = 0.0
    model_version: str = ""  # index: the version to stamp the index with
    privacy: dict | None = None  # index: the guarantee the function was trained under


def round_config(fedconfig: str, server_round: int, *, evaluate: bool | None = None, model_version: str | None = None,
                 privacy: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The CONFIG record's content (a strategy may add its own keys to it, e.g. FedProx's ``proximal-mu``)."""
    out: dict[str, Any] = {FEDCONFIG: fedconfig, SERVER_ROUND: int(server_round)}
    if evaluate is not None:
        out[EVALUATE_PREVIOUS] = bool(evaluate)
    if model_version is not None:
        out[MODEL_VERSION] = str(model_version)
    if privacy is not None:
        out[PRIVACY] = json.dumps(dict(privacy))
    return out


def read_round_config(rec: Mapping[str, Any]) -> RoundConfig:
    try:
        return RoundConfig(fedconfig=str(rec[FEDCONFIG]), server_round=int(rec[SERVER_ROUND]),
                           evaluate=bool(rec.get(EVALUATE_PREVIOUS, False)),
                           proximal_mu=float(rec.get(PROXIMAL_MU, 0.0)),
                           model_version=str(rec.get(MODEL_VERSION, "")),
                           privacy=json.loads(str(rec[PRIVACY])) if PRIVACY in rec else None)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"the message's {CONFIG!r} record lacks or garbles {e}; server and silo must run the "
                         "same fedhash") from None


def globals_state(buffers: Mapping[str, Any], prototypes: Any | None) -> "OrderedDict[str, Any]":
    """The GLOBALS record's arrays: the server-set buffers and, once pooled, the global prototypes."""
    out = OrderedDict(buffers)
    if prototypes is not None:
        out[PROTOTYPES] = prototypes
    return out


def split_globals(state: Mapping[str, Any]) -> tuple["OrderedDict[str, Any]", Any | None]:
    """(server-set buffers, prototypes or None) of a GLOBALS record's arrays."""
    return OrderedDict((k, v) for k, v in state.items() if k != PROTOTYPES), state.get(PROTOTYPES)


# --------------------------------------------------------------------------- silo -> server


def silo_info(name: str, ids: str, domain: str, index: str | None = None) -> dict[str, str]:
    """The SILO record: who answered (never what its images hold; ``ids`` is the fingerprint of its images'
    content ids, :meth:`hashing.silos.Silo.content_fingerprint`)."""
    out = {SILO_NAME: name, SILO_IDS: ids, SILO_DOMAIN: domain}
    if index is not None:
        out[SILO_INDEX] = str(index)
    return out


def read_silo(rec: Mapping[str, Any] | None, node_id: int) -> dict[str, str]:
    if rec is None:
        return {SILO_NAME: f"node-{node_id}"}
    return {k: str(v) for k, v in rec.items()}


def train_metrics(*, num_examples: int, loss: float, bit_balance: float, seconds: float, bytes_down: int,
                  bytes_up: int, evaluation: tuple[float, float] | None = None) -> dict[str, Any]:
    """A train reply's METRICS; ``evaluation`` (mAP, bit balance of the received model) rides along."""
    out = {NUM_EXAMPLES: int(num_examples), TRAIN_LOSS: float(loss), BIT_BALANCE: float(bit_balance),
           SECONDS: float(seconds), BYTES_DOWN: int(bytes_down), BYTES_UP: int(bytes_up)}
    if evaluation is not None:
        out[MAP], out[EVAL_BIT_BALANCE] = float(evaluation[0]), float(evaluation[1])
    return out


@dataclass(frozen=True)
class TrainReport:
    num_examples: int
    loss: float
    bit_balance: float
    seconds: float
    bytes_down: int
    bytes_up: int
    evaluation: tuple[float, float] | None  # (mAP, bit balance) of the model the silo received


def read_train_metrics(m: Mapping[str, Any]) -> TrainReport:
    ev = (float(m[MAP]), float(m[EVAL_BIT_BALANCE])) if MAP in m else None
    return TrainReport(int(m[NUM_EXAMPLES]), float(m[TRAIN_LOSS]), float(m[BIT_BALANCE]), float(m[SECONDS]),
                       int(m[BYTES_DOWN]), int(m[BYTES_UP]), ev)


def evaluation(map_: float, bit_balance: float, *, num_examples: int, n_db: int | None = None) -> dict[str, Any]:
    """An evaluate or index reply's METRICS: the model's mAP@1000 and bit balance on the silo's own data."""
    out = {NUM_EXAMPLES: int(num_examples), MAP: float(map_), BIT_BALANCE: float(bit_balance)}
    if n_db is not None:
        out[N_DB] = int(n_db)
    return out


def read_evaluation(m: Mapping[str, Any]) -> tuple[float, float]:
    """(mAP, bit balance) of an evaluate or index reply."""
    return float(m[MAP]), float(m[BIT_BALANCE])


def transfer_metrics(*, num_examples: int, bytes_down: int, bytes_up: int) -> dict[str, Any]:
    """A statistics or moments reply's METRICS."""
    return {NUM_EXAMPLES: int(num_examples), BYTES_DOWN: int(bytes_down), BYTES_UP: int(bytes_up)}


def releases(history: Sequence[Sequence[float]], planned_epsilon: float) -> dict[str, Any]:
    """Sample-level DP: the (noise multiplier, sample rate, steps) of every mechanism a message ran on
    the silo's data, as metric lists the server's privacy ledger reads."""
    return {DP_NOISE: [float(h[0]) for h in history], DP_SAMPLE_RATE: [float(h[1]) for h in history],
            DP_STEPS: [int(h[2]) for h in history], DP_EPSILON_PLANNED: float(planned_epsilon)}


def read_releases(m: Mapping[str, Any]) -> list[list[float]] | None:
    """The releases a reply reports, or None when it reports none."""
    if DP_NOISE not in m:
        return None
    return [[float(a), float(b), int(c)] for a, b, c in zip(m[DP_NOISE], m[DP_SAMPLE_RATE], m[DP_STEPS])]
