"""The fedhash ServerApp. Its knobs come from the run config (``[tool.flwr.app.config]``,
``flwr run --run-config``), or from a scenario when ``fedhash simulate`` builds it.

A run config whose ``search.codes`` is set (``fedhash search --federation``) runs no training: the
server fans those codes out to every connected silo and prints the merged answer (``server.search``)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hashing.config import Config
from hashing.errors import ConfigError
from hashing.federated import protocol as P

from .federation import Federation, RoundHook
from .search import run_search

AfterRun = Callable[[Grid, Federation], None]


def make_server_app(cfg: Config | Sequence[Config] | None = None, *, scenario: Mapping[str, Any] | None = None,
                    on_round: RoundHook | None = None, result: dict | None = None,
                    on_grid: Callable[[Grid, Config], None] | None = None,
                    after_run: AfterRun | None = None,
                    job: Callable[[Grid], Any] | None = None) -> ServerApp:
    """A ServerApp for ``cfg``; without one, the run config of the Flower run is read.

    Several configs run one after the other on the same SuperNodes (``fedhash simulate`` runs both
    CroVCA modes in one simulation); ``result`` then maps each config's out-dir to its outcome.
    ``on_grid(grid, cfg)`` is called once with the grid before the first run (``fedhash simulate``'s
    engine tweaks, ``simulations.engine``); ``after_run(grid, federation)`` after each run, on the same
    SuperNodes (``fedhash simulate``'s cross-silo evaluation). ``job(grid)`` replaces the runs (a search of a
    simulation); its return value is ``result["job"]``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.getLogger("fedhash").setLevel(logging.INFO)
        search = None
        if cfg is None and job is None:
            try:
                search, rest = P.split_search_job(dict(context.run_config))
            except ValueError as e:
                raise ConfigError(f"run config: {e}") from None
            cfgs = [Config.from_dict(rest, source="run config")]
        else:
            cfgs = [] if cfg is None else [cfg] if isinstance(cfg, Config) else list(cfg)
        if search is not None:
            run_search(grid, cfgs[0], search)
            return
        if on_grid is not None and cfgs:
            on_grid(grid, cfgs[0])
        if job is not None:
            out = job(grid)
            if result is not None:
                result["job"] = out
            return
        for c in cfgs:
            fed = Federation(grid, c, scenario=scenario, on_round=on_round, print_status=cfg is None)
            out = fed.run()
            if after_run is not None:
                after_run(grid, fed)
            if result is not None:
                result[c.out_dir] = out

    return app


app = make_server_app()
