"""Connecting to Ray: a private single-machine instance on loopback, or an existing cluster (token auth).

``runtime.address`` empty starts a private single-machine Ray instance on 127.0.0.1 (shut down when the run ends);
``"auto"`` or ``"HOST:PORT"`` joins an existing cluster (left running). ``runtime.auth_token_path`` turns on Ray's
token authentication with that token file (else Ray's own settings apply: ``RAY_AUTH_MODE``,
``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fedtune.core.errors import ConfigError, FedtuneError

LOOPBACK = "127.0.0.1"
#: Environment variables a worker inherits from the driver when they are set there.
FORWARDED_ENV = ("FEDTUNE_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextmanager
def single_machine() -> Iterator[None]:
    """Keep a private Ray instance on loopback while it starts.

    Ray resolves "127.0.0.1" to the machine's outward address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its
    single-machine mode), which it reads when ``ray`` is first imported: set it for Ray's own processes (they
    inherit the environment) and for this process (the constant, if ray was imported already), then restore both.
    """
    key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    saved_env = os.environ.get(key)
    os.environ[key] = "0"
    constants, saved = None, None
    try:
        from ray._private import ray_constants as constants

        saved = constants.ENABLE_RAY_CLUSTER
        constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # a Ray without the switch: the environment variable still applies
        constants = None
    try:
        yield
    finally:
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved_env


def connect(rt) -> bool:
    """Initialise Ray for ``rt`` (a RuntimeConfig) unless it already is; returns whether this call started it."""
    if rt.auth_token_path:
        path = Path(rt.auth_token_path).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"runtime.auth_token_path: no token file at {path}")
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
        os.environ.pop("RAY_AUTH_TOKEN", None)
    import ray

    if ray.is_initialized():
        return False
    if rt.auth_token_path:
        try:  # Ray caches the auth mode when it is imported; re-read it as Ray itself does when it enables tokens
            from ray._raylet import Config

            Config.initialize("")
        except Exception:  # noqa: BLE001 - older/newer Ray without this hook: the environment still applies
            pass
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": rt.progress,
                              "configure_logging": True, "logging_level": "warning"}
    try:
        if rt.address:
            ray.init(address=rt.address, **kwargs)
        else:
            with single_machine():
                ray.init(_node_ip_address=LOOPBACK, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {rt.address!r}" if rt.address else "a local Ray instance"
        raise FedtuneError(f"cannot connect to {where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. ray.exceptions.AuthenticationError
        if type(exc).__name__ == "AuthenticationError":
            raise FedtuneError(f"Ray refused the connection (token authentication): {exc}. Set "
                               "runtime.auth_token_path to the cluster's token file") from None
        raise
    return True
