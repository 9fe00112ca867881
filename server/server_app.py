"""The fedhash ServerApp. Its knobs come from the run config (``[tool.flwr.app.config]``,
``flwr run --run-config``), or from a scenario when ``fedhash simulate`` builds it."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hashing.fedconfig import FedConfig

from .federation import Federation, RoundHook


def make_server_app(cfg: FedConfig | Sequence[FedConfig] | None = None, *, scenario: Mapping[str, Any] | None = None,
                    on_round: RoundHook | None = None, result: dict | None = None) -> ServerApp:
    """A ServerApp for ``cfg``; without one, the run config of the Flower run is read.

    Several configs run one after the other on the same SuperNodes (``fedhash
    simulate`` runs both CroVCA modes in one simulation); ``result`` then maps each
    config's out-dir to its outcome.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.getLogger("fedhash").setLevel(logging.INFO)
        if hasattr(grid, "pull_interval"):
            # Flower's in-memory (simulation) grid polls for replies every 0.1 s by default; a round has
            # two message phases, so that wait is a visible share of a 2 s round. The poll is a cheap lookup.
            grid.pull_interval = 0.01
        if cfg is None:
            cfgs = [FedConfig.from_dict(dict(context.run_config), source="run config")]
        else:
            cfgs = [cfg] if isinstance(cfg, FedConfig) else list(cfg)
        for c in cfgs:
            out = Federation(grid, c, scenario=scenario, on_round=on_round).run()
            if result is not None:
                result[c.out_dir] = out

    return app


app = make_server_app()
