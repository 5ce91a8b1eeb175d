"""Driving one split session over a pair of endpoints: relay each step's messages, count the compute of each side.

The driver holds no model: it runs wherever the round loop runs and only hands messages from one endpoint to the
other (:mod:`fedtune.split.protocol`), so the same loop drives in-process, Ray and deployed sessions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedtune.models.flops import ModelCost, train_flops
from fedtune.split.cut import Cut
from fedtune.split.protocol import ClientEndpoint, ServerEndpoint, StepInfo, failed


@dataclass
class SessionSteps:
    """What a session's steps did: the losses, each side's training FLOPs, and why it stopped early if it did."""

    losses: list[float] = field(default_factory=list)
    client_flops: int = 0
    server_flops: int = 0
    failure: str | None = None

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def step_flops(cost: ModelCost, cut: Cut, num_layers: int, info: StepInfo) -> tuple[int, int]:
    """(client, server) training FLOPs of one step: each side charged its own blocks (and whichever has the head)."""
    tokens, seq, L = info["tokens"], info["seq"], num_layers
    client = train_flops(cost, tokens, seq, blocks=range(cut.head), head=False)
    if cut.tail:
        client += train_flops(cost, tokens, seq, blocks=range(L - cut.tail, L), head=True)
    server = train_flops(cost, tokens, seq, blocks=cut.body(L), head=not cut.tail)
    return client, server


def _exchange(client: ClientEndpoint, server: ServerEndpoint, cut: Cut) -> tuple[StepInfo, float, str | None]:
    """One step's messages, up and down: (step info, loss, failure reason or None)."""
    up, info = client.forward()
    if not cut.tail:
        down, loss = server.step(up, info)
    else:
        tail_grads, loss = client.tail(server.forward(up, info))
        if failed(tail_grads):
            return info, loss, failed(tail_grads)
        down = server.backward(tail_grads)
    if failed(down):
        return info, loss, failed(down)
    return info, loss, failed(client.backward(down))


def drive_session(client: ClientEndpoint, server: ServerEndpoint, *, steps: int, cut: Cut, num_layers: int,
                  cost: ModelCost, on_step=None) -> SessionSteps:
    """Run ``steps`` steps between the endpoints; a step failure aborts both ends and ends the session."""
    out = SessionSteps()
    for _ in range(steps):
        info, loss, failure = _exchange(client, server, cut)
        if failure:
            out.failure = f"{failure} at step {len(out.losses) + 1}"
            client.abort()
            server.abort()
            break
        out.losses.append(loss)
        if on_step is not None:
            on_step(loss)
        flops = step_flops(cost, cut, num_layers, info)
        out.client_flops += flops[0]
        out.server_flops += flops[1]
    return out
