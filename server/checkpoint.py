"""One checkpoint per round, atomic, with provenance; and the door back in (--resume)."""
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
from hashing.errors import FedhashError, ModelVersionError
from hashing.fedconfig import FedConfig

FORMAT = 1
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


def save_checkpoint(out_dir: str | Path, *, server_round: int, params: Mapping[str, np.ndarray],
                    globals_: Mapping[str, np.ndarray], strategy_state: Mapping[str, Any], model_version: str,
                    cfg: FedConfig, weights_id: str, silos: Mapping[str, str], history: list[dict],
                    scenario: Mapping[str, Any] | None = None, privacy: Mapping[str, Any] | None = None) -> Path:
    """Write ``checkpoints/round-XXXX.pt`` atomically (temp file, then rename)."""
    rec = {
        "format": FORMAT, "round": int(server_round), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": {k: torch.from_numpy(np.array(v)) for k, v in params.items()},
        "globals": {k: torch.from_numpy(np.array(v)) for k, v in globals_.items()},
        "strategy_state": {a: {k: torch.from_numpy(np.array(v)) for k, v in d.items()} for a, d in strategy_state.items()},
        "model_version": model_version, "function_config": cfg.function_config() | {"weights_id": weights_id},
        "data_config": cfg.data_config(), "config": cfg.to_dict(), "scenario": dict(scenario or {}),
        "silos": dict(silos), "libraries": library_versions(), "history": list(history),
        "privacy": dict(privacy or {"unit": "none"}),  # the guarantee the weights were trained under
    }
    buf = io.BytesIO()
    torch.save(rec, buf)
    path = checkpoint_dir(out_dir) / f"round-{server_round:04d}.pt"
    atomic.write_bytes(path, buf.getvalue())
    return path


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in checkpoint_dir(out_dir).glob("round-*.pt") if (m := _NAME.search(p.name))]
    return max(found)[1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        rec = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise FedhashError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                           "delete it to resume from the round before") from e
    rec["params"] = {k: v.numpy() for k, v in rec["params"].items()}
    rec["globals"] = {k: v.numpy() for k, v in rec["globals"].items()}
    rec["strategy_state"] = {a: {k: v.numpy() for k, v in d.items()} for a, d in rec["strategy_state"].items()}
    return rec


def check_resume(rec: Mapping[str, Any], cfg: FedConfig, weights_id: str, path: Path) -> None:
    """A resumed run must compute the same hash function on the same silos."""
    want = cfg.function_config() | {"weights_id": weights_id}
    have = rec["function_config"]
    diff = [f"{k}={have.get(k)!r} (now {want.get(k)!r})" for k in sorted(set(want) | set(have)) if have.get(k) != want.get(k)]
    if diff:
        raise ModelVersionError(f"cannot resume from {path}: it was trained with {', '.join(diff)}; "
                                "resume with the same settings or start a fresh out-dir")
    pwant = cfg.dp_config()
    phave = {k: rec.get("config", {}).get(k.replace("_", "-"), FedConfig.__dataclass_fields__[k].default) for k in pwant}
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
