"""Every tweak fedhash makes to Flower's simulation engine, in one place. ``fedhash simulate`` uses them;
``flwr run`` and real sites use none. Each is guarded (the Flower versions it was checked against and
the signature or attribute it relies on: otherwise a warning and Flower's own behaviour) and the two
loops can each be switched off with a config key set to 0.

* **The message feeder** (``feed-interval``, default 10 ms; Flower: 0.1 s). Flower's engine moves new
  messages from its LinkState to the simulated silos in ``vce_api.add_messages_to_queue``, a loop that
  sleeps 0.1 s between passes, so every phase of a round waited 0-0.1 s before any silo started
  (BENCHMARKS.md, "With the 10 ms message feeder"). Flower has no setting for it; fedhash installs
  the same loop with a shorter pause.
* **The reply poll** (``pull-interval``, default 10 ms; Flower: 0.1 s). The simulation's in-memory grid
  polls for replies every ``pull_interval`` seconds, an argument of its constructor that
  ``run_simulation`` does not expose; fedhash sets the attribute on the grid it is handed.
* **Ray** is started by fedhash (Ray's public ``ray.init``) before Flower's engine, which then uses it
  as it is: Flower's own start passes a runtime environment, which makes Ray set up every worker
  through its agent (about 1.2 s more before the simulated silos start).
* **Stops** (Ctrl-C, SIGTERM). Flower runs the ServerApp in a thread of its own and the simulated silos
  in Ray actors; a signal lands in the main thread only. Flower's engine then shuts Ray down, but its
  ServerApp thread went on waiting for replies (up to round-timeout, 600 s) and the engine's worker
  threads waited forever in ``ray.get`` on actors still busy, so the process never exited. Here a
  signal during a simulation also sets a stop flag: the grid the ServerApp talks through raises
  ``server.federation.Interrupted`` at its next call (the federation writes ``"status": "interrupted"``
  with its last complete round), the busy actors are killed before Flower's shutdown of Ray, and
  ``stop_ray`` waits a few seconds for the ServerApp thread.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from hashing.config import Config

log = logging.getLogger("fedhash.engine")

STOP_GRACE = 10.0  # seconds stop_ray waits for the ServerApp thread to write its last status

CHECKED = ("1.41.0", "1.42.0")  # Flower versions whose engine these tweaks were read against
_FEEDER_SIGNATURE = ["state", "queue", "nodes_mapping", "f_stop"]


def _flower_checked(what: str) -> bool:
    import flwr

    if flwr.__version__ not in CHECKED:
        log.warning("flwr %s is not one of the versions fedhash's %s was checked against (%s); using Flower's own",
                    flwr.__version__, what, ", ".join(CHECKED))
        return False
    return True


def fast_feeder(interval: float) -> bool:
    """Hand new messages to the simulated silos every ``interval`` seconds (0: leave Flower's loop).

    Returns whether fedhash's loop is in place. Calling it again replaces fedhash's loop, never wraps it."""
    from flwr.server.superlink.fleet.vce import vce_api

    flowers = getattr(vce_api, "flwr_add_messages_to_queue", vce_api.add_messages_to_queue)
    if interval <= 0 or not _flower_checked("message feeder"):
        vce_api.add_messages_to_queue = flowers
        return False
    if list(inspect.signature(flowers).parameters) != _FEEDER_SIGNATURE:
        log.warning("flwr's simulation feeder changed (%s); keeping its 0.1 s poll", inspect.signature(flowers))
        return False

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
        while not f_stop.is_set():
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(interval)

    vce_api.flwr_add_messages_to_queue = flowers  # type: ignore[attr-defined]
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True


def tune_grid(grid: Any, cfg: Config) -> bool:
    """The ServerApp's grid (``on_grid``, called in the ServerApp's thread): it stops the run when a stop
    was asked for (``stoppable``), and it polls for replies every ``pull-interval`` seconds (0: Flower's
    0.1 s). Only Flower's in-memory (simulation) grid has the setting; returns whether it was set."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    stoppable(grid)
    if cfg.pull_interval <= 0 or not isinstance(grid, InMemoryGrid) or not _flower_checked("reply poll"):
        return False
    if not isinstance(getattr(grid, "pull_interval", None), (int, float)):
        log.warning("flwr's in-memory grid has no pull_interval any more; keeping its own poll")
        return False
    grid.pull_interval = cfg.pull_interval
    return True


# ------------------------------------------------------------------------------------------ stops

_stop = threading.Event()  # set by a signal during a simulation, or by stop_ray while the ServerApp still runs
_why: list[str] = []  # what stopped it, for the federation's status
_server: list[threading.Thread] = []  # the ServerApp's thread (tune_grid records it)
_handlers: dict[int, Any] = {}  # the signal handlers start_ray replaced, which stop_ray puts back
_GRID_CALLS = ("get_node_ids", "get_nodes", "push_messages", "pull_messages", "send_and_receive")


def request_stop(why: str) -> None:
    """Ask the running simulation to stop: the ServerApp raises ``Interrupted`` at its next grid call."""
    if not _stop.is_set():
        _why.append(why)
        _stop.set()


def stoppable(grid: Any) -> Any:
    """Make every call of ``grid`` raise ``server.federation.Interrupted`` once a stop is asked for, so that
    the ServerApp's thread stops within one reply poll. Records the calling thread as the ServerApp's."""
    from server.federation import Interrupted

    _server[:] = [threading.current_thread()]
    for name in _GRID_CALLS:
        call = getattr(grid, name, None)
        if call is None or getattr(call, "_fedhash_stoppable", False):
            continue

        def checked(*args, _call=call, **kwargs):
            if _stop.is_set():
                raise Interrupted(_why[0] if _why else "stopped")
            return _call(*args, **kwargs)

        checked._fedhash_stoppable = True  # type: ignore[attr-defined]
        setattr(grid, name, checked)
    return grid


def _on_signal(previous: Any):
    """A signal handler for the length of a simulation: the first signal asks the ServerApp to stop and then
    does what the handler before it did (a KeyboardInterrupt in the main thread: the CLI's, or Python's
    for Ctrl-C; SIGTERM without a handler of its own is made one too); a second one, while the run winds
    down (a few seconds), is ignored."""

    def handler(signum, frame):
        if _stop.is_set():
            return
        request_stop(f"stopped by {signal.Signals(signum).name}")
        if callable(previous):
            previous(signum, frame)
        raise KeyboardInterrupt

    return handler


def _install_handlers(before: dict[int, Any]) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, previous in before.items():
        if previous in (signal.SIG_IGN, None):  # ignored on purpose (nohup, a background job), or not Python's
            continue
        _handlers.setdefault(sig, previous)
        signal.signal(sig, _on_signal(previous))


def _terminate_kills_busy_actors() -> None:
    """Flower's ``RayBackend.terminate`` ends the idle actors only; a run stopped mid-round leaves the engine's
    worker threads in ``ray.get`` on busy ones, after Ray is gone: forever. fedhash kills the busy actors first
    and waits (at most 5 s) for their replies to fail, so that those threads end. Guarded like the rest."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    cls = raybackend.RayBackend
    flowers = getattr(cls, "flwr_terminate", cls.terminate)
    if not _flower_checked("stop of busy actors"):
        cls.terminate = flowers
        return

    def terminate(self) -> None:
        import ray

        busy = dict(getattr(getattr(self, "pool", None), "_future_to_actor", None) or {})
        if busy and ray.is_initialized():
            for actor in busy.values():
                try:
                    ray.kill(actor, no_restart=True)
                except Exception as e:  # noqa: BLE001 - an actor that is gone already
                    log.debug("ray.kill: %s", e)
            ray.wait(list(busy), num_returns=len(busy), timeout=5.0)
        flowers(self)

    cls.flwr_terminate = flowers  # type: ignore[attr-defined]
    cls.terminate = terminate


cluster: dict[str, Any] = {}  # what the last start_ray ran on: address ("" = started here), nodes, cpus


def start_ray(num_cpus: int, address: str = "") -> dict[str, Any]:
    """Start Ray (local, no dashboard, no runtime environment) unless it runs already, or with ``address``
    (config ``ray-address``) connect to a running cluster instead (``ray start --head`` on one machine,
    ``ray start --address=HEAD:PORT`` on the others). The workers import fedhash from its installation
    (``pip install -e .``, as ``make setup`` does), not from a path that Flower's runtime environment would
    set: every node of a cluster runs the same fedhash and reads the same feature cache folder. What they
    print is forwarded to this process's stdout and stderr (``simulations.console.quiet_flower`` sends it to
    the run's log.txt). Flower's engine sizes its actor pool from every node's CPUs. Returns (and keeps in
    :data:`cluster`) the address, the number of nodes and their CPUs.

    A signal (SIGINT, SIGTERM) from now until ``stop_ray`` stops the simulation cleanly (``_on_signal``);
    Ray's own SIGTERM handlers, which end the process at once, are replaced. ``stop_ray`` disconnects from a
    cluster and leaves it running: whoever started it stops it."""
    import ray

    _stop.clear()
    _why.clear()
    _server.clear()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _terminate_kills_busy_actors()
    address = (address or "").strip()
    if not ray.is_initialized():
        if address:
            _reachable(address)
            try:
                ray.init(address=address, logging_level=logging.ERROR)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise _no_cluster(address, (str(e).strip().splitlines() or [type(e).__name__])[0][:160]) from e
        else:
            ray.init(num_cpus=num_cpus, num_gpus=0, include_dashboard=False, logging_level=logging.ERROR)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
    cluster.clear()
    cluster.update(address=address, nodes=len(nodes), cpus=int(sum(n["Resources"].get("CPU", 0) for n in nodes)))
    _install_handlers(before)
    return dict(cluster)


def _no_cluster(address: str, why: str) -> Exception:
    from hashing.errors import ConfigError

    return ConfigError(f"config: ray-address = {address!r}: no Ray cluster answers there ({why}); start one with "
                       "`ray start --head`, or set ray-address = \"\" to run Ray here")


def _reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to a cluster's ``host:port`` (Ray itself retries an absent head for minutes);
    "auto" and Ray Client's ``ray://`` addresses are left to Ray."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise _no_cluster(address, str(e.strerror or e)) from None


def for_cluster(cfg: Config) -> Config:
    """``cfg`` as the simulated silos of a Ray cluster need it (``ray-address`` set): a cluster's workers run
    where ``ray start`` put them, so the run's folders are absolute and the feature cache is one named folder
    (``cache-dir``, else this machine's default); ``cfg`` itself without a cluster."""
    if not cfg.ray_address:
        return cfg
    from hashing.cache import default_cache_dir

    return dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir).resolve()),
                               cache_dir=str(Path(cfg.cache_dir).resolve() if cfg.cache_dir else default_cache_dir()))


def probe_cluster(address: str) -> dict[str, Any]:
    """Connect to the Ray cluster at ``address`` and disconnect: a wrong ``ray-address`` fails in seconds,
    before any feature is extracted. Returns :data:`cluster`."""
    import ray

    if ray.is_initialized():
        return dict(cluster)
    try:
        return start_ray(1, address)
    finally:
        stop_ray()


def stop_ray() -> None:
    """The end of a simulation, however it ended: a ServerApp thread still running is told to stop and given
    ``STOP_GRACE`` seconds to write its status; Ray is shut down (Flower's engine does it when it ends, this
    covers a run that failed before it did); the signal handlers are put back."""
    import ray

    try:
        server = [t for t in _server if t.is_alive() and t is not threading.current_thread()]
        if server:
            request_stop("the simulation engine stopped")
            server[0].join(STOP_GRACE)
            if server[0].is_alive():
                log.warning("the ServerApp did not stop within %.0f s", STOP_GRACE)
        if ray.is_initialized():
            ray.shutdown()
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, previous in _handlers.items():
                signal.signal(sig, previous)
        _handlers.clear()
