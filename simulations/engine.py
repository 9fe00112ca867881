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
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

from hashing.config import Config

log = logging.getLogger("fedhash.engine")

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
    """Poll the simulation grid for replies every ``pull-interval`` seconds (0: Flower's 0.1 s).
    Only Flower's in-memory (simulation) grid has the setting; returns whether it was set."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if cfg.pull_interval <= 0 or not isinstance(grid, InMemoryGrid) or not _flower_checked("reply poll"):
        return False
    if not isinstance(getattr(grid, "pull_interval", None), (int, float)):
        log.warning("flwr's in-memory grid has no pull_interval any more; keeping its own poll")
        return False
    grid.pull_interval = cfg.pull_interval
    return True


def start_ray(num_cpus: int) -> None:
    """Start Ray (local, no dashboard, no runtime environment) unless it runs already. The workers import
    fedhash from its installation (``pip install -e .``, as ``make setup`` does), not from a path that
    Flower's runtime environment would set. What they print is forwarded to this process's stdout and
    stderr (``simulations.console.quiet_flower`` sends it to the run's log.txt)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, num_gpus=0, include_dashboard=False, logging_level=logging.ERROR)


def stop_ray() -> None:
    """Flower's engine shuts Ray down when it ends; this covers a run that failed before it did."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
