"""The Flower apps. ``flwr run .`` (pyproject ``[tool.flwr.app.components]``) loads ``serverapp`` and ``clientapp``;
the simulation helpers build the same apps with ``make_server_app`` / ``make_client_app``."""

from __future__ import annotations

import os
from logging import WARNING
from typing import Callable, Dict, Optional

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from flux_engine.federated.client import make_client_app, model_config
from flux_engine.federated.config import ConfigError, RunConfig
from flux_engine.federated.state import ServerState
from flux_engine.federated.strategy import FluxStrategy
from flux_engine.fileio import remove_stale_temps

# Keys a resumed run must share with the checkpoint it resumes: they fix the shape of the global state.
_STRUCTURAL = ("preset", "checkpoint", "mode", "lora-rank", "seed")


def make_server_app(run: Optional[RunConfig] = None, on_round: Optional[Callable[[Dict], None]] = None) -> ServerApp:
    """The ServerApp; ``run`` overrides the run config Flower passes in the context; ``on_round`` receives each
    round's report."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = run or RunConfig.from_mapping(dict(context.run_config))
        # A server killed mid-checkpoint left its temp file: this one owns the folder now.
        for name in remove_stale_temps(cfg.state_dir):
            log(WARNING, "removed %s, left by a run killed while writing it", os.path.join(cfg.state_dir, name))
        state = ServerState.load(cfg.state_dir) if cfg.resume else None
        if state is not None:
            changed = [k for k in _STRUCTURAL if state.config.get(k) != cfg.to_flower()[k]]
            if changed:
                raise ConfigError(
                    f"cannot resume {cfg.state_dir}: {', '.join(changed)} differ from the checkpoint's run"
                )
            # Clients may have restarted too: the first round after a restart sends everyone the full state.
            state.last_sync.clear()
        FluxStrategy(model_config(cfg), cfg, state, on_round).start(grid, num_rounds=cfg.last_round)

    return app


serverapp = make_server_app()
clientapp = make_client_app()
