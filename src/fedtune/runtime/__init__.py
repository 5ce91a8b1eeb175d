"""Where a round's client turns run (``[runtime] backend``): in this process, or on Ray actors.

See :mod:`fedtune.runtime.base` for the interface a paradigm uses and :mod:`fedtune.runtime.ray_backend` for the
Ray pool, its fault handling and how it connects to a cluster.
"""

from fedtune.runtime.base import (BACKENDS, Backend, ClientJob, ClientLost, ClientReply, RoundReplies,
                                  backend_of, make_backend)

# Importing the implementations registers them (the Ray one imports ray only when it starts).
from fedtune.runtime import inprocess, ray_backend  # noqa: E402,F401

__all__ = ["BACKENDS", "Backend", "ClientJob", "ClientLost", "ClientReply", "RoundReplies", "backend_of", "make_backend"]
