"""The interfaces of a split session: what crosses the cut, in which direction, sent by which side.

One table for everyone who names them: the config (which interfaces to compress), the compression channels
(one per interface) and the split paradigm's byte summary.
"""

from __future__ import annotations

from fedtune.comm.ledger import DOWN, UP

#: interface (message kind) -> (tensor field, direction, sender side)
SPLIT_INTERFACES = {
    "activations": ("hidden", UP, "client"),
    "body_output": ("hidden", DOWN, "server"),
    "tail_gradients": ("grad", UP, "client"),
    "gradients": ("grad", DOWN, "server"),
}
#: The interfaces only a U-shape split has (the body output goes back to the client's tail).
USHAPE_ONLY = ("body_output", "tail_gradients")
