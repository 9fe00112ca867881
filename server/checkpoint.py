"""One checkpoint per round, atomic, with provenance; and the door back in (``resume = true``).

A checkpoint (``checkpoints/round-XXXX.pt``) holds the round's global model as a model record (the
one format of :mod:`hashing.model`: ``hashing.model.load_model`` reads a checkpoint as it reads
``model.pt``; the model record's ``extra`` carries the config, the silos and the library versions)
and what the server needs to go on: the prototypes, the strategy's server-optimiser state, the history
of rounds, the privacy ledger, the data config and the scenario.

**Verified on read.** A checkpoint carries a ``digest``: :func:`hashing.model.digest` of every field (its
tensors' bytes included), with the model record standing in by its own digest, which :func:`load_checkpoint`
checks together with the model record itself (its tensors against its model version, its fields against
its digest). A mismatch is an :class:`~hashing.errors.IntegrityError` naming the file and the fix (delete
it to resume from the round before). A checkpoint written before fedhash wrote digests has none and is
read as before (its model's tensors still checked against its model version).

**Retention.** After each checkpoint is written (atomically, then its folder synced) the older ones beyond
the last ``keep-checkpoints`` are deleted (0 keeps all); the newest complete checkpoint is never deleted,
so a crash at any moment leaves one to resume from, and the last round's checkpoint is the run's final one.
:func:`disk_estimate` is what a run's checkpoints will take on disk, :func:`disk_notice` the one line to
say before a run whose estimate is over :data:`DISK_NOTICE_BYTES`.
"""
from __future__ import annotations

import io
import logging
import os
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
from hashing.errors import IntegrityError, ModelVersionError
from hashing.model import digest, seal, verify_record

log = logging.getLogger("fedhash.server")

FORMAT = 2
LIBRARIES = ("fedhash", "flwr", "flwr-datasets", "torch", "timm", "peft", "faiss-cpu", "numpy", "opacus")
_NAME = re.compile(r"round-(\d{4,})\.pt$")
_TEMP = re.compile(r"^\.round-\d{4,}\.pt\..*\.tmp$")  # what a write killed mid-way leaves (hashing.atomic)
DISK_NOTICE_BYTES = 1 << 30  # a run whose checkpoints would take more than this is announced before it starts


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
    rec["model"] = seal(rec["model"])
    rec["digest"] = _digest(rec)
    buf = io.BytesIO()
    torch.save(rec, buf)
    path = checkpoint_dir(out_dir) / f"round-{server_round:04d}.pt"
    atomic.write_bytes(path, buf.getvalue())
    prune(out_dir, cfg.keep_checkpoints, newest=path)
    return path


def _digest(rec: Mapping[str, Any]) -> str:
    """A checkpoint's digest: every field but its own digest, the model record by its digest."""
    return digest({k: v for k, v in rec.items() if k != "digest"} | {"model": rec["model"]["digest"]})


def prune(out_dir: str | Path, keep: int, newest: Path | None = None) -> list[Path]:
    """Delete the checkpoints older than the last ``keep`` (0: keep all) and the temp files of writes killed
    mid-way; ``newest`` (the one just written) is always kept. The folder is synced first, so the new
    checkpoint's rename is on disk before any old one goes. Returns what was deleted."""
    folder = checkpoint_dir(out_dir)
    _sync_dir(folder)
    found = sorted((int(m.group(1)), p) for p in folder.glob("round-*.pt") if (m := _NAME.search(p.name)))
    doomed = [p for _, p in found[:-keep]] if keep > 0 else []
    doomed = [p for p in doomed if p != newest]
    doomed += [p for p in folder.iterdir() if _TEMP.match(p.name)] if keep > 0 else []
    gone = []
    for p in doomed:
        try:
            p.unlink()
            gone.append(p)
        except FileNotFoundError:
            pass
        except OSError as e:  # a checkpoint kept too many is no reason to stop a run
            log.warning("could not delete old checkpoint %s (%s)", p, e)
    return gone


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def disk_estimate(cfg: Config, model_bytes: int) -> int:
    """Bytes a run of ``cfg`` will hold on disk at most in its checkpoints and its ``model.pt``, for a model
    whose parameters and buffers take ``model_bytes`` (``sum(t.nbytes for t in params + buffers)``).

    One checkpoint holds the model, the server optimiser's state (FedAvgM: one more copy of the parameters;
    FedAdam, FedYogi, FedAdagrad: two), some 64 KiB of config and ledger, and the history of the rounds
    so far (some 1 KiB a round); the run keeps the last ``keep-checkpoints`` of them (all when it is 0)."""
    rounds = cfg.num_server_rounds
    copies = 1 + {"fedavgm": 1, "fedadam": 2, "fedyogi": 2, "fedadagrad": 2}.get(cfg.strategy, 0)
    kept = rounds if cfg.keep_checkpoints == 0 else min(cfg.keep_checkpoints, rounds)
    history = (1 << 10) * (kept * rounds - kept * (kept - 1) // 2)  # the last `kept` checkpoints' histories
    return kept * (copies * int(model_bytes) + (64 << 10)) + history + int(model_bytes)


def disk_notice(cfg: Config, model_bytes: int, threshold: int = DISK_NOTICE_BYTES) -> str | None:
    """The one line to say before a run whose checkpoints will take more than ``threshold`` bytes, else None
    (:func:`disk_estimate`)."""
    need = disk_estimate(cfg, model_bytes)
    if need <= threshold:
        return None
    rounds, keep = cfg.num_server_rounds, cfg.keep_checkpoints
    kept = (f"all {rounds} round checkpoints" if keep == 0
            else f"the last {min(keep, rounds)} of {rounds} round checkpoints")
    fix = ("set keep-checkpoints = 3 to keep only the last 3" if keep == 0 or keep > 3
           else "fewer num-server-rounds take less")
    return f"this run will take about {_size(need)} of disk in {checkpoint_dir(cfg.out_dir)} ({kept}); {fix}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint as numpy arrays: its model record's ``params``, ``buffers``, ``identity``,
    ``model_version`` and ``privacy`` at the top level beside the server's own state."""
    fix = "delete it to resume from the round before (or start a fresh out-dir)"
    try:
        rec = torch.load(Path(path), map_location="cpu", weights_only=True)
        if rec.get("format") != FORMAT:
            raise ValueError(f"format {rec.get('format')!r}, this fedhash reads format {FORMAT}")
        m = rec["model"]
        verify_record(m, path, fix)
        if "digest" in rec and _digest(rec) != rec["digest"]:
            raise IntegrityError(f"checkpoint {path}: its digest does not match what it holds; the file was changed "
                                 f"or damaged: {fix}")
        out = {k: v for k, v in rec.items() if k != "model"}
        out |= {"identity": m["identity"], "model_version": m["model_version"], "privacy": m["privacy"],
                "params": {k: v.numpy() for k, v in m["params"].items()},
                "buffers": {k: v.numpy() for k, v in m["buffers"].items()}}
    except (IntegrityError, ModelVersionError):
        raise
    except Exception as e:
        raise IntegrityError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); {fix}") from e
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
