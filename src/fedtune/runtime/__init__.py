"""Where a round's client turns run (``[runtime] backend``): in this process, or on Ray actors.

See :mod:`fedtune.runtime.base` for the interface a paradigm uses and :mod:`fedtune.runtime.ray_backend` for the
Ray pool, its fault handling and how it connects to a cluster.
"""

# Importing the implementations registers them (the Ray one imports ray only when it starts).
from fedtune.runtime import flower_backend, inprocess, ray_backend  # noqa: E402,F401
from fedtune.runtime.base import (
                                  BACKENDS,
                                  Backend,
                                  Capabilities,
                                  ClientJob,
                                  ClientLost,
                                  ClientReply,
                                  RoundReplies,
                                  make_backend,
                                  with_quorum,
)

__all__ = ["BACKENDS", "Backend", "Capabilities", "ClientJob", "ClientLost", "ClientReply", "RoundReplies",
           "make_backend", "with_quorum"]
