"""The ServerApp the SuperLink runs for a deployed fedtune run: fedtune's round loop, on the Flower backend.

Run config (``[tool.flwr.app.config]`` of the app, overridable with ``flwr run --run-config``):
``run-dir`` (where the run directory is written, on the coordinator's machine: metrics, summary, report, adapter,
checkpoints, as in a simulation) and ``resume`` (continue that directory from its last checkpoint).
"""

from __future__ import annotations

from pathlib import Path

from fedtune.config import load_config
from fedtune.deploy.client_turns import client_app as _client_app
from fedtune.engine.runner import Runner


def run_server(grid, config_path: Path, run_config: dict) -> dict:
    """Run the federation of ``config_path`` over ``grid``; returns the run's summary."""
    cfg = load_config(config_path)
    run_dir = Path(str(run_config["run-dir"])).expanduser()
    return Runner(cfg, run_dir, backend_resources={"grid": grid}).run(resume=bool(run_config.get("resume", False)))


def server_app(config_path: Path):
    """The Flower ServerApp for the run configured in ``config_path``."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, Path(config_path), dict(context.run_config))

    return app


def client_app(config_path: Path):
    """The Flower ClientApp for the run configured in ``config_path`` (the config is read when a turn arrives)."""
    return _client_app(lambda: load_config(config_path))
