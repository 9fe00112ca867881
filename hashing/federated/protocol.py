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

Under secure aggregation (``secagg = true``; server/secagg.py, client/secagg.py) the train, statistics and
moments messages also carry SECAGG (the sum's label, its silos' mask keys), and each reply carries MASKED
and SECAGG (its layout) instead of ARRAYS, STATS or MOMENTS; before them, once per key set:

``query.secagg_keys``    down: SECAGG (nonce, silos, threshold);  up: SECAGG (the silo's two public keys)
``query.secagg_shares``  down: SECAGG (every keyed silo's public keys);  up: SECAGG (sealed shares of its mask key)
``query.secagg_unmask``  down: SECAGG (label, dropped silos, the shares sealed for this silo)
                         up:   SECAGG (the silo's self-mask seed, its shares of the dropped silos' keys)

Search across silos (any time after the index phase; ``hashing.federated.search``):

``query.search``   down: QUERIES (packed query codes), CONFIG (:func:`search_config`: k, the codes' model version)
                   up:   HITS (the silo's top-k: content ids, Hamming distances), SHARED (only what the site's
                         node config shares: labels), METRICS (n-db, seconds), SILO
"""
from __future__ import annotations

import base64
import binascii
import json
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# --------------------------------------------------------------------------- message types

MSG_TRAIN = "train"             # Flower's MessageType.TRAIN
MSG_EVALUATE = "evaluate"       # Flower's MessageType.EVALUATE
MSG_STATS = "query.stats"
MSG_MOMENTS = "query.moments"
MSG_INDEX = "query.index"
MSG_SEARCH = "query.search"
# secure aggregation (secagg = true; hashing.federated.secagg): key setup once, an unmasking after every sum
MSG_SECAGG_KEYS = "query.secagg_keys"
MSG_SECAGG_SHARES = "query.secagg_shares"
MSG_SECAGG_UNMASK = "query.secagg_unmask"

# The words of a site's refusal to work below its own privacy floor (node config require-dp / max-epsilon):
# the server stops the run when a reply's error carries them, whatever min-train-nodes allows.
PRIVACY_FLOOR = "privacy floor"


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
QUERIES = "queries"   # search: the packed query codes
HITS = "hits"         # search: a silo's top-k (content ids, distances)
SHARED = "shared"     # search: what a silo's node config lets it share beyond ids and distances
SECAGG = "secagg"     # secure aggregation: the sum's label, its silos and their keys (down); the masked layout (up)
MASKED = "masked"     # secure aggregation: a silo's masked vectors (Y32, Y64), in place of ARRAYS, STATS or MOMENTS

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

# SECAGG record keys (hashing.federated.secagg; server/secagg.py and client/secagg.py speak them)
SA_NONCE, SA_IDS, SA_THRESHOLD = "nonce", "ids", "threshold"       # the run's key set
SA_C_PK, SA_S_PK, SA_C_PKS, SA_S_PKS = "c-pk", "s-pk", "c-pks", "s-pks"  # public keys (one silo's; a table)
SA_SEALED = "sealed"            # encrypted secret shares, one per keyed silo in SA_IDS order
SA_LABEL, SA_RANGE = "label", "range"  # which sum; the bound on a weighted update's entries
SA_SCALE = "scale"              # train: a silo weighs its update by num-examples / scale
SA_DROPPED, SA_SEED, SA_SHARES = "dropped", "seed", "shares"  # unmasking
SA_LAYOUT32, SA_LAYOUT64 = "layout32", "layout64"
Y32, Y64 = "y32", "y64"
SA_WEIGHT = "weight"            # the entry of the 64-bit vector a train reply's weight travels in

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


# --------------------------------------------------------------------------- search across silos

SEARCH_K = "k"
SEARCH_CODES, SEARCH_IDS, SEARCH_DISTANCES, SEARCH_LABELS = "codes", "ids", "distances", "labels"
MAX_SEARCH_QUERIES = 10_000   # a search message's query codes at most
MAX_SEARCH_K = 10_000         # hits per query a silo returns at most
SHAREABLE = ("labels",)       # what a site's node config may share beyond ids and distances


@dataclass(frozen=True)
class SearchRequest:
    codes: Any              # uint8 (n, bits/8)
    k: int
    model_version: str
    fedconfig: str = ""     # simulation only: the run's config (which silo a partition is, where its index is)


def search_config(k: int, model_version: str, fedconfig: str | None = None) -> dict[str, Any]:
    """A search message's CONFIG record."""
    out: dict[str, Any] = {SEARCH_K: int(k), MODEL_VERSION: str(model_version)}
    if fedconfig:
        out[FEDCONFIG] = fedconfig
    return out


def check_search(codes: Any, k: Any, model_version: Any) -> tuple[Any, int, str]:
    """(codes, k, model version) of a search, or ValueError naming what is wrong with it."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] == 0:
        raise ValueError(f"the query codes are {codes.dtype} {codes.shape}; a search carries packed codes, uint8 "
                         "(queries, bits/8)")
    if not 1 <= codes.shape[0] <= MAX_SEARCH_QUERIES:
        raise ValueError(f"a search carries 1 to {MAX_SEARCH_QUERIES} query codes, got {codes.shape[0]}; "
                         "split the batch")
    if isinstance(k, bool) or not isinstance(k, (int, float, np.integer)) or float(k) != int(k):
        raise ValueError(f"k is {k!r}; give a whole number of hits per query")
    k = int(k)
    if not 1 <= k <= MAX_SEARCH_K:
        raise ValueError(f"k is {k}; a silo returns 1 to {MAX_SEARCH_K} hits per query")
    if not str(model_version or ""):
        raise ValueError("the search names no model version; codes from different hash functions must never meet")
    return codes, k, str(model_version)


def _numpy(v: Any) -> np.ndarray:
    """An array of a record (Flower's ``Array`` has ``.numpy()``) or any array-like, as numpy."""
    return v.numpy() if hasattr(v, "numpy") else np.asarray(v)


def read_search_request(arrays: Mapping[str, Any], config: Mapping[str, Any]) -> SearchRequest:
    """A search message as a silo reads it (``arrays``: the QUERIES record)."""
    try:
        codes, k, version = check_search(_numpy(arrays[SEARCH_CODES]), config[SEARCH_K], config[MODEL_VERSION])
    except KeyError as e:
        raise ValueError(f"the search message lacks {e}; server and silo must run the same fedhash") from None
    return SearchRequest(codes, k, version, str(config.get(FEDCONFIG, "")))


def search_reply(ids: Any, distances: Any, labels: Sequence[Sequence[str]] | None = None
                 ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(HITS arrays, SHARED config or None) of a silo's reply; labels, when shared, as ';'-joined names per hit,
    row-major."""
    hits = {SEARCH_IDS: np.ascontiguousarray(ids, dtype=np.int64),
            SEARCH_DISTANCES: np.ascontiguousarray(distances, dtype=np.int32)}
    shared = None if labels is None else {SEARCH_LABELS: [str(x) for row in labels for x in row]}
    return hits, shared


def read_search_reply(hits: Mapping[str, Any], shared: Mapping[str, Any] | None, n: int, k: int
                      ) -> tuple[Any, Any, list[list[str]] | None]:
    """(ids int64 (n, k), distances int32 (n, k), labels or None) of a silo's reply, checked against the request."""
    try:
        ids, dist = _numpy(hits[SEARCH_IDS]), _numpy(hits[SEARCH_DISTANCES])
    except KeyError as e:
        raise ValueError(f"the silo's reply lacks {e}") from None
    if ids.shape != (n, k) or dist.shape != (n, k) or ids.dtype != np.int64 or dist.dtype != np.int32:
        raise ValueError(f"the silo's reply holds ids {ids.dtype} {ids.shape} and distances {dist.dtype} {dist.shape}; "
                         f"expected int64 and int32 ({n}, {k})")
    labels = None
    if shared is not None and SEARCH_LABELS in shared:
        flat = [str(x) for x in shared[SEARCH_LABELS]]
        if len(flat) != n * k:
            raise ValueError(f"the silo's reply shares {len(flat)} labels for {n * k} hits")
        labels = [flat[i * k:(i + 1) * k] for i in range(n)]
    return ids, dist, labels


# A search run (``flwr run --run-config``): the [tool.flwr.app.config.search] table of pyproject.toml.
# Non-empty codes make the ServerApp fan them out to every silo instead of training.
SEARCH_JOB_PREFIX = "search."
JOB_CODES, JOB_BITS, JOB_K, JOB_VERSION = "search.codes", "search.bits", "search.k", "search.model-version"
JOB_REPEAT = "search.repeat"
JOB_DEFAULTS = {JOB_CODES: "", JOB_BITS: 0, JOB_K: 10, JOB_VERSION: "", JOB_REPEAT: 1}


@dataclass(frozen=True)
class SearchJob:
    request: SearchRequest
    repeat: int = 1  # fan the batch out this many times (latency measurements); the answer is the last one's


def search_job(codes: Any, k: int, model_version: str, repeat: int = 1) -> dict[str, Any]:
    """The run-config overrides of a search run (codes as base64, so they travel in a TOML string)."""
    codes, k, model_version = check_search(codes, k, model_version)
    return {JOB_CODES: base64.b64encode(np.ascontiguousarray(codes).tobytes()).decode(),
            JOB_BITS: int(codes.shape[1] * 8), JOB_K: k, JOB_VERSION: model_version, JOB_REPEAT: int(repeat)}


def split_search_job(run_config: Mapping[str, Any]) -> tuple[SearchJob | None, dict[str, Any]]:
    """(the search the run config asks for, or None; the rest of the run config, for Config)."""
    rest = {k: v for k, v in run_config.items() if not str(k).startswith(SEARCH_JOB_PREFIX)}
    blob = str(run_config.get(JOB_CODES, "") or "")
    if not blob:
        return None, rest
    bits = int(run_config.get(JOB_BITS, 0) or 0)
    if bits <= 0 or bits % 8:
        raise ValueError(f"run config {JOB_BITS} is {bits}; give the code length of the search's codes")
    try:
        raw = np.frombuffer(base64.b64decode(blob, validate=True), np.uint8)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"run config {JOB_CODES} is not base64 ({e}); fedhash search writes it") from None
    if raw.size % (bits // 8):
        raise ValueError(f"run config {JOB_CODES} holds {raw.size} bytes, not whole {bits}-bit codes")
    codes, k, version = check_search(raw.reshape(-1, bits // 8), run_config.get(JOB_K, 10),
                                     run_config.get(JOB_VERSION, ""))
    repeat = run_config.get(JOB_REPEAT, 1)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= 1000:
        raise ValueError(f"run config {JOB_REPEAT} is {repeat!r}; give a whole number from 1 to 1000")
    return SearchJob(SearchRequest(codes, k, version), repeat), rest


# --------------------------------------------------------------------------- records in a run's log

STATUS_MARK = "fedhash-status:"  # a federated run's progress, one line per phase (fedhash status --federation)


def log_line(mark: str, record: Mapping[str, Any]) -> str:
    """A JSON record as one log line (zlib + base64 after ``mark``): what a ServerApp hands to ``flwr log``."""
    blob = base64.b64encode(zlib.compress(json.dumps(record, separators=(",", ":")).encode(), 9)).decode()
    return mark + blob


def read_log_line(log_text: str, mark: str) -> dict[str, Any] | None:
    """The last record under ``mark`` in a run's log, or None when the log holds none."""
    found = None
    for line in log_text.splitlines():
        i = line.find(mark)
        if i >= 0:
            words = line[i + len(mark):].split()
            try:
                found = json.loads(zlib.decompress(base64.b64decode(words[0] if words else "")))
            except (ValueError, zlib.error):
                continue
    return found


# --------------------------------------------------------------------------- records packed for the wire

PACKED = "packed"  # the one array of an ArrayRecord packed for the wire


def pack_arrays(arrays: Mapping[str, Any]) -> np.ndarray:
    """Every array of a record in one uint8 array: an 8-byte length, a JSON layout (names, dtypes, shapes),
    then each array's bytes. Flower carries each array as objects of its own, one HTTPS request each; a
    record of a dozen arrays then costs a dozen round trips on every hop. Lossless: :func:`unpack_arrays`."""
    arrs = OrderedDict((str(k), np.asarray(v)) for k, v in arrays.items())
    head = json.dumps([[k, a.dtype.str, list(a.shape)] for k, a in arrs.items()]).encode()
    parts = [np.frombuffer(len(head).to_bytes(8, "little"), np.uint8), np.frombuffer(head, np.uint8)]
    parts += [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrs.values()]
    return np.concatenate(parts)


def unpack_arrays(blob: Any) -> "OrderedDict[str, np.ndarray]":
    """The arrays :func:`pack_arrays` packed, in order, each its own copy."""
    b = np.asarray(blob)
    if b.dtype != np.uint8 or b.ndim != 1 or b.size < 8:
        raise ValueError("a packed record is a 1-d uint8 array")
    n = int.from_bytes(b[:8].tobytes(), "little")
    try:
        layout = json.loads(b[8:8 + n].tobytes())
    except ValueError:
        raise ValueError("a packed record's layout is not JSON") from None
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    at = 8 + n
    for name, dtype, shape in layout:
        dt = np.dtype(dtype)
        size = dt.itemsize * int(np.prod(shape, dtype=np.int64))
        if at + size > b.size:
            raise ValueError(f"a packed record ends inside array {name!r}")
        out[name] = b[at:at + size].copy().view(dt).reshape(shape)
        at += size
    if at != b.size:
        raise ValueError("a packed record has bytes past its last array")
    return out
