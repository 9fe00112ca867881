"""The knobs of a federated run, one flat dataclass shared by the server, the clients and the runner.

Keys are written kebab-case in TOML (``[tool.flwr.app.config]``, scenario files,
``flwr run --run-config``) and snake_case here. :func:`FedConfig.from_dict`
checks every key and type and names the offending key in a one-line error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .backbones import DEFAULT_BACKBONE
from .errors import ConfigError

MODES = ("probe", "lora")
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum")
DP_UNITS = ("none", "sample", "client")
DP_CLIPPING = ("server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
PARTITIONERS = ("iid", "dirichlet", "pathological", "quantity", "domain")
# Flower message types of the fedhash protocol beyond train / evaluate
MSG_STATS = "query.stats"
MSG_INDEX = "query.index"


@dataclass(frozen=True)
class FedConfig:
    # data and silos
    data: str = "fashion-mnist"
    n_images: int = 10000           # simulation: the first n images of `data` are partitioned (0 = all)
    partitioner: str = "dirichlet"
    num_silos: int = 5              # simulation; Flower's num-partitions wins inside a Flower run
    alpha: float = 0.3
    classes_per_silo: int = 2
    quantity_power: float = 1.0
    domains: str = ""               # domain skew: comma-separated transforms per silo, cycled
    min_size: int = 10
    query_frac: float = 0.1
    seed: int = 0
    # the hash function
    bits: int = 64
    mode: str = "probe"
    supervised: bool = True
    backbone: str = DEFAULT_BACKBONE
    weights: str = ""               # weights file for backbones that do not ship with fedhash
    size: int = 96
    views: int = 4
    variant: str = "small"
    lora_r: int = 16
    lora_alpha: float = 16.0
    # local training
    local_epochs: int = 1
    batch_size: int = 256
    lr: float = 1e-3
    lr_min: float = 1e-6
    weight_decay: float = 1e-2
    lam: float = 0.1
    eps: float = 0.05
    # local training normalises a silo's batch against the pooled BatchNorm statistics of all
    # silos (Batch Renormalization) instead of the batch's own; see hashing.coder.BatchRenorm1d
    batch_renorm: bool = True
    # differential privacy (README, "Differential privacy"): the privacy unit is one image ("sample":
    # Opacus DP-SGD on the DP head, per silo) or one silo's whole update ("client": Flower's DP wrappers)
    dp: str = "none"
    dp_epsilon: float = 0.0         # sample: target ε per silo for the whole run (0 = use dp-noise)
    dp_delta: float = 1e-5
    dp_noise: float = 0.0           # noise multiplier (sample: DP-SGD's, when dp-epsilon is 0; client: the wrapper's)
    dp_clip: float = 0.3            # sample: per-image gradient norm bound; client: update norm bound (initial, adaptive)
    dp_moments_ratio: float = 1.0   # sample: noise multiplier of the one feature-moments release / DP-SGD's
    dp_max_noise: float = 20.0      # sample: a target ε that needs more DP-SGD noise than this is refused
    dp_dims: int = 256              # sample: principal axes the DP head projects on (its rotation is bits x dp-dims)
    dp_clipping: str = "server-fixed"  # client: which Flower wrapper clips the updates
    # server
    strategy: str = "fedavg"
    num_server_rounds: int = 10
    fraction_train: float = 1.0
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
    cache_dir: str = ""
    resume: bool = False

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config", base: "FedConfig | None" = None,
                  key_prefix: str = "") -> "FedConfig":
        """Build from a flat mapping (kebab- or snake-case keys); unknown keys and bad types are errors.

        ``key_prefix`` is how the source spells these keys (a scenario's ``unsupervised-``), for the errors."""
        types = {f.name: f.type for f in fields(cls)}
        out = asdict(base) if base is not None else {}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in types:
                raise ConfigError(f"{source}: unknown key '{key_prefix}{raw_key}'; known keys: {', '.join(cls.keys())}")
            out[key] = _coerce(value, types[key], f"{key_prefix}{raw_key}", source)
        cfg = cls(**out)
        cfg.check(source, key_prefix)
        return cfg

    def check(self, source: str = "config", key_prefix: str = "") -> None:
        def bad(key: str, why: str):
            raise ConfigError(f"{source}: '{key_prefix}{key.replace('_', '-')}' {why}")
        if self.mode not in MODES:
            bad("mode", f"is {self.mode!r}; use one of {', '.join(MODES)}")
        if self.strategy not in STRATEGIES:
            bad("strategy", f"is {self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        if self.partitioner not in PARTITIONERS:
            bad("partitioner", f"is {self.partitioner!r}; use one of {', '.join(PARTITIONERS)}")
        if self.bits <= 0 or self.bits % 8:
            bad("bits", f"is {self.bits}; the code length must be a positive multiple of 8 (FAISS binary indexes)")
        for key in ("num_server_rounds", "local_epochs", "batch_size", "size", "num_silos", "eval_every"):
            if getattr(self, key) < 1:
                bad(key, f"is {getattr(self, key)}; it must be at least 1")
        if self.views < 2 and not self.supervised:
            bad("views", "must be at least 2 for unsupervised CroVCA (two views per image)")
        if not 0.0 < self.fraction_train <= 1.0:
            bad("fraction_train", f"is {self.fraction_train}; use a fraction in (0, 1]")
        if self.min_train_nodes < 1:
            bad("min_train_nodes", "must be at least 1")
        if self.alpha <= 0:
            bad("alpha", f"is {self.alpha}; the Dirichlet concentration must be > 0")
        if not 0.0 < self.query_frac < 1.0:
            bad("query_frac", f"is {self.query_frac}; use a fraction in (0, 1)")
        if self.lr <= 0:
            bad("lr", "must be > 0")
        if self.dp not in DP_UNITS:
            bad("dp", f"is {self.dp!r}; use one of {', '.join(DP_UNITS)}")
        if self.dp_clipping not in DP_CLIPPING:
            bad("dp_clipping", f"is {self.dp_clipping!r}; use one of {', '.join(DP_CLIPPING)}")
        for key in ("dp_epsilon", "dp_noise", "dp_max_noise"):
            if not getattr(self, key) >= 0:
                bad(key, f"is {getattr(self, key)}; it must be >= 0")
        if self.dp != "none":
            if not 0 < self.dp_delta < 1:
                bad("dp_delta", f"is {self.dp_delta}; use a probability in (0, 1), below 1/N, e.g. 1e-5")
            if self.dp_clip <= 0:
                bad("dp_clip", f"is {self.dp_clip}; the clipping norm must be > 0")
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

    def to_dict(self, kebab: bool = True) -> dict[str, Any]:
        d = asdict(self)
        return {k.replace("_", "-"): v for k, v in d.items()} if kebab else d

    def replace(self, **changes: Any) -> "FedConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.check()
        return cfg

    def function_config(self) -> dict[str, Any]:
        """What defines the hash function (must match on --resume)."""
        d = {k: getattr(self, k) for k in ("backbone", "weights", "size", "bits", "mode", "variant")}
        if self.mode == "lora":
            d |= {"lora_r": self.lora_r, "lora_alpha": self.lora_alpha}
        if self.dp != "none":  # the DP head is another function
            d |= {"dp": self.dp, "dp_dims": self.dp_dims}
        return d

    def dp_config(self) -> dict[str, Any]:
        """What defines the run's privacy guarantee (must match on --resume)."""
        return {k: getattr(self, k) for k in ("dp", "dp_epsilon", "dp_delta", "dp_noise", "dp_clip",
                                               "dp_moments_ratio", "dp_max_noise", "dp_dims", "dp_clipping")}

    def data_config(self) -> dict[str, Any]:
        """What defines the silos (their data and splits)."""
        keys = ("data", "n_images", "partitioner", "alpha", "classes_per_silo", "quantity_power", "domains",
                "min_size", "query_frac", "seed", "views")
        return {k: getattr(self, k) for k in keys}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "the server's run config") -> "FedConfig":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source} is not valid JSON ({e}); client and server must run the same fedhash") from e
        return cls.from_dict(values, source=source)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if name == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if name == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if name == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if name == "str":
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{source}: '{key}' = {value!r} is not {'an' if name == 'int' else 'a'} {name}; write e.g. {key} = {_example(name)}")


def _example(name: str) -> str:
    return {"bool": "true", "int": "10", "float": "0.5", "str": '"text"'}.get(name, "...")
