"""``fedhash status``: an operator's view of a federated run while it runs, or after.

- ``fedhash status DIR``: the run's out-dir on the SuperLink's machine (or a ``fedhash simulate`` run folder):
  its ``federation.json``, which the ServerApp rewrites atomically as each phase's messages go out and
  after each round.
- ``fedhash status --federation C [--run-id N]``: through the SuperLink's Control API, from any machine with
  the connection in its Flower config: the run's log (``flwr log``), whose last ``fedhash-status:`` line is
  the same view. Without ``--run-id``, the newest run that is running (else the newest run).

It shows the run's status, the round in flight of how many and its phase, the elapsed time, each site's
last reply (round, phase, how long ago, or its failure) and the latest failures. ``--json`` prints the
view; ``--watch S`` redraws it every S seconds until the run ends.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from hashing.errors import ConfigError, FedhashError
from hashing.federated import protocol as P

from .federated_search import _flwr, _flwr_json

VIEW_KEYS = ("status", "round", "num_server_rounds", "phase", "started_at", "updated_at", "elapsed_seconds",
             "sites", "n_failures", "last_failures")


def from_folder(path: str | os.PathLike) -> dict[str, Any]:
    """The view from a run's out-dir (federation.json there, or under federated/ of a simulate run)."""
    p = Path(path)
    for cand in (p, p / "federation.json", p / "federated" / "federation.json"):
        if cand.is_file():
            try:
                rec = json.loads(cand.read_text())
            except (OSError, ValueError) as e:
                raise FedhashError(f"cannot read {cand} ({e}); is it a fedhash run's federation.json?") from None
            view = {k: rec.get(k) for k in VIEW_KEYS}
            view["rounds_done"] = len(rec.get("rounds") or [])
            if view["last_failures"] is None:  # written by a fedhash before the operator's view
                view["last_failures"] = (rec.get("failures") or [])[-5:]
                view["n_failures"] = len(rec.get("failures") or [])
            return view | {"source": str(cand)}
    raise ConfigError(f"{p} holds no federation.json; give the run's out-dir (the run config's out-dir on the "
                      "SuperLink's machine) or a fedhash simulate run folder")


def from_federation(federation: str, run_id: int | None = None, env: dict | None = None) -> dict[str, Any]:
    """The view of a run on the SuperLink ``federation`` (a connection of the Flower config)."""
    env = dict(os.environ if env is None else env)
    runs = _flwr_json(["ls", federation] + (["--run-id", str(run_id)] if run_id else []), env, timeout=60).get("runs", [])
    if not runs:
        raise FedhashError(f"no run {'with id ' + str(run_id) + ' ' if run_id else ''}on {federation}; "
                           f"flwr ls {federation} lists them")
    if run_id is None:
        running = [r for r in runs if str(r.get("status", "")).startswith("running")]
        pick = (running or runs)
        run = max(pick, key=lambda r: str(r.get("created-at", "")))
    else:
        run = runs[0]
    rid = str(run["run-id"])
    log = subprocess.run([_flwr(), "log", rid, federation, "--show"], env=env, capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    view = P.read_log_line(log.stdout + log.stderr, P.STATUS_MARK)
    base = {"run_id": int(rid), "flower_status": run.get("status"), "source": f"flwr log {rid} {federation}"}
    if view is None:
        return base | {"status": "starting" if str(run.get("status")).startswith(("pending", "starting", "running"))
                       else str(run.get("status")), "sites": {}, "last_failures": [], "n_failures": 0}
    return base | {k: view.get(k) for k in VIEW_KEYS}


def render(view: dict[str, Any], now: float | None = None) -> str:
    """The view as text for a terminal."""
    now = time.time() if now is None else now
    head = f"{view.get('source', '')}\n"
    if view.get("run_id"):
        head += f"run {view['run_id']} ({view.get('flower_status')}): "
    status = view.get("status") or "?"
    head += status
    if view.get("num_server_rounds"):
        head += f", round {view.get('round') or 0} of {view['num_server_rounds']}"
        if status == "running":
            head += f" ({view.get('phase')})"
    if view.get("elapsed_seconds") is not None:
        head += f", {view['elapsed_seconds']:.0f} s since start"
        if view.get("updated_at"):
            head += f", updated {max(0.0, now - float(view['updated_at'])):.0f} s ago"
    lines = [head]
    sites = view.get("sites") or {}
    if sites:
        lines.append(f"{'site':<20} {'node':<22} last reply")
        for node, s in sorted(sites.items(), key=lambda kv: str(kv[1].get("silo") or kv[0])):
            ago = f"{max(0.0, now - float(s['at'])):.0f} s ago" if s.get("at") else ""
            what = f"round {s.get('round')} {s.get('phase')}, {ago}"
            what += ", ok" if s.get("ok") else f", FAILED: {s.get('reason', '')}"
            lines.append(f"{str(s.get('silo') or '?'):<20} {node:<22} {what}")
    fails = view.get("last_failures") or []
    if fails:
        lines.append(f"failures: {view.get('n_failures', len(fails))} (latest {len(fails)}):")
        for f in fails:
            who = f.get("silo") or f"node {f.get('node')}"
            lines.append(f"  round {f.get('round')} {f.get('phase')}: {who}: {str(f.get('reason', ''))[:200]}")
    else:
        lines.append("failures: none")
    return "\n".join(lines)


def finished(view: dict[str, Any]) -> bool:
    return (str(view.get("status")) in ("done", "failed", "interrupted")
            or str(view.get("flower_status", "")).startswith("finished"))


def status_command(args) -> int:
    if bool(args.federation) == bool(args.dir):
        raise ConfigError("give a run's out-dir (fedhash status DIR) or a SuperLink (fedhash status --federation C)")
    while True:
        view = from_federation(args.federation, args.run_id) if args.federation else from_folder(args.dir)
        print(json.dumps(view, indent=2) if args.json else render(view), flush=True)
        if not args.watch or finished(view):
            return 1 if view.get("status") == "failed" else 0
        time.sleep(args.watch)
        if not args.json:
            print()
