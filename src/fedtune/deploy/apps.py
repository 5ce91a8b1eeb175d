"""The ServerApp the SuperLink runs for a deployed fedtune run: fedtune's round loop, on the Flower backend.

Run config (``[tool.flwr.app.config]`` of the app, overridable with ``flwr run --run-config``):
``run-dir`` (where the run directory is written, on the coordinator's machine: metrics, summary, report, adapter,
checkpoints, as in a simulation), ``resume`` (continue that directory from its last checkpoint) and, for split
learning, the split server's ``split-host`` (listen address), ``split-advertise`` (the host clients dial, named in
the certificate) and ``certificates`` (the folder of ``ca.crt``, ``server.pem`` and ``server.key``).
"""

from __future__ import annotations

from pathlib import Path

from fedtune.config import load_config
from fedtune.deploy.client_turns import client_app as _client_app
from fedtune.engine.runner import Runner
from fedtune.runtime.flower_split import SplitSettings


def run_server(grid, config_path: Path, run_config: dict, context=None) -> dict:
    """Run the federation of ``config_path`` over ``grid`` (``context``: the ServerApp's Flower context, where
    SecAgg+ keeps its round state); returns the run's summary."""
    cfg = load_config(config_path)
    run_dir = Path(str(run_config["run-dir"])).expanduser()
    resources = {"grid": grid, "split": split_settings(run_config), "context": context}
    return Runner(cfg, run_dir, backend_resources=resources).run(resume=bool(run_config.get("resume", False)))


def split_settings(run_config: dict) -> SplitSettings | None:
    """The split server's settings from the run config (None when no certificates are given)."""
    folder = str(run_config.get("certificates", ""))
    if not folder:
        return None
    folder = Path(folder).expanduser()
    host = str(run_config.get("split-host", "127.0.0.1"))
    return SplitSettings(host, str(run_config.get("split-advertise") or host), folder / "server.pem",
                         folder / "server.key", folder / "ca.crt")


def server_app(config_path: Path):
    """The Flower ServerApp for the run configured in ``config_path``."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, Path(config_path), dict(context.run_config), context)

    return app


def client_app(config_path: Path):
    """The Flower ClientApp for the run configured in ``config_path`` (the config is read when a turn arrives)."""
    return _client_app(lambda: load_config(config_path))
