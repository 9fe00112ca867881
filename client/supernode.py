"""``fedhash-supernode``: a hospital's SuperNode. It takes every ``flower-supernode`` option and runs
Flower's SuperNode with three differences, each because a site must be fast and trust only itself:

- **One warm ClientApp process.** Flower 1.42's SuperNode starts a SuperExec that starts a fresh
  ``flwr-clientapp`` process for every message: it imports torch (2-4 s), reloads the silo, and runs the
  code of the app the *server* uploaded (the FAB). Here the SuperNode runs in Flower's ``process``
  isolation mode and this process is its executor: it claims each task from the SuperNode's Runtime API
  (signed with a fresh per-start secret, ``--superexec-auth-secret-file``) and runs this site's own
  installed fedhash ClientApp in-process, so imports, the silo's images and features, the model templates
  and open indexes stay warm across messages and runs. A run of another app, or of another fedhash
  version, is refused.
- **Short polls.** Flower's SuperNode asks the SuperLink for work every 3 s and its reply every 0.5 s; here
  both every ``--poll-interval`` seconds (default 0.2), so a message costs its compute plus the network.
  The tweak is guarded: where Flower's module has changed, the SuperNode runs as Flower ships it.
- **Clean stops.** SIGTERM or Ctrl-C stops the SuperNode and every process it started within a few
  seconds (SIGTERM, then SIGKILL after ``--grace``), by PID.

It also puts its own ``bin`` folder first on ``PATH`` and sets
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``, so the command works as printed from a shell where the
venv is not activated.

    .venv/bin/fedhash-supernode --superlink fedhash.example.org:9093 --root-certificates ca.crt \\
        --auth-supernode-private-key hospital-a --node-config 'data="/data" silo="hospital-a" out-dir="/srv/fh"'
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from hashing.federated.processes import Tree, die_with_parent, flower_env

log = logging.getLogger("fedhash.supernode")

FLOWER_FLAG = "--flower-supernode"  # internal: this module runs Flower's SuperNode (with the poll tweak)
FAB_ID = "fedhash/fedhash"  # [tool.flwr.app] publisher / [project] name
_AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})
_STOPPING = threading.Event()  # set by SIGTERM / SIGINT


class Stop(BaseException):
    """Raised in the main thread by SIGTERM or SIGINT: abandon the message in flight and stop."""


# --------------------------------------------------------------------------- Flower's SuperNode, polled faster


class _Clock:
    """``time`` as Flower's SuperNode loop sees it: every sleep capped at the poll interval."""

    def __init__(self, cap: float):
        self.cap = cap

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def quick_object_pulls(poll: float, max_time: float | None = None) -> None:
    """Flower pulls a message's objects with a back-off that starts at 1 s and doubles to 10 s while an object
    is still on its way (a floor of 1-3 s under every message); here it starts at a tenth of ``poll`` and
    stops at ``poll``, for up to ``max_time`` seconds (Flower: 2 hours). Guarded: an unknown Flower is left as it
    is."""
    try:
        from flwr.supercore.inflatable import inflatable_utils as iu
    except ImportError:
        return
    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        kw = getattr(fn, "__kwdefaults__", None) or {}
        if {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= set(kw):
            kw.update(initial_backoff=poll / 10, backoff_cap=poll, max_tries_per_object=None)
            if max_time is not None:
                kw["max_time"] = max_time


def run_flower_supernode(argv: list[str], poll: float, heartbeat: float) -> None:
    """Flower's ``flower-supernode`` main, its idle polls capped at ``poll`` seconds and its heartbeat every
    ``heartbeat`` seconds (Flower: 30; the SuperLink takes a node for gone after two), when Flower's modules
    still look as fedhash knows them (flwr 1.41, 1.42)."""
    try:
        from flwr.supercore import heartbeat as hb
        from flwr.supernode import fleet_http_connection as fhc
        from flwr.supernode import start_client_internal as sci
        if getattr(sci, "time", None) is time:
            sci.time = _Clock(poll)
        else:
            logging.getLogger("fedhash.supernode").warning(
                "flwr's SuperNode loop has changed; it polls at Flower's own interval")
        if isinstance(getattr(fhc, "HEARTBEAT_DEFAULT_INTERVAL", None), int) and \
                isinstance(getattr(hb, "HEARTBEAT_DEFAULT_INTERVAL", None), int):
            fhc.HEARTBEAT_DEFAULT_INTERVAL = hb.HEARTBEAT_DEFAULT_INTERVAL = heartbeat
    except ImportError:
        pass
    quick_object_pulls(poll)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


# --------------------------------------------------------------------------- the warm executor


def _runtime_client(address: str, interceptors: list, *, max_tries: int | None = None, max_time: float = 60.0):
    """A client of the SuperNode's Runtime API whose retries end (Flower's own retry for ever)."""
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    retry = make_simple_http_retry_invoker()
    retry.max_tries, retry.max_time = max_tries, max_time
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors, retry_invoker=retry)


def run_task(address: str, token: str) -> str:
    """One ClientApp task in this process, as ``flwr-clientapp`` runs it, with this site's installed app in
    place of the FAB's code. Returns the task's final status."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from . import client_app, site

    client = _runtime_client(address, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                                       RuntimeTokenHttpInterceptor(token)])
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        t0 = time.perf_counter()
        message, context, run, _fab = pull_task_input(client)
        check_app(run.fab_id, run.fab_version)
        t1 = time.perf_counter()
        reply = client_app.app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
        log.info("run %s: %s message handled in %.2f s (pulled in %.2f s)", run.run_id,
                 message.metadata.message_type, time.perf_counter() - t1, t1 - t0)
    except Exception as ex:  # noqa: BLE001 — the server gets the error, this site's log the traceback
        log.error("ClientApp raised an exception", exc_info=ex)
        details = f"{type(ex)}:<'{site.site_error_text(str(ex), None if context is None else context.node_config)}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        if not _STOPPING.is_set():  # stopping: the SuperNode is going too, and the server counts a timeout
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001
                log.error("could not push the reply to the SuperNode", exc_info=ex)
            push_task_output(client, context, status, details)
        heartbeat.stop()
        client.close()
    return status


def check_app(fab_id: str, fab_version: str) -> None:
    """A site runs only fedhash, and only the version it installed."""
    from importlib.metadata import version

    from hashing.errors import ConfigError

    mine = version("fedhash")
    if fab_id != FAB_ID:
        raise ConfigError(f"this site runs only the fedhash app, not {fab_id!r}; ask the operator to run fedhash")
    if fab_version != mine:
        raise ConfigError(f"the run is fedhash {fab_version}, this site has fedhash {mine} installed; every site and "
                          "the operator must install the same version")


def serve_tasks(address: str, secret: bytes, stop: threading.Event, poll: float,
                alive=lambda: True, pull_timeout: float = 300.0) -> None:
    """Claim ClientApp tasks from the SuperNode's Runtime API and run each in this process, until ``stop``."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor

    _warm_imports()
    # A message whose objects never reach the SuperNode (the SuperLink died mid-transfer) would hold this one
    # process for Flower's 2 hours; after pull_timeout its task fails and the next message is served.
    quick_object_pulls(poll, max_time=pull_timeout)
    client = _runtime_client(address, [RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                                       SuperExecAuthHttpInterceptor(master_secret=secret,
                                                                    protected_methods=_AUTH_METHODS)],
                             max_tries=1)  # this loop is the retry: it also watches the SuperNode's process
    try:
        while not stop.is_set() and alive():
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            except Exception as ex:  # noqa: BLE001 — the SuperNode is starting or stopping
                log.debug("AcquireTask: %s", ex)
                stop.wait(max(poll, 1.0))
                continue
            if res.HasField("task") and res.token:
                run_task(address, res.token)
                continue
            stop.wait(poll)
    finally:
        client.close()


def _warm_imports() -> None:
    """Import the ClientApp (torch, timm, faiss, Flower) once, before the first message."""
    from . import client_app  # noqa: F401


# --------------------------------------------------------------------------- the command


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="fedhash-supernode", add_help=False)
    p.add_argument("--poll-interval", type=float, default=0.2)
    p.add_argument("--grace", type=float, default=5.0)
    p.add_argument("--heartbeat-interval", type=float, default=10.0)
    p.add_argument("--rejoin-wait", type=float, default=120.0)
    p.add_argument("--task-pull-timeout", type=float, default=300.0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9094)
    p.add_argument("--isolation")
    p.add_argument("--superexec-auth-secret-file")
    p.add_argument("-h", "--help", action="store_true")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [FLOWER_FLAG]:
        run_flower_supernode(argv[3:], float(argv[1]), float(argv[2]))
        return 0
    own, flower_args = _parse(argv)
    if own.help:
        print(__doc__)
        print("fedhash's own options: --poll-interval S (default 0.2), --grace S (default 5), --heartbeat-interval S "
              "(default 10, Flower's least), --rejoin-wait S (default 120), --task-pull-timeout S (default 300: how "
              "long a message's objects may take to reach the SuperNode); every other option is flower-supernode's "
              "(flower-supernode --help)")
        return 0
    if own.isolation or own.superexec_auth_secret_file:
        print("fedhash-supernode: --isolation and --superexec-auth-secret-file are set by fedhash-supernode itself "
              "(it is the SuperNode's executor); drop them", file=sys.stderr)
        return 2
    if own.poll_interval <= 0 or own.grace < 0 or not 10 <= own.heartbeat_interval <= 1800 or own.rejoin_wait < 0:
        print("fedhash-supernode: --poll-interval must be > 0, --grace and --rejoin-wait >= 0, --heartbeat-interval "
              "between 10 and 1800 (Flower's bounds)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "faiss.loader"):  # a line per poll, a line per CPU feature probed
        logging.getLogger(noisy).setLevel(logging.WARNING)

    fd, secret_path = tempfile.mkstemp(prefix="fedhash-superexec-")
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    tree = Tree()
    stop = _STOPPING

    def on_signal(signum, _frame):
        if not stop.is_set():
            stop.set()
            raise Stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cmd = [sys.executable, "-m", "client.supernode", FLOWER_FLAG, str(own.poll_interval), str(own.heartbeat_interval),
           *flower_args, "--isolation", "process", "--superexec-auth-secret-file", secret_path,
           "--host", own.host, "--port", str(own.port)]
    watcher = threading.Thread(target=_watch, args=(tree, stop), daemon=True)
    watcher.start()
    host = "127.0.0.1" if own.host in ("0.0.0.0", "") else own.host
    deadline = time.monotonic() + own.rejoin_wait
    node = None
    try:
        while True:
            node, refused, echo = _start_node(cmd)
            tree.add(node)
            serve_tasks(f"{host}:{own.port}", secret, stop, own.poll_interval, alive=lambda: node.poll() is None,
                        pull_timeout=own.task_pull_timeout)
            node.wait()
            echo.join(timeout=5)
            if not (refused.is_set() and time.monotonic() < deadline):
                break
            log.warning("the SuperLink refused this SuperNode: its key is not registered (flwr supernode register), or "
                        "its previous session is still open there (it closes two heartbeats after the site went "
                        "away); trying again in 5 s, for --rejoin-wait=%.0f s in all", own.rejoin_wait)
            stop.wait(5.0)
    except Stop:
        log.info("stopping: the SuperNode and every process it started")
    finally:
        by_signal = stop.is_set()
        stop.set()
        left = tree.stop(own.grace)
        Path(secret_path).unlink(missing_ok=True)
        if left:
            log.error("processes still alive after the stop: %s", left)
    if by_signal:
        return 0
    return node.returncode if node is not None and node.returncode is not None else 1


# What Flower's SuperNode prints when the SuperLink refuses it: its key is not registered, or (a site killed and
# restarted) its previous session is still online there until two heartbeats have passed; the two read the same
REFUSED_ACTIVATION = b"Failed to activate SuperNode"


def _start_node(cmd: list[str]) -> tuple[subprocess.Popen, threading.Event, threading.Thread]:
    """Start Flower's SuperNode; its output goes on to ours, watched for a refused activation."""
    node = subprocess.Popen(cmd, env=flower_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    refused = threading.Event()

    def echo() -> None:
        out = sys.stdout.buffer
        for line in node.stdout:
            out.write(line)
            out.flush()
            if REFUSED_ACTIVATION in line:
                refused.set()

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    return node, refused, t


def _watch(tree: Tree, stop: threading.Event) -> None:
    """Keep the process tree's membership current, so a stop reaches processes re-parented to init."""
    while not stop.wait(1.0):
        tree.track()


if __name__ == "__main__":
    sys.exit(main())
