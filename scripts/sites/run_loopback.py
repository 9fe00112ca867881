#!/usr/bin/env python3
"""Real fedhash sites (two or more) on this machine's loopback, with TLS and SuperNode authentication.

    python scripts/sites/run_loopback.py WORK_DIR --site site-a=/data/a --site site-b=/data/b \
        [--run-config "num-server-rounds=2 bits=16 ..."] [--timeout 1200] [--no-intruder]

What it does, with the commands a real deployment types (see README, "Running across sites"):

1. `make_certs.py`: a test CA, a SuperLink certificate for 127.0.0.1/localhost, one ECDSA P-384 key
   pair per site and one for an "intruder" that is never registered.
2. `fedhash-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
   --enable-supernode-auth --disable-runtime-dependency-installation --host 127.0.0.1 --port P` (one
   HTTPS port serves the Fleet, Control and Runtime APIs in Flower 1.41 and 1.42).
3. `flwr supernode register keys/<site>.pub sites` for each site: the connection `sites` lives in
   `$FLWR_HOME/config.toml` (address 127.0.0.1:P, root-certificates ca.crt).
4. `fedhash-supernode --superlink 127.0.0.1:P --root-certificates ca.crt --auth-supernode-private-key
   keys/<site> --port Q --node-config 'data="..." silo="<site>" out-dir="<WORK>/sites/<site>"'`.
5. The intruder: the same command with the unregistered key. The SuperLink answers its ActivateNode
   with HTTP 412 / API error 2004 ("No SuperNode found with the given public key"), and the SuperNode
   logs "Exit Code: 305" (SUPERNODE_CONNECTION_ERROR) with "[code: 2004] Failed to activate SuperNode."
   and exits with status 1 (Flower maps every error code to process status 1).
6. `flwr run <app> sites --run-config "..." --format json`, then `flwr ls sites --run-id ID --format
   json` until the run is finished, and `flwr log ID sites --show` into `logs/run.log`.
   With `--search IMAGE`: the first site's index encodes the image and a second Flower run fans its
   code out to every site (`fedhash search --federation sites`); the merged answer is in the summary.
7. Stops every process it started, by PID, and every process those started (SuperExec, ServerApp,
   ClientApp): SIGTERM, then SIGKILL after a grace period; on success, on failure, on Ctrl-C
   (try/finally, atexit, SIGTERM handler).

The summary (JSON, also `WORK_DIR/summary.json`) names the run id and status, the sites' out-dirs,
the server's out-dir, how the intruder was refused and every PID started, with those still alive
after the stop (none, or it is a bug). Exit code 0 when the run completed and the intruder was
refused.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import make_certs  # noqa: E402

from hashing.federated.processes import Tree, flower_env  # noqa: E402
from hashing.federated.processes import alive as _alive  # noqa: E402
from hashing.federated.processes import proc_stat as _proc_stat  # noqa: E402

CONNECTION = "sites"
REFUSAL_EXIT_CODE = 305  # flwr.supercore.exit.ExitCode.SUPERNODE_CONNECTION_ERROR, logged as "Exit Code: 305"
REFUSAL_SUPERNODE_LINE = "Failed to activate SuperNode"
REFUSAL_SUPERLINK_LINE = "No SuperNode found with the given public key"


# ---------------------------------------------------------------- processes


@dataclass
class Procs:
    """Every process this script starts (or adopts), and their descendants; stopped by PID only
    (:class:`hashing.federated.processes.Tree`), each with a name for the summary."""

    log_dir: Path
    env: dict
    started: dict = field(default_factory=dict)  # name -> Popen
    tree: Tree = field(default_factory=Tree)
    names: dict = field(default_factory=dict)  # pid -> name ("superlink", "superlink/child", ...)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:  # a restarted process appends
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=self.env, cwd=self.log_dir, start_new_session=True)
        self.started[name] = p
        self.tree.add(p)
        self.names[p.pid] = name
        return p

    def adopt(self, pid: int, name: str) -> None:
        """Take charge of a process this script caused to start (e.g. the SuperLink `flwr run` leaves)."""
        if pid not in self.tree.known:
            self.tree.add(pid)
            self.names[pid] = name

    @property
    def known(self) -> dict:
        """pid -> (name, start time) of every process seen."""
        return {pid: (self.names.get(pid, "?"), start) for pid, start in self.tree.known.items()}

    def track_descendants(self) -> None:
        """Remember the live descendants of every known process (SuperExec, ServerApp, ClientApp, Ray...)."""
        before = set(self.tree.known)
        self.tree.track()
        for pid in sorted(set(self.tree.known) - before):
            st = _proc_stat(pid)
            self.names[pid] = f"{self.names.get(st[1], '?') if st else '?'}/child"

    def stop(self, grace: float = 10.0) -> list[int]:
        """SIGTERM the roots, then every descendant; SIGKILL what outlives `grace`. Returns pids still alive."""
        self.track_descendants()
        return self.tree.stop(grace)


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(flwr_home: Path, base: dict | None = None) -> dict:
    """The environment every Flower process here runs in: own FLWR_HOME, no telemetry, no installs."""
    env = flower_env(base)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def write_connection(flwr_home: Path, name: str, address: str, ca_cert: Path) -> None:
    """A SuperLink connection in Flower's config file ($FLWR_HOME/config.toml)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca_cert}"\n'
    )


def flwr(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def flwr_json(env: dict, *args: str, timeout: float = 120) -> dict:
    r = flwr(env, *args, "--format", "json", timeout=timeout)
    out = r.stdout
    try:
        return json.loads(out[out.index("{"):])
    except ValueError:
        raise RuntimeError(f"flwr {' '.join(args)} (rc {r.returncode}): {out}\n{r.stderr}") from None


def wait_https(port: int, ca_cert: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=ctx, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"flower-superlink not serving on 127.0.0.1:{port} after {timeout:.0f} s")


def node_config(data: str, silo: str, out_dir: Path, cache_dir: str | None = None, extra: str = "") -> str:
    cfg = f'data="{data}" silo="{silo}" out-dir="{out_dir}"'
    return (cfg + (f' cache-dir="{cache_dir}"' if cache_dir else "") + (f" {extra}" if extra else "")).strip()


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""


# ---------------------------------------------------------------- the federation


@contextlib.contextmanager
def guarded(procs: "Procs", summary: dict, work: Path, grace: float,
            before_stop: Callable[[], None] | None = None) -> Iterator[float]:
    """Run the body, then stop every process ``procs`` started (also at interpreter exit, and
    only once), record an exception and the seconds in ``summary`` and write work/summary.json.
    Yields the start time (time.monotonic())."""
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            if before_stop is not None:
                before_stop()
            summary["alive_after_stop"] = procs.stop(grace)
            summary["pids"] = {str(pid): name for pid, (name, _) in procs.known.items()}

    atexit.register(stop)
    t0 = time.monotonic()
    try:
        yield t0
    except Exception as e:  # noqa: BLE001 — reported in the summary, processes stopped below
        summary["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        stop()
        atexit.unregister(stop)
        summary["seconds"] = round(time.monotonic() - t0, 1)
        (work / "summary.json").write_text(json.dumps(summary, indent=2))


@dataclass
class Chaos:
    """What a ``chaos`` hook of :func:`run_loopback` may touch."""

    procs: "Procs"
    summary: dict
    env: dict
    server_out: Path
    start_site: Callable[[str], subprocess.Popen]
    start_superlink: Callable[[], subprocess.Popen]
    down: set = field(default_factory=set)  # sites killed on purpose (not an error while down)
    state: dict = field(default_factory=dict)  # the hook's own memory

    def view(self) -> dict:
        """The run's federation.json as the server last wrote it ({} before the first write)."""
        try:
            return json.loads((self.server_out / "federation.json").read_text())
        except (OSError, ValueError):
            return {}

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a process this script started (``supernode-<site>``, ``superlink``), and, when it dies, its
        children follow (the launchers' children die with them)."""
        p = self.procs.started[name]
        self.procs.track_descendants()
        os.kill(p.pid, sig)
        p.wait(timeout=30)


def run_loopback(work: Path, sites: dict[str, str], run_config: str = "", app: Path = REPO,
                 timeout: float = 1200.0, intruder: bool = True, cache_dir: str | None = None,
                 env: dict | None = None, grace: float = 10.0, search: list[str] | None = None,
                 search_k: int = 10, search_repeat: int = 1, node_extra: dict[str, str] | None = None,
                 chaos: Callable[["Chaos"], str | None] | None = None,
                 supernode_args: list[str] | None = None, superlink_database: bool = True) -> dict:
    """Start a SuperLink, register and start one SuperNode per site, run the app, stop everything.

    `sites` maps a silo name to its data (a folder of class_name/*.png, a CSV manifest, or
    "fashion-mnist"). Each site's out-dir is `work/sites/<name>`; the server's is `work/server`
    (appended to `run_config` as `out-dir`). With `search` (query image files), the first site then
    searches every site by code (`fedhash search --federation`'s Python door, a second Flower run):
    the answer is `summary["search"]`. ``chaos(ctx)`` (tests of sites that come and go) is called every
    second while the run is in flight; it may kill and restart sites and the SuperLink through ``ctx``
    (:class:`Chaos`), and returns "resume" after restarting the SuperLink: a new run then continues the
    old one with ``resume=true``. ``superlink_database=False`` runs the SuperLink on Flower's in-memory state
    (no ``--database``: faster rounds, but a restarted SuperLink has forgotten the registrations). Returns the
    summary (see the module docstring).
    """
    work = Path(work).resolve()
    logs, home = work / "logs", work / "flwr-home"
    logs.mkdir(parents=True, exist_ok=True)
    env = flwr_env(home, env)
    procs = Procs(logs, env)
    summary: dict = {"work": str(work), "sites": {}, "server_out_dir": str(work / "server"), "ok": False}

    with guarded(procs, summary, work, grace):
        creds = make_certs.make_all(work / "certs", ["127.0.0.1", "localhost"], [*sites, "intruder"])
        port = free_port()
        address = f"127.0.0.1:{port}"
        write_connection(home, CONNECTION, address, creds["ca_cert"])

        def start_superlink() -> subprocess.Popen:
            p = procs.start("superlink", [
                "fedhash-superlink",
                "--ssl-ca-certfile", str(creds["ca_cert"]),
                "--ssl-certfile", str(creds["server_cert"]),
                "--ssl-keyfile", str(creds["server_key"]),
                "--enable-supernode-auth",
                "--host", "127.0.0.1", "--port", str(port),
                *(["--database", str(home / "superlink-state.db")] if superlink_database else []),
            ])
            wait_https(port, creds["ca_cert"], p)
            summary["superlink"] = {"address": address, "pid": p.pid}
            return p

        start_superlink()
        for name in sites:
            res = flwr_json(env, "supernode", "register", str(creds["nodes"][name][1]), CONNECTION, "--name", name)
            if not res.get("success"):
                raise RuntimeError(f"registering {name} failed: {res}")
            summary["sites"][name] = {"node_id": str(res["node-id"])}

        def start_site(name: str) -> subprocess.Popen:
            data = sites[name]
            out = work / "sites" / name
            out.mkdir(parents=True, exist_ok=True)
            p = procs.start(f"supernode-{name}", [
                "fedhash-supernode",
                "--superlink", address,
                "--root-certificates", str(creds["ca_cert"]),
                "--auth-supernode-private-key", str(creds["nodes"][name][0]),
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", node_config(data, name, out, cache_dir, (node_extra or {}).get(name, "")),
                *(supernode_args or []),
            ])
            summary["sites"][name].update({"pid": p.pid, "data": data, "out_dir": str(out)})
            return p

        for name in sites:
            start_site(name)

        if intruder:
            p = procs.start("supernode-intruder", [
                "fedhash-supernode",
                "--superlink", address,
                "--root-certificates", str(creds["ca_cert"]),
                "--auth-supernode-private-key", str(creds["nodes"]["intruder"][0]),
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--max-retries", "2", "--max-wait-time", "30", "--rejoin-wait", "0",
                "--node-config", node_config(next(iter(sites.values())), "intruder", work / "sites" / "intruder"),
            ])
            summary["intruder"] = {"pid": p.pid}

        # Both registered SuperNodes online
        deadline = time.monotonic() + 90
        while True:
            nodes = flwr_json(env, "supernode", "ls", CONNECTION)["nodes"]
            online = {str(n["node-id"]) for n in nodes if n["status"] == "online"}
            if all(s["node_id"] in online for s in summary["sites"].values()):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"SuperNodes not online after 90 s: {nodes}")
            for name in sites:
                if procs.started[f"supernode-{name}"].poll() is not None:
                    raise RuntimeError(f"supernode {name} exited: {_tail(logs / f'supernode-{name}.log')}")
            time.sleep(1)

        if intruder:
            p = procs.started["supernode-intruder"]
            try:
                p.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
            procs.track_descendants()
            log = (logs / "supernode-intruder.log").read_text(errors="replace")
            link_log = (logs / "superlink.log").read_text(errors="replace")
            nodes = flwr_json(env, "supernode", "ls", CONNECTION)["nodes"]
            flower_code = next((int(m[1]) for m in re.finditer(r"Exit Code: (\d+)", log)), None)
            summary["intruder"].update({
                "exit_status": p.returncode,  # the process's status: 1 for every Flower error exit
                "flower_exit_code": flower_code,  # Flower's own code, from the log line "Exit Code: N"
                "supernode_log_line": next((ln.strip() for ln in log.splitlines() if REFUSAL_SUPERNODE_LINE in ln), None),
                "superlink_log_line": next((ln.strip() for ln in link_log.splitlines() if REFUSAL_SUPERLINK_LINE in ln), None),
                "nodes_known_to_superlink": len(nodes),
            })
            summary["intruder"]["refused"] = (
                p.returncode not in (None, 0) and flower_code == REFUSAL_EXIT_CODE
                and summary["intruder"]["supernode_log_line"] is not None
                and len(nodes) == len(sites))

        cfg = f"{run_config} out-dir=\"{work / 'server'}\"".strip()
        summary["run_config"] = cfg
        ctx = Chaos(procs=procs, summary=summary, env=env, server_out=work / "server", start_site=start_site,
                    start_superlink=start_superlink)
        summary["run_ids"] = []
        t_run = time.monotonic()
        status, resume = "pending", False
        while True:
            res = flwr_json(env, "run", str(app), CONNECTION, "--run-config", cfg + (" resume=true" if resume else ""))
            if not res.get("success"):
                raise RuntimeError(f"flwr run failed: {res}")
            run_id = int(res["run-id"])
            summary["run_id"] = run_id
            summary["run_ids"].append(run_id)
            status, resume = "pending", False
            while not status.startswith("finished"):
                if time.monotonic() - t_run > timeout:
                    flwr(env, "stop", str(run_id), CONNECTION)
                    raise RuntimeError(f"run {run_id} not finished after {timeout:.0f} s (status {status})")
                procs.track_descendants()
                time.sleep(1 if chaos else 3)
                if chaos is not None and chaos(ctx) == "resume":  # the SuperLink was restarted: a new run resumes
                    resume = True
                    break
                runs = flwr_json(env, "ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
                status = runs[0]["status"] if runs else status
                for name in sites:
                    if name not in ctx.down and procs.started[f"supernode-{name}"].poll() is not None:
                        raise RuntimeError(f"supernode {name} exited during the run: "
                                           f"{_tail(logs / f'supernode-{name}.log')}")
            if not resume:
                break
        summary["run_status"] = status
        summary["run_seconds"] = round(time.monotonic() - t_run, 1)
        try:
            r = flwr(env, "log", str(run_id), CONNECTION, "--show", timeout=60)
            (logs / "run.log").write_text(r.stdout + r.stderr)
        except subprocess.TimeoutExpired:
            pass
        st = subprocess.run([sys.executable, "-m", "simulations.cli", "status", "--federation", CONNECTION, "--run-id",
                             str(run_id), "--json"], env=env, capture_output=True, text=True, timeout=120)
        try:  # the operator's view through the SuperLink (fedhash status --federation)
            summary["status_view"] = json.loads(st.stdout)
        except ValueError:
            summary["status_view"] = {"error": (st.stdout + st.stderr)[-500:]}
        summary["ok"] = status == "finished:completed" and (not intruder or summary["intruder"]["refused"])
        if search and summary["ok"]:
            summary["search"] = search_sites(work, summary, search, search_k, search_repeat, app, env)
            procs.track_descendants()
            summary["ok"] = bool(summary["search"]["answered"])
    return summary


def search_sites(work: Path, summary: dict, images: list[str], k: int, repeat: int, app: Path, env: dict) -> dict:
    """The first site searches every site by code: its own index's model encodes `images` here, the codes go
    to the SuperLink as a Flower run, the merged answer comes back through `flwr log`."""
    from simulations import federated_search as F

    first = next(iter(summary["sites"].values()))
    folder = next(Path(first["out_dir"]).rglob("catalogue.sqlite")).parent
    enc = F.query_encoder(folder)
    codes = F.encode_queries(enc, images)
    t0 = time.monotonic()
    answer = F.search_deployment(CONNECTION, codes, k, enc.version, app=app, env=env, repeat=repeat, timeout=60)
    answer["wall_seconds"] = round(time.monotonic() - t0, 2)
    answer["index"] = str(folder)
    return answer


# ---------------------------------------------------------------- `flwr run .` on a local simulation


def local_superlink_pids(flwr_home: Path) -> list[int]:
    """The background `flower-superlink` that `flwr run` starts for FLWR_HOME=flwr_home, found by its log file.

    `flwr run . local` (connection address ":local:") starts `flower-superlink --insecure --simulation
    ... --log-file $FLWR_HOME/local-superlink/superlink.log` detached, and leaves it running.
    """
    marker = str(Path(flwr_home).resolve() / "local-superlink" / "superlink.log")
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"flower-superlink") for a in argv[:2]) and marker.encode() in argv \
                    and _alive(int(d)):
                pids.append(int(d))
    return pids


def run_local_simulation(work: Path, run_config: str = "", app: Path = REPO, num_supernodes: int = 2,
                         timeout: float = 1200.0, env: dict | None = None, grace: float = 10.0) -> dict:
    """`flwr run <app> local` as a user types it, on a simulation, then stop the SuperLink it left behind.

    Flower's home (`work/flwr-home`) and the local SuperLink's ports are this call's own
    (FLWR_LOCAL_SUPERLINK_HTTP_API_PORT / FLWR_LOCAL_CONTROL_API_PORT), so a SuperLink started by
    someone else on the default port 39091 is neither used nor stopped. The server's out-dir is
    `work/server`, appended to `run_config`.
    """
    work = Path(work).resolve()
    home, logs = work / "flwr-home", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    env = flwr_env(home, env)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    procs = Procs(logs, env)
    summary: dict = {"work": str(work), "server_out_dir": str(work / "server"), "ok": False}
    cfg = f"{run_config} out-dir=\"{work / 'server'}\"".strip()
    summary["run_config"] = cfg

    def adopt() -> None:
        for pid in local_superlink_pids(home):
            procs.adopt(pid, "local-superlink")
        procs.track_descendants()

    with guarded(procs, summary, work, grace, before_stop=adopt) as t0:
        for attempt in range(2):  # flwr gives the SuperLink 15 s to start: not always enough on a busy machine
            r = flwr(env, "run", str(app), "local", "--run-config", cfg,
                     "--federation-config", f"num-supernodes={num_supernodes}", "--format", "json", timeout=180)
            adopt()
            out = r.stdout
            if "{" in out and json.loads(out[out.index("{"):]).get("success"):
                res = json.loads(out[out.index("{"):])
                break
            if attempt == 1 or "Failed to start local SuperLink" not in out + r.stderr:
                raise RuntimeError(f"flwr run (rc {r.returncode}): {out}\n{r.stderr}")
            procs.stop(grace)
        run_id = int(res["run-id"])
        summary["run_id"] = run_id
        summary["superlink_pids"] = local_superlink_pids(home)
        status = "pending"
        while not status.startswith("finished"):
            if time.monotonic() - t0 > timeout:
                flwr(env, "stop", str(run_id), "local")
                raise RuntimeError(f"run {run_id} not finished after {timeout:.0f} s (status {status})")
            adopt()
            time.sleep(3)
            runs = flwr_json(env, "ls", "local", "--run-id", str(run_id)).get("runs", [])
            status = runs[0]["status"] if runs else status
        summary["run_status"] = status
        try:
            r = flwr(env, "log", str(run_id), "local", "--show", timeout=60)
            (logs / "run.log").write_text(r.stdout + r.stderr)
        except subprocess.TimeoutExpired:
            pass
        summary["ok"] = status == "finished:completed"
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("work", type=Path, help="working folder: certs, Flower home, logs, site and server out-dirs")
    p.add_argument("--site", action="append", metavar="NAME=DATA", default=[],
                   help="a site and its data: a folder of class_name/*.png|jpg, a CSV manifest, or fashion-mnist "
                        "(repeat; two or more; ignored with --local)")
    p.add_argument("--run-config", default="num-server-rounds=2", help="passed to `flwr run --run-config`")
    p.add_argument("--app", type=Path, default=REPO, help="the Flower app folder (default: this repository)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds the run may take")
    p.add_argument("--cache-dir", help="the sites' feature cache (node config cache-dir)")
    p.add_argument("--no-intruder", action="store_true", help="skip the unregistered-SuperNode check")
    p.add_argument("--search", action="append", metavar="IMAGE", default=[],
                   help="after training, the first site searches every site with this image, by code (repeat)")
    p.add_argument("--search-k", type=int, default=10, help="hits per query of --search")
    p.add_argument("--search-repeat", type=int, default=1,
                   help="fan the --search batch out this many times in its run (latency measurements)")
    p.add_argument("--local", type=int, metavar="N", help="instead: `flwr run <app> local` on a local simulation "
                   "of N SuperNodes, then stop the SuperLink it leaves behind (--site is ignored)")
    args = p.parse_args(argv)
    if not args.local and (len(args.site) < 2 or not all("=" in s for s in args.site)):
        p.error("give two or more --site NAME=DATA (or --local N for a simulation)")
    sites = dict(s.split("=", 1) for s in args.site)

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        if args.local:
            summary = run_local_simulation(args.work, args.run_config, args.app, args.local, args.timeout)
        else:
            summary = run_loopback(args.work, sites, args.run_config, args.app, args.timeout,
                                   intruder=not args.no_intruder, cache_dir=args.cache_dir, search=args.search,
                                   search_k=args.search_k, search_repeat=args.search_repeat)
    except Exception as e:  # noqa: BLE001
        print(f"run_loopback: {e}\nlogs: {args.work / 'logs'}", file=sys.stderr)
        summary = json.loads((args.work / "summary.json").read_text())
    print(json.dumps(summary, indent=2))
    return 0 if summary.get("ok") and not summary.get("alive_after_stop") else 1


if __name__ == "__main__":
    sys.exit(main())
