"""What identifies a hash function, its model version, and the one model file format.

The **identity** of a hash function is everything but its weights that decides its codes: its kind,
the backbone and the fingerprint of the backbone's weights, the input size, the code length and the
head's architecture (:func:`identity`). The **model version** hashes the identity and the trainable
state (parameters and server-set buffers). Every index and every query carries it: codes of
different hash functions never meet.

**A model file** (``model.pt``; also the ``model`` entry of every federated checkpoint) is one
record, whether centralized ``fedhash train`` or a federation wrote it:

    {"format": 2, "identity": {...}, "model_version": "...", "params": {...}, "buffers": {...},
     "privacy": {...the guarantee it was trained under...}, "extra": {...provenance...}, "digest": "..."}

**Verified on read.** The model version already hashes the identity and every tensor, so
:func:`read_record` recomputes it; the ``digest`` (sha256 of a canonical JSON of every other field:
format, identity, model version, privacy, extra) then covers the rest, so an edited privacy guarantee or
provenance is refused too (:class:`~hashing.errors.IntegrityError`, naming the file). :func:`write_record`
seals every record it writes. A record written before fedhash wrote digests has none: it is read as before
(its tensors still checked against its model version), its metadata unverified.

:func:`digest` is the one checksum of nested records (dicts, lists, scalars, tensors, arrays) that the
federated checkpoints use as well (``server.checkpoint``).

:func:`load_model` reads a model file, a federated checkpoint or a federated run folder alike.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import atomic
from .errors import FedhashError, IntegrityError, ModelVersionError
from .hashers import Hasher, create_hasher

FORMAT = 2
NO_PRIVACY = {"unit": "none"}
STATE = ("params", "buffers")  # the tensors of a record: covered by its model version


def identity(hasher: Hasher, *, backbone: str, weights_id: str, size: int) -> dict[str, Any]:
    """Everything but the weights that defines ``hasher``'s codes (JSON-able; one definition for all runs)."""
    return {"kind": hasher.kind, "backbone": str(backbone), "weights_id": str(weights_id), "size": int(size),
            "bits": int(hasher.bits)} | hasher.architecture()


def model_version(state: Mapping[str, torch.Tensor], ident: Mapping[str, Any]) -> str:
    """sha256 (first 16 hex digits) over the identity (JSON, sorted) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(dict(ident), sort_keys=True, default=str).encode())
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def version_of(params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor], ident: Mapping[str, Any]) -> str:
    """The model version of a state given as (parameters, server-set buffers)."""
    return model_version(OrderedDict(list(params.items()) + list(buffers.items())), ident)


def record(params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor], ident: Mapping[str, Any], *,
           privacy: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model record of a state (see the module docstring)."""
    params = OrderedDict((k, torch.as_tensor(v)) for k, v in params.items())
    buffers = OrderedDict((k, torch.as_tensor(v)) for k, v in buffers.items())
    return {"format": FORMAT, "identity": dict(ident), "model_version": version_of(params, buffers, ident),
            "params": params, "buffers": buffers, "privacy": dict(privacy or NO_PRIVACY), "extra": dict(extra or {})}


def save_model(path: str | Path, hasher: Hasher, ident: Mapping[str, Any], *,
               privacy: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> str:
    """Write ``hasher``'s model record atomically; return its model version."""
    rec = record(*hasher.state(), ident, privacy=privacy, extra=extra)
    write_record(path, rec)
    return rec["model_version"]


def digest(obj: Any) -> str:
    """sha256 (hex) of a nested record: dicts (keys sorted), lists and tuples, tensors and numpy arrays (dtype,
    shape and bytes) and JSON scalars, each tagged with its type; the same value gives the same digest after
    ``torch.save``/``torch.load``."""
    h = hashlib.sha256(b"fedhash-digest-v1\0")
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, o: Any) -> None:
    if isinstance(o, Mapping):
        h.update(b"{%d\0" % len(o))
        for k, v in sorted(o.items(), key=lambda kv: (type(kv[0]).__name__, str(kv[0]))):
            _feed(h, k)
            _feed(h, v)
        h.update(b"}")
    elif isinstance(o, (list, tuple)):
        h.update(b"[%d\0" % len(o))
        for v in o:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(o, torch.Tensor):
        t = o.detach().cpu().contiguous()
        h.update(f"T\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif hasattr(o, "__array__") and hasattr(o, "dtype") and hasattr(o, "shape"):  # numpy arrays and scalars
        import numpy as np

        a = np.ascontiguousarray(o)
        h.update(f"A\0{a.dtype.str}\0{a.shape}\0".encode() + a.tobytes())
    else:
        h.update(f"{type(o).__name__}\0".encode() + json.dumps(o, sort_keys=True, default=str).encode() + b"\0")


def record_digest(rec: Mapping[str, Any]) -> str:
    """The digest of a model record: every field but its tensors (which its model version covers) and the digest."""
    return digest({k: v for k, v in rec.items() if k not in STATE and k != "digest"})


def seal(rec: Mapping[str, Any]) -> dict[str, Any]:
    """``rec`` with its ``digest`` (re)computed: what :func:`write_record` writes."""
    rec = {k: v for k, v in rec.items() if k != "digest"}
    return rec | {"digest": record_digest(rec)}


def write_record(path: str | Path, rec: Mapping[str, Any]) -> None:
    """Write a model record atomically, sealed with its digest."""
    buf = io.BytesIO()
    torch.save(seal(rec), buf)
    atomic.write_bytes(path, buf.getvalue())


def verify_record(rec: Mapping[str, Any], path: str | Path, fix: str = "retrain it or restore the file") -> None:
    """Refuse a model record whose tensors do not give its model version, or whose digest does not cover its
    fields (a record without a digest was written before fedhash wrote them: its fields go unverified)."""
    if version_of(rec["params"], rec["buffers"], rec["identity"]) != rec["model_version"]:
        raise ModelVersionError(f"model file {path}: its weights do not match its recorded model version "
                                f"{rec['model_version']} (corrupt or edited?); {fix}")
    if "digest" in rec and record_digest(rec) != rec["digest"]:
        raise IntegrityError(f"{path}: its digest does not match its identity, model version, privacy and "
                             f"provenance fields; the file was changed or damaged: {fix}")


def read_record(path: str | Path) -> dict[str, Any]:
    """The model record in ``path``: a model file, a federated checkpoint, or a federated run folder
    (its ``model.pt``). Its weights are checked against its model version."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model.pt").is_file():
            raise FedhashError(f"{path} holds no model.pt; pass a run folder that finished training, or its model file")
        path = path / "model.pt"
    if not path.is_file():
        raise FedhashError(f"no model at {path}; train one first (fedhash train, fedhash simulate)")
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FedhashError(f"model file {path} is unreadable or not a fedhash model ({type(e).__name__}: {e}); "
                           "retrain it") from e
    if isinstance(rec, dict) and isinstance(rec.get("model"), dict):
        rec = rec["model"]  # a federated checkpoint holds the model record of its round
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or "identity" not in rec:
        raise FedhashError(f"model file {path} is not a fedhash model of format {FORMAT} (it has "
                           f"{rec.get('format') if isinstance(rec, dict) else type(rec).__name__!r}); "
                           "retrain it with this fedhash")
    try:
        verify_record(rec, path)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:  # a field missing or of the wrong kind
        raise IntegrityError(f"{path}: its model record is incomplete or malformed ({type(e).__name__}: {e}); "
                             "retrain it or restore the file") from e
    return rec


def build(ident: Mapping[str, Any], *, weights: str | None = None) -> Hasher:
    """An empty hasher of the identity ``ident`` (the state still to be loaded). A LoRA hasher needs its
    backbone's weights: ``weights`` (the site's own file; default: the weights that ship with fedhash)."""
    kind = ident["kind"]
    opts: dict[str, Any] = {"feature_dim": ident["in_dim"], "bits": ident["bits"]}
    if kind == "dp":
        opts["dims"] = ident["dims"]
    else:
        opts["variant"] = ident["variant"]
    if kind == "lora":
        opts |= {"backbone": ident["backbone"], "weights": weights, "r": ident["lora_r"], "alpha": ident["lora_alpha"]}
    elif ident.get("variant") == "large":
        opts["hidden"] = ident["hidden"]
    hasher = create_hasher(kind, **opts)
    if kind == "lora" and getattr(hasher, "weights_id", None) != ident["weights_id"]:
        raise ModelVersionError(f"the backbone weights given ({weights or 'the bundled ones'}) are not the ones the "
                                f"model was trained on (fingerprint {ident['weights_id']}); pass that weights file")
    return hasher


def load_model(path: str | Path, *, weights: str | None = None) -> tuple[Hasher, dict[str, Any]]:
    """(hasher in eval mode, its record without the state) from a model file, checkpoint or run folder."""
    rec = read_record(path)
    hasher = build(rec["identity"], weights=weights)
    hasher.load_state(rec["params"], rec["buffers"])
    hasher.eval()
    return hasher, {k: v for k, v in rec.items() if k not in ("params", "buffers")}
