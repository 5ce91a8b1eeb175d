"""``fedtune deploy init CONFIG --out APP_DIR``: a ready Flower app (pyproject and app module) for one run config.

The app directory holds ``pyproject.toml`` (the Flower app's components and run config), ``fedtune_app/app.py``
(the ServerApp and ClientApp, which call fedtune) and ``fedtune_app/fedtune.toml`` (the run's resolved
configuration on the Flower backend). ``flwr run APP_DIR <superlink>`` ships it to the SuperLink and the SuperNodes
(as a Flower App Bundle); every machine runs it with its own installed fedtune.
"""

from __future__ import annotations

import re
from pathlib import Path

import tomli_w

from fedtune.config import RunConfig, build_config
from fedtune.core.errors import FedtuneError
from fedtune.core.files import atomic_write
from fedtune.paradigms import PARADIGMS

APP_MODULE = '''"""Flower app for the fedtune run {name!r}, written by `fedtune deploy init`."""

from pathlib import Path

from fedtune.deploy.apps import client_app, server_app

CONFIG = Path(__file__).with_name("fedtune.toml")

server = server_app(CONFIG)
client = client_app(CONFIG)
'''


def _package_name(name: str) -> str:
    return "fedtune-" + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run")


def write_app(cfg: RunConfig, out: Path, run_dir: Path, certificates: Path | None = None,
              split_host: str = "127.0.0.1") -> Path:
    """Write the Flower app for ``cfg`` into ``out``; its ServerApp writes the run directory ``run_dir``. Split
    learning's stream serves TLS with ``certificates`` (``ca.crt``, ``server.pem``, ``server.key``) on
    ``split_host``."""
    out = Path(out)
    if (out / "pyproject.toml").exists():
        raise FedtuneError(f"{out} already holds an app (pyproject.toml); choose another --out")
    data = cfg.model_dump(mode="json")
    data["runtime"] = {**data["runtime"], "backend": "flower", "progress": False}
    deployed = build_config(data)  # checks before writing that the paradigm and its settings deploy
    if PARADIGMS.get(deployed.paradigm).capabilities.split_sessions and certificates is None:
        raise FedtuneError("a deployed split run needs the split server's TLS files: give --certificates DIR "
                           "(ca.crt, server.pem, server.key; `fedtune deploy credentials` makes laboratory ones)")
    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": _package_name(cfg.name), "version": "1.0.0", "license": "Apache-2.0",
                    "description": f"fedtune run {cfg.name!r} ({cfg.paradigm}) as a Flower app",
                    "dependencies": ["fedtune"]},
        "tool": {"hatch": {"build": {"targets": {"wheel": {"packages": ["fedtune_app"]}}}},
                 "flwr": {"app": {"publisher": "fedtune",
                                  "components": {"serverapp": "fedtune_app.app:server",
                                                 "clientapp": "fedtune_app.app:client"},
                                  "config": {"run-dir": str(Path(run_dir).expanduser().resolve()),
                                             "resume": False,
                                             "certificates": str(Path(certificates).expanduser().resolve())
                                             if certificates else "",
                                             "split-host": split_host, "split-advertise": split_host}}}},
    }
    package = out / "fedtune_app"
    package.mkdir(parents=True, exist_ok=True)
    atomic_write(package / "__init__.py", b"")
    atomic_write(package / "app.py", APP_MODULE.format(name=cfg.name).encode())
    atomic_write(package / "fedtune.toml", deployed.to_toml().encode())
    atomic_write(out / "pyproject.toml", tomli_w.dumps(pyproject).encode())
    return out
