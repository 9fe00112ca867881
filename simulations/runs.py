"""Run folders: ``runs/<YYYYmmdd-HHMMSS>-<name>/``, one per ``fedhash train``, ``simulate`` or sweep."""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from hashing.config import Config
from hashing.errors import FedhashError


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", Path(s).name if "/" in s else s).strip("-")[:24] or "data"


def new_run_dir(root: str | Path, name: str) -> Path:
    """A fresh folder ``root/<YYYYmmdd-HHMMSS>-<name>`` (suffixed -1, -2, ... when taken)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        d = Path(root) / (f"{stamp}-{name}" if i == 0 else f"{stamp}-{name}-{i}")
        try:
            d.mkdir(parents=True)
            return d
        except FileExistsError:
            continue
    raise FedhashError(f"cannot create a run folder under {root}")


def read_status(out_dir: str | Path) -> dict:
    """A federated out-dir's federation.json, or {} when it is missing or half-written."""
    try:
        return json.loads((Path(out_dir) / "federation.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def read_run(run: Path) -> dict:
    """A ``fedhash train`` run folder's config.json."""
    f = run / "config.json"
    if not f.exists():
        raise FedhashError(f"{run} is not a fedhash run folder (no config.json); pass --run runs/<id> from fedhash train")
    try:
        rc = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise FedhashError(f"{f} is not valid JSON ({e}); re-run fedhash train") from e
    if not isinstance(rc, dict) or not isinstance(rc.get("config"), dict):
        raise FedhashError(f"{f} holds no 'config' section; was it written by another fedhash version? re-run fedhash train")
    return rc


def run_config(run: Path, rc: dict) -> Config:
    return Config.from_dict(rc["config"], source=str(run / "config.json"))
