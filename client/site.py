"""What one silo does with its own data: load it, cache its features, train locally, report the
statistics the server pools, evaluate, build its index, and answer another site's search by code.
Flower-free except for the names of node-config keys; ``client_app.py`` wires these functions to Flower
messages.

**A real site obeys only its own node config** (a node config with ``data``; the server's config has no
such key). Its data, its name, its out-dir (required), feature cache, backbone weights, torch threads and
the backbone itself come from its node config (``data``, ``silo``, ``out-dir``, ``cache-dir``, ``weights``,
``threads``, ``backbone``) or else fedhash's installed defaults, never from the run config: the server's
values for those keys are ignored with a logged warning (a different backbone is refused: the model would
not be the federation's). Test switches (``inject-failures``) are ignored. The node config can set a
privacy floor (``require-dp="sample"``, ``max-epsilon=8``): the site refuses to train under a weaker
setting, with an error the server stops the run on. What its search replies share beyond content ids and
distances is ``search-share``. Errors a site sends back name none of its paths (:func:`site_error_text`).

In simulation (node config ``partition-id``) server and silos are one user, and the run config decides.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hashing import hashers, model, retrieval
from hashing.atomic import atomic_path
from hashing.backbones import backbone_for, backbone_identity
from hashing.cache import cache_root
from hashing.codes import logits_to_codes
from hashing.config import Config, failures_of
from hashing.data import load_dataset
from hashing.encoder import Encoder
from hashing.errors import ConfigError, DataError, ModelVersionError
from hashing.features import cached_features
from hashing.federated import pooling
from hashing.federated import protocol as P
from hashing.federated.search import PAD_DISTANCE, PAD_ID
from hashing.hashers import Hasher, Inputs, create_hasher
from hashing.metrics import retrieval_metrics
from hashing.privacy import accountant, dpsgd, release
from hashing.silos import Silo, local_silo, make_silo, silo_name, source_dataset
from hashing.train import History, Schedule, train

log = logging.getLogger("fedhash.client")
_lock = threading.Lock()

# node-config keys a site sets for itself (flower-supernode --node-config '...')
NODE_DATA, NODE_SILO, NODE_OUT_DIR, NODE_CACHE_DIR, NODE_THREADS = "data", "silo", "out-dir", "cache-dir", "threads"
NODE_WEIGHTS, NODE_BACKBONE = "weights", "backbone"
NODE_SHARE = "search-share"  # what a search reply may carry beyond content ids and distances: "" or "labels"
NODE_REQUIRE_DP, NODE_MAX_EPSILON = "require-dp", "max-epsilon"  # a site's privacy floor
NODE_PARTITION, NODE_PARTITIONS = "partition-id", "num-partitions"  # set by Flower's simulation engine

# Config fields a real site decides for itself: field -> the node-config key that sets it (None: nothing
# does; the installed default holds). The server's values are ignored.
SITE_OWNED: dict[str, str | None] = {"data": NODE_DATA, "out_dir": NODE_OUT_DIR, "cache_dir": NODE_CACHE_DIR,
                                     "weights": NODE_WEIGHTS, "client_threads": NODE_THREADS,
                                     "inject_failures": None}
_DEFAULTS = Config()
_warned: set[tuple[str, ...]] = set()


# --------------------------------------------------------------------------- the site's own settings


def is_site(node_config: Mapping[str, Any]) -> bool:
    """A real site (its node config names its data), not a simulated silo."""
    return NODE_DATA in node_config


def own_settings(cfg: Config, node_config: Mapping[str, Any]) -> Config:
    """The run's config as this node must use it. At a real site every path and site-side switch is its
    own (node config, else fedhash's default; the server's values are ignored, with a warning), and the
    backbone must be the site's. In simulation, the run's config (a node config's cache-dir wins)."""
    if not is_site(node_config):
        if NODE_CACHE_DIR in node_config:
            cfg = dataclasses.replace(cfg, cache_dir=str(node_config[NODE_CACHE_DIR]))
        return cfg
    name = node_silo_name(node_config)
    mine_backbone = str(node_config.get(NODE_BACKBONE, _DEFAULTS.backbone))
    if cfg.backbone != mine_backbone:
        raise ConfigError(f"site '{name}' runs backbone {mine_backbone!r} and the run asks for {cfg.backbone!r}; run "
                          f"with backbone=\"{mine_backbone}\" (or every site sets backbone in its node config)")
    changes: dict[str, Any] = {}
    for field, key in SITE_OWNED.items():
        default = getattr(_DEFAULTS, field)
        mine = type(default)(node_config[key]) if key is not None and key in node_config else default
        if getattr(cfg, field) != mine:
            changes[field] = mine
    ignored = tuple(sorted(k.replace("_", "-") for k in changes
                           if getattr(cfg, k) != getattr(_DEFAULTS, k)))  # the server set them
    if ignored and (name, *ignored) not in _warned:
        _warned.add((name, *ignored))
        log.warning("site %s ignores the run config's %s: a site's paths and switches come from its own node config",
                    name, ", ".join(ignored))
    return dataclasses.replace(cfg, **changes) if changes else cfg


def set_threads(cfg: Config, node_config: Mapping[str, Any]) -> None:
    """torch threads of this process: the node config's ``threads``, else the config's ``client-threads``."""
    threads = int(node_config.get(NODE_THREADS, cfg.client_threads))
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def privacy_floor(node_config: Mapping[str, Any]) -> tuple[str, float | None]:
    """The site's privacy floor from its node config: (required DP unit or "", the largest ε it accepts)."""
    need = str(node_config.get(NODE_REQUIRE_DP, "")).strip().lower()
    if need not in ("", "none", "sample"):
        raise ConfigError(f"node config {NODE_REQUIRE_DP}={need!r}: a site can require \"sample\" (sample-level DP, "
                          "whose ε it computes itself), or nothing")
    raw = node_config.get(NODE_MAX_EPSILON)
    max_eps = None
    if raw is not None:
        try:
            max_eps = float(raw)
        except (TypeError, ValueError):
            max_eps = -1.0
        if not max_eps > 0:
            raise ConfigError(f"node config {NODE_MAX_EPSILON}={raw!r}: give a number > 0, e.g. max-epsilon=8")
        need = "sample"  # a site can check only the ε of its own sample-level plan
    return ("" if need == "none" else need), max_eps


def check_privacy_floor(cfg: Config, node_config: Mapping[str, Any], n_train: int | None) -> None:
    """Refuse to work under a weaker setting than the site's floor (P.PRIVACY_FLOOR in the error: the server
    stops the run on it). The ε checked is the one this site's own accountant plans for the whole run for its
    ``n_train`` images (None: the DP unit only, before the silo is loaded)."""
    need, max_eps = privacy_floor(node_config)
    if not need:
        return
    name = node_silo_name(node_config)
    floor = f"{NODE_REQUIRE_DP}=\"{need}\"" + (f" {NODE_MAX_EPSILON}={max_eps:g}" if max_eps is not None else "")
    if cfg.dp != need:
        raise ConfigError(f"site '{name}' refuses: its {P.PRIVACY_FLOOR} is {floor} and the run asks dp=\"{cfg.dp}\"; "
                          f"run with dp=\"{need}\"" + (f" and dp-epsilon <= {max_eps:g}" if max_eps else ""))
    if max_eps is not None and n_train is not None:
        eps = accountant.silo_plan(cfg, n_train, silo=name).epsilon
        if eps > max_eps * (1 + 1e-9):
            raise ConfigError(f"site '{name}' refuses: its {P.PRIVACY_FLOOR} is {floor} and the run's plan gives its "
                              f"data epsilon={eps:.3g}; run with dp-epsilon <= {max_eps:g}")


def own_privacy(cfg: Config, data: "SiloData", announced: Mapping[str, Any] | None) -> dict[str, Any]:
    """The privacy record a real site writes into its index: what its own accountant computes for what it
    ran. Sample-level DP: its plan for the whole run (its noise, its sampling rate, every planned step and the
    moments release: an upper bound when it skipped rounds). Otherwise it can account for nothing itself,
    and says whose figure it carries."""
    if cfg.dp == "sample":
        plan = dp_plan(cfg, data)
        return {"unit": "sample (one image)", "mechanism": accountant.MECHANISM, "accountant": accountant.ACCOUNTANT,
                "computed_by": f"site {data.name}", "epsilon": plan.epsilon, "delta": plan.delta,
                "noise_multiplier": plan.noise_multiplier, "moments_noise": plan.moments_noise,
                "sample_rate": plan.sample_rate, "steps": plan.steps_per_round * plan.rounds,
                "max_grad_norm": plan.max_grad_norm, "rounds": plan.rounds, "n": plan.n}
    if cfg.dp == "none":
        return {"unit": "none", "epsilon": math.inf, "computed_by": f"site {data.name}"}
    return dict(announced or {}) | {"computed_by": "server (a site cannot account client-level DP alone)"}


_PATH = re.compile(r"(?<![\w>.~])(?:~|\.{1,2})?/[^\s'\"<>,;()\[\]{}]*")  # not the rest of a <site path>


def site_error_text(text: str, node_config: Mapping[str, Any] | None) -> str:
    """What a real site tells the server about its own error: the text, every path in it (and every value of
    its node config that names a file or folder) replaced by <site path>. A simulated silo's text is kept."""
    if not node_config or not is_site(node_config):
        return text
    for key in (NODE_DATA, NODE_OUT_DIR, NODE_CACHE_DIR, NODE_WEIGHTS):
        v = str(node_config.get(key, "")).strip()
        if len(v) > 1:
            text = text.replace(v, "<site path>")
    return _PATH.sub(lambda m: "<site path>" if len(m.group(0)) > 1 else m.group(0), text)


def out_dir(cfg: Config, node_config: Mapping[str, Any]) -> str:
    """Where a node keeps its index: a real site's own out-dir (only its node config names it), the run's
    out-dir in simulation."""
    if is_site(node_config):
        check_node_config(node_config)
        return str(node_config[NODE_OUT_DIR])
    return str(node_config.get(NODE_OUT_DIR, cfg.out_dir))


def check_node_config(node_config: Mapping[str, Any]) -> None:
    """A real site's node config names where its index goes, and shares only what fedhash can share;
    checked at the first message, before any work."""
    if is_site(node_config) and not str(node_config.get(NODE_OUT_DIR, "")).strip():
        raise ConfigError(f"the node config of site '{node_silo_name(node_config)}' names no out-dir; a site keeps its "
                          "index where its own node config says: add out-dir=\"/var/lib/fedhash\" to --node-config")
    shared_fields(node_config)


def shared_fields(node_config: Mapping[str, Any]) -> tuple[str, ...]:
    """What the site's search replies carry beyond content ids and distances (node config ``search-share``)."""
    raw = [x.strip().lower() for x in str(node_config.get(NODE_SHARE, "")).split(",") if x.strip()]
    bad = [x for x in raw if x not in P.SHAREABLE]
    if bad:
        raise ConfigError(f"node config {NODE_SHARE}={node_config.get(NODE_SHARE)!r} names {bad[0]!r}; a site can "
                          f"share: {', '.join(P.SHAREABLE)} (or nothing: ids and distances only)")
    return tuple(dict.fromkeys(raw))


def node_silo_name(node_config: Mapping[str, Any]) -> str:
    """A real site's silo name: its node config's ``silo``, else silo-<partition-id> on a test bench, else its
    data folder's name."""
    if NODE_SILO in node_config:
        return str(node_config[NODE_SILO])
    if NODE_PARTITION in node_config:
        return f"silo-{int(node_config[NODE_PARTITION])}"
    return Path(str(node_config[NODE_DATA])).name


# --------------------------------------------------------------------------- silos


def silo_from_node(cfg: Config, node_config: Mapping[str, Any]) -> Silo:
    """The silo a node holds: a partition in simulation, its own data at a real site."""
    if is_site(node_config) and NODE_PARTITION in node_config:
        # a test bench: a real SuperNode holding partition i of its own data, cut as a simulation cuts it
        n = int(node_config.get(NODE_PARTITIONS, cfg.num_silos))
        part_cfg = cfg.replace(data=str(node_config[NODE_DATA]), num_silos=n)
        silo = make_silo(source_dataset(part_cfg), part_cfg, int(node_config[NODE_PARTITION]))
        return dataclasses.replace(silo, name=node_silo_name(node_config))
    if is_site(node_config):  # a real site: node config data="<folder or manifest>" silo="<name>"
        ds = load_dataset(str(node_config[NODE_DATA]))
        name = node_silo_name(node_config)
        return local_silo(ds, name, seed=cfg.seed, query_frac=cfg.query_frac)
    if NODE_PARTITION in node_config:
        n = int(node_config.get(NODE_PARTITIONS, cfg.num_silos))
        part_cfg = cfg if n == cfg.num_silos else cfg.replace(num_silos=n)
        return make_silo(source_dataset(cfg), part_cfg, int(node_config[NODE_PARTITION]))
    raise ConfigError("node config has neither 'data' (a real site: --node-config 'data=\"/path/to/images\"') "
                      "nor 'partition-id' (simulation); give the SuperNode one of them")


@dataclass
class SiloData:
    """A silo's data as training needs it: its images and, for hashers on cached features, those."""

    silo: Silo
    inputs: Inputs
    num_classes: int
    weights_id: str
    feature_dim: int

    @property
    def name(self) -> str:
        return self.silo.name

    @property
    def who(self) -> str:
        """How an error names the silo."""
        return f"silo '{self.silo.name}'"

    @property
    def labels(self) -> np.ndarray:
        return self.silo.ds.labels

    @property
    def train_labels(self) -> np.ndarray:
        return self.labels[self.silo.splits.train]

    @property
    def n_train(self) -> int:
        return len(self.silo.splits.train)

    @property
    def clean(self) -> np.ndarray | None:
        return self.inputs.clean

    @property
    def train_views(self) -> np.ndarray | None:
        return self.inputs.views


def silo_features(cfg: Config, silo: Silo) -> SiloData:
    """The silo's inputs; features are loaded from (or extracted once into) the feature cache when the
    config's kind of hash function reads them (the backbone is built only if an entry is missing)."""
    ds = silo.ds
    num_classes = ds.labels.shape[1] if ds.labels.ndim == 2 else len(ds.classes)
    weights = cfg.weights or None
    wid, dim = backbone_identity(cfg.backbone, weights, cfg.cache_dir or None)
    inputs = Inputs(ds, silo.splits.train, cfg.size)
    if hashers.reads_features(cfg.hasher_kind):
        common = dict(size=cfg.size, cache_dir=cfg.cache_dir or None, weights_id=wid)
        make = lambda: backbone_for(cfg.backbone, weights)[0]  # noqa: E731
        inputs.clean = cached_features(make, cfg.backbone, ds, np.arange(len(ds)), views=0, seed=0, **common)
        inputs.views = cached_features(make, cfg.backbone, ds, silo.splits.train, views=cfg.views, seed=cfg.seed,
                                       **common)
    return SiloData(silo, inputs, num_classes, wid, dim)


_silos: "OrderedDict[tuple, SiloData]" = OrderedDict()


def silo_data(cfg: Config, node_config: Mapping[str, Any]) -> SiloData:
    """Memoized per process: a SuperNode (or simulation actor) loads its silo once per run."""
    what = cfg.data_config() | {k: getattr(cfg, k) for k in ("backbone", "weights", "size", "cache_dir")} | {
        "features": hashers.reads_features(cfg.hasher_kind)}
    key = (tuple(sorted(what.items())), tuple(sorted((str(k), str(v)) for k, v in node_config.items())))
    with _lock:
        hit = _silos.get(key)
    if hit is not None:
        return hit
    data = silo_features(cfg, silo_from_node(cfg, node_config))
    with _lock:
        _silos[key] = data
        while len(_silos) > 8:
            _silos.popitem(last=False)
    return data


def check_silo(data: SiloData) -> None:
    if data.n_train < 2:
        raise DataError(f"silo '{data.name}' has {data.n_train} training images; "
                        "it needs at least 2: give it more data or fewer silos")


# --------------------------------------------------------------------------- the global model

_templates: "OrderedDict[tuple, Hasher]" = OrderedDict()


def global_model(cfg: Config, feature_dim: int) -> Hasher:
    """The federation's starting model, identical on every node for the same config (seeded)."""
    return create_hasher(cfg.hasher_kind, **cfg.hasher_options(feature_dim))


def fresh_model(cfg: Config, feature_dim: int) -> Hasher:
    """A copy of the global model's architecture, for a message to load its state into.

    A hasher on cached features is copied from one seeded template per process instead of re-running
    the weight initialisation for every message (the message's state overwrites all of it anyway)."""
    if not hashers.reads_features(cfg.hasher_kind):
        return global_model(cfg, feature_dim)
    key = (cfg.hasher_kind, tuple(sorted(cfg.hasher_options(feature_dim).items())))
    with _lock:
        if key not in _templates:
            _templates[key] = global_model(cfg, feature_dim)
            while len(_templates) > 4:
                _templates.popitem(last=False)
        return copy.deepcopy(_templates[key])


# --------------------------------------------------------------------------- the silo's jobs


def local_train(cfg: Config, data: SiloData, hasher: Hasher, server_round: int, *,
                prototypes: np.ndarray | None, prox_mu: float = 0.0, progress: bool = False) -> tuple[History, float | None]:
    """This round's local epochs; (history, the ε the silo's plan allows for the run, under sample-level DP)."""
    private = dpsgd.sample_level(cfg, data.n_train, silo=data.who)
    sup = cfg.supervised
    hist = train(hasher, data.inputs, cfg, Schedule.federated_round(cfg, server_round),
                 labels=data.train_labels if sup else None, prototypes=prototypes if sup else None,
                 prox_mu=prox_mu, private=private, progress=progress)
    return hist, (private.plan.epsilon if private is not None else None)


def dp_plan(cfg: Config, data: SiloData) -> accountant.DPPlan:
    """The silo's sample-level DP plan for the whole run (noise multipliers from the target ε)."""
    return accountant.silo_plan(cfg, data.n_train, silo=data.who)


def release_moments(cfg: Config, data: SiloData) -> tuple[dict[str, np.ndarray], accountant.DPPlan | None]:
    """The silo's feature moments for the DP head, once, before training (README, "Differential privacy")."""
    return release.silo_release(cfg, data.clean[data.silo.splits.train], data.silo.ids_fingerprint(),
                                silo=data.who)


def local_stats(cfg: Config, data: SiloData, hasher: Hasher, params_digest: str | None = None) -> dict[str, np.ndarray]:
    """count / sum / sumsq of the activations entering the final normalisation for the silo's clean
    training images, and per-class counts and sums (supervised), under ``hasher``.

    Clean images, one forward pass each: the distribution the model encodes at search time,
    and a quarter of the cost of all cached views (the pooled mAP is the same either way:
    BENCHMARKS.md, "Federated: where the time goes")."""
    h = hasher.activations(data.inputs, data.silo.splits.train)
    _keep_activations(cfg, data, params_digest, h)
    sup = cfg.supervised
    return pooling.activation_stats(h, data.train_labels if sup else None, data.num_classes if sup else 0)


# The database of a simulated or real silo is its training split, so the statistics phase has
# already run the new global model's head (up to its BatchNorm) over every database image when
# the next round's train message asks the silo to score that model. The activations are kept on
# disk, keyed by the model's parameters, for that evaluation: a simulation engine may hand the
# two messages to different processes. A miss (or a mismatch) just encodes again.

def _activation_path(cfg: Config, data: SiloData, params_digest: str | None) -> Path | None:
    sp = data.silo.splits
    source = getattr(data.clean, "filename", None)
    if params_digest is None or source is None or not np.array_equal(sp.database, sp.train):
        return None
    h = hashlib.sha256(Path(source).name.encode())  # the feature cache entry: data, backbone, weights, size
    h.update(np.ascontiguousarray(sp.train, dtype="<i8").tobytes())
    return cache_root(cfg.cache_dir) / "activations" / f"{h.hexdigest()[:16]}-{params_digest}.npy"


def _keep_activations(cfg: Config, data: SiloData, params_digest: str | None, h: np.ndarray) -> None:
    path = _activation_path(cfg, data, params_digest)
    if path is None:
        return
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, h)
        # keep this model's and the one before (still to be scored if a round is retried)
        older = sorted(path.parent.glob(path.name.split("-")[0] + "-*.npy"), key=lambda p: p.stat().st_mtime)
        for p in older[:-2]:
            p.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not keep the activations under %s (%s); the evaluation will encode again", path.parent, e)


def _kept_activations(cfg: Config, data: SiloData, params_digest: str | None) -> np.ndarray | None:
    path = _activation_path(cfg, data, params_digest)
    if path is None or not path.exists():
        return None
    try:
        h = np.load(path)
    except (OSError, ValueError, EOFError):
        return None
    ok = h.dtype == np.float32 and h.shape == (len(data.silo.splits.database), cfg.bits) and np.isfinite(h).all()
    return h if ok else None


@dataclass(frozen=True)
class Score:
    """A model scored on one silo: mAP@1000 of its query split against its own database."""

    map: float
    bit_balance: float  # 1 - mean_k |2 p_k - 1| of the database codes (1: every bit splits the database in half)
    n_query: int
    n_db: int


def silo_map(data: SiloData, query: np.ndarray, db_codes: np.ndarray) -> Score:
    """mAP@1000 (Hamming) of query codes or logits against packed database codes, on the silo's labels."""
    sp = data.silo.splits
    res = retrieval_metrics(query, db_codes, data.labels[sp.query], data.labels[sp.database],
                            asymmetric=False, k=1000, p_at=None, radius=None, pr=False)
    bits = np.unpackbits(db_codes, axis=1, bitorder="little").mean(0)
    return Score(float(res["mAP@1000"]), float(1 - np.abs(2 * bits - 1).mean()), int(len(sp.query)),
                 int(len(sp.database)))


def evaluate(cfg: Config, data: SiloData, hasher: Hasher, params_digest: str | None = None) -> Score:
    """mAP@1000 (Hamming) of the silo's query split against its own database.

    ``params_digest`` (:func:`hashing.backbones.weights_fingerprint` of the model's parameters) lets it
    reuse the database activations the statistics phase kept for this model."""
    sp = data.silo.splits
    q = hasher.encode(data.inputs, sp.query)
    h = _kept_activations(cfg, data, params_digest)
    db = hasher.normalise(h) if h is not None else hasher.encode(data.inputs, sp.database)
    return silo_map(data, q, logits_to_codes(db))


def site_dir(out: str, silo_name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in silo_name)
    return Path(out) / "silos" / safe


def build_index(cfg: Config, data: SiloData, hasher: Hasher, model_version: str, out: str,
                privacy: Mapping[str, Any] | None = None) -> tuple[Path, int]:
    """Encode the silo's database with the global function and index it in the silo's index folder
    (:mod:`hashing.retrieval`: catalogue with content ids, FAISS codes, a copy of the model), stamped
    with the model version and the privacy guarantee the function was trained under. A folder that
    already holds an index (an earlier federation at this site) is upgraded to the new model, its
    audit log kept. Returns (folder, images indexed)."""
    sp = data.silo.splits
    codes = logits_to_codes(hasher.encode(data.inputs, sp.database))
    ident = model.identity(hasher, backbone=cfg.backbone, weights_id=data.weights_id, size=cfg.size)
    rec = model.record(*hasher.state(), ident, privacy=privacy, extra={"silo": data.name})
    if rec["model_version"] != model_version:
        raise ModelVersionError(f"{data.who}: the global model it holds is version {rec['model_version']}, the server "
                                f"announced {model_version}; server and silo must run the same fedhash and backbone")
    enc = Encoder(hasher, rec, weights=cfg.weights, cache_dir=cfg.cache_dir)
    folder = site_dir(out, data.name)
    detail = {"federation": True, "silo": data.name}
    if (folder / retrieval.CATALOGUE).is_file():
        idx = retrieval.open_index(folder, weights=cfg.weights, cache_dir=cfg.cache_dir)
        if idx.model_version != model_version:
            idx.upgrade(enc)
    else:
        idx = retrieval.create(folder, enc, weights=cfg.weights, cache_dir=cfg.cache_dir)
    with idx:
        digests = data.silo.content_digests()  # read once already, for the silo's provenance
        idx.add_encoded(data.silo.ds, sp.database, codes, model_version=model_version, action="build", detail=detail,
                        digests=[digests[i] for i in sp.database])
        return folder, len(idx)


# --------------------------------------------------------------------------- search by code


def search_folder(node_config: Mapping[str, Any], req: P.SearchRequest) -> tuple[str, Path]:
    """(silo name, index folder) a search message reaches: a real site's from its own node config only;
    a simulated silo's from the run's config, which the simulation's search message carries."""
    if is_site(node_config):
        check_node_config(node_config)
        name = node_silo_name(node_config)
        return name, site_dir(str(node_config[NODE_OUT_DIR]), name)
    if NODE_PARTITION in node_config:
        if not req.fedconfig:
            raise ConfigError("a simulated silo's search message must carry the run's config (which silo a partition "
                              "is, where its index is); search a simulation with fedhash search --run")
        cfg = Config.from_json(req.fedconfig)
        name = silo_name(cfg, int(node_config[NODE_PARTITION]))
        return name, site_dir(out_dir(cfg, node_config), name)
    raise ConfigError("node config has neither 'data' (a real site) nor 'partition-id' (simulation)")


_indexes: "OrderedDict[Path, retrieval.SearchIndex]" = OrderedDict()


def _search_index(folder: Path, name: str) -> retrieval.SearchIndex:
    """The silo's index, opened once per process (every search re-reads what another process changed)."""
    with _lock:
        idx = _indexes.get(folder)
        if idx is None:
            if not (folder / retrieval.CATALOGUE).is_file():
                raise DataError(f"silo '{name}' holds no index at {folder}; it is filled by a federation's last round "
                                "(or fedhash index build): run one first")
            idx = _indexes[folder] = retrieval.open_index(folder)
            while len(_indexes) > 8:
                _indexes.popitem(last=False)[1].close()
        return idx


@dataclass(frozen=True)
class SearchResult:
    silo: str
    ids: np.ndarray        # int64 (n, k), PAD_ID past the silo's last hit
    distances: np.ndarray  # int32 (n, k)
    labels: list[list[str]] | None  # shared only when the node config says so
    n_db: int


def search(node_config: Mapping[str, Any], req: P.SearchRequest) -> SearchResult:
    """The silo's top-k of the request's codes in its own index: content ids and Hamming distances, equal
    distances by content id, and the hits' labels only when the node config shares them."""
    name, folder = search_folder(node_config, req)
    share = shared_fields(node_config)
    if NODE_PARTITION in node_config and req.fedconfig:  # a simulated silo asked to misbehave (inject-failures)
        run_cfg = Config.from_json(req.fedconfig)
        injected = failures_of(run_cfg.inject_failures).get(name, set())
        if "search" in injected:
            raise RuntimeError(f"injected failure of {name} in a search (inject-failures)")
        if "search-stall" in injected:
            time.sleep(run_cfg.round_timeout + 2.0)
    idx = _search_index(folder, name)
    if idx.model_version != req.model_version:
        raise ModelVersionError(f"silo '{name}': its index holds model {idx.model_version}, the query codes come from "
                                f"model {req.model_version}; query with the model the federation last trained "
                                "(or upgrade the silo's index to it)")
    if req.codes.shape[1] * 8 != idx.bits:
        raise ModelVersionError(f"silo '{name}': the query codes are {req.codes.shape[1] * 8} bits, its index "
                                f"{idx.bits}")
    hits = idx.search_codes(req.codes, req.k, model_version=req.model_version, ties="id")
    n, k = req.codes.shape[0], req.k
    ids = np.full((n, k), PAD_ID, np.int64)
    dist = np.full((n, k), PAD_DISTANCE, np.int32)
    labels = [[""] * k for _ in range(n)] if "labels" in share else None
    for q, row in enumerate(hits):
        for r, h in enumerate(row):
            ids[q, r], dist[q, r] = h.id, int(h.distance)
            if labels is not None:
                labels[q][r] = ";".join(h.labels)
    return SearchResult(name, ids, dist, labels, len(idx))
