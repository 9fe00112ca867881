"""What one silo does with its own data: load it, cache its features, train locally,
evaluate, and build its index. Flower-free except for the names of node-config keys;
``client_app.py`` wires these functions to Flower messages.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hashing import dp, fedstats
from hashing.atomic import atomic_path
from hashing.codes import logits_to_codes
from hashing.data import ImageSet, load_dataset
from hashing.errors import ConfigError, DataError
from hashing.fedconfig import FedConfig
from hashing.features import cache_root, cached_features
from hashing.fedmodel import backbone_for, backbone_identity, build_model, head_of
from hashing.finetune import LoraHasher, backbone_features, train_lora
from hashing.index import SiloIndex
from hashing.metrics import retrieval_metrics
from hashing.train import TrainConfig, encode, train_head

from .partitions import PartitionSpec, Silo, local_silo, make_silo

log = logging.getLogger("fedhash.client")
_lock = threading.Lock()


# --------------------------------------------------------------------------- silos


def partition_spec(cfg: FedConfig, num_silos: int) -> PartitionSpec:
    domains = tuple(d.strip() for d in cfg.domains.split(",") if d.strip())
    return PartitionSpec(kind=cfg.partitioner, num_silos=int(num_silos), alpha=cfg.alpha,
                         classes_per_silo=cfg.classes_per_silo, quantity_power=cfg.quantity_power,
                         domains=domains, min_size=cfg.min_size, query_frac=cfg.query_frac, seed=cfg.seed)


def load_source(cfg: FedConfig) -> ImageSet:
    """The data set a simulation partitions: the first ``n-images`` of ``data`` (0: all)."""
    return load_dataset(cfg.data, limit=cfg.n_images if cfg.n_images > 0 else None)


def silo_from_node(cfg: FedConfig, node_config: Mapping[str, Any]) -> Silo:
    """The silo a node holds: a partition in simulation, its own data at a real site."""
    if "data" in node_config:  # a real site: node config data="<folder or manifest>" silo="<name>"
        ds = load_dataset(str(node_config["data"]))
        name = str(node_config.get("silo", Path(str(node_config["data"])).name))
        return local_silo(ds, name, seed=cfg.seed, query_frac=cfg.query_frac)
    if "partition-id" in node_config:
        n = int(node_config.get("num-partitions", cfg.num_silos))
        return make_silo(load_source(cfg), partition_spec(cfg, n), int(node_config["partition-id"]),
                         cache_dir=cfg.cache_dir or None)
    raise ConfigError("node config has neither 'data' (a real site: --node-config 'data=\"/path/to/images\"') "
                      "nor 'partition-id' (simulation); give the SuperNode one of them")


@dataclass
class SiloData:
    """A silo's data as training needs it (probe: cached features; lora: images)."""

    silo: Silo
    labels: np.ndarray
    num_classes: int
    weights_id: str
    feature_dim: int
    clean: np.ndarray | None = None        # probe: (n, d) clean features of every silo image
    train_views: np.ndarray | None = None  # probe: (n_train, V, d)

    @property
    def name(self) -> str:
        return self.silo.name

    @property
    def train_labels(self) -> np.ndarray:
        return self.labels[self.silo.splits.train]


def silo_features(cfg: FedConfig, silo: Silo) -> SiloData:
    """Load (or extract once into the feature cache) the silo's features."""
    ds = silo.ds
    num_classes = ds.labels.shape[1] if ds.labels.ndim == 2 else len(ds.classes)
    wid, dim = backbone_identity(cfg)
    if cfg.mode == "lora":
        return SiloData(silo, ds.labels, num_classes, wid, dim)
    # the backbone is built only if a feature cache entry is missing
    common = dict(size=cfg.size, cache_dir=cfg.cache_dir or None, weights_id=wid)
    model = lambda: backbone_for(cfg)[0]  # noqa: E731
    clean = cached_features(model, cfg.backbone, ds, np.arange(len(ds)), views=0, seed=0, **common)
    views = cached_features(model, cfg.backbone, ds, silo.splits.train, views=cfg.views, seed=cfg.seed, **common)
    return SiloData(silo, ds.labels, num_classes, wid, dim, clean=clean, train_views=views)


_silos: "OrderedDict[tuple, SiloData]" = OrderedDict()


def silo_data(cfg: FedConfig, node_config: Mapping[str, Any]) -> SiloData:
    """Memoized per process: a SuperNode (or simulation actor) loads its silo once per run."""
    what = cfg.data_config() | {k: getattr(cfg, k) for k in ("backbone", "weights", "size", "mode", "cache_dir")}
    key = (tuple(sorted(what.items())), tuple(sorted((str(k), str(v)) for k, v in node_config.items())))
    with _lock:
        hit = _silos.get(key)
    if hit is not None:
        return hit
    silo = silo_from_node(cfg, node_config)
    data = silo_features(cfg, silo)
    with _lock:
        _silos[key] = data
        while len(_silos) > 8:
            _silos.popitem(last=False)
    return data


# --------------------------------------------------------------------------- training

_templates: "OrderedDict[tuple, torch.nn.Module]" = OrderedDict()


def fresh_model(cfg: FedConfig, feature_dim: int) -> torch.nn.Module:
    """A copy of the global model's architecture, for a message to load its state into.

    Probe mode copies one seeded template per process instead of re-running the weight
    initialisation for every message (the message's state overwrites all of it anyway)."""
    if cfg.mode == "lora":
        return build_model(cfg, feature_dim)
    key = (tuple(sorted(cfg.function_config().items())), int(feature_dim))
    with _lock:
        if key not in _templates:
            _templates[key] = build_model(cfg, feature_dim)
            while len(_templates) > 4:
                _templates.popitem(last=False)
        return copy.deepcopy(_templates[key])


def train_config(cfg: FedConfig, server_round: int) -> TrainConfig:
    """This round's slice of one cosine schedule over all rounds."""

    def lr_at(t: float) -> float:
        return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * t))

    r, total = int(server_round), cfg.num_server_rounds
    return TrainConfig(bits=cfg.bits, supervised=cfg.supervised,
                       epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=lr_at((r - 1) / total),
                       lr_min=lr_at(r / total), weight_decay=cfg.weight_decay, lam=cfg.lam, eps=cfg.eps,
                       variant=cfg.variant, seed=cfg.seed * 100003 + r, renorm=cfg.batch_renorm)


# --------------------------------------------------------------------------- the silo's jobs


def dp_plan(cfg: FedConfig, data: SiloData) -> dp.DPPlan:
    """The silo's sample-level DP plan for the whole run (noise multipliers from the target ε)."""
    return dp.plan(len(data.silo.splits.train), target_epsilon=cfg.dp_epsilon, delta=cfg.dp_delta,
                   noise_multiplier=cfg.dp_noise, max_grad_norm=cfg.dp_clip, batch_size=cfg.batch_size,
                   local_epochs=cfg.local_epochs, rounds=cfg.num_server_rounds, moments_ratio=cfg.dp_moments_ratio,
                   max_noise=cfg.dp_max_noise, silo=f"silo '{data.name}'")


def _noise_rng(cfg: FedConfig, data: SiloData, what: str) -> np.random.Generator:
    """The moments release's noise: seeded by the run's seed and the silo, so a simulated scenario is
    reproducible (Opacus runs with secure_mode off likewise; README, "Differential privacy")."""
    h = hashlib.sha256(f"{cfg.seed}/{data.silo.ids_fingerprint()}/{what}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def release_moments(cfg: FedConfig, data: SiloData) -> tuple[dict[str, np.ndarray], dp.DPPlan | None]:
    """The silo's feature moments for the DP head, once, before training.

    Sample-level DP: sums over the clean training images with the Gaussian noise of the silo's plan
    (accounted with its DP-SGD). Client-level DP: the exact means (count 1); the server adds the noise
    to their sum, the privacy unit being the silo."""
    x = data.clean[data.silo.splits.train]
    if cfg.dp == "sample":
        p = dp_plan(cfg, data)
        return dp.release_moments(x, p.moments_noise, _noise_rng(cfg, data, "moments")), p
    m = dp.release_moments(x, 0.0, _noise_rng(cfg, data, "moments"))
    n = float(m["count"][0])
    return {"count": np.array([1.0]), "sum": m["sum"] / n, "outer": m["outer"] / n}, None


def local_train(cfg: FedConfig, data: SiloData, model: torch.nn.Module, server_round: int, *,
                prototypes: np.ndarray | None, prox_mu: float = 0.0, progress: bool = False) -> dict[str, Any]:
    tcfg = train_config(cfg, server_round)
    sup = tcfg.supervised
    t0 = time.perf_counter()
    if cfg.dp == "sample":
        p = dp_plan(cfg, data)
        res = dp.train_dp_head(model, data.train_views, p, lr=tcfg.lr, lr_min=tcfg.lr_min,
                               weight_decay=tcfg.weight_decay, lam=tcfg.lam, eps=tcfg.eps, local_epochs=tcfg.epochs,
                               batch_size=tcfg.batch_size, seed=tcfg.seed, progress=progress)
        return {"train-loss": res["loss"], "bit-balance": res["bit_balance"], "train-seconds": time.perf_counter() - t0,
                "dp-history": res["history"], "dp-epsilon-planned": p.epsilon}
    if isinstance(model, LoraHasher):
        hist = train_lora(model, data.silo.ds, data.silo.splits.train, tcfg, size=cfg.size,
                          prototypes=prototypes if sup else None, prox_mu=prox_mu, progress=progress)
    else:
        _, hist = train_head(data.train_views, data.train_labels if sup else None, tcfg, coder=model,
                             progress=progress, prototypes=prototypes if sup else None, prox_mu=prox_mu)
    last = hist.epoch[-1]
    return {"train-loss": float(last["loss"]), "bit-balance": float(last["bit_balance"]),
            "train-seconds": time.perf_counter() - t0}


def local_stats(cfg: FedConfig, data: SiloData, model: torch.nn.Module,
                params_digest: str | None = None) -> dict[str, np.ndarray]:
    """count / sum / sumsq of the pre-BatchNorm activations of the silo's clean training images
    and per-class counts and sums (supervised), under ``model``.

    Clean images, one forward pass each: the distribution the model encodes at search time,
    and a quarter of the cost of all cached views (the pooled mAP is the same either way:
    BENCHMARKS.md, "Federated: where the time goes")."""
    head = head_of(model)
    labels = data.train_labels if cfg.supervised else None
    classes = data.num_classes if cfg.supervised else 0
    if isinstance(model, LoraHasher):
        feats = backbone_features(model, data.silo.ds, data.silo.splits.train, size=cfg.size)
        return fedstats.head_stats(head, feats, labels, classes)
    h = encode(head, data.clean[data.silo.splits.train], pre_bn=True)
    _keep_activations(cfg, data, params_digest, h)
    return fedstats.activation_stats(h, labels, classes)


# The database of a simulated or real silo is its training split, so the statistics phase has
# already run the new global model's head (up to its BatchNorm) over every database image when
# the next round's train message asks the silo to score that model. The activations are kept on
# disk, keyed by the model's parameters, for that evaluation: a simulation engine may hand the
# two messages to different processes. A miss (or a mismatch) just encodes again.

def _activation_path(cfg: FedConfig, data: SiloData, params_digest: str | None) -> Path | None:
    sp = data.silo.splits
    source = getattr(data.clean, "filename", None)
    if params_digest is None or source is None or not np.array_equal(sp.database, sp.train):
        return None
    h = hashlib.sha256(Path(source).name.encode())  # the feature cache entry: data, backbone, weights, size
    h.update(np.ascontiguousarray(sp.train, dtype="<i8").tobytes())
    root = cache_root(cfg.cache_dir)
    return root / "activations" / f"{h.hexdigest()[:16]}-{params_digest}.npy"


def _keep_activations(cfg: FedConfig, data: SiloData, params_digest: str | None, h: np.ndarray) -> None:
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


def _kept_activations(cfg: FedConfig, data: SiloData, params_digest: str | None) -> np.ndarray | None:
    path = _activation_path(cfg, data, params_digest)
    if path is None or not path.exists():
        return None
    try:
        h = np.load(path)
    except (OSError, ValueError, EOFError):
        return None
    ok = h.dtype == np.float32 and h.shape == (len(data.silo.splits.database), cfg.bits) and np.isfinite(h).all()
    return h if ok else None


def encode_silo(cfg: FedConfig, data: SiloData, model: torch.nn.Module, idx: np.ndarray) -> np.ndarray:
    """Logits of the clean view of silo images ``idx`` under the global model."""
    if isinstance(model, LoraHasher):
        return encode(model.head, backbone_features(model, data.silo.ds, idx, size=cfg.size))
    return encode(model, data.clean[idx])


def silo_map(data: SiloData, query: np.ndarray, db_codes: np.ndarray) -> dict[str, float]:
    """mAP@1000 (Hamming) of query codes or logits against packed database codes, on the silo's labels."""
    sp = data.silo.splits
    res = retrieval_metrics(query, db_codes, data.labels[sp.query], data.labels[sp.database],
                            asymmetric=False, k=1000, p_at=None, radius=None, pr=False)
    bits = np.unpackbits(db_codes, axis=1, bitorder="little").mean(0)
    return {"map": float(res["mAP@1000"]), "bit-balance": float(1 - np.abs(2 * bits - 1).mean()),
            "n-query": int(len(sp.query)), "n-db": int(len(sp.database))}


def local_evaluate(cfg: FedConfig, data: SiloData, model: torch.nn.Module,
                   params_digest: str | None = None) -> dict[str, float]:
    """mAP@1000 (Hamming) of the silo's query split against its own database.

    ``params_digest`` (:func:`hashing.backbones.weights_fingerprint` of the model's parameters) lets it
    reuse the database activations the statistics phase kept for this model."""
    sp = data.silo.splits
    q = encode_silo(cfg, data, model, sp.query)
    h = None if isinstance(model, LoraHasher) else _kept_activations(cfg, data, params_digest)
    if h is not None:
        norm = head_of(model).norm.eval()
        with torch.inference_mode():
            db = norm(torch.from_numpy(h)).numpy()
    else:
        db = encode_silo(cfg, data, model, sp.database)
    return silo_map(data, q, logits_to_codes(db))


def site_dir(out_dir: str, silo_name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in silo_name)
    return Path(out_dir) / "silos" / safe


def build_index(cfg: FedConfig, data: SiloData, model: torch.nn.Module, model_version: str,
                out_dir: str, privacy: Mapping[str, Any] | None = None) -> tuple[Path, int]:
    """Encode the silo's database with the global function and save its SiloIndex (atomic), stamped
    with the model version and the privacy guarantee the function was trained under."""
    sp = data.silo.splits
    codes = logits_to_codes(encode_silo(cfg, data, model, sp.database))
    index = SiloIndex(cfg.bits, model_version, backbone=cfg.backbone)
    index.privacy = dict(privacy or {"unit": "none"})
    index.add(codes, sp.database.astype(np.int64), model_version=model_version)
    path = site_dir(out_dir, data.name) / "index.faiss"
    path.parent.mkdir(parents=True, exist_ok=True)
    index.save(path)
    return path, len(sp.database)


def node_out_dir(cfg: FedConfig, node_config: Mapping[str, Any]) -> str:
    """Where a node writes its index: the site's own out-dir at a real site, the run's in simulation."""
    return str(node_config.get("out-dir", cfg.out_dir))


def check_silo(data: SiloData) -> None:
    if len(data.silo.splits.train) < 2:
        raise DataError(f"silo '{data.name}' has {len(data.silo.splits.train)} training images; "
                        "it needs at least 2: give it more data or fewer silos")




