"""End of a split round: every block's LoRA weights averaged over the versions trained in that round.

A client-side block is averaged over the clients that held it (their uploads), a server-side block over the
server's copies: SplitFed-V2 has one shared copy, weighted by the samples of the clients it served; V1 one copy
per client. Every block's weights live in the one global state, so a block whose owner changes (adaptive cuts)
takes its weights with it.
"""

from __future__ import annotations

from fedtune.federated.strategies import weighted_average
from fedtune.split.protocol import TensorDict


def aggregate_blocks(global_state: TensorDict, key_block: dict[str, int], client_states: dict[int, TensorDict],
                     body_states: dict[int, TensorDict], weights: dict[int, float],
                     shared_body: TensorDict | None) -> TensorDict:
    """The new global state. ``client_states[c]``: client c's uploaded blocks; ``body_states[c]``: the server's body
    after c's session (V1); ``shared_body``: the shared server copy at the end of the round (V2), else None."""
    out = dict(global_state)
    for key in key_block:
        versions, server_weight = [], 0.0
        for c, state in client_states.items():
            if key in state:
                versions.append((state[key], weights[c]))
            elif shared_body is None:
                versions.append((body_states[c][key], weights[c]))
            else:
                server_weight += weights[c]
        if shared_body is not None and server_weight > 0:
            versions.append((shared_body[key], server_weight))
        if versions:
            out[key] = weighted_average(versions)
    return out
