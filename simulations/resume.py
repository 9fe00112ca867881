"""``fedhash simulate --resume RUN_DIR``: what a resume must agree with, checked before it writes anything.

A resume continues the run in RUN_DIR: the same scenario (``scenario.json``) in every key but where it runs
and how it waits (``server.checkpoint.RESUME_FREE``), and at least as many rounds as its checkpoints hold
(more extend it). A complete run resumed with the same rounds is refused: there is nothing to continue. When
the resume goes ahead, the report of the shorter run is removed first, so that the report, ``scenario.json``
and the checkpoints never describe different runs (the report is written again at the end).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hashing.config import Config
from hashing.errors import ConfigError
from server import checkpoint as ckpt

from .runs import read_status

# the files of simulations.report.write_report that state the run's rounds and figures
REPORT_FILES = ("report.md", "table.md", "summary.json", "rounds.json", "rounds.csv")
_FREE = set(ckpt.RESUME_FREE) | {"num-server-rounds", "source"}


def read_scenario(run_dir: Path) -> dict[str, Any]:
    f = run_dir / "scenario.json"
    if not f.exists():
        raise ConfigError(f"--resume {run_dir}: not a fedhash simulate run folder (no scenario.json)")
    try:
        was = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--resume {run_dir}: {f} is unreadable ({e}); start a fresh run") from e
    if not isinstance(was, dict):
        raise ConfigError(f"--resume {run_dir}: {f} holds no scenario; start a fresh run")
    return was


def check_resume_run(run_dir: Path, scenario: Mapping[str, Any], cfgs: Sequence[Config]) -> None:
    """Refuse (ConfigError/ModelVersionError, one line naming the key) a resume of ``run_dir`` by ``scenario``
    (its dict) whose federations are ``cfgs`` (their out-dirs under ``run_dir``); writes nothing."""
    was = read_scenario(run_dir)
    what = f"--resume {run_dir}"
    for key in sorted(set(was) | set(scenario)):
        if key in _FREE:
            continue
        if key not in was or key not in scenario or was[key] != scenario[key]:
            before, now = was.get(key, "(not set)"), scenario.get(key, "(not set)")
            raise ConfigError(f"{what}: the run was started with {key} = {before!r}, now {now!r}; resume with the "
                              f"run's settings ({run_dir / 'scenario.json'}; only a larger num-server-rounds may "
                              "change), or start a fresh run")
    complete = (run_dir / "report.md").exists()
    for c in cfgs:
        last = ckpt.latest_checkpoint(c.out_dir)
        if last is None:
            complete = False
            continue
        rec = ckpt.load_checkpoint(last)
        ckpt.check_same_run(rec.get("config", {}), int(rec["round"]), c, what)
        status = read_status(c.out_dir)
        complete = complete and int(rec["round"]) == c.num_server_rounds and status.get("status") == "done"
    if complete:
        n = cfgs[0].num_server_rounds
        raise ConfigError(f"{what}: the run is complete ({n} rounds); there is nothing to resume: give "
                          f"--set num-server-rounds={n + 1} or more to extend it")


def drop_stale_report(run_dir: Path) -> None:
    """The shorter run's report goes before its resume trains (it is written again when the resume ends)."""
    for name in REPORT_FILES:
        (run_dir / name).unlink(missing_ok=True)
