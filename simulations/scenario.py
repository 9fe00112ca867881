"""Scenario files: one TOML per study, every key a knob of the federated run (Config, kebab-case)
plus a few of the study itself.

    name = "demo"
    description = "5 hospitals, Dirichlet 0.3 on Fashion-MNIST"
    references = ["local-only", "centralized", "itq"]   # what the report places the federation between
    also-unsupervised = true                            # run the other CroVCA mode beside the headline one
    unsupervised-strategy = "fedavgm"                   # "<mode>-<key>": a knob for one CroVCA mode only
    data = "fashion-mnist"
    num-silos = 5
    partitioner = "dirichlet"
    ...

A malformed file or key gives a one-line error naming the file and the key.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hashing.config import Config
from hashing.errors import ConfigError

REFERENCES = ("local-only", "centralized", "itq")
# the gradient-leakage lab's plan (fedhash leakage; simulations/leakage/study.py checks them)
LEAKAGE_KEYS = ("leakage-attacks", "leakage-batch-sizes", "leakage-local-steps", "leakage-epsilons", "leakage-trials",
                "leakage-smallest-trials")
STUDY_KEYS = ("name", "description", "references", "also-unsupervised", *LEAKAGE_KEYS)
MODE_PREFIXES = {"supervised-": True, "unsupervised-": False}  # per-mode knobs: unsupervised-server-lr = 3.0
# what both modes must share: the silos, their features and the run's folders
SHARED_KEYS = ("data", "n_images", "partitioner", "num_silos", "alpha", "classes_per_silo", "quantity_power",
               "domains", "min_size", "query_frac", "seed", "mode", "backbone", "weights", "size", "views",
               "strict", "supervised", "out_dir", "cache_dir", "resume", "feed_interval", "pull_interval",
               "ray_address")
SCENARIO_DIR = Path(__file__).parent / "scenarios"


@dataclass
class Scenario:
    name: str
    cfg: Config
    description: str = ""
    references: tuple[str, ...] = REFERENCES
    also_unsupervised: bool = False
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    mode_overrides: dict[bool, dict[str, Any]] = field(default_factory=dict)  # supervised? -> knobs

    def config_for(self, supervised: bool) -> Config:
        """The run config of one CroVCA mode: the scenario's knobs plus that mode's own."""
        return Config.from_dict(self.mode_overrides.get(supervised, {}) | {"supervised": supervised},
                                   source=self.source, base=self.cfg)

    def to_dict(self) -> dict[str, Any]:
        per_mode = {f"{p}{k}": v for p, sup in MODE_PREFIXES.items() for k, v in self.mode_overrides.get(sup, {}).items()}
        return {"name": self.name, "description": self.description, "references": list(self.references),
                "also-unsupervised": self.also_unsupervised, "source": self.source} | per_mode | self.cfg.to_dict()


def resolve(path_or_name: str | Path) -> Path:
    """A scenario file path, or the name of one shipped in simulations/scenarios/."""
    p = Path(path_or_name)
    if p.exists():
        return p
    shipped = SCENARIO_DIR / f"{p.stem}.toml"
    if shipped.exists() and p.suffix in ("", ".toml") and len(p.parts) == 1:
        return shipped
    names = ", ".join(sorted(q.stem for q in SCENARIO_DIR.glob("*.toml")))
    raise ConfigError(f"scenario '{path_or_name}' not found; give a .toml path or one of: {names}")


def load_scenario(path_or_name: str | Path, overrides: dict[str, Any] | None = None) -> Scenario:
    path = resolve(path_or_name)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"scenario {path} is not valid TOML: {e}; fix that line") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"scenario {path} cannot be read ({e})") from e
    return scenario_from_dict(raw, source=str(path), overrides=overrides)


def scenario_from_dict(raw: dict[str, Any], *, source: str = "scenario", overrides: dict[str, Any] | None = None) -> Scenario:
    """The scenario of ``raw`` (a file's keys) with ``overrides`` (``--set``) on top. An error the overrides cause
    names them (``--set k=v over <file>: ...``); an error of the file itself names the file."""
    if not overrides:
        return _scenario(dict(raw), source)
    try:
        return _scenario(dict(raw) | dict(overrides), source)
    except ConfigError as e:
        _scenario(dict(raw), source)  # the file alone: its own error blames the file
        said = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in overrides.items())
        text = str(e)
        text = text[len(source) + 2:] if text.startswith(f"{source}: ") else text
        raise ConfigError(f"--set {said} (over {source}): {text}") from None


def _scenario(raw: dict[str, Any], source: str) -> Scenario:
    nested = [k for k, v in raw.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"{source}: '{nested[0]}' is a table; scenario keys are flat (write {nested[0]}-<key> = ... "
                          "or move its keys to the top level)")
    study = {k: raw.pop(k) for k in list(raw) if k in STUDY_KEYS}
    per_mode: dict[bool, dict[str, Any]] = {}
    for k in list(raw):
        for prefix, sup in MODE_PREFIXES.items():
            if str(k).startswith(prefix):
                per_mode.setdefault(sup, {})[str(k)[len(prefix):]] = raw.pop(k)
    cfg = Config.from_dict(raw, source=source)
    for prefix, sup in MODE_PREFIXES.items():  # a bad per-mode key fails here, named with its prefix
        knobs = per_mode.get(sup, {})
        shared = [k for k in knobs if k.replace("-", "_") in SHARED_KEYS]
        if shared:
            raise ConfigError(f"{source}: '{prefix}{shared[0]}': both CroVCA modes share the silos, features and "
                              "folders; only training and server knobs can differ per mode")
        Config.from_dict(knobs, source=source, base=cfg, key_prefix=prefix)
    name = study.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: 'name' must be a non-empty string")
    refs = study.get("references", list(REFERENCES))
    if not isinstance(refs, list) or any(r not in REFERENCES for r in refs):
        raise ConfigError(f"{source}: 'references' = {refs!r}; use a list drawn from {list(REFERENCES)}")
    also = study.get("also-unsupervised", False)
    if not isinstance(also, bool):
        raise ConfigError(f"{source}: 'also-unsupervised' = {also!r} is not a bool; write also-unsupervised = true")
    desc = study.get("description", "")
    if not isinstance(desc, str):
        raise ConfigError(f"{source}: 'description' must be a string")
    return Scenario(name=name, cfg=cfg, description=desc, references=tuple(refs), also_unsupervised=also,
                    source=source, raw=dict(raw) | study, mode_overrides=per_mode)
