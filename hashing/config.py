"""Every knob of fedhash, in one flat dataclass: centralized runs, federated runs, scenarios and sites.

Keys are written kebab-case in TOML (``[tool.flwr.app.config]`` of ``pyproject.toml``, scenario files,
``flwr run --run-config``, ``fedhash simulate --set``) and snake_case here. :meth:`Config.from_dict`
checks every key, type and value and names the offending key in a one-line error. ``pyproject.toml``
lists every key with its default (``tests/test_config.py`` holds the two to the same set).

A site's own settings (its data, its name, its out-dir, cache folder and threads) come from its
node config, never from here: the server sends this config to every site.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .backbones import DEFAULT_BACKBONE
from .codes import MAX_BITS
from .errors import ConfigError

MODES = ("probe", "lora")
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum")
DP_UNITS = ("none", "sample", "client")
DP_CLIPPING = ("server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
PARTITIONERS = ("iid", "dirichlet", "pathological", "quantity", "domain")
DOMAINS = ("none", "invert", "blur", "animal-mnist")
DEFAULT_DOMAINS = ("none", "invert", "blur")
DEFAULT_SIZE = 96  # BENCHMARKS.md: backbone throughput and mAP by input size
MAX_VIEWS = 64  # each view is cached as one feature row per training image
MIN_SIZE, MAX_SIZE = 32, 512  # input sizes in pixels: the backbones downsample by 32; above 512 px a CPU crawls


@dataclass(frozen=True)
class Config:
    # ------------------------------------------------------------ data and silos
    data: str = "fashion-mnist"     # fashion-mnist | digits | a folder of IDX files | a folder class/*.png | a CSV manifest
    n_images: int = 10000           # the first n images of `data` are used (0 = all)
    strict: bool = False            # stop at the first unreadable image instead of skipping it
    partitioner: str = "dirichlet"  # simulation: how `data` is cut into silos
    num_silos: int = 5              # simulation; Flower's num-partitions wins inside a Flower run
    alpha: float = 0.3              # dirichlet: label-skew concentration (0.1 strong skew, 100 nearly IID)
    classes_per_silo: int = 2       # pathological
    quantity_power: float = 1.0     # quantity: silo i holds a share proportional to (i + 1) ** quantity-power
    domains: str = ""               # domain skew: comma-separated transforms per silo, cycled
    min_size: int = 10              # smallest acceptable silo (never below 3)
    query_frac: float = 0.1         # each silo's query split
    n_query: int = 1000             # fedhash train: query images of the centralized split
    n_train: int = 10000            # fedhash train: training images, drawn from the database split
    seed: int = 0
    # ------------------------------------------------------------ the hash function
    bits: int = 64
    mode: str = "probe"             # probe: the head on cached features; lora: adapters in the backbone too
    supervised: bool = True
    backbone: str = DEFAULT_BACKBONE
    weights: str = ""               # weights file for backbones that do not ship with fedhash
    size: int = DEFAULT_SIZE        # backbone input size in pixels
    views: int = 4                  # augmented views cached per training image
    variant: str = "small"          # HashCoder size
    lora_r: int = 16
    lora_alpha: float = 16.0
    # ------------------------------------------------------------ training
    epochs: int = 5                 # fedhash train: epochs of centralized training
    local_epochs: int = 1           # federated: epochs per round at each silo
    batch_size: int = 256
    lr: float = 1e-3
    lr_min: float = 1e-6
    weight_decay: float = 1e-2
    lam: float = 0.1
    eps: float = 0.05
    # local training normalises a silo's batch against the pooled BatchNorm statistics of all
    # silos (Batch Renormalization) instead of the batch's own; see hashing.coder.BatchRenorm1d
    batch_renorm: bool = True
    # ------------------------------------------------------------ differential privacy
    # README, "Differential privacy": the privacy unit is one image ("sample": Opacus DP-SGD on the
    # DP head, per silo) or one silo's whole update ("client": Flower's DP wrappers)
    dp: str = "none"
    dp_epsilon: float = 0.0         # sample: target ε per silo for the whole run (0 = use dp-noise)
    dp_delta: float = 1e-5
    dp_noise: float = 0.0           # noise multiplier (sample: DP-SGD's, when dp-epsilon is 0; client: the wrapper's)
    dp_clip: float = 0.3            # sample: per-image gradient norm bound; client: update norm bound (initial, adaptive)
    dp_moments_ratio: float = 1.0   # sample: noise multiplier of the one feature-moments release / DP-SGD's
    dp_max_noise: float = 20.0      # sample: a target ε that needs more DP-SGD noise than this is refused
    dp_dims: int = 256              # sample: principal axes the DP head projects on (its rotation is bits x dp-dims)
    dp_axes: int = 8                # DP head and DP-ITQ: where the release left PCA's tail as it is, keep this many principal
                                    # axes, the rest random directions of their complement (>= dp-dims: plain PCA);
                                    # BENCHMARKS.md, "The noise-helps mystery"
    dp_clipping: str = "server-fixed"  # client: which Flower wrapper clips the updates
    # ------------------------------------------------------------ secure aggregation (README, "Secure aggregation")
    secagg: bool = False            # the server learns only the sums: updates, statistics, moments (masked, SecAgg)
    secagg_threshold: int = 0       # silos whose shares rebuild a dropped silo's mask key (0 = a majority of the keyed silos)
    secagg_range: float = 4.0       # bound on every entry of a silo's weighted update (num-examples / total x change)
    # ------------------------------------------------------------ server
    strategy: str = "fedavg"
    num_server_rounds: int = 10
    fraction_train: float = 1.0     # the silos that train each round (a seeded sample by silo name; at least min-train-nodes)
    fraction_evaluate: float = 1.0  # the silos that score the global model each round (a seeded sample; the final scores are all)
    min_train_nodes: int = 2
    round_timeout: float = 600.0
    proximal_mu: float = 0.01
    server_lr: float = 0.0          # server learning rate; 0 = the strategy's default (FedAvgM 1.0, FedAdam/Yogi/Adagrad eta 0.1)
    server_momentum: float = 0.0    # FedAvgM
    server_tau: float = 1e-3
    trimmed_beta: float = 0.2
    krum_malicious: int = 0
    eval_every: int = 1
    out_dir: str = "runs/flwr"
    cache_dir: str = ""             # feature cache folder ("" = $FEDHASH_CACHE or ~/.cache/fedhash/features)
    resume: bool = False
    keep_checkpoints: int = 3       # checkpoints kept: the last N rounds' (the newest is the final one); 0 = keep all
    # ------------------------------------------------------------ the ClientApp process and testing
    client_threads: int = 0         # torch threads per ClientApp process (0 = torch's default); a site's node config `threads` wins
    inject_failures: str = ""       # testing: "<silo>@<round>,..." makes that silo raise in that round's training (@search, @search-stall: in a search)
    # ------------------------------------------------------------ Flower's simulation engine (fedhash simulate only)
    feed_interval: float = 0.01     # seconds between passes of the engine's message feeder (0 = Flower's own 0.1 s loop)
    pull_interval: float = 0.01     # seconds between the server's polls for replies (0 = Flower's own 0.1 s)
    ray_address: str = ""           # a running Ray cluster to put the simulated silos on ("host:port" or "auto"; "" = start one)

    # ---------------------------------------------------------------- reading and writing

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config", base: "Config | None" = None,
                  key_prefix: str = "") -> "Config":
        """Build from a flat mapping (kebab- or snake-case keys); unknown keys and bad types are errors.

        ``key_prefix`` is how the source spells these keys (a scenario's ``unsupervised-``), for the errors."""
        types = {f.name: f.type for f in fields(cls)}
        out = asdict(base) if base is not None else {}
        for raw_key, value in values.items():
            key = str(raw_key).strip().replace("-", "_")
            shown = f"{key_prefix}{key.replace('_', '-')}"
            if key not in types:
                raise ConfigError(f"{source}: unknown key '{key_prefix}{raw_key}'; known keys: {', '.join(cls.keys())}")
            out[key] = _coerce(value, types[key], shown, source)
        out = _normalise(out, source, key_prefix)
        cfg = cls(**out)
        cfg.check(source, key_prefix)
        return cfg

    def check(self, source: str = "config", key_prefix: str = "") -> None:
        """Every value in range, before any work starts; the error names the key and the fix."""
        def bad(key: str, why: str):
            raise ConfigError(f"{source}: '{key_prefix}{key.replace('_', '-')}' {why}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                bad(f.name, f"is {v}; give a finite number")
        choices = {"mode": MODES, "strategy": STRATEGIES, "partitioner": PARTITIONERS, "dp": DP_UNITS,
                   "dp_clipping": DP_CLIPPING, "variant": ("small", "large")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                bad(key, f"is {getattr(self, key)!r}; use one of: {', '.join(allowed)}")
        if self.bits <= 0 or self.bits % 8 or self.bits > MAX_BITS:
            bad("bits", f"is {self.bits}; the code length must be a positive multiple of 8 (FAISS binary indexes) "
                        f"up to {MAX_BITS}, e.g. 64")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            bad("size", f"is {self.size}; give an input size in pixels from {MIN_SIZE} (the backbone's stride: smaller "
                        f"images leave it one pixel) to {MAX_SIZE}, e.g. {DEFAULT_SIZE}")
        for key in ("num_server_rounds", "local_epochs", "epochs", "batch_size", "size", "num_silos", "eval_every",
                    "classes_per_silo", "n_query", "n_train", "lora_r", "dp_dims"):
            if getattr(self, key) < 1:
                bad(key, f"is {getattr(self, key)}; it must be at least 1")
        for key in ("n_images", "min_size", "seed", "krum_malicious", "client_threads", "keep_checkpoints", "dp_axes"):
            if getattr(self, key) < 0:
                bad(key, f"is {getattr(self, key)}; it must be at least 0")
        if self.views < 2 and not self.supervised:
            bad("views", "must be at least 2 for unsupervised CroVCA (two views per image)")
        if not 1 <= self.views <= MAX_VIEWS:
            bad("views", f"is {self.views}; cache from 1 to {MAX_VIEWS} augmented views per image (default 4)")
        for key in ("fraction_train", "fraction_evaluate"):
            if not 0.0 < getattr(self, key) <= 1.0:
                bad(key, f"is {getattr(self, key)}; use a fraction in (0, 1]")
        if self.min_train_nodes < 1:
            bad("min_train_nodes", "must be at least 1")
        if not self.alpha > 0 or not math.isfinite(self.alpha):
            bad("alpha", f"is {self.alpha}; the Dirichlet concentration must be a number above 0 "
                         "(0.1: strong label skew, 100: nearly IID)")
        if not self.quantity_power >= 0 or not math.isfinite(self.quantity_power):
            bad("quantity_power", f"is {self.quantity_power}; use a number of at least 0 (0: equal sizes)")
        if not 0.0 < self.query_frac < 1.0:
            bad("query_frac", f"is {self.query_frac}; use a fraction between 0 and 1 (exclusive)")
        for key in ("lr", "round_timeout"):
            if not getattr(self, key) > 0:
                bad(key, f"is {getattr(self, key)}; it must be > 0")
        for key in ("lr_min", "weight_decay", "lam", "proximal_mu", "server_tau", "feed_interval", "pull_interval"):
            if not getattr(self, key) >= 0:
                bad(key, f"is {getattr(self, key)}; it must be >= 0")
        if not self.eps > 0:
            bad("eps", f"is {self.eps}; the coding rate's epsilon must be > 0")
        for key in ("feed_interval", "pull_interval"):
            if getattr(self, key) > 1:
                bad(key, f"is {getattr(self, key)}; give seconds in [0, 1] (0: Flower's own)")
        addr = self.ray_address.strip()
        if addr and addr != "auto" and not (addr.startswith("ray://") or re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", addr)):
            bad("ray_address", f"is {self.ray_address!r}; give a running cluster's host:port (ray start --head prints "
                               "it), \"auto\" for the cluster this machine belongs to, or \"\" to start Ray here")
        for key in ("dp_epsilon", "dp_noise", "dp_max_noise"):
            if not getattr(self, key) >= 0:
                bad(key, f"is {getattr(self, key)}; it must be >= 0")
        if self.dp != "none":
            if not 0 < self.dp_delta < 1:
                bad("dp_delta", f"is {self.dp_delta}; use a probability in (0, 1), below 1/N, e.g. 1e-5")
            if self.dp_clip <= 0:
                bad("dp_clip", f"is {self.dp_clip}; the clipping norm must be > 0")
            if self.dp_moments_ratio <= 0:
                bad("dp_moments_ratio", f"is {self.dp_moments_ratio}; it must be > 0")
            if self.mode != "probe":
                bad("dp", f"is {self.dp!r} with mode = {self.mode!r}; DP training runs in probe mode (set mode = \"probe\")")
        if self.dp == "sample":
            if self.supervised:
                bad("dp", "is \"sample\" with supervised = true; sample-level DP trains unsupervised CroVCA (its class "
                          "prototypes would need an accounted release): set supervised = false")
            if self.dp_epsilon <= 0 and self.dp_noise <= 0:
                bad("dp_epsilon", "and 'dp-noise' are both 0; sample-level DP needs a target ε or a noise multiplier")
        if self.dp == "client" and self.dp_noise <= 0:
            bad("dp_noise", "is 0; client-level DP needs a noise multiplier > 0")
        if self.server_lr < 0:
            bad("server_lr", f"is {self.server_lr}; use a rate > 0, or 0 for the strategy's default")
        if not 0.0 <= self.server_momentum < 1.0:
            bad("server_momentum", f"is {self.server_momentum}; use a momentum in [0, 1)")
        if not 0.0 <= self.trimmed_beta < 0.5:
            bad("trimmed_beta", f"is {self.trimmed_beta}; use a fraction in [0, 0.5)")
        if self.secagg:
            if self.strategy in SECAGG_REFUSED:
                bad("secagg", f"is true with strategy = {self.strategy!r}, which needs every silo's own update; secure "
                              "aggregation gives the server only their sum: use fedavg, fedprox, fedavgm, fedadam, "
                              "fedyogi or fedadagrad, or secagg = false")
            if self.dp == "client" and self.dp_clipping != "client-fixed":
                bad("secagg", f"is true with dp = \"client\" and dp-clipping = {self.dp_clipping!r}: under secure "
                              "aggregation each silo clips its own update and adds its share of the noise (distributed "
                              "DP), which needs a fixed norm the silo applies itself; set dp-clipping = \"client-fixed\"")
        if self.secagg_threshold < 0 or self.secagg_threshold == 1:
            bad("secagg_threshold", f"is {self.secagg_threshold}; give 0 (a majority) or at least 2 silos")
        if not 0 < self.secagg_range <= 1024:
            bad("secagg_range", f"is {self.secagg_range}; give a bound in (0, 1024] on a weighted update's entries")
        failures_of(self.inject_failures, source, key_prefix)

    def to_dict(self, kebab: bool = True) -> dict[str, Any]:
        d = asdict(self)
        return {k.replace("_", "-"): v for k, v in d.items()} if kebab else d

    def replace(self, **changes: Any) -> "Config":
        cfg = dataclasses.replace(self, **changes)
        cfg.check()
        return cfg

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "the server's run config") -> "Config":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source} is not valid JSON ({e}); client and server must run the same fedhash") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{source} is not a JSON object; client and server must run the same fedhash")
        return cls.from_dict(values, source=source)

    # ---------------------------------------------------------------- views of the config

    @property
    def hasher_kind(self) -> str:
        """The kind of hash function (:func:`hashing.hashers.create_hasher`) this config trains: under any DP
        the DP head (its statistics are released once, not pooled each round), else the mode."""
        return "dp" if self.dp != "none" else self.mode

    def hasher_options(self, feature_dim: int) -> dict[str, Any]:
        """The keyword arguments of :func:`hashing.hashers.create_hasher` for :attr:`hasher_kind`."""
        common = {"feature_dim": int(feature_dim), "bits": self.bits, "seed": self.seed}
        if self.hasher_kind == "dp":
            return common | {"dims": self.dp_dims}
        if self.hasher_kind == "lora":
            return common | {"variant": self.variant, "backbone": self.backbone, "weights": self.weights or None,
                             "r": self.lora_r, "alpha": self.lora_alpha}
        return common | {"variant": self.variant}

    @property
    def domain_list(self) -> tuple[str, ...]:
        return tuple(d for d in self.domains.split(",") if d)

    def domain_of(self, silo_id: int) -> str:
        """The transform silo ``silo_id`` gets: ``domains`` cycled (the default cycle under ``domain``), else none."""
        cycle = self.domain_list or (DEFAULT_DOMAINS if self.partitioner == "domain" else ())
        return cycle[silo_id % len(cycle)] if cycle else "none"

    @property
    def min_silo_size(self) -> int:
        return max(self.min_size, 3)  # one query, one database image, one more: make_splits' minimum

    def partition_config(self) -> dict[str, Any]:
        """What defines a silo partition of a data set's labels."""
        keys = ("partitioner", "num_silos", "alpha", "classes_per_silo", "quantity_power", "domains", "min_size",
                "query_frac", "seed")
        return {k: getattr(self, k) for k in keys}

    def data_config(self) -> dict[str, Any]:
        """What defines the silos (their data and splits): must match on --resume."""
        return {k: getattr(self, k) for k in ("data", "n_images", "views")} | self.partition_config()

    def dp_config(self) -> dict[str, Any]:
        """What defines the run's privacy guarantee: must match on --resume."""
        return {k: getattr(self, k) for k in ("dp", "dp_epsilon", "dp_delta", "dp_noise", "dp_clip",
                                               "dp_moments_ratio", "dp_max_noise", "dp_dims", "dp_clipping")}


SEARCH_FAILURES = ("search", "search-stall")  # inject-failures: a simulated silo's search raises, or stalls
UNMASK_FAILURE = "unmask"  # inject-failures "<silo>@unmask<r>": the silo fails its unmaskings of round r (secagg)
SECAGG_REFUSED = ("fedmedian", "fedtrimmedavg", "krum")  # strategies that need each silo's own update


def failures_of(text: str, source: str = "config", key_prefix: str = "") -> dict[str, set[int | str]]:
    """``inject-failures`` parsed: silo name -> rounds in which its training raises, ``search`` (its
    search replies with an error), ``search-stall`` (it answers only after round-timeout) or ``unmask<r>``
    (under secure aggregation it fails to unmask round r's sums, after it sent its masked reply)."""
    out: dict[str, set[int | str]] = {}
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        name, sep, rnd = item.rpartition("@")
        rnd = rnd.strip()
        unmask = rnd.startswith(UNMASK_FAILURE) and rnd[len(UNMASK_FAILURE):].isdigit()
        if not sep or not name or not (rnd.isdigit() or rnd in SEARCH_FAILURES or unmask):
            raise ConfigError(f"{source}: '{key_prefix}inject-failures' item {item!r} is not <silo>@<round>, "
                              "<silo>@search, <silo>@search-stall or <silo>@unmask<round>; write e.g. "
                              "inject-failures = \"silo-1@2\"")
        out.setdefault(name, set()).add(int(rnd) if rnd.isdigit() else rnd)
    return out


def _normalise(values: dict[str, Any], source: str, key_prefix: str) -> dict[str, Any]:
    """Canonical spellings: a partitioner in lower case, domains as a comma list of known names."""
    if isinstance(values.get("partitioner"), str):
        values["partitioner"] = values["partitioner"].strip().lower()
    if "domains" in values:
        names = []
        for s in str(values["domains"]).split(","):
            s = s.strip().lower().replace("_", "-")
            if s and s not in DOMAINS:
                raise ConfigError(f"{source}: '{key_prefix}domains' names {s!r}; use names from: {', '.join(DOMAINS)}")
            if s:
                names.append(s)
        values["domains"] = ",".join(names)
    return values


def _coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if name == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.strip().lower() in ("true", "1", "yes")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if name == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value.strip()) if isinstance(value, str) else int(value)
        if name == "float":
            if isinstance(value, bool):
                raise ValueError
            v = float(value.strip()) if isinstance(value, str) else float(value)
            if math.isnan(v):
                raise ValueError
            return v
        if name == "str":
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return ",".join(value)
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError, AttributeError):
        pass
    raise ConfigError(f"{source}: '{key}' = {value!r} is not {'an' if name == 'int' else 'a'} {name}; "
                      f"write e.g. {key} = {_example(name)}")


def _example(name: str) -> str:
    return {"bool": "true", "int": "10", "float": "0.5", "str": '"text"'}.get(name, "...")
