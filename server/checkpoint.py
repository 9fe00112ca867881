"""One checkpoint per round, atomic, with provenance; and the door back in (``resume = true``).

A checkpoint (``checkpoints/round-XXXX.pt``) holds the round's global model as a model record (the
one format of :mod:`hashing.model`: ``hashing.model.load_model`` reads a checkpoint as it reads
``model.pt``; the model record's ``extra`` carries the config, the silos and the library versions)
and what the server needs to go on: the prototypes, the strategy's server-optimiser state, the history
of rounds, the privacy ledger, the data config and the scenario.
"""
from __future__ import annotations

import io
import platform
import re
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hashing import atomic
from hashing.config import Config
from hashing.errors import FedhashError, ModelVersionError

FORMAT = 2
LIBRARIES = ("fedhash", "flwr", "flwr-datasets", "torch", "timm", "peft", "faiss-cpu", "numpy", "opacus")
_NAME = re.compile(r"round-(\d{4})\.pt$")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return out


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in checkpoint_dir(out_dir).glob("round-*.pt") if (m := _NAME.search(p.name))]
    return max(found)[1] if found else None


def _tensors(d: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in d.items()}


def save_checkpoint(out_dir: str | Path, *, server_round: int, model: Mapping[str, Any], cfg: Config,
                    prototypes: Any | None, strategy_state: Mapping[str, Any], silos: Mapping[str, str],
                    history: list[dict], ledger: Mapping[str, list], scenario: Mapping[str, Any] | None = None) -> Path:
    """Write ``checkpoints/round-XXXX.pt`` atomically (temp file, then rename); ``model`` is a model record."""
    rec = {
        "format": FORMAT, "round": int(server_round), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": dict(model),
        "prototypes": None if prototypes is None else torch.as_tensor(np.array(prototypes)),
        "strategy_state": {a: _tensors(d) for a, d in strategy_state.items()},
        "config": cfg.to_dict(), "data_config": cfg.data_config(), "scenario": dict(scenario or {}),
        "silos": dict(silos), "libraries": dict(model.get("extra", {}).get("libraries") or library_versions()),
        "history": list(history),
        "ledger": {k: [list(e) for e in v] for k, v in ledger.items()},
    }
    buf = io.BytesIO()
    torch.save(rec, buf)
    path = checkpoint_dir(out_dir) / f"round-{server_round:04d}.pt"
    atomic.write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint as numpy arrays: its model record's ``params``, ``buffers``, ``identity``,
    ``model_version`` and ``privacy`` at the top level beside the server's own state."""
    try:
        rec = torch.load(Path(path), map_location="cpu", weights_only=True)
        if rec.get("format") != FORMAT:
            raise ValueError(f"format {rec.get('format')!r}, this fedhash reads format {FORMAT}")
        m = rec["model"]
        out = {k: v for k, v in rec.items() if k != "model"}
        out |= {"identity": m["identity"], "model_version": m["model_version"], "privacy": m["privacy"],
                "params": {k: v.numpy() for k, v in m["params"].items()},
                "buffers": {k: v.numpy() for k, v in m["buffers"].items()}}
    except Exception as e:
        raise FedhashError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                           "delete it to resume from the round before") from e
    out["prototypes"] = None if rec["prototypes"] is None else rec["prototypes"].numpy()
    out["strategy_state"] = {a: {k: v.numpy() for k, v in d.items()} for a, d in rec["strategy_state"].items()}
    return out


def check_resume(rec: Mapping[str, Any], cfg: Config, identity: Mapping[str, Any], path: Path) -> None:
    """A resumed run must compute the same hash function on the same silos, under the same privacy settings."""
    have = rec["identity"]
    diff = [f"{k}={have.get(k)!r} (now {identity.get(k)!r})" for k in sorted(set(identity) | set(have))
            if have.get(k) != identity.get(k)]
    if diff:
        raise ModelVersionError(f"cannot resume from {path}: it was trained with {', '.join(diff)}; "
                                "resume with the same settings or start a fresh out-dir")
    pwant = cfg.dp_config()
    defaults = Config()
    phave = {k: rec.get("config", {}).get(k.replace("_", "-"), getattr(defaults, k)) for k in pwant}
    pdiff = [f"{k.replace('_', '-')}={phave[k]!r} (now {pwant[k]!r})" for k in pwant if phave[k] != pwant[k]]
    if pdiff:
        raise ModelVersionError(f"cannot resume from {path}: it was trained under other privacy settings, "
                                f"{', '.join(pdiff)}; its ε would not hold: resume with the same dp settings or "
                                "start a fresh out-dir")
    dwant, dhave = cfg.data_config(), rec["data_config"]
    ddiff = [f"{k}={dhave.get(k)!r} (now {dwant.get(k)!r})" for k in sorted(dwant) if dhave.get(k) != dwant.get(k)]
    if ddiff:
        raise ModelVersionError(f"cannot resume from {path}: its silos were built with {', '.join(ddiff)}; "
                                "resume with the same data settings or start a fresh out-dir")
    check_same_run(rec.get("config", {}), int(rec["round"]), cfg, f"cannot resume from {path}")


# what a resumed run may set otherwise than the run it continues: where it runs and how it waits, not what it computes
RESUME_FREE = ("resume", "out-dir", "cache-dir", "weights", "client-threads", "round-timeout", "min-train-nodes",
               "feed-interval", "pull-interval", "keep-checkpoints", "inject-failures")


def check_same_run(was: Mapping[str, Any], rounds_done: int, cfg: Config, what: str) -> None:
    """A resume continues the run that wrote ``was`` (a config as kebab-case dict; keys it lacks take their
    defaults) after ``rounds_done`` rounds: every setting but :data:`RESUME_FREE` the same, and at least as many
    rounds (more extend it). The error names the first key that differs."""
    defaults, now = Config().to_dict(), cfg.to_dict()
    for key in sorted(now):
        if key in RESUME_FREE or key == "num-server-rounds":
            continue
        before = was.get(key, defaults[key])
        if before != now[key]:
            raise ModelVersionError(f"{what}: the run was started with {key} = {before!r}, now {now[key]!r}; "
                                    f"resume with {key} = {before!r} (only a larger num-server-rounds may change), "
                                    "or start a fresh run")
    if cfg.num_server_rounds < rounds_done:
        raise ModelVersionError(f"{what}: the run has done {rounds_done} rounds; num-server-rounds = "
                                f"{cfg.num_server_rounds} would rewrite them: give num-server-rounds of at least "
                                f"{rounds_done} (more extends the run), or start a fresh run")
