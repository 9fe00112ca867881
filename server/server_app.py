"""The fedhash ServerApp. Its knobs come from the run config (``[tool.flwr.app.config]``,
``flwr run --run-config``), or from a scenario when ``fedhash simulate`` builds it."""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hashing.config import Config

from .federation import Federation, RoundHook


def make_server_app(cfg: Config | Sequence[Config] | None = None, *, scenario: Mapping[str, Any] | None = None,
                    on_round: RoundHook | None = None, result: dict | None = None,
                    on_grid: Callable[[Grid, Config], None] | None = None) -> ServerApp:
    """A ServerApp for ``cfg``; without one, the run config of the Flower run is read.

    Several configs run one after the other on the same SuperNodes (``fedhash simulate`` runs both
    CroVCA modes in one simulation); ``result`` then maps each config's out-dir to its outcome.
    ``on_grid(grid, cfg)`` is called once with the grid before the first run (``fedhash simulate``'s
    engine tweaks, ``simulations.engine``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.getLogger("fedhash").setLevel(logging.INFO)
        if cfg is None:
            cfgs = [Config.from_dict(dict(context.run_config), source="run config")]
        else:
            cfgs = [cfg] if isinstance(cfg, Config) else list(cfg)
        if on_grid is not None:
            on_grid(grid, cfgs[0])
        for c in cfgs:
            out = Federation(grid, c, scenario=scenario, on_round=on_round).run()
            if result is not None:
                result[c.out_dir] = out

    return app


app = make_server_app()
